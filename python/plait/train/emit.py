"""``plait plan --emit job.yaml``: the planner's chosen layout as a ``plait train`` job file.

The planner knows the layout, the batch and the sequence length, not where the model and
the data are, so the file holds those settings and a comment saying what to add; either
edit it or pass them as flags: ``plait train job.yaml --model DIR --data data.bin``. The
file is checked as a :class:`~plait.train.job.TrainJob` (with placeholder paths) before it
is written, so the planner never emits a job ``plait train`` would refuse for its layout.
Two settings are narrowed to what plait train runs, and a comment in the file says so: ZeRO
stages above 1 are written as 1, and sequence parallelism (not available for transformers
models yet) as off.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

from .job import TrainJob


def job_settings(estimate, job_spec, seq_len: int) -> tuple[dict[str, Any], list[str]]:
    """``plait train`` settings of a planner :class:`~plait.plan.Estimate` for a training ``job_spec``,
    and notes on what was narrowed (module doc)."""
    layout = estimate.layout
    notes = []
    if job_spec.zero_stage > 1:
        notes.append(f"the plan assumed ZeRO stage {job_spec.zero_stage}; plait train runs stage 1")
    if estimate.sequence_parallel:
        notes.append("the plan assumed sequence parallelism, which plait train does not run for transformers "
                     "models yet: expect more activation memory")
    settings = {"seq": seq_len, "global_batch": job_spec.global_batch, "microbatches": estimate.num_microbatches,
                "dp": layout.dp, "pp": layout.pp, "tp": layout.tp, "vpp": layout.num_virtual,
                "schedule": layout.schedule, "zero": min(int(job_spec.zero_stage), 1),
                "recompute": estimate.recompute, "mixed": "bf16" if job_spec.precision == "bf16" else "none"}
    return settings, notes


def write_job_file(path: Union[str, Path], settings: dict[str, Any], notes: Sequence[str] = (),
                   source: str = "") -> None:
    """Check ``settings`` as a job (placeholder model and data) and write them as YAML to ``path``."""
    import yaml

    TrainJob.from_dict({"model": "MODEL_DIR", "data": "DATA_FILE", **settings}, where=f"emitted job {path}")
    header = ("# plait train job emitted by plait plan" + (f" ({source})" if source else "") + "\n"
              + "".join(f"# note: {n}\n" for n in notes)
              + "# add the model and the data here (model: DIR or gpt: PRESET,vocab=N; data: FILE) or as flags:\n"
              f"#   plait train {Path(path).name} --model DIR --data data.bin\n")
    try:
        Path(path).write_text(header + yaml.safe_dump(settings, sort_keys=False))
    except OSError as err:
        raise ValueError(f"{path}: cannot write the job file ({err.strerror or err})") from None
