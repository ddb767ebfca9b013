"""The settings of one training job: a dataclass checked field by field, from a job file or flags.

Every field is also a ``plait train`` flag (``global_batch`` is ``--global-batch``) and a
key of a YAML or JSON job file; flags given on the command line override the file.
Unknown keys are refused with the closest valid name; every value is checked for its
type and range before any process starts, so a bad job never reaches a collective.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..config import ParallelConfig
from ..mesh import COMM_BACKENDS

LR_SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float64")
MIXED = ("none", "bf16")
RECOMPUTE = ("none", "selective", "full")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainJob:
    """One training run; see the module doc. ``help`` metadata is the flag's help text."""

    data: Optional[str] = _help("token file to train on (see plait.train.data for the format); or --synthetic",
                                default=None)
    synthetic: bool = _help("train on synthetic sequences instead of a token file: each counts up (mod the "
                            "vocabulary) from a random start with a random stride, 10% of its tokens random, drawn "
                            "from (--seed, step); the same data on every layout (benchmarks, tests)", default=False)
    model: Optional[str] = _help("transformers model directory to fine-tune", default=None)
    config: Optional[str] = _help("transformers config.json to train from scratch (weights from --seed)",
                                  default=None)
    gpt: Optional[str] = _help("plait's GPT from scratch (weights from --seed): a preset (gpt-tiny, gpt-mini, "
                               "gpt2-small, ...) and/or dimensions, e.g. gpt-tiny,vocab=512 or "
                               "layers=4,hidden=64,heads=4,vocab=512", default=None)
    eval_data: Optional[str] = _help("token file for the evaluation loss", default=None)
    eval_fraction: float = _help("hold out this fraction of --data's sequences for evaluation", default=0.0)
    eval_every: int = _help("evaluate every N steps (0: only at the end when there is evaluation data)",
                            default=0)
    eval_batches: int = _help("global batches per evaluation", default=1)
    data_dtype: Optional[str] = _help("token dtype (uint16|uint32); default: from the file suffix", default=None)
    shuffle: bool = _help("permute the sequences by --seed, once per epoch", default=False)
    seq: int = _help("sequence length (tokens per sequence)", default=1024)
    global_batch: int = _help("sequences per optimizer step, over all DP ranks", default=8)
    microbatches: int = _help("pipeline microbatches per step and DP rank", default=1)
    steps: int = _help("total optimizer steps of the job (a resumed job runs the rest)", default=100)
    dp: int = _help("data-parallel degree", default=1)
    pp: int = _help("pipeline-parallel degree", default=1)
    tp: int = _help("tensor-parallel degree", default=1)
    vpp: int = _help("virtual pipeline stages per rank", default=1)
    schedule: str = _help("pipeline schedule (gpipe|1f1b|interleaved|zb1p)", default="1f1b")
    sp: bool = _help("sequence parallelism", default=False)
    zero: int = _help("ZeRO stage (0: off, 1: optimizer state sharded over DP)", default=0)
    lr: float = _help("peak learning rate", default=3e-4)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    eps: float = _help("AdamW eps", default=1e-8)
    weight_decay: float = _help("AdamW weight decay (never applied to biases and norms)", default=0.0)
    lr_schedule: str = _help(f"learning-rate decay after warmup ({'|'.join(LR_SCHEDULES)})", default="cosine")
    warmup: int = _help("warmup steps (linear from lr/warmup to lr)", default=0)
    min_lr: float = _help("learning rate at the end of the decay", default=0.0)
    clip_grad: float = _help("clip gradients to this global L2 norm (0: no clipping)", default=1.0)
    dtype: str = _help(f"parameter dtype ({'|'.join(DTYPES)})", default="float32")
    mixed: str = _help("mixed precision: bf16 compute under autocast, float32 master weights (none|bf16)",
                       default="none")
    recompute: str = _help(f"activation recomputation ({'|'.join(RECOMPUTE)})", default="none")
    save: Optional[str] = _help("directory for checkpoints", default=None)
    save_every: int = _help("save a checkpoint every N steps (0: only at the end)", default=0)
    keep: int = _help("checkpoints to keep in --save", default=3)
    resume: Optional[str] = _help("resume from a checkpoint, a --save directory, or 'latest' (--save's)",
                                  default=None)
    json: bool = _help("print one JSON line per step (and a JSON summary) instead of a progress bar",
                       default=False)
    seed: int = _help("seed of the initial weights (--config, --gpt), of --shuffle and of --synthetic data",
                      default=0)
    bucket_mb: float = _help("DP gradient bucket size in MB", default=25.0)
    dp_overlap: bool = _help("reduce DP gradients bucket by bucket during backward (--no-dp-overlap: all after "
                             "backward, e.g. to measure what the overlap gains)", default=True)
    tp_across_hosts: bool = _help("allow TP groups that span hosts (refused by default: TP exchanges activations "
                                  "in every layer)", default=False)
    comm: Optional[str] = _help("communicators of the mesh axes: torch (gloo/NCCL), shm (plait's shared-memory "
                                "collectives, CPU ranks of one host) or auto (shm for CPU tensors when every rank "
                                "is on one host, else torch); default: auto on CPU, torch on CUDA", default=None)
    tensorboard: Optional[str] = _help("write TensorBoard scalars (loss, lr, grad_norm, tokens/s, eval loss) "
                                       "per step into this directory (needs tensorboard)", default=None)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if sum(x is not None for x in (self.model, self.config, self.gpt)) != 1:
            raise ValueError("give exactly one of model (a transformers model directory, to fine-tune), config (a "
                             "transformers config.json, to train from scratch) and gpt (plait's GPT: a preset "
                             "or dimensions, from scratch)")
        _check_data(self)
        positive = ("seq", "global_batch", "microbatches", "steps", "eval_batches", "keep", "dp", "pp", "tp", "vpp")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _finite_range("lr", self.lr, low=0.0, low_open=True)
        _finite_range("min_lr", self.min_lr, low=0.0)
        _finite_range("beta1", self.beta1, low=0.0, high=1.0, high_open=True)
        _finite_range("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        _finite_range("eps", self.eps, low=0.0, low_open=True)
        _finite_range("weight_decay", self.weight_decay, low=0.0)
        _finite_range("clip_grad", self.clip_grad, low=0.0)
        _finite_range("bucket_mb", self.bucket_mb, low=0.0, low_open=True)
        _finite_range("eval_fraction", self.eval_fraction, low=0.0, high=1.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr:g} is above lr={self.lr:g}; the schedule decays to min_lr")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("dtype", DTYPES), ("mixed", MIXED),
                              ("recompute", RECOMPUTE), ("comm", (None, *COMM_BACKENDS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.mixed == "bf16" and self.dtype != "float32":
            raise ValueError(f"mixed bf16 keeps float32 master weights: use dtype float32, not {self.dtype}")
        if self.eval_data and self.eval_fraction:
            raise ValueError("give eval_data or eval_fraction, not both")
        per_replica = self.dp * self.microbatches
        if self.global_batch % per_replica:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by dp x microbatches = {self.dp} "
                             f"x {self.microbatches}; use a multiple of {per_replica}")
        if self.resume == "latest" and not self.save:
            raise ValueError("resume 'latest' means the latest checkpoint in --save; give --save DIR")
        self.parallel   # noqa: B018 - the layout rules live in ParallelConfig
        if self.gpt is not None:
            from ..models.presets import gpt_config

            gpt = gpt_config(self.gpt, self.seq)   # the spec and the layout, before any process starts
            self.parallel.check_model(gpt.shape(seq_len=self.seq))

    @property
    def parallel(self) -> ParallelConfig:
        """The job's layout as a :class:`~plait.ParallelConfig` (validated there)."""
        return ParallelConfig(dp=self.dp, pp=self.pp, tp=self.tp, num_virtual=self.vpp, schedule=self.schedule,
                              sequence_parallel=self.sp, zero=self.zero, tp_across_hosts=self.tp_across_hosts)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that must not change when a job resumes (the data and how it is cut)."""
        keys = ("data", "seq", "global_batch", "shuffle", "seed", "data_dtype")
        if self.synthetic:   # only when set: checkpoints of token-file jobs from before the key still resume
            keys += ("synthetic",)
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "job") -> "TrainJob":
        """Build from a mapping; unknown keys are refused with the closest valid name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a job must be a mapping of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
                raise ValueError(f"{where}: unknown setting {key!r}{hint}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ValueError(f"{where}: missing required setting(s) {missing}")
        data = dict(data)
        if isinstance(data.get("gpt"), Mapping):   # gpt: {preset: gpt-tiny, vocab: 512} in a job file
            data["gpt"] = ",".join(str(v) if k == "preset" else f"{k}={v}" for k, v in data["gpt"].items())
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _check_data(job: TrainJob) -> None:
    """Exactly one source of training data; no token-file settings for synthetic data."""
    if job.synthetic and job.data is not None:
        raise ValueError("give data (a token file) or synthetic (generated sequences), not both")
    if not job.synthetic and job.data is None:
        raise ValueError("give data (a token file to train on) or synthetic: true (generated sequences)")
    if not job.synthetic:
        return
    refused = {"shuffle": job.shuffle and "it permutes a token file's sequences; synthetic data is drawn anew "
                                          "every step",
               "eval_fraction": job.eval_fraction and "it holds out part of a token file; with synthetic data "
                                                      "give an evaluation token file as eval_data",
               "data_dtype": job.data_dtype is not None and job.eval_data is None
               and "it says how a token file stores its ids, and synthetic data has no file"}
    for name, why in refused.items():
        if why:
            raise ValueError(f"{name} does not apply to synthetic data: {why}")


def read_job_file(path: Union[str, Path]) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON job file, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: job file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise their own error types
        raise ValueError(f"{path}: not a valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                         f"job file ({err})") from None
    if data is None:
        raise ValueError(f"{path}: the job file is empty")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job file holds a mapping of settings, got {type(data).__name__}")
    return data


def _check_type(name: str, value: Any, annotation: str) -> None:
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    if value is None and optional:
        return
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str),
          "bool": isinstance(value, bool)}[base]
    if not ok:
        raise ValueError(f"{name} must be {'an' if base == 'int' else 'a'} {base}"
                         f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})")


def _finite_range(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    import math

    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
