"""plait's GPT trained by plait.train on DP x PP x TP layouts equals the one-process run: losses, gradient norms,
parameters and AdamW moments after 3 steps, on synthetic data (the same batches on every layout).

float64 over the torch (gloo) communicators; the bounds and why they hold are in tests/gpt_jobs.py. The
parameters and moments are compared as each layout saves them (plait.train's checkpoint: whole tensors by
name), so the checkpoint is shown to be the same whatever the layout. The jobs of one world size run one
after another on the same ranks (one start-up each).
"""
import pytest

from gpt_jobs import assert_same_run, job_dict, run_jobs
from plait.launch import run_ranks

pytest.importorskip("safetensors")

LAYOUTS = {  # name: (dp, pp, tp) and further settings
    "dp2": dict(dp=2), "pp2": dict(pp=2), "tp2": dict(tp=2), "dp2 pp2": dict(dp=2, pp=2),
    "pp2 tp2": dict(pp=2, tp=2), "dp2 pp2 tp2": dict(dp=2, pp=2, tp=2),
    "pp2 gpipe": dict(pp=2, schedule="gpipe"), "pp2 interleaved vpp2": dict(pp=2, schedule="interleaved", vpp=2),
    "pp2 zb1p": dict(pp=2, schedule="zb1p"), "pp2 tp2 sp": dict(pp=2, tp=2, sp=True),
    "dp2 no overlap": dict(dp=2, dp_overlap=False),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout's outcome (rank 0's; every rank reports the same) and the one-process run's under "one"."""
    root = tmp_path_factory.mktemp("3d")
    jobs = {"one": job_dict()} | {name: job_dict(**settings) for name, settings in LAYOUTS.items()}
    by_world: dict[int, list[str]] = {}
    for name, spec in jobs.items():
        spec.update(comm="torch", save=str(root / name.replace(" ", "-")))
        by_world.setdefault(spec.get("dp", 1) * spec.get("pp", 1) * spec.get("tp", 1), []).append(name)
    out = {}
    for world, names in sorted(by_world.items()):
        results = run_ranks(run_jobs, world, [jobs[n] for n in names], timeout=300)
        for i, name in enumerate(names):
            assert all(r[i]["losses"] == results[0][i]["losses"] for r in results), f"{name}: ranks disagree"
            out[name] = dict(results[0][i], overlapped=[r[i]["overlapped"] for r in results])
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, runs):
    assert_same_run(runs[name], runs["one"], name)
    if LAYOUTS[name].get("dp", 1) > 1:
        overlap = LAYOUTS[name].get("dp_overlap", True)   # the DP reduction starts before backward ends, or after
        assert all(flags == [overlap] * 3 for flags in runs[name]["overlapped"]), runs[name]["overlapped"]
    else:
        assert all(flag is None for flags in runs[name]["overlapped"] for flag in flags)


def test_synthetic_batches_are_one_function_of_seed_and_step():
    """Every DP rank's rows are its slice of one global batch of (seed, step); the data is learnable counting."""
    import torch

    from plait.train.data import SyntheticBatches

    one, two = SyntheticBatches(32, 8, 8, dp=1, seed=1), SyntheticBatches(32, 8, 8, dp=2, seed=1)
    for step in range(3):
        ids, targets = one.batch(step, 0)
        assert ids.shape == targets.shape == (8, 8) and ids.dtype == torch.int64
        assert torch.equal(ids[:, 1:], targets[:, :-1])                   # targets are the next tokens
        halves = [two.batch(step, d) for d in range(2)]
        assert torch.equal(torch.cat([h[0] for h in halves]), ids)
        assert torch.equal(torch.cat([h[1] for h in halves]), targets)
        assert torch.equal(SyntheticBatches(32, 8, 8, dp=1, seed=1).batch(step, 0)[0], ids)
        assert int(ids.min()) >= 0 and int(ids.max()) < 32
    assert not torch.equal(one.batch(0, 0)[0], one.batch(1, 0)[0])
    assert not torch.equal(one.batch(0, 0)[0], SyntheticBatches(32, 8, 8, dp=1, seed=2).batch(0, 0)[0])
    ids, targets = SyntheticBatches(32, 64, 256, dp=1, seed=0).batch(0, 0)
    step = (targets - ids) % 32                                           # the stride, except at noise tokens
    counting = (step >= 1) & (step <= 3)
    assert 0.75 < counting.double().mean() < 0.9                          # ~81% of pairs have no noise token


def test_bad_configurations_are_caught_before_training():
    from plait.train import TrainJob

    cases = [(dict(tp=3), "num_heads=4 is not divisible by tp=3"),
             (dict(pp=4, vpp=2, schedule="interleaved"), "fewer than pp x virtual"),
             (dict(dp=3), "not divisible by dp x microbatches"),
             (dict(schedule="1f1b", vpp=2), "interleaved"),
             (dict(schedule="zigzag"), "unknown schedule"),
             (dict(gpt="layers=4,hidden=16,heads=4,vocab=32,ffn=30", tp=4), "ffn_hidden=30 is not divisible by tp=4"),
             (dict(lr=-1.0), "lr must be > 0"), (dict(bucket_mb=0), "bucket_mb must be > 0"),
             (dict(synthetic=False), r"give data \(a token file to train on\) or synthetic"),
             (dict(data="tokens.bin"), "give data .* or synthetic .*, not both"),
             (dict(synthetic="yes"), "synthetic must be a bool"),
             (dict(shuffle=True), "shuffle does not apply to synthetic data"),
             (dict(eval_fraction=0.1), "eval_fraction does not apply to synthetic data"),
             (dict(data_dtype="uint16"), "data_dtype does not apply to synthetic data")]
    for settings, text in cases:
        with pytest.raises(ValueError, match=text):
            TrainJob.from_dict(job_dict(**settings))
    assert TrainJob.from_dict(job_dict(pp=2, schedule="zb1p", vpp=2)).vpp == 2   # zero-bubble runs virtual stages
    assert TrainJob.from_dict(job_dict(data_dtype="uint32", eval_data="held-out.u32")).data_dtype == "uint32"
