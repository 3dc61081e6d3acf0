"""ipc.sched partial-order reduction and run-ahead, after the cold review (B1, B4, B5, R1, R3, N1):
what a run-ahead must not change (the steps the checker sees, the hang timer, an abort, the
decisions counted, the history's repeats)."""

from __future__ import annotations

import pytest
from sched_kit import DATA, data  # noqa: F401  (fixture)

from ipc.sched import pool, strategies
from ipc.shm import Region


def _own_body(run_id: str, rounds: int = 6):
    """Each client loads and stores its own word only (nobody races: every step after a turn runs
    ahead), then a shared one (word 1)."""
    from ipc.sched.points import SharedPoints

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        m = SharedPoints(r, c, "data", {"stats": None}, "access")
        w = r.word("w")
        for _ in range(rounds):
            m.store(w + 4 + i, m.load(w + 4 + i) + 1)
        m.store(w + 1, m.load(w + 1) + 1)
        return b"ok"

    return body


def test_b5_the_checker_is_told_the_log_index_of_the_next_step_not_its_call_count(run_id, data):
    steps: list[int] = []
    strat = strategies.Pct(1, 2, 2, 20, strategies.Footprint())
    s, out, _ = pool.run_forked(run_id, 2, _own_body(run_id), strat, 1000, check=steps.append)
    assert s.outcome == "done" and out == [b"ok", b"ok"]
    assert len(steps) < len(s.log)  # run-ahead: fewer hand-offs than steps
    assert steps == sorted(set(steps)) and steps[0] == 0
    assert steps[-1] == len(s.log)  # the last check runs after every step: its index is the log's length


def _slow_body(run_id: str, steps: int, pause: float, stall_at: int = -1, stall: float = 0.0):
    """Client 0 takes ``steps`` accesses of its own word (run-ahead steps), ``pause`` s each (a
    loaded host), and stalls ``stall`` s before access ``stall_at``; it counts them in word 6."""
    from ipc.sched.points import SharedPoints

    def body(i: int, c) -> bytes:
        import time

        r = Region.attach(run_id, DATA)
        m = SharedPoints(r, c, "data", {"stats": None}, "access")
        w = r.word("w")
        if i == 0:
            for k in range(steps):
                time.sleep(stall if k == stall_at else pause)
                m.store(w + 4, k)
                r.mem.store(w + 6, k + 1)  # not a point: how far it got
        return b"ok"

    return body


def test_r1_a_long_run_ahead_of_short_steps_is_no_hang(run_id, data):
    # 12 steps of 0.1 s in one run-ahead: 1.2 s > hang_s, each step well under it
    strat = strategies.Pct(0, 2, 2, 20, strategies.Footprint())
    strat.prio = [9, 1]  # client 0 first: its whole program is one run-ahead
    s, out, _ = pool.run_forked(run_id, 2, _slow_body(run_id, 12, 0.1), strat, 1000, hang_s=0.6)
    assert s.outcome == "done", (s.outcome, s.detail)
    assert int(data.v["w"][6]) == 12


def test_r3_an_abort_stops_a_run_ahead_and_its_steps_are_logged(run_id, data):
    # client 0 runs ahead 4 steps, then stalls past hang_s (the scheduler aborts: "hang"), then
    # resumes while the pool still waits for its report: its next access must end it
    strat = strategies.Pct(0, 2, 2, 20, strategies.Footprint())
    strat.prio = [9, 1]
    s, _, _ = pool.run_forked(run_id, 2, _slow_body(run_id, 40, 0.0, stall_at=5, stall=0.75), strat, 1000,
                              hang_s=0.5)
    assert s.outcome == "hang", (s.outcome, s.detail)
    assert [i for i, _, _ in s.log].count(0) == 5, s.log  # its turn and the 4 run-ahead steps
    assert int(data.v["w"][6]) == 5  # no access after the abort


class _StepByStep(strategies.Pct):
    run_ahead = False


def _ending_body(run_id: str):
    """Both clients idle at once (every client ended or idles: both are enabled, "ending"); the
    one chosen ends its idling and then reads and writes the shared word 1, the other idles on."""
    from ipc.sched.points import SharedPoints

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        m = SharedPoints(r, c, "data", {"stats": None}, "access")
        w = r.word("w")
        while True:
            c.idle("park")
            if c.finishing():
                break
        for _ in range(3):
            m.load(w + 1)
        m.store(w + 1, m.load(w + 1) + 1)
        return b"ok"

    return body


def test_n1_idle_clients_enabled_only_by_the_ending_are_not_counted_in_a_run_ahead(run_id, data):
    decisions, logs = [], []
    for cls in (strategies.Pct, _StepByStep):
        fp = strategies.Footprint()
        for _ in range(2):  # the second schedule knows that both touch word 1
            data.v["w"][:] = 0
            strat = cls(0, 2, 2, 20, fp)
            strat.prio = [9, 1]
            strat.change = {19: 0}
            s, out, _ = pool.run_forked(run_id, 2, _ending_body(run_id), strat, 1000)
            assert s.outcome == "done" and out == [b"ok", b"ok"], s.detail
        decisions.append(strat.decisions)
        logs.append(s.log)
    assert logs[0] == logs[1]
    assert decisions[0] == decisions[1]  # a step-by-step run counts no decision while 1 cannot run


def test_b1_a_parked_clients_pending_write_makes_the_running_clients_access_a_decision():
    fp = strategies.Footprint()  # nothing learnt yet
    load_x, store_x = 5 << 2 | 1, 5 << 2 | 2
    p = strategies.Pct(0, 2, 2, 10, fp)
    p.prio, p.change = [9, 1], {9: 0}
    # client 0 ran last and is about to load X; parked client 1 is about to store X: a decision
    assert p.pick([0, 1], 1, 0, (load_x, store_x)) == 0 and p.decisions == 1
    assert fp.racy(load_x, 0)


def _reader_writer_body(run_id: str):
    """Client 0 loads word 1 three times; client 1 stores it once."""
    from ipc.sched.points import SharedPoints

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        m = SharedPoints(r, c, "data", {"stats": None}, "access")
        w = r.word("w")
        if i == 0:
            for _ in range(3):
                m.load(w + 1)
        else:
            m.store(w + 1, 7)
        return b"ok"

    return body


def test_b1_a_first_schedule_counts_the_race_with_a_parked_writer_as_step_by_step(run_id, data):
    decisions, logs = [], []
    for cls in (strategies.Pct, _StepByStep):
        strat = cls(0, 2, 2, 20, strategies.Footprint())
        strat.prio, strat.change = [9, 1], {19: 0}
        s, out, _ = pool.run_forked(run_id, 2, _reader_writer_body(run_id), strat, 1000)
        assert s.outcome == "done" and out == [b"ok", b"ok"], s.detail
        decisions.append(strat.decisions)
        logs.append(s.log)
    assert logs[0] == logs[1] and decisions[0] == decisions[1] >= 2, decisions


def test_b4_a_run_ahead_past_an_idle_client_is_never_taken_for_a_repeat():
    """/tmp/hdemo.py: schedule S1 ran client 0 ahead while client 1 idled (a kick could wake it:
    the recorded state (0,) is a guess); a later schedule learnt that client 1 writes X. A PCT
    draw whose real run chooses client 1 at step 1 must not be skipped as S1's repeat."""
    from ipc.sched.points import K_LOAD, K_NONE, K_STORE

    x, idle_pt, end0 = 5 << 2 | K_LOAD, (1 << 47 | 7) << 2 | K_NONE, (1 << 47 | 9) << 2 | K_NONE
    fp = strategies.Footprint()
    s1 = strategies.RandomWalk(0, fp)
    s1._chose((0,), (end0, idle_pt), 0)  # step 0: a turn (client 1 idle, not woken)
    s1.ran(0, (0,), (x, idle_pt), approx=True)  # step 1: run ahead past the idle client
    hist = strategies.History()
    hist.add(s1)
    fp.add(5 << 2 | K_STORE, 1)
    for seed in range(50):
        p = strategies.Pct(seed, 2, 2, 2, fp)
        if p.prio[1] > p.prio[0] and 1 in p.change:
            real = p.clone()
            real.pick([0], 0, -1, (end0, idle_pt))
            assert real.pick([0, 1], 1, 0, (x, idle_pt)) == 1  # the real run: another schedule
            assert not hist.seen(p)
            break
    else:
        pytest.fail("no such draw")
    exact = strategies.RandomWalk(0, strategies.Footprint())  # the same steps, exact states: a repeat
    exact._chose((0,), (end0, idle_pt), 0)
    exact.ran(0, (0,), (x, idle_pt))
    h2 = strategies.History()
    h2.add(exact)
    assert h2.seen(strategies.RandomWalk(0, strategies.Footprint()))
