"""ipc.sched: forked processes run one at a time between scheduling points; the scheduler's choice
is the interleaving (PCT, random walk, replay); blocking is modelled; deadlocks are reported."""

from __future__ import annotations

import pytest
from sched_kit import DATA, data  # noqa: F401  (fixture)

from ipc import fuzz, sched
from ipc.locks import init_lockstat, new_lock
from ipc.sched import pool, strategies
from ipc.shm import Region


def _counter_body(run_id: str, incs: int = 2):
    """Each client increments word 0 non-atomically (load, point, store): a lost update needs the
    other client to run between a load and its store."""

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        for _ in range(incs):
            v = r.mem.load(0)
            fuzz.point("between load and store")
            r.mem.store(0, v + 1)
            fuzz.point("after store")
        return b"ok"

    return body


def test_clients_run_one_at_a_time_and_the_log_is_the_interleaving(run_id, data):
    s, out, codes = pool.run_forked(run_id, 2, _counter_body(run_id), strategies.RandomWalk(1), 1000)
    assert s.outcome == "done" and out == [b"ok", b"ok"] and codes == [0, 0]
    assert sorted(i for i, _, _ in s.log).count(0) == sorted(i for i, _, _ in s.log).count(1) == 4
    # every step is a (client, point) choice, point ids are the names' crc32
    assert {p for _, p, _ in s.log} == {sched.point_id("between load and store"), sched.point_id("after store")}


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_a_strategy_finds_the_lost_update_and_replay_repeats_it(run_id, data, strategy):
    found = None
    for seed in range(40):
        data.v["w"][:] = 0
        strat = strategies.RandomWalk(seed) if strategy == "random" else strategies.Pct(seed, 2, 2, 8)
        s, _, _ = pool.run_forked(run_id, 2, _counter_body(run_id), strat, 1000)
        assert s.outcome == "done"
        if int(data.v["w"][0]) != 4:
            found = s.log
            break
    assert found is not None, "no interleaving with a lost update in 40 schedules"
    lost = int(data.v["w"][0])
    for _ in range(3):
        data.v["w"][:] = 0
        s, _, _ = pool.run_forked(run_id, 2, _counter_body(run_id), strategies.Replay([(i, p) for i, p, _ in found]),
                                   len(found) + 1)
        assert s.outcome == "done" and s.log == found and int(data.v["w"][0]) == lost


def test_same_seed_same_interleaving(run_id, data):
    logs = [pool.run_forked(run_id, 2, _counter_body(run_id), strategies.Pct(7, 2, 3, 8), 1000)[0].log
            for _ in range(2)]
    assert logs[0] == logs[1]


def test_replay_of_a_point_that_does_not_exist_is_a_mismatch(run_id, data):
    s, _, _ = pool.run_forked(run_id, 2, _counter_body(run_id), strategies.RandomWalk(3), 1000)
    bad = [(i, p) for i, p, _ in s.log]
    bad[2] = (bad[2][0], sched.point_id("no such point"))
    s2, _, codes = pool.run_forked(run_id, 2, _counter_body(run_id), strategies.Replay(bad), len(bad) + 1)
    assert s2.outcome == "mismatch" and "step 2" in s2.detail
    assert codes == [1, 1]  # both clients unwound (ScheduleAborted) and exited


def _lock_body(run_id: str, order: tuple[int, int] | None):
    """Client i takes lock A then B (or, with ``order``, client 1 takes them reversed)."""

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        locks = [new_lock("spin", r.mem, r.word("locks", k), tag=i + 1, name=f"L{k}") for k in (0, 1)]
        assert isinstance(locks[0], sched.SchedLock)  # wrapped at creation in a scheduled process
        first, second = (0, 1) if order is None or i == 0 else order
        for _ in range(2):
            locks[first].lock()
            locks[second].lock()
            v = r.mem.load(1)
            fuzz.point("in critical section")
            r.mem.store(1, v + 1)
            locks[second].unlock()
            locks[first].unlock()
        return b"ok"

    return body


def test_blocking_on_a_descheduled_holder_yields_and_mutual_exclusion_holds(run_id, data):
    retries = 0
    for seed in range(15):
        data.v["w"][:] = 0
        s, out, _ = pool.run_forked(run_id, 2, _lock_body(run_id, None), strategies.RandomWalk(seed), 2000)
        assert s.outcome == "done" and out == [b"ok", b"ok"]
        assert int(data.v["w"][1]) == 4  # no lost update under the (scheduled) lock
        retries += sum(b for _, _, b in s.log)
    assert retries > 0  # some client met the lock held by a descheduled one, blocked, retried


def test_opposite_lock_order_is_reported_as_a_deadlock_not_a_hang(run_id, data):
    outcomes = set()
    for seed in range(30):
        data.v["locks"][:] = 0
        s, _, _ = pool.run_forked(run_id, 2, _lock_body(run_id, (1, 0)), strategies.RandomWalk(seed), 2000)
        outcomes.add(s.outcome)
        if s.outcome == "deadlock":
            assert "process 0 at @" in s.detail and "process 1 at @" in s.detail  # both blocked, named
            break
    assert "deadlock" in outcomes


def test_step_bound(run_id, data):
    s, _, _ = pool.run_forked(run_id, 2, _counter_body(run_id, incs=50), strategies.RandomWalk(1), 10)
    assert s.outcome == "step-bound" and len(s.log) == 10


def test_pct_priorities_and_guarantee():
    p = strategies.Pct(1, 3, 3, 100)
    assert sorted(p.prio) == [3, 4, 5] and len(p.change) == 2 and sorted(p.change.values()) == [1, 2]
    assert strategies.guarantee(2, 10, 3) == pytest.approx(1 / 200)
    # the highest-priority enabled process runs; at a change point the running one drops
    top = max(range(3), key=p.prio.__getitem__)
    assert p.pick([0, 1, 2], 0, -1) == top and p.decisions == 0  # nobody ran yet: no decision
    # change points are counted in decisions (steps where the running process could go on and
    # another could run instead); without a footprint every such step is one
    c = min(p.change)
    for d in range(1, c):
        assert p.pick([0, 1, 2], d, top) == top and p.decisions == d
    assert p.pick([0, 1, 2], c, top) != top and p.decisions == c


def _release_then_spin_body(run_id: str):
    """Process 0 takes and releases L, then spin-waits for a flag; process 1 takes L, sets the flag,
    releases L. The step that ended at process 0's first spin released L: that is progress."""

    def body(i: int, c) -> bytes:
        from ipc import _prims

        r = Region.attach(run_id, DATA)
        lk = new_lock("spin", r.mem, r.word("locks", 0), tag=i + 1, name="L")
        lk.lock()
        if i == 0:
            lk.unlock()
            while not r.mem.load(2):
                _prims.sched_yield()
        else:
            r.mem.store(2, 1)
            lk.unlock()
        return b"ok"

    return body


def test_a_block_after_a_release_is_progress_not_a_deadlock(run_id, data):
    bad = []
    for seed in range(40):
        data.v["w"][:] = 0
        data.v["locks"][:] = 0
        s, out, _ = pool.run_forked(run_id, 2, _release_then_spin_body(run_id), strategies.RandomWalk(seed), 2000)
        if s.outcome != "done":
            bad.append((seed, s.outcome, len(s.log)))
    assert bad == []


def test_the_scheduler_clears_its_wake_word_with_a_full_barrier(run_id, data, monkeypatch):
    """store(WAKE, 0) then loads of the states may be reordered (store buffer) and lose a WAKE=1:
    the scheduler must clear it with xchg (seq_cst), never a plain store."""
    plain = []
    init = sched.Scheduler.__init__

    class Spy:
        def __init__(self, mem, wake):
            self.m, self.wake = mem, wake

        def store(self, w, v):
            if w == self.wake:
                plain.append(v)
            self.m.store(w, v)

        def __getattr__(self, a):
            return getattr(self.m, a)

    def spy_init(self, region, *a, **k):
        init(self, region, *a, **k)
        self.mem = Spy(self.mem, self.hdr + sched.H_WAKE)

    monkeypatch.setattr(sched.Scheduler, "__init__", spy_init)
    s, _, _ = pool.run_forked(run_id, 2, _counter_body(run_id), strategies.RandomWalk(1), 1000)
    assert s.outcome == "done" and len(s.log) == 8 and plain == []


def _stat_lock_body(run_id: str, finish_holding: bool = False):
    """Each process takes and releases L (lock_stat on) twice; or each takes it, one of them ends
    holding it."""

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        lk = new_lock("spin", r.mem, r.word("locks", 0), r.word("stats"), tag=i + 1, name="L")
        if finish_holding:
            lk.lock()
            return b"ok"
        for _ in range(2):
            lk.lock()
            fuzz.point("in critical section")
            lk.unlock()
        return b"ok"

    return body


def test_a_scheduled_lock_counts_one_contention_per_acquisition_that_waited(run_id, data):
    wait = sched.point_id("L: wait")
    total = 0
    for seed in range(10):
        init_lockstat(data.v["stats"])
        data.v["locks"][:] = 0
        s, _, _ = pool.run_forked(run_id, 2, _stat_lock_body(run_id), strategies.RandomWalk(seed), 2000)
        assert s.outcome == "done"
        prev: dict[int, int] = {}
        waited = 0
        for i, p, _ in s.log:  # resumed at "L: wait" after something else: one acquisition that waited
            waited += p == wait and prev.get(i) != wait
            prev[i] = p
        assert int(data.v["stats"][0]) == 4 and int(data.v["stats"][1]) == waited
        total += waited
    assert total > 0


def test_a_lock_left_held_by_a_finished_process_names_its_holder(run_id, data):
    for seed in range(10):
        data.v["locks"][:] = 0
        s, _, _ = pool.run_forked(run_id, 2, _stat_lock_body(run_id, True), strategies.RandomWalk(seed), 2000)
        assert s.outcome == "deadlock"
        assert any(f"process {b} at @{sched.point_id('L: wait')} (lock held by process {1 - b}, which has finished)"
                   in s.detail for b in (0, 1)), s.detail


def _idle_kick_body(run_id: str, serve: bool = True):
    """Process 0 ends its program "in L2" and idles; process 1 posts a request (word 4) and
    spin-waits for its acknowledgement (word 5), which only process 0 can give: as a reload
    request's kick and KVM_REQUEST_WAIT (flood-drop's deadlock of the harness, issue 20)."""

    def body(i: int, c) -> bytes:
        from ipc import _prims

        r = Region.attach(run_id, DATA)
        if i == 0:
            fuzz.point("enter L2")
            while True:
                c.idle("L2 runs on")
                if r.mem.load(4) and serve:
                    r.mem.store(4, 0)
                    r.mem.store(5, r.mem.load(5) + 1)
                    continue
                if c.finishing():
                    break
        else:
            fuzz.point("request")
            r.mem.store(4, 1)
            while not r.mem.load(5):
                _prims.sched_yield()
        return b"ok"

    return body


def test_an_idle_client_is_run_only_when_woken_or_at_the_end(run_id, data):
    idle = sched.point_id("L2 runs on")
    for seed in range(12):
        data.v["w"][:] = 0
        s, out, _ = pool.run_forked(run_id, 2, _idle_kick_body(run_id), strategies.RandomWalk(seed), 200,
                                         wake=lambda i: i == 0 and bool(data.v["w"][4]))
        assert s.outcome == "done" and out == [b"ok", b"ok"], s.detail
        assert int(data.v["w"][5]) == 1
        # resumed twice: for the request, then to end (no step while nothing is pending for it)
        assert sum(p == idle for _, p, _ in s.log) == 2, s.log


def test_an_idle_client_nobody_wakes_is_named_in_the_deadlock(run_id, data):
    data.v["w"][:] = 0
    s, _, _ = pool.run_forked(run_id, 2, _idle_kick_body(run_id), strategies.RandomWalk(1), 200)
    assert s.outcome == "deadlock"
    assert f"process 0 idle at @{sched.point_id('L2 runs on')} (nothing pending for it)" in s.detail, s.detail
    assert f"process 1 at @{sched.point_id('sched_yield (spin wait)')}" in s.detail, s.detail


def test_an_idle_client_whose_turn_does_not_clear_its_kick_is_a_named_deadlock(run_id, data):
    """The wake says a kick is pending, but the idle client's turn changes nothing (its take_kick is
    broken): a deadlock naming it, not a loop of idle turns to the step bound."""
    data.v["w"][:] = 0
    s, _, _ = pool.run_forked(run_id, 2, _idle_kick_body(run_id, serve=False), strategies.RandomWalk(1), 200,
                                   wake=lambda i: i == 0 and bool(data.v["w"][4]))
    assert s.outcome == "deadlock", (s.outcome, s.detail)
    assert "process 0 idle at" in s.detail and "woken, but its last turn did not clear" in s.detail, s.detail


# -- per-access points, statistics, partial-order reduction (issue 22 items 3, 4) ---------------
def _shared_body(run_id: str, mode: str, rounds: int = 1):
    """Each client reads and writes shared words through ``SharedPoints`` (``stats`` declared as
    statistics): a counter bump, a racing read-modify-write by load / store, an atomic add."""
    from ipc.sched.points import SharedPoints

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, DATA)
        m = SharedPoints(r, c, "data", {"stats": None}, mode)
        w = r.word("w")
        for _ in range(rounds):
            m.fetch_add(r.word("stats") + 3, 1)  # statistics: never a point
            m.store(w + 4 + i, m.load(w + 4 + i) + 1)  # this client's own word: no other touches it
            v = m.load(w + 1)
            m.store(w + 1, v + 1)
            m.fetch_add(w + 2, 1)
        return b"ok"

    return body


@pytest.mark.parametrize("mode", ["access", "atomic"])
def test_shared_accesses_are_points_and_statistics_are_not(run_id, data, mode):
    s, out, _ = pool.run_forked(run_id, 2, _shared_body(run_id, mode), strategies.RandomWalk(1), 1000)
    assert s.outcome == "done" and out == [b"ok", b"ok"]
    names = [f"data.w[{w}] {op}" for w in (1, 2, 4, 5) for op in ("load", "store", "fetch_add")]
    ids = {sched.point_id(n): n for n in names}
    seen = {ids.get(p, p) for _, p, _ in s.log}
    if mode == "access":
        assert {"data.w[1] load", "data.w[1] store", "data.w[2] fetch_add"} <= seen
    else:  # the read-modify-writes only
        assert "data.w[2] fetch_add" in seen and "data.w[1] load" not in seen and "data.w[1] store" not in seen
    assert not any(isinstance(p, int) for p in seen)  # nothing else: no point at the statistics word
    assert int(data.v["stats"][3]) == 2 and int(data.v["w"][2]) == 2


def test_statistics_words_come_from_the_declared_layouts():
    from ipc.sched.points import statistic_words
    from vm import layout as L
    from vm.avic import table as T
    from vm.config import from_dict

    cfg = from_dict({"vcpus": 2, "fuzz": "off"})
    lay = L.vm_layout(cfg)
    st = statistic_words(lay, L.STATISTICS)
    flags, counters = lay["flags"].offset // 8, lay["counters"].offset // 8
    assert flags + L.F_WARNS in st and flags + L.F_WRITE_TRACKING not in st and flags + L.F_RUN_STATE not in st
    assert all(counters + k in st for k in range(cfg.nprocs * L.NCOUNTERS))
    alay = T.avic_layout(cfg)
    ast = statistic_words(alay, T.STATISTICS)
    hdr, tables = alay["hdr"].offset // 8, alay["tables"].offset // 8
    assert {hdr + T.H_LIVE, tables + T.T_SYNCS, tables + T.TW + T.T_WRITES} <= ast
    assert hdr + T.H_GEN not in ast and tables + T.T_STATE not in ast and tables + T.TW + T.T_REF not in ast


def test_blocked_retries_are_no_decisions_and_consume_no_change_point():
    fp = strategies.Footprint()
    code = 7 << 2 | 2  # a store to location 7
    fp.add(code, 0)  # client 0 wrote it: client 1's store there races
    p = strategies.Pct(1, 2, 3, 10, fp)
    p.prio = [3, 4]
    p.change = {1: 2, 2: 1}
    # client 1 blocked (not enabled) after its step: client 0 alone runs, no decision, no change
    assert p.pick([0], 0, 1, (code, code)) == 0 and p.decisions == 0 and p.prio == [3, 4]
    # again a blocked retry of 1 that did not progress: 1 is not enabled, nothing counted
    assert p.pick([0], 1, 0, (code, code)) == 0 and p.decisions == 0
    # 1 enabled and running at a racing store: the first decision, its change point drops 1
    assert p.pick([0, 1], 2, 1, (code, code)) == 0 and p.decisions == 1 and p.prio[1] == 2
    # a step that races with nobody (location 9 only client 0 touched) is no decision
    own = 9 << 2 | 2
    assert p.pick([0, 1], 3, 0, (own, code)) == 0 and p.decisions == 1


def test_a_forked_schedule_counts_decisions_without_its_blocked_retries(run_id, data):
    fp = strategies.Footprint()  # learnt over the schedules: the locks are shared from the second on
    for seed in range(20):
        data.v["w"][:] = 0
        strat = strategies.Pct(seed, 2, 3, 20, fp)
        s, out, _ = pool.run_forked(run_id, 2, _lock_body(run_id, None), strat, 2000)
        assert s.outcome == "done"
        retries = [k for k, (_, _, b) in enumerate(s.log) if b]
        if retries:
            # a retry's client was not enabled at the step after it (it blocked again or went on):
            # the decisions counted are at most the steps that were not retries
            assert strat.decisions <= len(s.log) - len(retries)
            return
    pytest.fail("no schedule with a blocked retry in 20")


def test_run_ahead_gives_the_same_interleaving_with_fewer_turns(run_id, data):
    class NoRunAhead(strategies.Pct):
        run_ahead = False

    logs, turns = [], []
    for cls in (strategies.Pct, NoRunAhead):
        fp = strategies.Footprint()
        for seed in range(6):  # the footprint learns over the schedules, as in an exploration
            data.v["w"][:] = 0
            strat = cls(seed, 2, 3, 30, fp)
            s, _, _ = pool.run_forked(run_id, 2, _shared_body(run_id, "access", rounds=4), strat, 2000)
            assert s.outcome == "done"
            logs.append(s.log)
            turns.append(strat.turns)
    assert logs[:6] == logs[6:]
    assert sum(turns[:6]) < sum(turns[6:]) == sum(len(x) for x in logs[6:])


def test_history_knows_a_schedule_before_it_runs(run_id, data):
    fp, hist = strategies.Footprint(), strategies.History()
    first = strategies.RandomWalk(5, fp)
    s, _, _ = pool.run_forked(run_id, 2, _shared_body(run_id, "access"), first, 1000)
    hist.add(first)
    assert hist.seen(strategies.RandomWalk(5, fp))  # the same draw: the same schedule, skipped
    again = strategies.RandomWalk(5, fp)
    data.v["w"][:] = 0
    s2, _, _ = pool.run_forked(run_id, 2, _shared_body(run_id, "access"), again, 1000)
    assert s2.log == s.log
    novel = [sd for sd in range(6, 40) if not hist.seen(strategies.RandomWalk(sd, fp))]
    assert novel  # other seeds leave the tree somewhere
    data.v["w"][:] = 0
    other = strategies.RandomWalk(novel[0], fp)
    s3, _, _ = pool.run_forked(run_id, 2, _shared_body(run_id, "access"), other, 1000)
    assert s3.log != s.log
