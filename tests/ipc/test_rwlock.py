"""RwLock (``new_lock("rw", ...)``, the kernel's rwlock_t): its read side across processes -- writers
exclude readers and each other, readers hold it together, a pending writer keeps new readers out
(writer-preferring), lock_stat counts reads, a busted rw lock is caught by the exclusion test, a
dead writer is reported to readers and writers. The write side alone also runs through the
SpinLock / Mutex tests (test_locks.py, test_dead_holder.py, test_trace.py: kind "rw")."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import wait_until

from ipc import _prims, fuzz, sched
from ipc.locks import (
    LOCK_WORDS,
    STAT_WORDS,
    LockdepError,
    LockHolderDied,
    init_lockstat,
    lockdep_assert_held,
    lockdep_assert_held_read,
    merge_lockstat,
    new_lock,
)
from ipc.sched import pool, strategies
from ipc.shm import Layout, Region

NPROCS = 4
YIELD_EVERY = 16
BOUND_S = 10.0  # a dead writer is reported within this (generous: shared 2-core machine)
# control words (ctl, one line each): go / ready barrier, holder handshakes, pids
C_GO, C_READY, C_HOLD, C_RELEASE, C_WHOLD, C_WRELEASE, C_PID, C_WPID = range(8)
# shared data (data, one line each): the writers' two copies of a counter, how many writers /
# readers are inside, violations seen, reader overlaps seen
D_A, D_B, D_WRITERS, D_READERS, D_VIOL, D_OVERLAP = range(6)
RW_WORD_READERS = 5  # lock block word: readers inside


def layout() -> Layout:
    return Layout("rwlock", [
        ("locks", "i8", (2, LOCK_WORDS)),
        ("lockstat", "i8", (NPROCS + 1, 2, STAT_WORDS)),
        ("ctl", "i8", (8, 8)),
        ("data", "i8", (8, 8)),
    ])


@pytest.fixture
def region(region_factory):
    r = region_factory(layout())
    init_lockstat(r.v["lockstat"])
    return r


def _rw(region, tag, stats_proc=-1, **kw):
    sw = region.word("lockstat", stats_proc, 0) if stats_proc >= 0 else -1
    return new_lock("rw", region.mem, region.word("locks", 0), sw, tag=tag, **kw)


# -- workers (forkserver children) -------------------------------------------------------------------
def mixed_worker(run_id: str, me: int, writer: bool, n: int, gap_ns: int, busted: bool):
    """Writers: n times, under the write lock, A += 1 ... B = A (non-atomic, ``gap_ns`` of busy time
    and every YIELD_EVERY-th time a sched_yield in between, so that others run inside the window
    even on one core); a writer that finds another writer or a reader inside counts a violation.
    Readers: n times, under the read lock, read A, wait the same way, read B: A != B (a torn write)
    or a writer inside counts a violation; two readers inside at once count an overlap. Readers
    also wait ``gap_ns`` outside the lock (and often yield there): without moments with no reader inside, writers would
    only get in after the readers are done, and a reader that ignores a writer would go unseen."""
    region = Region.attach(run_id, layout())
    try:
        mem, w = region.mem, region.word
        d = {k: w("data", k) for k in (D_A, D_B, D_WRITERS, D_READERS, D_VIOL, D_OVERLAP)}
        ld, st, fa, spin, yld = mem.load, mem.store, mem.fetch_add, _prims.spin_ns, _prims.sched_yield
        lk = new_lock("rw", mem, w("locks", 0), w("lockstat", me, 0), tag=me + 1, busted=busted)
        fa(w("ctl", C_READY), 1)
        while not ld(w("ctl", C_GO)):
            yld()
        for i in range(n):
            if writer:
                lk.lock()
                if fa(d[D_WRITERS], 1) != 0 or ld(d[D_READERS]) != 0:
                    fa(d[D_VIOL], 1)
                v = ld(d[D_A]) + 1
                st(d[D_A], v)
                spin(gap_ns)
                if i % YIELD_EVERY == 0:
                    yld()
                st(d[D_B], v)
                if ld(d[D_READERS]) != 0:
                    fa(d[D_VIOL], 1)
                fa(d[D_WRITERS], -1)
                lk.unlock()
            else:
                lk.read_lock()
                if fa(d[D_READERS], 1) != 0:
                    fa(d[D_OVERLAP], 1)
                a = ld(d[D_A])
                spin(gap_ns)
                if i % YIELD_EVERY == 0:
                    yld()
                if ld(d[D_B]) != a or ld(d[D_A]) != a or ld(d[D_WRITERS]) != 0:
                    fa(d[D_VIOL], 1)
                fa(d[D_READERS], -1)
                lk.read_unlock()
                spin(gap_ns)
                if i % 4 == 0:
                    yld()
    finally:
        region.close()


def _hold(run_id: str, tag: int, die: bool, write: bool):
    """Take lock 0 for write or read, say so (C_WHOLD / C_HOLD = 1), then die holding it or hold it
    until C_WRELEASE / C_RELEASE (released 20 ms after, so a waiter started right after the release
    word really waits); the word is 2 once it is released."""
    region = Region.attach(run_id, layout())
    mem, w = region.mem, region.word
    held_w, release_w = (w("ctl", C_WHOLD), w("ctl", C_WRELEASE)) if write else (w("ctl", C_HOLD),
                                                                                  w("ctl", C_RELEASE))
    if write:
        mem.store(w("ctl", C_WPID), os.getpid())
    lk = new_lock("rw", mem, w("locks", 0), -1, tag=tag)
    (lk.lock if write else lk.read_lock)()  # (a writer waits for the readers as long as needed)
    mem.store(held_w, 1)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        while not mem.load(release_w):
            time.sleep(0.001)
        time.sleep(0.02)
        (lk.unlock if write else lk.read_unlock)()
        mem.store(held_w, 2)
    finally:
        region.close()


def reader_holder(run_id: str, tag: int, die: bool = False):
    _hold(run_id, tag, die, write=False)


def writer_holder(run_id: str, tag: int, die: bool = False):
    _hold(run_id, tag, die, write=True)


def _start(ctx, procs, target, *args):
    p = ctx.Process(target=target, args=args)
    procs.append(p)
    p.start()
    return p


def _run_mixed(ctx, procs, region, run_id, n, gap_ns, busted=False):
    """2 writers + 2 readers; returns (A, B, violations, overlaps)."""
    region.v["ctl"][:] = 0
    region.v["data"][:] = 0
    ps = [_start(ctx, procs, mixed_worker, run_id, i + 1, i % 2 == 0, n, gap_ns, busted) for i in range(NPROCS)]
    wait_until(lambda: region.mem.load(region.word("ctl", C_READY)) == NPROCS, 30, what="workers ready")
    region.mem.store(region.word("ctl", C_GO), 1)
    for p in ps:
        p.join(60)
    assert [p.exitcode for p in ps] == [0] * NPROCS
    d = region.v["data"][:, 0]
    return int(d[D_A]), int(d[D_B]), int(d[D_VIOL]), int(d[D_OVERLAP])


# -- mutual exclusion ------------------------------------------------------------------------------
def test_writers_exclude_writers_and_readers_across_processes(ctx, procs, region, run_id):
    n, gap = 600, 2000
    a, b, viol, _overlap = _run_mixed(ctx, procs, region, run_id, n, gap)
    assert viol == 0, f"{viol} violations: a writer met another writer or a reader, or a reader saw a torn write"
    assert a == b == 2 * n, f"lost updates under the write lock (A={a}, B={b}, want {2 * n})"
    st = merge_lockstat(region.v["lockstat"], ["rw", "unused"])
    assert set(st) == {"rw"}
    s = st["rw"]
    # reads and writes count into the same block: every worker's n outermost acquisitions
    assert s["acquisitions"] == NPROCS * n and s["holds"] == NPROCS * n
    assert list(region.v["lockstat"][1:NPROCS + 1, 0, 0]) == [n] * NPROCS
    assert 0 < s["contentions"] <= s["acquisitions"], "holders yield inside: somebody must wait"
    assert s["hold_ns_min"] >= gap * 0.9, s
    assert 0 <= s["wait_ns_min"] <= s["wait_ns_avg"] <= s["wait_ns_max"]
    # the lock is free: no writer, no reader
    lw = region.word("locks", 0)
    assert region.mem.load(lw) == 0 and region.mem.load(lw + RW_WORD_READERS) == 0


def test_busted_rwlock_is_caught_by_the_exclusion_test(ctx, procs, region, run_id):
    """Control: the same test with a lock that does not lock must fail (it can detect a bug)."""
    for _attempt in range(5):
        a, b, viol, _ = _run_mixed(ctx, procs, region, run_id, 300, 5000, busted=True)
        if viol > 0 or a != 600 or b != 600:
            return
    pytest.fail("busted rw lock: no violation in 5 attempts: the exclusion test cannot detect a broken lock")


# -- readers together, writer preference -------------------------------------------------------------
def test_two_processes_hold_it_for_read_at_once(ctx, procs, region, run_id):
    mem, w = region.mem, region.word
    _start(ctx, procs, reader_holder, run_id, 7)
    wait_until(lambda: mem.load(w("ctl", C_HOLD)) == 1, 30, what="reader")
    me = _rw(region, 1)
    assert me.readers() == 1 and not me.read_held()
    assert me.read_lock(10_000_000_000) is True  # the other reader still holds it (C_HOLD == 1)
    assert mem.load(w("ctl", C_HOLD)) == 1 and me.readers() == 2
    assert me.read_held() and not me.is_held() and me.owner() == 0 and me.holder() == (0, 0)
    lockdep_assert_held_read(me, "mmu_lock")
    with pytest.raises(LockdepError):
        lockdep_assert_held(me, "mmu_lock")  # held for read only
    me.read_unlock()
    assert not me.read_held()
    with pytest.raises(LockdepError, match="mmu_lock not held for read"):
        lockdep_assert_held_read(me, "mmu_lock")
    # a writer cannot get in while a reader is inside; its timed-out claim is given back
    wr = _rw(region, 2)
    assert wr.trylock() is False
    assert wr.lock(100_000_000) is False
    assert wr.owner() == 0 and wr.holder() == (0, 0)
    assert me.read_trylock() is True  # no stale writer claim keeps readers out
    me.read_unlock()
    mem.store(w("ctl", C_RELEASE), 1)
    assert wr.lock(10_000_000_000) is True
    assert wr.readers() == 0, "the writer got in with a reader inside"
    # (the reader says it left, C_HOLD = 2, only after its read_unlock: the writer may be first)
    wait_until(lambda: mem.load(w("ctl", C_HOLD)) == 2, 30, what="reader gone")
    lockdep_assert_held(wr)
    lockdep_assert_held_read(wr)  # a write hold is at least a read hold
    assert me.read_lock(1_000_000) is False and me.read_trylock() is False  # the writer holds it
    wr.unlock()
    assert me.read_lock() is True
    me.read_unlock()


def test_a_waiting_writer_keeps_new_readers_out(ctx, procs, region, run_id):
    """Writer-preferring: once a writer waits for the readers inside, new readers wait for it."""
    mem, w = region.mem, region.word
    _start(ctx, procs, reader_holder, run_id, 7)
    wait_until(lambda: mem.load(w("ctl", C_HOLD)) == 1, 30, what="reader")
    pw = _start(ctx, procs, writer_holder, run_id, 9)
    me = _rw(region, 1)
    wait_until(lambda: me.owner() == 9, 30, what="writer claiming the lock")
    assert me.holder()[0] == pw.pid  # the draining writer is recorded (dead-holder checks see it)
    assert mem.load(w("ctl", C_WHOLD)) == 0, "the writer got in with a reader inside"
    assert me.read_trylock() is False
    assert me.read_lock(100_000_000) is False  # a reader arriving now waits behind the writer
    mem.store(w("ctl", C_RELEASE), 1)  # the old reader leaves: the writer gets it
    wait_until(lambda: mem.load(w("ctl", C_WHOLD)) == 1, 30, what="writer")
    assert me.readers() == 0, "the writer got in with a reader inside"
    # (the reader says it left, C_HOLD = 2, only after its read_unlock: the writer may be first)
    wait_until(lambda: mem.load(w("ctl", C_HOLD)) == 2, 30, what="reader gone")
    mem.store(w("ctl", C_WRELEASE), 1)
    assert me.read_lock(10_000_000_000) is True
    assert me.owner() == 0, "a reader got in while the writer held the lock"
    # (the writer says it left, C_WHOLD = 2, only after its unlock: the reader may be first)
    wait_until(lambda: mem.load(w("ctl", C_WHOLD)) == 2, 30, what="writer gone")
    me.read_unlock()
    pw.join(10)
    assert pw.exitcode == 0


# -- lock_stat ---------------------------------------------------------------------------------------
def test_lock_stat_counts_reads_and_writes_in_one_block(ctx, procs, region, run_id):
    mem, w = region.mem, region.word
    me = _rw(region, 1, stats_proc=0)
    for _ in range(3):
        assert me.read_lock()
        _prims.spin_ns(200_000)
        me.read_unlock()
    assert me.read_lock() and me.read_lock()  # nested: one acquisition, one hold
    _prims.spin_ns(200_000)
    me.read_unlock()
    me.read_unlock()
    with me:
        _prims.spin_ns(200_000)
    s = merge_lockstat(region.v["lockstat"], ["rw", "x"])["rw"]
    assert (s["acquisitions"], s["holds"], s["contentions"]) == (5, 5, 0)
    assert 190_000 <= s["hold_ns_min"] <= s["hold_ns_max"] < 60_000_000_000
    # contended: a read waiting for a writer, then a write waiting for a reader (timed-out
    # attempts are not counted)
    _start(ctx, procs, writer_holder, run_id, 9)
    wait_until(lambda: mem.load(w("ctl", C_WHOLD)) == 1, 30, what="writer")
    assert me.read_lock(1_000_000) is False
    mem.store(w("ctl", C_WRELEASE), 1)
    assert me.read_lock(10_000_000_000) is True
    me.read_unlock()
    _start(ctx, procs, reader_holder, run_id, 7)
    wait_until(lambda: mem.load(w("ctl", C_HOLD)) == 1, 30, what="reader")
    assert me.lock(1_000_000) is False
    mem.store(w("ctl", C_RELEASE), 1)
    assert me.lock(10_000_000_000) is True
    me.unlock()
    s = merge_lockstat(region.v["lockstat"], ["rw", "x"])["rw"]
    assert (s["acquisitions"], s["holds"]) == (7, 7)
    assert s["contentions"] == 2, s  # each holder releases 20 ms after being told
    assert s["wait_ns_total"] >= s["wait_ns_max"] > 0


# -- misuse, busted ---------------------------------------------------------------------------------
def test_read_side_ownership_errors(region):
    a, b = _rw(region, 1), _rw(region, 2)
    with pytest.raises(RuntimeError, match="read_unlock .* without read_lock"):
        a.read_unlock()
    assert a.read_lock() and a.read_lock() and a.readers() == 1  # nesting is per object
    assert a.read_held() and not b.read_held()
    with pytest.raises(RuntimeError, match="upgrade"):
        a.lock()
    assert a.trylock() is False and a.owner() == 0
    a.read_unlock()
    assert a.read_held()
    a.read_unlock()
    assert not a.read_held() and a.readers() == 0
    with a:
        with pytest.raises(RuntimeError, match="read_lock by its write holder"):
            a.read_lock()
        assert b.read_trylock() is False and b.read_lock(1_000_000) is False
        assert not a.read_held() and a.readers() == 0
    assert b.read_lock() is True
    with pytest.raises(RuntimeError, match="unlock by tag 2"):
        b.unlock()  # a read hold is not a write hold
    b.read_unlock()


def test_busted_rwlock_does_not_lock(region):
    mem = region.mem
    lw = region.word("locks", 0)
    a, b = _rw(region, 1, busted=True), _rw(region, 2, busted=True)
    assert a.lock() and b.lock() and a.read_lock() and b.read_trylock() and a.trylock()
    assert a.is_held() and a.read_held()
    lockdep_assert_held(a)
    lockdep_assert_held_read(b)
    a.read_unlock()
    b.read_unlock()
    a.read_unlock()  # busted: no ownership errors
    a.unlock()
    assert mem.load(lw) == 0 and mem.load(lw + RW_WORD_READERS) == 0


# -- dead holders -----------------------------------------------------------------------------------
def _raises_dead_writer(call, pid):
    t = time.monotonic()
    with pytest.raises(LockHolderDied, match="died") as ei:
        call(int(3 * BOUND_S * 1e9))  # the timeout is a backstop: it must raise long before
    assert time.monotonic() - t < BOUND_S
    assert ei.value.holder_pid == pid and ei.value.owner_tag == 9 and "RwLock" in str(ei.value)
    return ei.value


def test_readers_and_writers_see_a_dead_writer(ctx, procs, region, run_id):
    p = _start(ctx, procs, writer_holder, run_id, 9, True)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    me = _rw(region, 1, stats_proc=0, name="mmu_lock")
    e = _raises_dead_writer(me.read_lock, p.pid)
    assert e.lock_name == "mmu_lock" and not me.read_held() and me.readers() == 0
    _raises_dead_writer(me.lock, p.pid)
    assert me.holder()[0] == p.pid
    assert me.recover(p.pid, me.holder()[1] + 1) is False  # another process' record
    assert me.recover(*me.holder()) is True
    assert me.is_held() and me.owner() == 1
    me.unlock()
    assert me.read_lock(1_000_000_000) is True
    me.read_unlock()


def test_writer_dying_while_it_waits_for_readers(ctx, procs, region, run_id):
    """A writer killed while it waits for readers leaves its claim: later readers and writers
    are told (the writer field names it), and recover() takes it over."""
    me = _rw(region, 1)
    assert me.read_lock()
    p = _start(ctx, procs, writer_holder, run_id, 9)
    wait_until(lambda: me.owner() == 9, 30, what="writer claiming the lock")
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    me.read_unlock()  # our own hold ends normally
    other = _rw(region, 2)
    _raises_dead_writer(other.read_lock, p.pid)
    _raises_dead_writer(other.lock, p.pid)
    assert other.recover(*other.holder()) is True
    other.unlock()
    assert me.read_lock(1_000_000_000) is True
    me.read_unlock()


def test_a_dead_reader_is_not_detected(ctx, procs, region, run_id):
    """Readers are anonymous: a reader that dies inside is not reported; a writer waits for it
    until its timeout (documented limit)."""
    p = _start(ctx, procs, reader_holder, run_id, 7, True)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    wr = _rw(region, 2)
    assert wr.readers() == 1
    assert wr.lock(200_000_000) is False  # no LockHolderDied: nothing names the reader
    assert wr.owner() == 0
    assert wr.read_lock() is True  # readers still get in
    wr.read_unlock()


# -- controlled scheduler ---------------------------------------------------------------------------
SCHED = Layout("rwdata", [("w", "i8", (8,)), ("locks", "i8", (1, LOCK_WORDS)), ("stats", "i8", (3, STAT_WORDS))])


def _sched_body(run_id: str):
    """Client 0 writes A then B (a point between); clients 1, 2 read A, B (a point between) and
    count a torn read in w[2], two readers inside at once in w[3]."""

    def body(i: int, c) -> bytes:
        r = Region.attach(run_id, SCHED)
        m = r.mem
        lk = new_lock("rw", m, r.word("locks", 0), r.word("stats", i), tag=i + 1, name="mmu_lock")
        assert isinstance(lk, sched.SchedRwLock)
        for _ in range(2):
            if i == 0:
                with lk:
                    v = m.load(0) + 1
                    m.store(0, v)
                    fuzz.point("between A and B")
                    m.store(1, v)
            else:
                lk.read_lock()
                assert lk.read_held()
                if m.fetch_add(4, 1):
                    m.fetch_add(3, 1)
                a = m.load(0)
                fuzz.point("between A and B")
                if m.load(1) != a:
                    m.fetch_add(2, 1)
                m.fetch_add(4, -1)
                lk.read_unlock()
        return b"ok"

    return body


def test_scheduled_rwlock_points_exclusion_and_shared_reads(run_id, region_factory):
    r = region_factory(SCHED)
    overlaps = retries = 0
    for seed in range(12):
        r.v["w"][:] = 0
        r.v["locks"][:] = 0
        init_lockstat(r.v["stats"])
        s, out, codes = pool.run_forked(run_id, 3, _sched_body(run_id), strategies.RandomWalk(seed), 3000)
        assert s.outcome == "done" and out == [b"ok"] * 3 and codes == [0, 0, 0], (s.outcome, s.detail)
        assert int(r.v["w"][2]) == 0, "a reader saw a torn write under the scheduled rw lock"
        assert int(r.v["w"][0]) == int(r.v["w"][1]) == 2
        assert merge_lockstat(r.v["stats"][:, None, :], ["l"])["l"]["acquisitions"] == 6
        overlaps += int(r.v["w"][3])
        retries += sum(b for _, _, b in s.log)
        names = {sched.point_id(f"mmu_lock: {p}") for p in ("lock", "unlock", "read_lock", "read_unlock")}
        assert names <= {p for _, p, _ in s.log}
    assert overlaps > 0, "two scheduled readers never held the lock together"
    assert retries > 0, "nobody ever blocked on the scheduled rw lock"
