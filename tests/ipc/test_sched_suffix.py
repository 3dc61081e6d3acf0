"""ipc.sched partial-order reduction by what the other clients may still touch (ipc/sched/
strategies.py, "What the others may still touch"): learnt per (client, op phase, point), a client
that ended touches nothing, the run-ahead agrees with a step-by-step run, and no order of two
conflicting accesses is lost."""

from __future__ import annotations

from sched_kit import DATA, data  # noqa: F401  (fixture)

from ipc.sched import pool, strategies
from ipc.sched.points import K_DONE, K_LOAD, K_NONE, K_STORE, name_location
from ipc.shm import Region

OPS = ("op a", "op b", "op c")


def _op(name: str) -> int:
    return name_location(name) << 2 | K_NONE


def test_a_client_past_the_ops_that_write_a_location_races_no_more():
    x_load, x_store, y_store = 5 << 2 | K_LOAD, 5 << 2 | K_STORE, 6 << 2 | K_STORE
    fp = strategies.Footprint(ops=[name_location(n) for n in OPS])
    # client 1: op a stores X, op b stores Y only; client 0 loads X throughout (learnt: one schedule)
    walk = strategies.RandomWalk(0, fp)
    for c, locs in ((1, (x_load, _op("op a"))), (1, (x_load, x_store)), (1, (x_load, _op("op b"))),
                    (1, (x_load, y_store)), (0, (x_load, K_DONE))):
        walk._chose((0, 1), locs, c)
    fp.learn(walk.trail, walk.choices)
    p = strategies.Pct(0, 2, 2, 10, fp)
    p.prio, p.change = [9, 1], {9: 0}
    p.phase = [0, 1]  # client 1 in op a, about to store X: client 0's load of X is a decision
    assert p.pick([0, 1], 0, 0, (x_load, x_store)) == 0 and p.decisions == 1
    p.phase = [0, 2]  # client 1 in op b, at the point it stores Y from: what it does next is known
    assert p.pick([0, 1], 1, 0, (x_load, y_store)) == 0 and p.decisions == 1
    # at a point of op b no schedule reached: every location client 1 touched in op b or later
    assert not fp.racy(x_load, 0, [0, 2], [True, True], (x_load, 7 << 2 | K_LOAD))
    assert fp.racy(x_load, 0, [0, 1], [True, True], (x_load, 7 << 2 | K_LOAD))  # op a: it stores X
    # the bitmap the scheduler writes agrees: X is set for client 0 in op a, not in op b
    from ipc.sched.points import RACY_W, racy_pos

    w, bit = racy_pos(5)
    assert fp.bitmap(0, [0, 1], [True, True], (x_load, x_store))[RACY_W, w] & bit
    assert not fp.bitmap(0, [0, 2], [True, True], (x_load, y_store))[RACY_W, w] & bit


def test_a_client_that_ended_touches_nothing():
    fp = strategies.Footprint()
    x = 5 << 2 | K_STORE
    fp.add(x, 1)  # client 1 wrote X
    assert fp.racy(x, 0, [0, 0], [True, True], None)
    assert not fp.racy(x, 0, [0, 0], [True, False], None)  # its slot says K_DONE
    p = strategies.Pct(0, 3, 2, 10, fp)
    p.prio = [9, 1, 5]
    # client 1 ended: client 0's store to X is no decision (client 2 never touched X)
    assert p.pick([0, 2], 0, 0, (x, K_DONE, 9 << 2 | K_LOAD)) == 0 and p.decisions == 0


def _phased_body(run_id: str):
    """Client 1, op a: stores the shared word 2, op b: loads and stores its own word, op c: stores
    word 1. Client 0, op a: loads word 1, op b: loads word 2 four times, op c: stores word 1."""
    from ipc.sched.points import SharedPoints

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        m = SharedPoints(r, c, "data", {"stats": None}, "access")
        w = r.word("w")
        c.hit("op a")
        if i == 1:
            m.store(w + 2, 1)
        else:
            m.load(w + 1)
        c.hit("op b")
        for _ in range(4):
            if i == 1:
                m.store(w + 5, m.load(w + 5) + 1)
            else:
                m.load(w + 2)
        c.hit("op c")
        m.store(w + 1, m.load(w + 1) * 2 + i + 1)  # the order of the two writers shows in the value
        return b"%d" % m.load(w + 1)

    return body


def _explore(run_id, data, ops, cls=strategies.RandomWalk, seeds=range(24)):
    fp = strategies.Footprint(ops=[name_location(n) for n in ops])
    orders, decisions, logs = set(), [], []
    for seed in seeds:
        data.v["w"][:] = 0
        strat = cls(seed, fp)
        s, out, _ = pool.run_forked(run_id, 2, _phased_body(run_id), strat, 1000)
        assert s.outcome == "done", s.detail
        fp.learn(strat.trail, strat.choices)
        orders.add(int(data.v["w"][1]))
        decisions.append(strat.decisions)
        logs.append(s.log)
    return orders, decisions, logs


def test_the_phases_cut_decisions_and_keep_every_order_of_the_conflicting_writes(run_id, data):
    plain_orders, plain_dec, _ = _explore(run_id, data, ())
    orders, dec, _ = _explore(run_id, data, OPS)
    # 0 then 1: (0*2+1)*2+2 = 4; 1 then 0: (0*2+2)*2+1 = 5; both load before either stores: 1 or 2
    assert orders == plain_orders == {1, 2, 4, 5}
    assert sum(dec) < sum(plain_dec), (dec, plain_dec)


class _StepByStep(strategies.RandomWalk):
    run_ahead = False


def test_a_run_ahead_by_the_phases_is_the_step_by_step_interleaving(run_id, data):
    _, dec, logs = _explore(run_id, data, OPS)
    _, dec1, logs1 = _explore(run_id, data, OPS, _StepByStep)
    assert logs == logs1 and dec == dec1
