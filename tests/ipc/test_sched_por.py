"""ipc.sched partial-order reduction and run-ahead, after the cold review (B1, B4, B5, R1, R3, N1):
what a run-ahead must not change (the steps the checker sees, the hang timer, an abort, the
decisions counted, the history's repeats)."""

from __future__ import annotations

import pytest

from ipc.locks import LOCK_WORDS, init_lockstat
from ipc.sched import pool, strategies
from ipc.shm import Layout, Region

DATA = Layout("data", [("w", "i8", (8,)), ("locks", "i8", (2, LOCK_WORDS)), ("stats", "i8", (16,))])


@pytest.fixture
def data(region_factory):
    r = region_factory(DATA)
    r.v["w"][:] = 0
    r.v["locks"][:] = 0
    init_lockstat(r.v["stats"])
    return r


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
