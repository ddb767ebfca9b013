"""Apply a plan: check it, cut the model into this rank's stages, and make them tensor-parallel.

Everything here is rank-local and deterministic, so a bad plan or a shape that does not
divide is a ValueError on every rank before any communication. Parameters are read from a
:class:`~plait.parallel.shard.TensorSource` (the model's own tensors, or a checkpoint on
disk for a model built on the meta device), one TP slice at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import fnmatch

import torch
from torch import nn

from ..comm import Communicator
from ..config import ModelShape, ParallelConfig, vocab_rows
from ..heads import HeadLayout, heads_for
from ..tp import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .modules import ReplicatedRowsColumn, VocabParallelHead
from .plan import Plan
from .shard import ShardSpec, block, padded_block

LINEAR_STYLES = ("colwise", "colwise_q", "colwise_kv", "colwise_qkv", "rowwise", "vocab_head")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer storing its weight as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.nx, module.nf
    raise TypeError(type(module).__name__)


@dataclass(frozen=True)
class ModelDims:
    """What the shard layouts need to know about the model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelDims":
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"{type(model).__name__} has no .config with its dimensions (num_attention_heads, "
                             f"num_key_value_heads, hidden_size, vocab_size); plans need them")
        heads = getattr(config, "num_attention_heads")
        hidden = getattr(config, "hidden_size")
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(heads, kv, head_dim, getattr(config, "vocab_size"), hidden)


def ffn_hidden(config) -> Optional[int]:
    """The MLP's inner width named by a model config (transformers' or plait's GPTConfig), None if unnamed."""
    for attr in ("intermediate_size", "ffn_hidden", "n_inner"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if getattr(config, "model_type", None) == "gpt2":
        return 4 * getattr(config, "hidden_size")   # transformers' GPT-2: n_inner None means 4 * n_embd
    return None


def model_shape(model: nn.Module, plan: Plan) -> ModelShape:
    """The dimensions of ``model`` that :meth:`ParallelConfig.check_model` judges a layout by. The sequence
    length is left out: it is each input's, and the TP layers check it under sequence parallelism."""
    dims = ModelDims.of(model)
    return ModelShape(num_layers=len(model.get_submodule(plan.layers)), num_heads=dims.num_heads,
                      num_kv_heads=dims.num_kv_heads, ffn_hidden=ffn_hidden(model.config), vocab_size=dims.vocab_size)


def output_rows(style: str, out_features: int, dims: ModelDims, tp: int, rank: int, what: str
                ) -> tuple[list[int], bool]:
    """(rows of the output features this rank keeps, whether rows are held more than once) for a column style."""
    if style == "colwise":
        return block(out_features, tp, rank, f"{what}: out_features"), False
    heads = heads_for(dims, tp, rank)
    if style == "colwise_q":
        return heads.rows(heads.q_heads), False
    if style == "colwise_kv":
        return heads.rows(heads.kv_heads), heads.replicated_kv or len(set(heads.kv_heads)) < len(heads.kv_heads)
    if style == "colwise_qkv":
        part = out_features // 3
        if part * 3 != out_features or part != dims.num_heads * dims.head_dim:
            raise ValueError(f"{what}: colwise_qkv needs out_features = 3 x heads x head_dim = "
                             f"{3 * dims.num_heads * dims.head_dim}, got {out_features}")
        q = heads.rows(heads.q_heads)
        return q + [part + i for i in q] + [2 * part + i for i in q], False
    if style == "vocab_head":
        return padded_block(out_features, tp, rank), False
    raise ValueError(style)


def param_specs(module_name: str, module: nn.Module, style: str, dims: ModelDims, tp: int, rank: int
                ) -> dict[str, ShardSpec]:
    """Shard specs of the parameters of one module under ``style`` (names relative to the model)."""
    prefix = f"{module_name}." if module_name else ""
    if style == "vocab_embed":
        index = tuple(padded_block(module.num_embeddings, tp, rank))
        return {"weight": ShardSpec(f"{prefix}weight", 0, index)}
    if style not in LINEAR_STYLES:
        return {}
    conv = _is_conv1d(module)
    in_features, out_features = linear_dims(module)
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    specs = {}
    if style == "rowwise":
        specs["weight"] = ShardSpec(f"{prefix}weight", in_dim, tuple(block(in_features, tp, rank,
                                                                             f"{module_name}: in_features")),
                                    transpose=conv)
        if getattr(module, "bias", None) is not None:
            specs["bias"] = ShardSpec(f"{prefix}bias")
        return specs
    rows, replicated = output_rows(style, out_features, dims, tp, rank, module_name)
    specs["weight"] = ShardSpec(f"{prefix}weight", out_dim, tuple(rows), transpose=conv, replicated=replicated)
    if getattr(module, "bias", None) is not None:
        specs["bias"] = ShardSpec(f"{prefix}bias", 0, tuple(rows), replicated=replicated)
    return specs


def check_plan(model: nn.Module, plan: Plan, tp: int) -> dict[str, str]:
    """Match the plan against ``model``; returns {module name: style}. ValueError (naming the module,
    the dimension and the fix) for a pattern matching nothing, an unsupported module type, or a
    split that does not divide. Rank-local: call it on every rank before any communication."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    matched: dict[str, str] = {}
    hits = {pattern: 0 for pattern in plan.styles}
    for name, module in model.named_modules():
        style = plan.style_of(name)
        if style is None:
            continue
        for pattern in plan.styles:
            if fnmatch.fnmatchcase(name, pattern):
                hits[pattern] += 1
                break
        matched[name] = style
    unused = [p for p, n in hits.items() if n == 0]
    if unused:
        raise ValueError(f"plan {plan.name!r}: patterns {unused} match no module of {type(model).__name__}; "
                         f"fix the plan (module names look like {next(iter(dict(model.named_modules())), '')!r}, "
                         f"print(model) lists them)")
    for path in (plan.embed, plan.layers, plan.norm, plan.head, plan.positions, plan.rotary):
        if path:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"plan {plan.name!r}: {type(model).__name__} has no module {path!r}") from None
    dims = ModelDims.of(model)
    ParallelConfig(tp=tp).check_model(model_shape(model, plan))   # the one verdict on heads, FFN, vocabulary
    for name, style in matched.items():
        module = model.get_submodule(name)
        if style in LINEAR_STYLES and not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise ValueError(f"plan {plan.name!r}: {name} is a {type(module).__name__}, but style {style!r} needs "
                             f"an nn.Linear (or transformers' Conv1D); change its style or the pattern")
        if style == "vocab_embed" and not isinstance(module, nn.Embedding):
            raise ValueError(f"plan {plan.name!r}: {name} is a {type(module).__name__}, but vocab_embed needs an "
                             f"nn.Embedding")
        for rank in range(tp):
            param_specs(name, module, style, dims, tp, rank)   # a module the verdict's dimensions do not cover
    return matched


def set_local_heads(attention: nn.Module, heads: HeadLayout) -> None:
    """Give an attention module this rank's head counts (whichever of these attributes it has)."""
    local_q, local_kv = len(heads.q_heads), len(heads.kv_heads)
    updates = {"num_heads": local_q, "num_attention_heads": local_q, "num_key_value_heads": local_kv,
               "num_key_value_groups": local_q // local_kv, "split_size": local_q * heads.head_dim,
               "hidden_size": local_q * heads.head_dim}
    for attr, value in updates.items():
        if hasattr(attention, attr) and isinstance(getattr(attention, attr), int):
            setattr(attention, attr, value)
    # which query heads of the whole model these are (layout-invariant attention dropout keys by them)
    attention.plait_head_offset, attention.plait_num_heads = heads.q_heads.start, heads.num_heads


def _load(source, spec: ShardSpec, dtype: Optional[torch.dtype], device) -> torch.Tensor:
    tensor = source.read(spec)
    if spec.transpose:
        tensor = tensor.t()
    return tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()


def _set_param(module: nn.Module, name: str, value: torch.Tensor, split_dim: Optional[int]) -> None:
    param = nn.Parameter(value, requires_grad=True)
    if split_dim is not None:
        param.tp_split_dim = split_dim
    setattr(module, name, param)


@dataclass
class Rewriter:
    """Replaces the styled modules of one stage by TP modules holding their loaded shards."""

    comm: Communicator
    dims: ModelDims
    source: object
    dtype: Optional[torch.dtype]
    device: torch.device
    overlap: str = "auto"
    sequence_parallel: bool = False

    def build(self, name: str, module: nn.Module, style: str) -> nn.Module:
        tp, rank = self.comm.size, self.comm.rank
        by_rank = [param_specs(name, module, style, self.dims, tp, r) for r in range(tp)]
        specs = by_rank[rank]
        sp = self.sequence_parallel
        # check_ranks=False: parallelize checks once, for the whole model, that the ranks agree
        kw = dict(group=self.comm, dtype=self.dtype or _dtype_of(module), device="meta", overlap=self.overlap,
                  sequence_parallel=sp, check_ranks=False)
        if style == "vocab_embed":
            per, padded, _ = vocab_rows(module.num_embeddings, tp, rank)
            new = VocabParallelEmbedding(padded, module.embedding_dim, self.comm, padding_idx=module.padding_idx,
                                         sequence_parallel=sp, dtype=kw["dtype"], device="meta", check_ranks=False)
            new.num_embeddings = module.num_embeddings   # ids past the real vocabulary are rejected
            split = {"weight": 0}
        elif style == "rowwise":
            in_features, out_features = linear_dims(module)
            new = RowParallelLinear(in_features, out_features, bias="bias" in specs, **kw)
            split = {"weight": 1, "bias": None}
        else:
            in_features, out_features = linear_dims(module)
            rows = len(specs["weight"].index)
            if style == "vocab_head":
                new = VocabParallelHead(in_features, rows * tp, bias="bias" in specs, **kw)
                _, _, valid = vocab_rows(out_features, tp, rank)
                new.setup_vocab(out_features, valid)
            elif specs["weight"].replicated:
                new = ReplicatedRowsColumn(in_features, rows * tp, bias="bias" in specs, **kw)
                new.setup_rows(list(specs["weight"].index), out_features)
            else:
                new = ColumnParallelLinear(in_features, rows * tp, bias="bias" in specs, **kw)
            split = {"weight": 0, "bias": 0}
        for param_name, spec in specs.items():
            value = _load(self.source, spec, self.dtype or _dtype_of(module), self.device)
            even = not spec.replicated and style in ("colwise", "colwise_q", "rowwise", "vocab_embed", "vocab_head")
            _set_param(new, param_name, value, split[param_name] if even else None)
        new.plait_specs_by_rank = by_rank   # every rank's rows: gathering and saving need them
        return new


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.get_default_dtype()
