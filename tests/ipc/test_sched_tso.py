"""ipc/sched/tso.py: the x86-TSO memory model of controlled schedules. The store-buffer litmus test
(SB: each process stores its flag, then loads the other's): under tso some schedule ends with both
loads 0, under sc none does, and with a full barrier between the store and the load none does
either; a schedule replays with the same outcome (its flushes are seeded); forwarding, the bound."""

from __future__ import annotations

import pytest
from sched_kit import DATA, data  # noqa: F401  (fixture)

from ipc import _prims, sched
from ipc.sched import pool, strategies, tso
from ipc.shm import Region

SCHEDULES = 200


def _sb_body(run_id: str, fence: str = ""):
    """Client i stores 1 to word i, then (``fence``: ``smp_mb`` / ``xchg``, a locked RMW of a word of
    its own) loads word 1 - i; its report is the value it loaded."""

    def body(i: int, c, job: int) -> bytes:
        r = Region.attach(run_id, DATA)
        try:
            tso.begin(c)
            m = sched.shared_points(r, "data", {"stats": None})
            w = r.word("w")
            m.store(w + i, 1)
            if fence == "smp_mb":
                _prims.smp_mb()
            elif fence == "xchg":
                m.xchg(w + 2 + i, 1)
            got = m.load(w + 1 - i)
            own = m.load(w + i)  # forwarded from its own buffer if still there: always 1
            tso.settle(c, False)
            return bytes([got, own])
        finally:
            r.close()

    return body


def _outcomes(run_id: str, data, model: str, fence: str = "", n: int = SCHEDULES) -> list[tuple]:
    """(loaded by client 0, by client 1, client 0's log) of ``n`` random-walk schedules."""
    old = tso.set_model(model)
    try:
        out = []
        with pool.Pool(run_id, 2, _sb_body(run_id, fence)) as p:
            for k in range(n):
                data.v["w"][:] = 0
                tso.announce(p.region, p.hdr, k)
                s, raw = p.run(strategies.RandomWalk(k), 1000)
                assert s.outcome == "done" and all(r[1] == 1 for r in raw)  # a process sees its own store
                assert list(data.v["w"][:2]) == [1, 1]  # every store reached memory by the end
                out.append((raw[0][0], raw[1][0], s.log))
        return out
    finally:
        tso.set_model(old)


def test_tso_finds_the_store_buffer_outcome_and_sc_never_does(run_id, data):
    tso_runs = _outcomes(run_id, data, "tso")
    both_zero = sum(1 for a, b, _ in tso_runs if a == b == 0)
    assert both_zero > 0, f"tso: no schedule of {SCHEDULES} loaded 0 in both processes"
    assert all((a, b) != (0, 0) for a, b, _ in _outcomes(run_id, data, "sc"))


@pytest.mark.parametrize("fence", ["smp_mb", "xchg"])
def test_a_full_barrier_forbids_it_under_tso(run_id, data, fence):
    assert all((a, b) != (0, 0) for a, b, _ in _outcomes(run_id, data, "tso", fence))


def test_a_tso_schedule_replays_with_the_same_outcome(run_id, data):
    runs = _outcomes(run_id, data, "tso", n=60)
    k = next(k for k, (a, b, _) in enumerate(runs) if a == b == 0)
    old = tso.set_model("tso")
    try:
        with pool.Pool(run_id, 2, _sb_body(run_id)) as p:
            for _ in range(3):
                data.v["w"][:] = 0
                tso.announce(p.region, p.hdr, k)  # the memory seed of schedule k
                s, raw = p.run(strategies.Replay([(i, pt) for i, pt, _ in runs[k][2]]), 1000)
                assert s.outcome == "done" and (raw[0][0], raw[1][0]) == (0, 0)
    finally:
        tso.set_model(old)


def test_store_buffer_forwards_the_newest_value_and_stays_bounded():
    stored: list[tuple[int, int]] = []

    class Mem:
        def store(self, w, v):
            stored.append((w, v))

    b, m = tso.StoreBuffer(), Mem()
    b.begin(1, 0)
    b.put(7, m, 7, 1)
    b.put(7, m, 7, 2)
    assert b.last[7][0] == 2 and not stored  # newest value forwarded, nothing in memory yet
    b.flush_one()
    assert stored == [(7, 1)] and b.last[7] == [2, 1]  # memory has the older one, forwarding the newer
    for k in range(tso.BOUND + 3):
        b.put(100 + k, m, 100 + k, k)
    assert len(b.q) == tso.BOUND  # the oldest were written, in order
    assert stored[:3] == [(7, 1), (7, 2), (100, 0)]
    b.drain()
    assert not b.q and not b.last and stored[-1] == (100 + tso.BOUND + 2, tso.BOUND + 2)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown memory model"):
        tso.set_model("arm")
