"""plait.pp's schedule IR, generators, text form, lowering, validator and simulator (pure Python)."""
import itertools

import pytest

from plait.pp import (Action, Kind, Schedule, ScheduleError, build_schedule, load_schedule, parse_action,
                      parse_schedule)
from plait.pp.schedules import round_sizes

ALL = [(name, v) for name in ("gpipe", "1f1b") for v in (1,)] + \
      [("interleaved", v) for v in (2, 3, 4)] + [("zb1p", v) for v in (1, 2, 3, 4)]


def edited(schedule: Schedule, edit) -> Schedule:
    rows = [list(row) for row in schedule.actions]
    edit(rows)
    return Schedule.from_lists(rows, schedule.num_microbatches, schedule.placement)


def fault(schedule: Schedule, *fragments: str) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        schedule.validate()
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in\n{text}"
    assert "step | rank 0" in text and ">" in info.value.grid  # the grid, with the fault marked
    return info.value


# ------------------------------------------------------------------------------------ the IR
def test_compact_form_round_trips():
    for kind in Kind:
        for stage, mb in ((0, 0), (3, 12), (17, 5)):
            action = Action(stage, kind, mb)
            assert parse_action(str(action)) == action
    assert str(Action(1, Kind.F, 3)) == "1F3" and Action.parse("0SEND_B2") == Action(0, Kind.SEND_B, 2)
    assert Action.parse(" 12RECV_F7 ") == Action(12, Kind.RECV_F, 7)
    assert Action(0, "W", 1).kind is Kind.W
    for bad in ("F3", "1X3", "1F", "1SEND3", "-1F0", "1 F 3 4"):
        with pytest.raises(ValueError, match="cannot read action"):
            Action.parse(bad)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="non-negative int"):
            Action(bad, Kind.F, 0)


def test_text_and_csv_round_trip(tmp_path):
    for name, v in ALL:
        for p, m in ((2, 3), (4, 8)):
            schedule = build_schedule(name, p, m, v)
            for form in (schedule, schedule.lower()):
                back = parse_schedule(form.to_text())
                assert (back.actions, back.num_microbatches, back.placement, back.name) == \
                       (form.actions, form.num_microbatches, form.placement, form.name)
            csv = parse_schedule(schedule.to_csv(), num_microbatches=m, placement=schedule.placement)
            assert csv.actions == schedule.actions
    path = tmp_path / "mine.csv"
    path.write_text('0F0,0F1,0B0,0B1\n"1F0","1B0",1F1,1B1,\n')
    loaded = load_schedule(path)
    assert loaded.num_ranks == 2 and loaded.placement == (0, 1) and loaded.num_microbatches == 2
    loaded.validate()


def test_reading_a_bad_schedule_says_which_line():
    with pytest.raises(ValueError, match="line 2: cannot read action '1Q0'"):
        parse_schedule("0F0 0B0\n1Q0")
    with pytest.raises(ValueError, match="rank 0 is listed twice"):
        parse_schedule("rank 0: 0F0\nrank 0: 0B0")
    with pytest.raises(ValueError, match=r"ranks \[1\] have no line"):
        parse_schedule("rank 0: 0F0 0B0\nrank 2: 1F0")
    with pytest.raises(ValueError, match="cannot read 'microbatches'"):
        parse_schedule("microbatches: many\n0F0")
    with pytest.raises(ValueError, match="holds no actions"):
        parse_schedule("# nothing\n\n")
    with pytest.raises(ValueError, match=r"stages \[1\] have no compute action"):
        parse_schedule("0F0 0B0 2F0 2B0")


def test_build_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        build_schedule("pipedream", 4, 8)
    with pytest.raises(ValueError, match=r"need one of the schedules \('interleaved', 'zb1p'\)"):
        build_schedule("1f1b", 4, 8, num_virtual=2)
    with pytest.raises(ValueError, match="num_virtual >= 2"):
        build_schedule("interleaved", 4, 8, num_virtual=1)
    for kwargs in ({"num_stages": 0}, {"num_microbatches": 0}, {"num_virtual": 0}, {"num_stages": 2.0}):
        args = {"num_stages": 2, "num_microbatches": 4, "num_virtual": 1, **kwargs}
        with pytest.raises(ValueError, match="must be a positive int"):
            build_schedule("gpipe", **args)
    assert build_schedule("ZB1P", 2, 2).name == "zb1p"


# ----------------------------------------------------------------------- generators, lowering
def test_generated_schedules_are_valid_and_lowered_consistently():
    # Every configuration p <= 8, m <= 16 for v <= 2 (m < p included: it must work, not hang),
    # and a spread of m for v = 3, 4.
    for (name, v), p in itertools.product(ALL, range(1, 9)):
        for m in (range(1, 17) if v <= 2 else sorted({1, max(1, p - 1), p, p + 1, 2 * p, 16})):
            schedule = build_schedule(name, p, m, v).validate()
            assert schedule.num_ranks == p and schedule.num_stages == p * v and schedule.num_virtual == v
            lowered = schedule.lower()
            assert lowered.compute_only().actions == schedule.actions
            assert not schedule.is_lowered and (lowered.is_lowered == (p > 1))
            if p > 1:
                assert lowered.lower() is lowered
            sends = sum(a.kind in (Kind.SEND_F, Kind.SEND_B) for row in lowered.actions for a in row)
            recvs = sum(a.kind in (Kind.RECV_F, Kind.RECV_B) for row in lowered.actions for a in row)
            assert sends == recvs == (2 * m * (p * v - 1) if p > 1 else 0)


def test_forward_only_schedule():
    schedule = build_schedule("zb1p", 4, 6, 2)
    forward = schedule.forward_only()
    assert forward.is_forward_only and {a.kind for row in forward.actions for a in row} == {Kind.F}
    forward.validate()
    lowered = forward.lower()
    assert {a.kind for row in lowered.actions for a in row} == {Kind.F, Kind.SEND_F, Kind.RECV_F}
    assert forward.simulate().peak_activations == (0, 0, 0, 0)


def test_round_sizes():
    assert round_sizes(4, 3) == [3] and round_sizes(4, 8) == [4, 4] and round_sizes(4, 9) == [5, 4]
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        sizes = round_sizes(p, m)
        assert sum(sizes) == m and max(sizes) - min(sizes) <= 1 and (m < p or min(sizes) >= p)


# ------------------------------------------------------------------------------- validator
def test_validator_catches_a_dropped_send():
    lowered = build_schedule("1f1b", 4, 4).lower()
    error = fault(edited(lowered, lambda rows: rows[1].remove(Action.parse("1SEND_F2"))),
                  "missing 1SEND_F2 on rank 1", "dropped send")
    assert error.marks[(1, lowered.actions[1].index(Action.parse("1F2")))].startswith("its result is never sent")
    fault(edited(lowered, lambda rows: rows[0].remove(Action.parse("0RECV_B1"))), "missing 0RECV_B1 on rank 0")


def test_validator_catches_swapped_actions():
    def swap(rank, i, j):
        def edit(rows):
            rows[rank][i], rows[rank][j] = rows[rank][j], rows[rank][i]
        return edit

    gpipe = build_schedule("gpipe", 2, 2)  # rank 0: 0F0 0F1 0B0 0B1
    error = fault(edited(gpipe, swap(0, 1, 2)), "deadlock", "rank 0 at 0B0 waits for 1B0", "rank 1 at 1F1 waits for 0F1")
    assert set(error.marks) == {(0, 1), (1, 1)}
    fault(edited(build_schedule("1f1b", 4, 8), swap(3, 0, 1)), "3B0 at step 0 of rank 3 needs 3F0", "swap them")
    zb = build_schedule("zb1p", 2, 4)
    i, j = zb.actions[1].index(Action.parse("1I0")), zb.actions[1].index(Action.parse("1W0"))
    fault(edited(zb, swap(1, i, j)), f"1W0 at step {i} of rank 1 needs 1I0")
    lowered = build_schedule("1f1b", 2, 4).lower()  # rank 1 posts RECV_F2 then SEND_B1, rank 0 the reverse
    i, j = lowered.actions[1].index(Action.parse("1RECV_F2")), lowered.actions[1].index(Action.parse("1SEND_B1"))
    fault(edited(lowered, swap(1, i, j)), "post their transfers in different orders")
    k = lowered.actions[1].index(Action.parse("1F1"))
    fault(edited(lowered, lambda rows: rows[1].insert(k + 1, rows[1].pop(rows[1].index(Action.parse("1RECV_F1"))))),
          "1RECV_F1 comes after 1F1")


def test_validator_catches_duplicated_and_missing_work():
    one = build_schedule("1f1b", 2, 4)
    fault(edited(one, lambda rows: rows[0].insert(3, Action.parse("0F1"))), "0F1 appears 2 times", "duplicated")
    fault(edited(one, lambda rows: rows[0].__setitem__(rows[0].index(Action.parse("0F3")), Action.parse("0F2"))),
          "0F2 appears 2 times")
    fault(edited(one, lambda rows: rows[1].remove(Action.parse("1B2"))), "stage 1 never runs the backward B of "
                                                                          "microbatch 2: add 1B2 to rank 1")
    zb = build_schedule("zb1p", 2, 2)
    fault(edited(zb, lambda rows: rows[0].remove(Action.parse("0W1"))), "never runs the backward W of microbatch 1")
    fault(edited(zb, lambda rows: rows[0].append(Action.parse("0B1"))), "both a full backward B and a split one")
    fault(edited(one, lambda rows: rows[0].append(Action.parse("1F9"))), "1F9 names microbatch 9")
    fault(edited(one, lambda rows: rows[0].append(Action.parse("1B0"))), "1B0 is on rank 0, but stage 1 lives on rank 1")
    fault(edited(one, lambda rows: rows[1].append(Action.parse("5F0"))), "names stage 5")
    fault(edited(one.lower(), lambda rows: rows[1].append(Action.parse("1SEND_F0"))), "1SEND_F0 names no transfer")


# ------------------------------------------------------------------------------- simulator
def test_simulator_reproduces_published_bubbles():
    # Exhaustive over p <= 8, m <= 16, v <= 4 with forward 1, backward 2 (W 1).
    checked = 0
    for (name, v), p, m in itertools.product(ALL, range(1, 9), range(1, 17)):
        sim = build_schedule(name, p, m, v).simulate(forward=1.0, backward=2.0, weight=1.0)
        assert sim.busy == tuple([3.0 * m * v] * p)
        assert sim.idle == tuple(sim.makespan - b for b in sim.busy)
        assert sim.bubble_fraction == pytest.approx(sum(sim.idle) / (p * sim.makespan), abs=1e-12)
        if name in ("gpipe", "1f1b"):
            assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
            want = [m] * p if name == "gpipe" else [min(m, p - r) for r in range(p)]
            assert list(sim.peak_activations) == want
        elif name == "interleaved":
            formula = ((p - 1) / v) / (m + (p - 1) / v)
            if m >= p:
                assert sim.bubble_fraction == pytest.approx(formula, abs=1e-12), (p, m, v)
            else:  # fewer microbatches than ranks: still runs, with a larger bubble
                assert sim.bubble_fraction > formula
            g = round_sizes(p, m)[0]
            assert list(sim.peak_activations) == [min(m * v, (v - 1) * g + 2 * (p - 1 - r) + 1) for r in range(p)]
        elif v == 1:  # ZB-H1
            one = build_schedule("1f1b", p, m).simulate(1.0, 2.0, 1.0)
            assert max(sim.peak_activations) <= max(one.peak_activations)
            if m >= p:  # (p-1)(F+I-W) idle per rank: a third of 1F1B's (p-1)(F+B)
                assert sim.idle == pytest.approx([p - 1.0] * p, abs=1e-12)
                assert sim.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
                assert sim.bubble_time == pytest.approx(one.bubble_time / 3, abs=1e-12)
            else:
                assert sim.bubble_time < one.bubble_time
        else:  # interleaved zero bubble: no more memory than interleaved 1F1B, less bubble
            inter = build_schedule("interleaved", p, m, v).simulate(1.0, 2.0, 1.0)
            assert max(sim.peak_activations) <= max(inter.peak_activations)
            assert sim.bubble_time <= inter.bubble_time + 1e-9
        checked += 1
    assert checked == len(ALL) * 8 * 16


def test_simulator_costs():
    schedule = build_schedule("zb1p", 4, 8)
    default = schedule.simulate(forward=1.0, backward=3.0)
    assert default == schedule.simulate(forward=1.0, backward=3.0, weight=1.5)  # W is half of B by default
    assert default.busy[0] == 8 * 4.0
    p, m, c = 4, 8, 0.25
    gpipe = build_schedule("gpipe", p, m).simulate(forward=1.0, backward=2.0, p2p=c)
    assert gpipe.makespan == pytest.approx(3 * (m + p - 1) + 2 * (p - 1) * c)
    assert [(r, str(a)) for r, a, _, _ in gpipe.timeline[:2]] == [(0, "0F0"), (0, "0F1")]
    for bad in (dict(weight=3.0), dict(forward=0.0), dict(p2p=-1.0), dict(backward=float("nan"))):
        with pytest.raises(ValueError):
            schedule.simulate(**{"forward": 1.0, "backward": 2.0, **bad})


def test_simulating_a_deadlocked_user_schedule_names_the_blocked_actions():
    text = "rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F0 1F1 1B0 1B1\n"
    with pytest.raises(ScheduleError, match="deadlock") as info:
        parse_schedule(text).simulate()
    assert "rank 1 at 1F1 waits for 0F1 (rank 0)" in str(info.value)


def test_a_hand_written_schedule_simulates_like_the_generator():
    text = """
    # 1F1B on two ranks, written by hand
    microbatches: 3
    rank 0: 0F0 0F1 0B0 0F2 0B1 0B2
    rank 1: 1F0 1B0 1F1 1B1 1F2 1B2
    """
    mine = parse_schedule(text).validate()
    assert mine.actions == build_schedule("1f1b", 2, 3).actions
    assert mine.simulate() == build_schedule("1f1b", 2, 3).simulate()
