"""``plait.parallelize``: a plain model in, this rank's parallel stages of it out.

    mesh = plait.init_mesh(dp=1, pp=2, tp=2)
    model = plait.parallelize(hf_model, mesh)          # plan: plait.plans.for_model(hf_model)
    logits = model.logits(input_ids)                   # [batch, seq, vocab] on every rank
    engine = model.pipeline("1f1b", num_microbatches=4)
    loss = engine.train_step(ids, targets)

The model is consumed: its submodules move into the stages and its TP modules are
replaced, so pass a copy to keep the original. Parameter names stay the model's own
(``model.layers.3.mlp.up_proj.weight``) on every rank and layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..config import ParallelConfig, vocab_rows
from ..pp.engine import eval_mode
from ..tp import vocab_parallel_cross_entropy
from .apply import ModelDims, Rewriter, check_plan, heads_for, model_shape, set_local_heads
from .dropout import DropoutScope, dropout_scope
from .families import check_config, family
from .plan import Plan
from .shard import ShardSpec, StateDictSource
from .stage import DecoderStage, build_stages


def resolve_plan(model: nn.Module, plan: Union[Plan, dict, str, None]) -> Plan:
    """A Plan from a Plan, a dict, JSON text, or None (the shipped plan for the model's architecture)."""
    if plan is None:
        from .families import for_model

        return for_model(model)
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, str):
        return Plan.from_json(plan)
    raise ValueError(f"plan must be a plait Plan, a dict, JSON text or None, got {type(plan).__name__}")


def _config_for(mesh, config: Optional[ParallelConfig], sequence_parallel: bool, overlap: str) -> ParallelConfig:
    if config is None:
        base = getattr(mesh, "config", None) or ParallelConfig(dp=mesh.dp, pp=mesh.pp, tp=mesh.tp)
        changes = {k: v for k, v in (("sequence_parallel", sequence_parallel), ("overlap", overlap))
                   if v != getattr(ParallelConfig, k)}   # explicit arguments win over the mesh's config
        return dataclasses.replace(base, **changes)
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"config must be a plait.ParallelConfig, got {type(config).__name__}")
    if (config.dp, config.pp, config.tp) != (mesh.dp, mesh.pp, mesh.tp):
        raise ValueError(f"config is for (dp, pp, tp) = {(config.dp, config.pp, config.tp)} but the mesh is "
                         f"{(mesh.dp, mesh.pp, mesh.tp)}; build the mesh from the config: plait.init_mesh(config)")
    return config


def _tied(model: nn.Module, plan: Plan) -> bool:
    config = getattr(model, "config", None)
    return bool(plan.tied and getattr(config, "tie_word_embeddings", True))


def _rebuild_meta_buffers(stage: nn.Module, model_config) -> None:
    """Modules built on the meta device keep meta buffers (rotary tables): rebuild those modules on CPU."""
    for name, module in list(stage.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                fresh = type(module)(config=model_config)
            except TypeError as err:
                raise ValueError(f"{name} ({type(module).__name__}) has buffers on the meta device and cannot be "
                                 f"rebuilt from the model config ({err})") from None
            parent, _, leaf = name.rpartition(".")
            setattr(stage.get_submodule(parent) if parent else stage, leaf, fresh)


class ParallelModel(nn.Module):
    """This rank's pipeline stages of a model, tensor-parallel; see the module docstring.

    ``stages`` are in stage order (one per virtual stage this rank holds). ``config`` is the
    :class:`~plait.ParallelConfig`, ``plan`` the plan applied, ``model_config`` the original
    model's config (a transformers config for Hugging Face models).
    """

    def __init__(self, stages: list[DecoderStage], mesh, config: ParallelConfig, plan: Plan, model_config,
                 dims: ModelDims, tied: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.mesh, self.config, self.plan, self.model_config, self.dims = mesh, config, plan, model_config, dims
        self.tied = tied
        self.source_dir: Optional[str] = None
        self._eval_engine = None
        self.dropout_seed = 0      # keys the layout-invariant dropout masks (plait.train sets the job's seed)

    # ----------------------------------------------------------------- names
    def named_model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name in the original model, parameter) for this rank's parameters, each once."""
        seen = set()
        for stage in self.stages:
            for name, param in stage.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param

    def spec_of(self, name: str, rank: Optional[int] = None) -> ShardSpec:
        """How parameter ``name`` is sharded on TP rank ``rank`` (default: this rank)."""
        module_name, _, param_name = name.rpartition(".")
        for stage in self.stages:
            try:
                module = stage.get_submodule(module_name)
            except AttributeError:
                continue
            by_rank = getattr(module, "plait_specs_by_rank", None)
            if by_rank is not None and param_name in by_rank[0]:
                return by_rank[self.mesh.tp_rank if rank is None else rank][param_name]
            return ShardSpec(name)
        raise KeyError(name)

    # ----------------------------------------------------------------- compute
    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the last stage's vocab-parallel logits ``[batch, seq, V/tp]``."""
        return vocab_parallel_cross_entropy(logits, targets, self.mesh.tp_comm)

    def pipeline(self, schedule: Optional[str] = None, num_microbatches: int = 1, **kwargs):
        """A :class:`~plait.PipelineEngine` over this rank's stages with this model's loss, keying the
        layout-invariant dropout of each microbatch (see :meth:`dropout_scope`)."""
        from ..pp import PipelineEngine

        kwargs.setdefault("loss_fn", self.loss_fn)
        kwargs.setdefault("microbatch_context", self.dropout_scope)
        return PipelineEngine(list(self.stages), self.mesh, schedule or self.config.schedule, num_microbatches,
                              num_virtual=self.config.num_virtual, **kwargs)

    def dropout_scope(self, step: int, first_row: int, rows: int):
        """The dropout scope of a microbatch: keyed by (``dropout_seed``, ``step``), its rows numbered in the
        global batch, whose DP rank ``d`` holds rows ``[d * rows, (d + 1) * rows)`` (plait.train's order).
        See :mod:`plait.parallel.dropout`."""
        scope = DropoutScope(self.dropout_seed, step, self.mesh.dp_rank * rows + first_row)
        return dropout_scope(scope)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Run the block in eval mode (no dropout), then restore each module's mode."""
        with eval_mode(self):
            yield

    def forward_local(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Vocab-parallel logits ``[batch, seq, V/tp]`` on the last pipeline rank (None elsewhere), in eval mode."""
        if self.mesh.pp == 1:
            x = input_ids
            with self.evaluating():
                for stage in self.stages:
                    x = stage(x)
            return x
        if self._eval_engine is None:
            schedule = "gpipe" if self.config.num_virtual == 1 else self.config.schedule
            self._eval_engine = self.pipeline(schedule, num_microbatches=1 if schedule == "gpipe" else self.mesh.pp,
                                              loss_fn=None)
        return self._eval_engine.eval_step(input_ids)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[batch, seq, vocab]`` on every rank: a collective over the PP and TP groups.
        Always in eval mode (no dropout), whatever mode the model is in."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"logits takes token ids [batch, seq] (an integer tensor), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.dims.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.dims.vocab_size})")
        if self.config.sequence_parallel and input_ids.shape[1] % self.mesh.tp:   # every rank, before any collective
            raise ValueError(f"sequence_parallel needs the sequence length {input_ids.shape[1]} divisible by "
                             f"tp={self.mesh.tp}; pad the ids or turn sequence parallelism off")
        local = self.forward_local(input_ids.to(self.mesh.device))
        vocab = self.dims.vocab_size
        if self.mesh.is_last_stage:
            full = self.mesh.tp_comm.all_gather(local.contiguous(), dim=-1)[..., :vocab].contiguous()
        else:
            full = torch.empty(*input_ids.shape, vocab, dtype=self.dtype, device=self.mesh.device)
        if self.mesh.pp > 1:
            self.mesh.pp_comm.broadcast(full, src=self.mesh.pp - 1)
        return full

    @property
    def dtype(self) -> torch.dtype:
        for _, param in self.named_model_parameters():
            return param.dtype
        return torch.get_default_dtype()

    # ----------------------------------------------------------------- gradients
    def finish_grads(self) -> None:
        """Sum the gradient of embeddings tied across pipeline ranks (the first and last stage).

        Call after backward (and after DP reduction) and before the optimizer step; a no-op unless
        the embeddings are tied and the first and last stages live on different pipeline ranks.
        Every pipeline rank calls it (a collective over the PP group).
        """
        if not self.tied or self.mesh.pp == 1:
            return
        param = self._tied_param()
        if param is None:
            per, _, _ = _local_rows(self)
            buffer = torch.zeros(per, self.dims.hidden, dtype=self.dtype, device=self.mesh.device)
        else:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            buffer = param.grad
        self.mesh.pp_comm.all_reduce(buffer)

    def _tied_param(self) -> Optional[nn.Parameter]:
        """The embedding (first stage) or head (last stage) weight on this rank, None on middle ranks."""
        for stage in self.stages:
            for role in ("embed", "head"):
                part = stage.part(role)
                if part is not None:
                    return part.weight
        return None

    # ----------------------------------------------------------------- gathering
    @torch.no_grad()
    def full_state_dict(self, grads: bool = False, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """Whole tensors (or their gradients) by the original model's names, in its stored layout.

        A collective over TP, and with ``everywhere`` also over PP (every rank gets every tensor;
        without it, each pipeline rank gets its own stages'). Tied heads are left out.
        """
        out = {}
        for name, param in self.named_model_parameters():
            value = param.detach()
            if grads:
                value = param.grad if param.grad is not None else torch.zeros_like(param)
            out[name] = self.gather_full(name, value)
        if everywhere and self.mesh.pp > 1:
            gathered = [None] * self.mesh.pp
            dist.all_gather_object(gathered, out, group=self.mesh.pp_group)
            out = {k: v for part in gathered for k, v in part.items()}
        if self.tied:
            out.pop(self.plan.head + ".weight", None)
        return out

    @torch.no_grad()
    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor, in the stored layout, of ``local``: this TP rank's shard of something shaped
        like parameter ``name`` (the parameter, its gradient, its optimizer state). A TP collective.

        Like ``nn.Module.state_dict``, the result may share memory with ``local`` (when it is already
        whole: replicated, or tp=1): nothing is copied that need not be (checkpoints of large models)."""
        spec = self.spec_of(name)
        value = local.t() if spec.transpose else local
        if spec.dim is None:
            return value
        tp = self.mesh.tp_comm
        parts = tp.all_gather(value.contiguous(), dim=spec.dim).chunk(tp.size, dim=spec.dim)
        return _assemble_full(self, name, parts, spec.dim)


def _local_rows(model: ParallelModel) -> tuple[int, int, int]:

    return vocab_rows(model.dims.vocab_size, model.mesh.tp, model.mesh.tp_rank)


def _leading_run(spec: ShardSpec, real: int) -> Optional[tuple[int, int]]:
    """``(start, stop)`` when the part's real rows are its first rows and hold ``[start, stop)`` in order."""
    runs = spec.runs(real)
    if len(runs) != 1:
        return None
    start, stop = runs[0]
    return runs[0] if tuple(spec.index[:stop - start]) == tuple(range(start, stop)) else None


def _assemble_full(model: ParallelModel, name: str, parts, dim: int) -> torch.Tensor:
    """One whole tensor from every TP rank's rows (padding dropped, replicated rows written once)."""
    specs = [model.spec_of(name, r) for r in range(len(parts))]
    if name in (model.plan.embed + ".weight", model.plan.head + ".weight"):
        real = model.dims.vocab_size
    else:
        real = max(i for spec in specs for i in spec.index) + 1
    runs = [_leading_run(spec, real) for spec in specs]
    if len(parts) == 1 and runs[0] == (0, real):
        return parts[0].narrow(dim, 0, real)     # already whole (tp=1); padding rows, if any, dropped
    shape = list(parts[0].shape)
    shape[dim] = real
    full = parts[0].new_zeros(shape)
    for spec, part, run in zip(specs, parts, runs):
        if run is not None:                      # a plain copy of one block of rows
            full.narrow(dim, run[0], run[1] - run[0]).copy_(part.narrow(dim, 0, run[1] - run[0]))
            continue
        keep = [k for k, i in enumerate(spec.index) if i < real]
        device = part.device
        index = torch.tensor([spec.index[k] for k in keep], dtype=torch.long, device=device)
        full.index_copy_(dim, index, part.index_select(dim, torch.tensor(keep, dtype=torch.long, device=device)))
    return full


def parallelize(model: nn.Module, mesh, plan: Union[Plan, dict, str, None] = None, *,
                config: Optional[ParallelConfig] = None, sequence_parallel: bool = False, overlap: str = "auto",
                source: Any = None, dtype: Optional[torch.dtype] = None) -> ParallelModel:
    """This rank's stages of ``model``, tensor-parallel by ``plan``; see the module docstring.

    Args:
        model: a plain single-device causal LM (a transformers model or plait's GPT); consumed.
        mesh: the :class:`~plait.ParallelMesh`.
        plan: a :class:`Plan` (or its dict / JSON); None picks ``plait.plans.for_model(model)``.
        config: the :class:`~plait.ParallelConfig` (its dp/pp/tp must be the mesh's); None derives
            one from the mesh with ``sequence_parallel`` and ``overlap``.
        source: where parameters are read from (default: the model's own tensors); a
            :class:`~plait.parallel.shard.SafetensorsSource` for a model built on the meta device.
        dtype: cast parameters to this dtype (default: keep each tensor's).

    Everything is checked on each rank before any communication. The result keeps ``model``'s mode
    (a model built from a config trains; one from transformers' ``from_pretrained`` is in eval mode).
    """
    chosen = plan is not None
    plan = resolve_plan(model, plan)
    if plan.family != "plait":
        check_config(model.config, plan.family if chosen else None)
    config = _config_for(mesh, config, sequence_parallel, overlap)
    styles = check_plan(model, plan, mesh.tp)
    dims = ModelDims.of(model)
    if config.sequence_parallel and not family(plan.family).sequence_parallel:
        raise ValueError(f"sequence_parallel is not supported for {plan.name!r} models yet (their activations "
                         f"are [batch, seq, hidden]); run with sequence_parallel=False")
    config.check_model(model_shape(model, plan))
    tied = _tied(model, plan)
    _check_ranks_agree(mesh, model, plan, config, dims, dtype)
    if source is None:
        source = StateDictSource(dict(model.state_dict(keep_vars=True)))
    chunks = list(range(mesh.pp_rank, config.num_chunks, mesh.pp))
    stages = build_stages(model, plan, config.num_chunks, chunks)
    rewriter = Rewriter(mesh.tp_comm, dims, _TiedSource(source, plan) if tied else source, dtype, mesh.device,
                        config.overlap, config.sequence_parallel)
    for stage in stages:
        stage.comm, stage.sequence_parallel = mesh.tp_comm, config.sequence_parallel
        _rewrite_stage(stage, styles, rewriter, dims, mesh.tp)
        _materialize_rest(stage, rewriter)
        _rebuild_meta_buffers(stage, getattr(model, "config", None))
        stage.family.prepare_stage(stage)
        stage.to(mesh.device)
        if config.sequence_parallel and mesh.tp > 1:
            _sum_replicated_grads_over_tp(stage, mesh.tp_comm)
    _tie_on_this_rank(stages, tied)
    parallel = ParallelModel(stages, mesh, config, plan, getattr(model, "config", None), dims, tied)
    return parallel.train(model.training)


def _check_ranks_agree(mesh, model: nn.Module, plan: Plan, config: ParallelConfig, dims: ModelDims, dtype) -> None:
    """One fingerprint exchange per mesh axis (before any other collective): every rank must be
    parallelizing the same model with the same plan and layout."""
    from ..comm.agree import check_agreement

    params = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    fields = {"model": type(model).__name__, "dims": dims, "plan": plan.to_json(), "config": config.to_dict(),
              "dtype": str(dtype), "parameters": params}
    comms = getattr(mesh, "comms", None) or {"tp": mesh.tp_comm}
    for axis, comm in comms.items():
        check_agreement(fields, comm, what=f"plait.parallelize (the {axis} axis)")


def _tie_on_this_rank(stages: list[DecoderStage], tied: bool) -> None:
    """Share one Parameter between the embedding and the head when both are on this rank."""
    embed = next((s.part("embed") for s in stages if s.part("embed") is not None), None)
    head = next((s.part("head") for s in stages if s.part("head") is not None), None)
    if tied and embed is not None and head is not None:
        head.weight = embed.weight


class _TiedSource:
    """Reads the head's weight from the embedding's tensor when the two are tied."""

    def __init__(self, source, plan: Plan) -> None:
        self.source, self.head, self.embed = source, plan.head + ".weight", plan.embed + ".weight"

    def read(self, spec: ShardSpec) -> torch.Tensor:
        if spec.name == self.head and self.head not in self.source.names():
            spec = ShardSpec(self.embed, spec.dim, spec.index, spec.transpose, spec.replicated)
        return self.source.read(spec)

    def names(self) -> set[str]:
        return self.source.names() | {self.head}


def _rewrite_stage(stage: DecoderStage, styles: dict[str, str], rewriter: Rewriter, dims: ModelDims, tp: int) -> None:
    for name, module in list(stage.named_modules()):
        style = styles.get(name)
        if style is None or style == "replicate":
            continue
        if style == "attention":
            set_local_heads(module, heads_for(dims, tp, rewriter.comm.rank))
            continue
        new = rewriter.build(name, module, style)
        parent, _, leaf = name.rpartition(".")
        setattr(stage.get_submodule(parent) if parent else stage, leaf, new)


class _SumOverTP:
    """A gradient hook: the sum of a replicated parameter's gradient over the TP group (picklable, named)."""

    def __init__(self, comm) -> None:
        self.comm = comm

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(grad.clone())


def _sum_replicated_grads_over_tp(stage: DecoderStage, comm) -> None:
    """Under sequence parallelism each rank sees a sequence shard, so a parameter left whole on every rank
    (norms, positions) gets a partial gradient: sum it over TP at each use (as Megatron does for norms)."""
    for name, param in stage.named_parameters():
        module_name = name.rpartition(".")[0]
        owner = stage.get_submodule(module_name) if module_name else stage
        if getattr(owner, "plait_specs_by_rank", None) is None:
            param.register_hook(_SumOverTP(comm))


def _materialize_rest(stage: DecoderStage, rewriter: Rewriter) -> None:
    """Parameters the plan did not shard: read whole (from the source) when on meta, cast when asked."""
    for name, param in list(stage.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = stage.get_submodule(module_name) if module_name else stage
        if getattr(module, "plait_specs_by_rank", None) is not None:
            continue
        if param.is_meta:
            value = rewriter.source.read(ShardSpec(name)).to(dtype=rewriter.dtype or param.dtype)
            setattr(module, leaf, nn.Parameter(value, requires_grad=param.requires_grad))
        elif rewriter.dtype is not None and param.dtype != rewriter.dtype:
            param.data = param.data.to(rewriter.dtype)
