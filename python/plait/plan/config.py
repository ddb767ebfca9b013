"""The planner's inputs: what is trained or served (ModelSpec), on what (HardwareSpec), how (JobSpec).

Each is a frozen dataclass validated in ``__post_init__`` so a bad number fails where it
is written, with a message that says how to fix it. ``load_specs`` reads all three from
a JSON file (or YAML when PyYAML is installed); a section may name a preset instead of
spelling out its fields (``{"model": "llama3-70b", "hardware": {"preset": "h100",
"gpus": 64}, "job": {...}}``).

Units: memory in GB (1e9 bytes), bandwidth in GB/s per GPU per direction, compute in
TFLOP/s (1e12), latency in seconds.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..config import ModelShape, head_misfit
from ..heads import heads_for

MLP_KINDS = ("gelu", "swiglu")
RECOMPUTE_MODES = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp16", "fp8")
MODES = ("train", "inference")


def _positive(owner: str, **values: float) -> None:
    """Raise ValueError naming every field of `values` that is not > 0."""
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{owner}: {name}={value!r} must be positive")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, by the sizes that set its memory, FLOPs and traffic.

    ``ffn_hidden`` is the width of the MLP's inner layer (4*hidden for GPT, e.g. 28672
    for Llama-3 70B); with ``mlp="swiglu"`` the up projection has two such matrices.
    ``num_kv_heads`` below ``num_heads`` is grouped-query attention. ``dropout`` adds the
    dropout masks Korthikanti et al. 2022 count (GPT-style training) to the activations.
    """

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    ffn_hidden: int
    vocab_size: int
    seq_len: int
    num_kv_heads: int | None = None
    mlp: str = "gelu"
    dropout: bool = False
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        _positive(f"model {self.name!r}", num_layers=self.num_layers, hidden=self.hidden,
                  num_heads=self.num_heads, ffn_hidden=self.ffn_hidden, vocab_size=self.vocab_size,
                  seq_len=self.seq_len)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.hidden % self.num_heads:
            raise ValueError(f"model {self.name!r}: hidden={self.hidden} is not a multiple of "
                             f"num_heads={self.num_heads}; pick heads that divide the hidden size")
        reason = head_misfit(self.num_heads, self.num_kv_heads, 1)   # the runtime's rule, at any tp
        if reason:
            raise ValueError(f"model {self.name!r}: {reason}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"model {self.name!r}: unknown mlp {self.mlp!r}; use one of {MLP_KINDS}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def shape(self) -> ModelShape:
        """The dimensions :meth:`plait.ParallelConfig.check_model` judges a layout by (the runtime's verdict)."""
        return self._shape

    @functools.cached_property
    def _shape(self) -> ModelShape:   # built once: the search judges every candidate layout by it
        return ModelShape(num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          ffn_hidden=self.ffn_hidden, vocab_size=self.vocab_size, seq_len=self.seq_len)

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads one TP rank holds (replicated ones included), as the runtime lays them out."""
        return len(heads_for(self, tp, 0).kv_heads)

    @property
    def mlp_matrices(self) -> int:
        """hidden x ffn_hidden weight matrices in one MLP: 2 (up, down) or 3 (gate, up, down)."""
        return 3 if self.mlp == "swiglu" else 2

    def layer_params(self) -> int:
        """Parameters of one transformer layer: attention, MLP and two norms (biases ignored)."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        return attention + self.mlp_matrices * self.hidden * self.ffn_hidden + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden

    def num_params(self) -> int:
        """All parameters: layers, input embedding, output layer (unless tied), final norm."""
        heads = 1 if self.tied_embeddings else 2
        return self.num_layers * self.layer_params() + heads * self.embedding_params() + self.hidden


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: memory, dense peak compute, HBM bandwidth and what kernels reach of it.

    ``gemm_efficiency`` is the fraction of peak a large, well-shaped GEMM sustains in
    training (clocks under load included); ``attention_efficiency`` the same for a fused
    (flash) attention kernel, forward and backward together.
    """

    name: str
    memory_gb: float
    peak_tflops: dict[str, float]
    hbm_gbs: float
    num_sms: int
    gemm_efficiency: float = 0.8
    attention_efficiency: float = 0.5

    def __post_init__(self) -> None:
        _positive(f"gpu {self.name!r}", memory_gb=self.memory_gb, hbm_gbs=self.hbm_gbs, num_sms=self.num_sms)
        for name in ("gemm_efficiency", "attention_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"gpu {self.name!r}: {name}={value} must be in (0, 1]")
        if not self.peak_tflops or any(v <= 0 for v in self.peak_tflops.values()):
            raise ValueError(f"gpu {self.name!r}: peak_tflops needs a positive value per precision, "
                             f"e.g. {{'bf16': 989}}")

    def peak(self, precision: str) -> float:
        """Dense peak TFLOP/s at `precision`; ValueError when the GPU has no such tensor cores."""
        if precision not in self.peak_tflops:
            raise ValueError(f"gpu {self.name!r} has no {precision} peak (it has "
                             f"{sorted(self.peak_tflops)}); choose another --precision")
        return self.peak_tflops[precision]


@dataclass(frozen=True)
class HardwareSpec:
    """A cluster of identical GPUs in nodes: links inside a node (NVLink) and between nodes (NICs).

    Bandwidths are per GPU and direction as the datasheet states them; ``link_efficiency``
    is the fraction collectives reach of them. ``measured`` optionally maps GEMM shapes to
    measured efficiencies (see ``compute.load_measured_efficiencies``).
    """

    gpu: GPUSpec
    num_gpus: int
    gpus_per_node: int = 8
    intra_node_gbs: float = 300.0
    inter_node_gbs: float = 25.0
    intra_node_latency_s: float = 3e-6
    inter_node_latency_s: float = 8e-6
    link_efficiency: float = 0.8
    measured: tuple[tuple[int, int, int, float], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        _positive("hardware", num_gpus=self.num_gpus, gpus_per_node=self.gpus_per_node,
                  intra_node_gbs=self.intra_node_gbs, inter_node_gbs=self.inter_node_gbs)
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ValueError(f"hardware: {self.num_gpus} GPUs do not fill nodes of {self.gpus_per_node}; "
                             f"use a multiple of {self.gpus_per_node} or set gpus_per_node")
        if not 0 < self.link_efficiency <= 1:
            raise ValueError(f"hardware: link_efficiency={self.link_efficiency} must be in (0, 1]")

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)


@dataclass(frozen=True)
class JobSpec:
    """What is run: training with a global batch, or inference with concurrent requests.

    Training: ``global_batch`` sequences per optimizer step; ``recompute`` is a mode or
    "auto" (the search tries each; estimate takes the least that fits);
    ``sequence_parallel`` None means on whenever tp > 1. ``tp_overlap`` is the fraction of
    tensor-parallel communication hidden behind GEMMs (0 for Megatron-LM 2021,
    more with plait's chunked/fused overlap); ``dp_overlap`` lets the gradient reduction
    run under the last microbatch's backward. ``memory_margin`` is the fraction of GPU
    memory kept free for the allocator, CUDA context and communication buffers.

    Inference: ``batch`` concurrent requests over all replicas, each ``prompt_len`` tokens
    in and ``output_len`` out; ``latency_target_ms`` bounds the time per output token.
    """

    mode: str = "train"
    global_batch: int = 1
    precision: str = "bf16"
    zero_stage: int = 1
    recompute: str = "auto"
    sequence_parallel: bool | None = None
    flash_attention: bool = True
    tp_overlap: float = 0.0
    dp_overlap: bool = True
    memory_margin: float = 0.1
    batch: int = 1
    prompt_len: int = 1024
    output_len: int = 256
    latency_target_ms: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"job: unknown mode {self.mode!r}; use one of {MODES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"job: unknown precision {self.precision!r}; use one of {PRECISIONS}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"job: zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.recompute not in (*RECOMPUTE_MODES, "auto"):
            raise ValueError(f"job: unknown recompute {self.recompute!r}; use auto or one of {RECOMPUTE_MODES}")
        _positive("job", global_batch=self.global_batch, batch=self.batch, prompt_len=self.prompt_len,
                  output_len=self.output_len)
        if not 0 <= self.tp_overlap <= 1:
            raise ValueError(f"job: tp_overlap={self.tp_overlap} is a fraction in [0, 1]")
        if not 0 <= self.memory_margin < 1:
            raise ValueError(f"job: memory_margin={self.memory_margin} is a fraction in [0, 1)")
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise ValueError(f"job: latency_target_ms={self.latency_target_ms} must be positive")

    @property
    def training(self) -> bool:
        return self.mode == "train"


def _read_mapping(path: Path) -> dict[str, Any]:
    """A JSON file, or YAML when the name ends in .yaml/.yml (needs PyYAML)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected JSON or YAML)") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a mapping with model/hardware/job sections")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); "
                             f"or write the same content as JSON") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with model/hardware/job sections, got {type(data).__name__}")
    return data


def unknown_keys(given: Any, known: Any, where: str, kind: str = "field") -> None:
    """ValueError naming the first key of `given` not in `known`, with the closest known name."""
    known = sorted(known)
    for key in sorted(map(str, given)):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise ValueError(f"{where}: unknown {kind} {key!r}; {hint}")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` (from JSON/YAML) fits the annotation `hint` of a spec field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1])
                                               for k, v in value.items())
    return True  # fields read elsewhere (HardwareSpec.gpu, measured)


def _type_name(hint: Any) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
             type(None): "null"}
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return names.get(hint, "a mapping" if typing.get_origin(hint) is dict else str(hint))


def check_fields(cls: type, values: Any, where: str, complete: bool = False) -> dict[str, Any]:
    """`values` as keyword arguments for the dataclass `cls`, checked field by field.

    ValueError for a section that is not a mapping, an unknown key (naming the closest field),
    a value of the wrong type (``"32"`` where a number is meant, a bool for a count, nan) or,
    with `complete`, a field without a default that is missing.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of fields, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    unknown_keys(values, [f.name for f in fields(cls)], where)
    missing = [f.name for f in fields(cls) if complete and f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (or name a preset)")
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise ValueError(f"{where}: {name} must be {_type_name(hints[name])}, got {value!r}")
    return dict(values)


def _build(cls: type, values: Any, where: str) -> Any:
    return cls(**check_fields(cls, values, where, complete=True))


def model_from(value: str | dict[str, Any]) -> ModelSpec:
    """A preset name, or a mapping of ModelSpec fields (``preset`` + overrides allowed)."""
    from .presets import model_preset

    if isinstance(value, str):
        return model_preset(value)
    if not isinstance(value, dict):
        raise ValueError(f"model: expected a preset name or a mapping of fields, got {value!r}")
    values = dict(value)
    preset = values.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise ValueError(f"model: preset must be a preset name, got {preset!r}")
        return replace(model_preset(preset), **check_fields(ModelSpec, values, "model"))
    values.setdefault("name", "custom")
    return _build(ModelSpec, values, "model")


def hardware_from(value: str | dict[str, Any], num_gpus: int | None = None) -> HardwareSpec:
    """A GPU preset name plus a count, or a mapping: ``gpu`` (name or GPUSpec fields), ``gpus``, links."""
    from .presets import hardware

    if isinstance(value, str):
        if num_gpus is None:
            raise ValueError("hardware: give the number of GPUs with the GPU preset")
        return hardware(value, num_gpus)
    if not isinstance(value, dict):
        raise ValueError(f"hardware: expected a GPU preset name or a mapping of fields, got {value!r}")
    values = dict(value)
    gpus = values.pop("gpus", values.pop("num_gpus", num_gpus))
    if gpus is None:
        raise ValueError("hardware: set gpus (the number of GPUs)")
    if not _type_ok(gpus, int):
        raise ValueError(f"hardware: gpus must be a whole number, got {gpus!r}")
    preset, gpu = values.pop("preset", None), values.pop("gpu", None)
    if preset is not None and gpu is not None:
        raise ValueError("hardware: set gpu or preset, not both")
    gpu = preset if preset is not None else gpu
    if gpu is None:
        raise ValueError("hardware: set gpu (a preset name such as 'h100', or its fields)")
    link_fields = {f.name for f in fields(HardwareSpec)} - {"gpu", "num_gpus", "measured"}
    unknown_keys(values, link_fields, "hardware")
    values = check_fields(HardwareSpec, values, "hardware")
    if isinstance(gpu, str):
        base = hardware(gpu, gpus)
    else:
        base = HardwareSpec(_build(GPUSpec, gpu, "hardware.gpu"), gpus)
    return replace(base, **values) if values else base


def load_specs(path: str | Path) -> tuple[ModelSpec | None, HardwareSpec | None, JobSpec | None]:
    """Read model, hardware and job sections from a JSON or YAML file; a missing section is None.

    Every problem is a ValueError that starts with the file's name.
    """
    data = _read_mapping(Path(path))
    try:
        unknown_keys(data, ("model", "hardware", "job"), "top level", "section")
        model = model_from(data["model"]) if "model" in data else None
        cluster = hardware_from(data["hardware"]) if "hardware" in data else None
        job = _build(JobSpec, data["job"], "job") if "job" in data else None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return model, cluster, job
