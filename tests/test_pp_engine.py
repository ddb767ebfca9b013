"""PipelineEngine on gloo ranks: loss and every gradient equal the one-process model.

Each test starts one world and runs many checks in it (tests/pp_reference.py), so the
whole file stays well under a few minutes on two cores.
"""
import importlib.util
import json
import sys

import pytest

from plait.launch import run_ranks
from plait.pp import Action, Event, build_schedule, chrome_trace, gantt_png, measured_bubble
from pp_reference import bad_input_cases, dead_peer, engine_cases, tp_cases


@pytest.mark.parametrize("p,transport", [(2, "torch"), (4, "auto")])
def test_every_schedule_matches_one_process(p, transport, tmp_path):
    # gpipe, 1f1b, interleaved (v=2), zb1p (v=1, 2) x m in {1, 2, 4, 8} (m < p included), float64 to
    # 1e-10, uneven microbatches, sequence length changing between steps, eval_step; on p=2 also
    # float32, loss_reduction="sum", hand-written V-shape and reversed-order schedules, eval of
    # [seq, batch] outputs, a lowered schedule read from text, transfers over the shm communicator,
    # and the timeline (Chrome trace, Gantt PNG).
    results = run_ranks(engine_cases, p, transport, timeout=400)
    assert all(r["checks"] > 100 for r in results)
    if p == 2:
        for rank, result in enumerate(results):
            peaks = result["peaks"]
            assert all(live == 0 for _, _, live in peaks.values())
            assert peaks["gpipe"][1] == 8 and peaks["1f1b"][1] == 2 - rank
            # 1F1B holds fewer microbatches than GPipe, and the bytes show it.
            assert peaks["1f1b"][0] * 3 <= peaks["gpipe"][0], peaks
        check_timeline(results[0]["events"], tmp_path)
        assert results[1]["events"] == results[0]["events"]


def check_timeline(events, tmp_path):
    schedule = build_schedule("zb1p", 2, 4)
    for rank in range(2):
        computed = [str(e.action) for e in sorted(events, key=lambda e: e.start)
                    if e.rank == rank and e.category == "compute"]
        assert computed == [str(a) for a in schedule.actions[rank]]  # each action once, in schedule order
    assert all(e.end >= e.start for e in events) and {e.category for e in events} == {"compute", "post", "wait"}
    trace = chrome_trace(events, tmp_path / "trace.json")
    assert json.loads((tmp_path / "trace.json").read_text()) == trace
    assert sum(t["ph"] == "X" for t in trace["traceEvents"]) == len(events)
    bubble = measured_bubble(events, 2)
    assert 0 < bubble["bubble_fraction"] < 1 and len(bubble["busy"]) == 2
    png = gantt_png([("zb1p", events)], tmp_path / "gantt.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert png is None and not (tmp_path / "gantt.png").exists()
    else:
        assert png == tmp_path / "gantt.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_gantt_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    events = [Event(0, Action.parse("0F0"), "compute", 0.0, 1.0)]
    assert gantt_png(events, tmp_path / "g.png") is None and not (tmp_path / "g.png").exists()


def test_tensor_parallel_stages():
    assert run_ranks(tp_cases, 4, timeout=300) == [16] * 4


def test_bad_input_is_a_value_error_before_any_communication():
    messages = run_ranks(bad_input_cases, 2, timeout=200)
    assert len(messages[0]) == len(messages[1]) == 13


@pytest.mark.parametrize("mode,transport", [("hang", "torch"), ("exit", "torch"), ("hang", "auto"), ("exit", "auto")])
def test_a_dead_rank_gives_the_others_a_clear_error(mode, transport):
    results = run_ranks(dead_peer, 2, mode, transport, timeout=120, env={"PLAIT_TIMEOUT_S": "3"})
    assert results[1] == "stopped"
    message = results[0]
    assert message.startswith("CommTimeoutError" if mode == "hang" else ("CommTimeoutError", "CommError")), message
    assert "pipeline rank 0 waiting for" in message and "pipeline rank 1" in message, message
    if mode == "hang":
        assert "3 s" in message and "group 'pp'" in message, message
