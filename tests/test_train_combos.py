"""plait train in combinations test_train.py leaves out, each against one process.

- Tied embeddings with ZeRO-1 and pp > 1 at (dp, pp, tp) = (2, 2, 1): the tied gradient is summed
  over PP before ZeRO-1 reduce-scatters it over DP, and the head is counted once in the clipping
  norm. A tied tiny Llama (one KV head) and a tiny GPT-2 (learned positions, Conv1D), float64,
  against the plain transformers + AdamW loop of test_train.py to 1e-9.
- bfloat16 at tp = 2, as ``--dtype bfloat16`` and as ``--mixed bf16``, against the same job in
  one process. See :data:`BF16_RTOL` for the tolerance.
"""
from __future__ import annotations

import pytest

from hf_models import load_reference, save_tiny
from plait.launch import run_ranks
from test_train import _run_jobs, assert_close, job_dict, reference_losses

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 (0.2%) of the value. At tp = 2 a
# row-parallel GEMM rounds two half-sums to bf16 and adds them (and DP sums bf16 gradients), where one
# process rounds each whole sum once, so the two runs round differently from the first layer on. The
# loss, a mean over every token, averages those errors out: measured on this test's model, the two
# runs' losses differ by 1e-5 (relative) at step 1 and up to 5e-5 by step 4 (as AdamW carries the
# differences into the weights); both differ from the float32 run by up to 2e-4. The tolerance is
# one bf16 rounding of the loss itself, 2^-9: 40x what was measured, while a fault that moves the
# loss by more than 0.2% fails.
BF16_RTOL = 2.0 ** -9


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import numpy as np

    from hf_models import VOCAB
    from test_train import SEQ

    root = tmp_path_factory.mktemp("combos")
    save_tiny("llama_mqa", root / "mqa", seed=1)
    save_tiny("gpt2", root / "gpt2", seed=2)
    save_tiny("llama", root / "model")
    np.random.default_rng(0).integers(0, VOCAB, 7 * SEQ + 1).astype(np.uint16).tofile(root / "data.bin")
    return {"mqa": str(root / "mqa"), "gpt2": str(root / "gpt2"), "model": str(root / "model"),
            "data": str(root / "data.bin")}


def _bf16_jobs(files) -> list[dict]:
    return [job_dict(files, dtype="bfloat16"), job_dict(files, dtype="float32", mixed="bf16")]


def test_tied_zero1_pp2_and_bf16_tp2(files, tmp_path):
    from plait.train import TrainJob, train_rank

    opts = dict(clip_grad=0.05, weight_decay=0.1)
    tied = [job_dict(files, model=files[kind], dp=2, pp=2, zero=1, microbatches=2, **opts) for kind in ("mqa", "gpt2")]
    bf16 = [dict(job, dp=2, tp=2) for job in _bf16_jobs(files)]
    results = run_ranks(_run_jobs, 4, tied + bf16, timeout=600)

    for kind, index in (("mqa", 0), ("gpt2", 1)):
        want = reference_losses(files, model=load_reference(files[kind]), clip=0.05, weight_decay=0.1)
        for rank, outcome in enumerate(results):
            assert_close(outcome[index], want, f"rank {rank} tied {kind} (2,2,1) ZeRO-1")

    one = [[r.loss for r in train_rank(TrainJob.from_dict(job), show=False).records] for job in _bf16_jobs(files)]
    fp32 = [r.loss for r in train_rank(TrainJob.from_dict(job_dict(files, dtype="float32")), show=False).records]
    for what, single, index in (("dtype bfloat16", one[0], 2), ("mixed bf16", one[1], 3)):
        for rank, outcome in enumerate(results):
            got = outcome[index]
            assert isinstance(got, list) and len(got) == len(single), f"rank {rank} {what}: {got}"
            worst = max(abs(g - s) / s for g, s in zip(got, single))
            assert worst <= BF16_RTOL, f"rank {rank} {what} at (2,1,2): {got} vs one process {single} ({worst:.1e})"
        # the runs really are bf16: they differ from float32 by far more than float32's own rounding (1e-7)
        assert max(abs(s - e) / e for s, e in zip(single, fp32)) > 1e-5, (what, single, fp32)
