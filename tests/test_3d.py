"""The GPT trained on DP x PP x TP layouts equals the one-process run: losses and parameters, 3 AdamW steps.

float32. Layouts sum in different orders, so gradients differ by rounding; Adam
divides each gradient by its own magnitude, so an element whose gradient is
near zero can move by up to about lr x 1e-3 differently. With lr = 1e-3 that
stays under the 1e-6 absolute (1e-5 relative on weights of ~0.02) checked here.
"""
import pytest
import torch

from plait.launch import run_ranks

MODEL = dict(vocab_size=32, num_layers=4, hidden=16, num_heads=4, seq_len=8)


def _job(dp=1, pp=1, tp=1, schedule="1f1b", vpp=1, sp=False, microbatches=2):
    from plait.models import GPTConfig, TrainJob

    return TrainJob(model=GPTConfig(**MODEL, sequence_parallel=sp), dp=dp, pp=pp, tp=tp, num_virtual=vpp,
                    schedule=schedule, microbatches=microbatches, global_batch=8, steps=3, seed=1, lr=1e-3,
                    bucket_mb=0.002)


def run_job(rank: int, world: int, layout: dict):
    from plait.models import train

    records, state = train(_job(**layout), return_state=True)
    import plait

    plait.destroy_mesh()
    return [r.loss for r in records], state, [r.extra.get("dp_overlapped") for r in records]


@pytest.fixture(scope="module")
def reference():
    losses, state, _ = run_ranks(run_job, 1, {})[0]
    return losses, state


def _check(results, reference, where):
    ref_losses, ref_state = reference
    merged = {}
    for losses, state, _ in results:
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"{where}: losses {losses} vs {ref_losses}"
        merged.update(state)
    assert merged.keys() == ref_state.keys(), where
    for name, value in ref_state.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")


@pytest.mark.parametrize("dp,pp,tp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 2, 2)])
def test_layouts_match_one_process(dp, pp, tp, reference):
    results = run_ranks(run_job, dp * pp * tp, dict(dp=dp, pp=pp, tp=tp), timeout=300)
    _check(results, reference, f"(dp, pp, tp)=({dp}, {pp}, {tp})")
    if dp > 1:
        assert all(all(flags) for _, _, flags in results), "DP reduction should start before backward ends"


@pytest.mark.parametrize("schedule,vpp", [("gpipe", 1), ("interleaved", 2), ("zb1p", 1)])
def test_pp2_schedules_match_one_process(schedule, vpp, reference):
    results = run_ranks(run_job, 2, dict(pp=2, schedule=schedule, vpp=vpp), timeout=300)
    _check(results, reference, schedule)


def test_sequence_parallel_layout_matches(reference):
    results = run_ranks(run_job, 4, dict(pp=2, tp=2, sp=True), timeout=300)
    _check(results, reference, "pp=2 tp=2 sp")


def test_bad_configurations_are_caught_before_training():
    from plait.models import GPTConfig, TrainJob

    cases = [(dict(tp=3), "num_heads=4 is not divisible by tp=3"),
             (dict(pp=4, vpp=2, schedule="interleaved"), "fewer than pp x virtual"),
             (dict(dp=3), "not divisible by dp x microbatches"),
             (dict(schedule="1f1b", vpp=2), "interleaved"),
             (dict(schedule="zigzag"), "unknown schedule")]
    for kwargs, text in cases:
        with pytest.raises(ValueError, match=text):
            _job(**kwargs)
    with pytest.raises(ValueError, match="ffn_hidden=30 is not divisible by tp=4"):
        TrainJob(model=GPTConfig(**dict(MODEL, ffn_hidden=30)), tp=4, global_batch=8)
    for kwargs, text in ((dict(lr=-1.0), "lr must be a positive"), (dict(bucket_mb=0), "bucket_mb must be")):
        with pytest.raises(ValueError, match=text):
            TrainJob(model=GPTConfig(**MODEL), global_batch=8, **kwargs)
    assert _job(pp=2, schedule="zb1p", vpp=2).num_virtual == 2   # zero-bubble runs virtual stages too
