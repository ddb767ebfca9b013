"""PipelineEngine on gloo ranks: loss and every gradient equal the one-process model.

Each test starts one world and runs many checks in it (tests/pp_reference.py), so the
whole file stays well under a few minutes on two cores.
"""
import pytest

from plait.launch import run_ranks
from pp_reference import bad_input_cases, dead_peer, engine_cases, tp_cases


@pytest.mark.parametrize("p", [2, 4])
def test_every_schedule_matches_one_process(p):
    # gpipe, 1f1b, interleaved (v=2), zb1p (v=1, 2) x m in {1, 2, 4, 8} (m < p included), float64 to
    # 1e-10, uneven microbatches, sequence length changing between steps, eval_step; on p=2 also
    # float32, loss_reduction="sum", a hand-written V-shape schedule and a lowered schedule read from text.
    results = run_ranks(engine_cases, p, timeout=400)
    assert all(r["checks"] > 100 for r in results)
    if p == 2:
        for rank, result in enumerate(results):
            peaks = result["peaks"]
            assert all(live == 0 for _, _, live in peaks.values())
            assert peaks["gpipe"][1] == 8 and peaks["1f1b"][1] == 2 - rank
            # 1F1B holds fewer microbatches than GPipe, and the bytes show it.
            assert peaks["1f1b"][0] * 3 <= peaks["gpipe"][0], peaks


def test_tensor_parallel_stages():
    assert run_ranks(tp_cases, 4, timeout=300) == [16] * 4


def test_bad_input_is_a_value_error_before_any_communication():
    messages = run_ranks(bad_input_cases, 2, timeout=200)
    assert len(messages[0]) == len(messages[1]) == 13


@pytest.mark.parametrize("mode", ["hang", "exit"])
def test_a_dead_rank_gives_the_others_a_clear_error(mode):
    results = run_ranks(dead_peer, 2, mode, timeout=120, env={"PLAIT_TIMEOUT_S": "3"})
    assert results[1] == "stopped"
    message = results[0]
    assert message.startswith("CommTimeoutError" if mode == "hang" else ("CommTimeoutError", "CommError")), message
    assert "pipeline rank 0 waiting for" in message and "pipeline rank 1" in message, message
    if mode == "hang":
        assert "within 3 s" in message and "group 'pp'" in message, message
