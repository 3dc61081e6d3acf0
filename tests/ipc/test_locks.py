"""SpinLock / Mutex / RwLock (its write side) across processes: mutual exclusion, lock_stat
accounting, lockdep asserts, ownership errors, timeouts, futex wake-ups. The rw lock's read side:
tests/ipc/test_rwlock.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import ROOT, wait_until

from ipc import _prims
from ipc.locks import (
    LOCK_WORDS,
    STAT_WORDS,
    LockdepError,
    init_lockstat,
    lockdep_assert_held,
    merge_lockstat,
    new_lock,
)
from ipc.shm import Layout, Region

NPROCS = 4
YIELD_EVERY = 16
# control words (one cache line each)
C_COUNTER, C_GO, C_READY, C_HOLD, C_RELEASE, C_RESULT = 0, 1, 2, 3, 4, 5


def layout() -> Layout:
    return Layout("locks", [
        ("locks", "i8", (3, LOCK_WORDS)),
        ("lockstat", "i8", (NPROCS + 1, 2, STAT_WORDS)),
        ("ctl", "i8", (8, 8)),
        ("res", "i8", (NPROCS + 1, 8)),
    ])


def _make(region_factory):
    r = region_factory(layout())
    init_lockstat(r.v["lockstat"])
    return r


# -- workers (run in forkserver children) ----------------------------------------------------------
def counter_worker(run_id: str, me: int, kind: str | None, n: int, gap_ns: int, busted: bool = False):
    """n increments of a shared counter by load ... store (not atomic), under lock ``kind``
    (None = no lock), with ``gap_ns`` of busy time between the load and the store, and every
    YIELD_EVERY-th time a sched_yield there too: other processes then run inside the window even
    when the machine is so loaded that the workers share one core (each would otherwise finish
    within its time slice and never interleave)."""
    region = Region.attach(run_id, layout())
    try:
        mem, w = region.mem, region.word
        c = w("ctl", C_COUNTER)
        ld, st, spin, yld = mem.load, mem.store, _prims.spin_ns, _prims.sched_yield
        mem.fetch_add(w("ctl", C_READY), 1)
        go = w("ctl", C_GO)
        while not ld(go):
            _prims.sched_yield()
        if kind is None:
            for i in range(n):
                v = ld(c)
                spin(gap_ns)
                if i % YIELD_EVERY == 0:
                    yld()
                st(c, v + 1)
        else:
            lk = new_lock(kind, mem, w("locks", 0), w("lockstat", me, 0), tag=me + 1, busted=busted)
            for i in range(n):
                lk.lock()
                v = ld(c)
                spin(gap_ns)
                if i % YIELD_EVERY == 0:
                    yld()
                st(c, v + 1)
                lk.unlock()
    finally:
        region.close()


def holder_worker(run_id: str, kind: str, tag: int):
    """Take lock 0, say so, hold it until told to release."""
    region = Region.attach(run_id, layout())
    try:
        mem, w = region.mem, region.word
        lk = new_lock(kind, mem, w("locks", 0), -1, tag=tag)
        lk.lock()
        mem.store(w("ctl", C_HOLD), 1)
        while not mem.load(w("ctl", C_RELEASE)):
            time.sleep(0.001)
        lk.unlock()
        mem.store(w("ctl", C_HOLD), 2)
    finally:
        region.close()


class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted()


def waiter_worker(run_id: str, me: int, interruptible: bool):
    """Block in Mutex.lock(); record when it got the lock (res[me, 0]) or -1 if a signal
    interrupted the wait."""
    region = Region.attach(run_id, layout())
    try:
        mem, w = region.mem, region.word
        if interruptible:
            signal.signal(signal.SIGUSR1, _raise_interrupted)
        lk = new_lock("mutex", mem, w("locks", 0), -1, tag=me + 1)
        mem.store(w("res", me) + 1, 1)  # ready
        try:
            lk.lock()
        except Interrupted:
            mem.store(w("res", me), -1)
            return
        mem.store(w("res", me), _prims.now_ns())
        lk.unlock()
    finally:
        region.close()


def _run_counter(ctx, procs, region, run_id, kind, n, gap_ns, busted=False, nprocs=NPROCS) -> int:
    v = region.v["ctl"]
    v[:] = 0
    ps = [ctx.Process(target=counter_worker, args=(run_id, i + 1, kind, n, gap_ns, busted))
          for i in range(nprocs)]
    procs.extend(ps)
    for p in ps:
        p.start()
    wait_until(lambda: region.mem.load(region.word("ctl", C_READY)) == nprocs, 30, what="workers ready")
    region.mem.store(region.word("ctl", C_GO), 1)
    for p in ps:
        p.join(60)
    assert [p.exitcode for p in ps] == [0] * nprocs
    return int(v[C_COUNTER, 0])


# -- mutual exclusion ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_counter_exact_and_lock_stat(ctx, procs, region_factory, run_id, kind):
    region = _make(region_factory)
    n, gap = 1500, 2000
    total = _run_counter(ctx, procs, region, run_id, kind, n, gap)
    assert total == NPROCS * n, f"{kind}: lost updates under the lock ({total} != {NPROCS * n})"

    st = merge_lockstat(region.v["lockstat"], ["lock0", "unused"])
    assert set(st) == {"lock0"}  # a class never acquired is left out
    s = st["lock0"]
    assert s["acquisitions"] == NPROCS * n
    assert s["contentions"] > 0, "holders yield inside the critical section: the others must contend"
    assert s["contentions"] <= s["acquisitions"]
    assert 0 <= s["wait_ns_min"] <= s["wait_ns_avg"] <= s["wait_ns_max"]
    assert s["hold_ns_min"] <= s["hold_ns_avg"] <= s["hold_ns_max"]
    # every hold contains spin_ns(gap): the stats clock (TSC or clock_gettime) converts right
    assert s["hold_ns_min"] >= gap * 0.9, s
    assert s["hold_ns_total"] >= NPROCS * n * gap * 0.9
    assert s["wait_ns_total"] >= s["wait_ns_max"]
    # per process: exact counts, merged = sum
    per = region.v["lockstat"][1:NPROCS + 1, 0, 0]
    assert list(per) == [n] * NPROCS
    # the lock is free and no owner remains
    assert region.mem.load(region.word("locks", 0)) == 0


@pytest.mark.parametrize("case", ["no-lock", "busted-spin", "busted-mutex", "busted-rw"])
def test_counter_detects_lost_updates(ctx, procs, region_factory, run_id, case):
    """Control: the same test without mutual exclusion must see lost updates (it can fail)."""
    region = _make(region_factory)
    kind = None if case == "no-lock" else case.split("-")[1]
    n, gap = 400, 5000
    for _attempt in range(5):
        total = _run_counter(ctx, procs, region, run_id, kind, n, gap, busted=kind is not None)
        if total < NPROCS * n:
            return
    pytest.fail(f"{case}: no lost update in 5 attempts: the counter test cannot detect a broken lock")


# -- lockdep, ownership, recursion -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_lockdep_and_ownership(region_factory, kind):
    region = _make(region_factory)
    mem, w = region.mem, region.word
    a = new_lock(kind, mem, w("locks", 0), w("lockstat", 0, 0), tag=1)
    b = new_lock(kind, mem, w("locks", 0), w("lockstat", 1, 0), tag=2)  # "another process"
    with pytest.raises(LockdepError, match="mmu_lock not held"):
        lockdep_assert_held(a, "mmu_lock")
    assert a.lock() is True
    lockdep_assert_held(a, "mmu_lock")  # passes
    assert a.is_held() and not b.is_held()
    assert a.owner() == 1 and b.owner() == 1
    with pytest.raises(LockdepError):
        lockdep_assert_held(b)
    with pytest.raises(RuntimeError, match="unlock by tag 2"):
        b.unlock()  # non-owner
    assert a.is_held(), "a failed foreign unlock must not release the lock"
    with pytest.raises(RuntimeError, match="recursive"):
        a.lock()
    assert b.trylock() is False
    assert b.lock(1_000_000) is False  # 1 ms timeout, held "elsewhere"
    a.unlock()
    assert a.owner() == 0 and not a.is_held()
    with pytest.raises(RuntimeError):
        a.unlock()  # not held at all
    with pytest.raises(LockdepError):
        lockdep_assert_held(a)
    assert b.trylock() is True
    b.unlock()
    with a:  # context manager
        lockdep_assert_held(a)
    assert not a.is_held()
    st = merge_lockstat(region.v["lockstat"], ["x"])["x"]
    assert st["acquisitions"] == 3  # a.lock, b.trylock, with a


def test_busted_lock_and_bad_args(region_factory):
    region = _make(region_factory)
    mem, w = region.mem, region.word
    lk = new_lock("spin", mem, w("locks", 0), -1, tag=1, busted=True)
    assert lk.lock() and lk.lock() and lk.is_held()  # does not lock (fault injection)
    lk.unlock()
    assert mem.load(w("locks", 0)) == 0
    with pytest.raises(ValueError, match="unknown lock kind"):
        new_lock("rwlock", mem, 0)
    with pytest.raises(ValueError, match="tag"):
        new_lock("spin", mem, w("locks", 0), tag=0)
    with pytest.raises(IndexError):
        new_lock("mutex", mem, mem.nwords - 4)


@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_timeout_when_held_by_another_process(ctx, procs, region_factory, run_id, kind):
    region = _make(region_factory)
    mem, w = region.mem, region.word
    p = ctx.Process(target=holder_worker, args=(run_id, kind, 7))
    procs.append(p)
    p.start()
    wait_until(lambda: mem.load(w("ctl", C_HOLD)) == 1, 30, what="holder")
    lk = new_lock(kind, mem, w("locks", 0), w("lockstat", 0, 0), tag=1)
    t = time.monotonic()
    assert lk.lock(100_000_000) is False  # 100 ms
    dt = time.monotonic() - t
    assert dt >= 0.09
    assert dt < 5.0
    assert lk.trylock() is False
    assert not lk.is_held() and lk.owner() == 7
    with pytest.raises(LockdepError):
        lockdep_assert_held(lk)
    s = merge_lockstat(region.v["lockstat"], ["l"]).get("l", {})  # no row: nothing counted yet
    assert s.get("acquisitions", 0) == 0 and s.get("contentions", 0) == 0  # the timed-out attempt is not counted
    mem.store(w("ctl", C_RELEASE), 1)
    t = time.monotonic()
    assert lk.lock(10_000_000_000) is True
    assert time.monotonic() - t < 5.0
    lockdep_assert_held(lk)
    lk.unlock()
    p.join(10)
    assert p.exitcode == 0
    s = merge_lockstat(region.v["lockstat"], ["l"])["l"]
    # contended unless the holder saw the release and unlocked before this lock() began (a race)
    assert s["acquisitions"] == 1 and s["contentions"] in (0, 1)


def test_mutex_sleeper_is_woken_on_unlock(ctx, procs, region_factory, run_id):
    """A waiter sleeping in the futex is woken by unlock (well before its 50 ms safety timeout)."""
    region = _make(region_factory)
    mem, w = region.mem, region.word
    lk = new_lock("mutex", mem, w("locks", 0), -1, tag=100)
    lats = []
    for _ in range(5):
        region.v["res"][:] = 0
        lk.lock()
        p = ctx.Process(target=waiter_worker, args=(run_id, 1, False))
        procs.append(p)
        p.start()
        wait_until(lambda: mem.load(w("res", 1) + 1) == 1, 30, what="waiter")
        wait_until(lambda: mem.load(w("locks", 0)) & 0xFFFFFFFF == 2, 10, what="waiter asleep")
        time.sleep(0.005)
        t = _prims.now_ns()
        lk.unlock()
        p.join(10)
        assert p.exitcode == 0
        lats.append(int(region.v["res"][1, 0]) - t)
    assert min(lats) > 0
    assert sorted(lats)[2] < 20_000_000, f"median wake latency {sorted(lats)[2]} ns: lost futex wake-ups?"


def test_mutex_interrupted_waiter_passes_on_wakeup(ctx, procs, region_factory, run_id):
    """Two sleepers; unlock wakes one of them, which a signal handler makes give up (exception).
    The wake-up must reach the other sleeper at once, not after its 50 ms futex timeout
    (regression: an interrupted waiter swallowed the wake-up)."""
    region = _make(region_factory)
    mem, w = region.mem, region.word
    lk = new_lock("mutex", mem, w("locks", 0), -1, tag=100)
    slow = []
    for _round in range(12):
        region.v["res"][:] = 0
        lk.lock()
        ps = [ctx.Process(target=waiter_worker, args=(run_id, i, i == 1)) for i in (1, 2)]
        procs.extend(ps)
        for i, p in enumerate(ps, 1):
            p.start()  # one after the other: the first one queues first on the futex
            wait_until(lambda i=i: mem.load(w("res", i) + 1) == 1, 30, what="waiter")
        wait_until(lambda: mem.load(w("locks", 0)) & 0xFFFFFFFF == 2, 10, what="waiters asleep")
        time.sleep(0.01)
        os.kill(ps[0].pid, signal.SIGUSR1)
        t = _prims.now_ns()
        lk.unlock()
        for p in ps:
            p.join(10)
        assert [p.exitcode for p in ps] == [0, 0]
        r1, r2 = int(region.v["res"][1, 0]), int(region.v["res"][2, 0])
        assert r2 > 0, "the second waiter never got the lock"
        if r1 == -1 and r2 - t > 25_000_000:
            slow.append(r2 - t)
    assert len(slow) <= 1, f"woken waiter interrupted -> other sleeper waited {slow} ns (lost wake-up)"


def test_stats_off_and_trylock_accounting(region_factory):
    region = _make(region_factory)
    mem, w = region.mem, region.word
    for kind in ("spin", "mutex"):
        lk = new_lock(kind, mem, w("locks", 1), -1, tag=3)
        for _ in range(100):
            lk.lock()
            lk.unlock()
    assert not region.v["lockstat"][..., 0].any()
    lk = new_lock("spin", mem, w("locks", 1), w("lockstat", 2, 1), tag=3)
    assert lk.trylock()
    _prims.spin_ns(200_000)
    lk.unlock()
    s = merge_lockstat(region.v["lockstat"], ["a", "b"])["b"]
    assert s["acquisitions"] == 1 and s["contentions"] == 0 and s["wait_ns_min"] == 0
    assert 190_000 <= s["hold_ns_min"] == s["hold_ns_max"] < 1_000_000_000
    # acq_ns (lock word 1) is CLOCK_MONOTONIC ns
    acq = int(region.v["locks"][1, 1])
    assert 0 < _prims.now_ns() - acq < 60_000_000_000


def test_lock_after_region_close_raises(run_id):
    """Lock objects outliving their region raise instead of touching unmapped memory."""
    lay = layout()
    r = Region.create(run_id, lay)
    try:
        lk = new_lock("spin", r.mem, r.word("locks", 0), -1, tag=1)
        mx = new_lock("mutex", r.mem, r.word("locks", 1), -1, tag=1)
        rw = new_lock("rw", r.mem, r.word("locks", 2), -1, tag=1)
    finally:
        r.close()
    for obj in (lk, mx, rw):
        for meth in ("lock", "unlock", "is_held", "trylock"):
            with pytest.raises(ValueError, match="released"):
                getattr(obj, meth)()
    for meth in ("read_lock", "read_unlock", "read_held", "read_trylock", "readers"):
        with pytest.raises(ValueError, match="released"):
            getattr(rw, meth)()
    with pytest.raises(ValueError, match="released"):
        lockdep_assert_held(lk)


def test_merge_lockstat_across_processes_synthetic():
    arr = np.zeros((3, 1, STAT_WORDS), dtype=np.int64)
    init_lockstat(arr)
    arr[0, 0, :9] = [10, 2, 300, 200, 100, 1000, 400, 50, 10]
    arr[2, 0, :9] = [5, 1, 50, 50, 50, 500, 150, 60, 4]  # one hold never ended (its holder died)
    s = merge_lockstat(arr, ["c"])["c"]
    assert s["acquisitions"] == 15 and s["contentions"] == 3 and s["holds"] == 14
    assert s["wait_ns_min"] == 50 and s["wait_ns_max"] == 200 and s["wait_ns_avg"] == 350 // 3
    assert s["hold_ns_min"] == 50 and s["hold_ns_max"] == 400 and s["hold_ns_avg"] == 1500 // 14


_CLOSE_WHILE_WAITING = textwrap.dedent("""
    import sys, threading, time
    sys.path.insert(0, {root!r})
    from ipc.locks import new_lock
    from ipc.shm import Layout, Region

    for kind in ("mutex", "spin", "rw"):
        r = Region.create({run_id!r} + kind[0], Layout("cw", [("locks", "i8", (1, 8))]))
        a = new_lock(kind, r.mem, r.word("locks", 0), -1, tag=1, spins=10)
        b = new_lock(kind, r.mem, r.word("locks", 0), -1, tag=2, spins=10)
        a.lock()
        out = []

        def waiter():
            try:
                b.lock()
                out.append("locked")
            except ValueError as e:
                out.append(str(e))

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)
        r.close()  # another thread closes the region under the blocked waiter
        t.join(5)
        assert not t.is_alive(), kind
        assert out and "released" in out[0], (kind, out)
    print("ok")
""")


def test_region_closed_under_a_blocked_waiter(tmp_path, run_id):
    """Closing a region while another thread waits on one of its locks: the waiter gets
    ValueError, nobody touches unmapped memory (run in a subprocess: a bug would segfault)."""
    script = tmp_path / "cw.py"
    script.write_text(_CLOSE_WHILE_WAITING.format(root=str(ROOT), run_id=run_id))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_hold_avg_counts_completed_holds_only(region_factory, kind):
    """A hold that never ends (its holder died) is an acquisition but not a hold: it must not pull
    the hold average below the minimum hold (issue 12, defect 5)."""
    region = _make(region_factory)
    mem, w = region.mem, region.word
    lk = new_lock(kind, mem, w("locks", 0), w("lockstat", 1, 0), tag=2)
    for _ in range(3):
        lk.lock()
        _prims.spin_ns(1_000_000)
        lk.unlock()
    lk.lock()  # "dies" holding it: never released
    s = merge_lockstat(region.v["lockstat"], ["l"])["l"]
    assert s["acquisitions"] == 4
    assert s["hold_ns_min"] >= 900_000
    assert s["hold_ns_min"] <= s["hold_ns_avg"] <= s["hold_ns_max"], s
    assert s["hold_ns_avg"] == s["hold_ns_total"] // 3
