"""Dead lock holders (issue 12): every SpinLock / Mutex records its holder (pid + process start
time) inside the C call that takes it, and a waiter whose holder died gets ``LockHolderDied``
in bounded time instead of spinning or sleeping forever -- also when the holder's pid was reused."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import wait_until

from ipc import locks
from ipc.locks import LOCK_WORDS, STAT_WORDS, init_lockstat, merge_lockstat, new_lock
from ipc.proc import proc_starttime
from ipc.shm import Layout, Region

KINDS = ["spin", "mutex", "rw"]  # rw: its write side (read side: tests/ipc/test_rwlock.py)
C_HOLD, C_RELEASE, C_PID, C_DIE = 0, 1, 2, 3
BOUND_S = 10.0  # a dead holder is reported within this (generous: shared 2-core machine)


def layout() -> Layout:
    return Layout("deadholder", [
        ("locks", "i8", (2, LOCK_WORDS)),
        ("lockstat", "i8", (3, 2, STAT_WORDS)),
        ("ctl", "i8", (4, 8)),
    ])


@pytest.fixture
def region(region_factory):
    r = region_factory(layout())
    init_lockstat(r.v["lockstat"])
    return r


def holder_then_die(run_id: str, kind: str, tag: int, die_after_s: float):
    """Take lock 0 (with stats), say so, then die holding it (SIGKILL) after ``die_after_s``
    (< 0: when the test sets ``C_DIE``, at most 30 s)."""
    region = Region.attach(run_id, layout())
    mem, w = region.mem, region.word
    lk = new_lock(kind, mem, w("locks", 0), w("lockstat", 1, 0), tag=tag)
    lk.lock()
    mem.store(w("ctl", C_PID), os.getpid())
    mem.store(w("ctl", C_HOLD), 1)
    if die_after_s >= 0:
        time.sleep(die_after_s)
    else:
        t = time.monotonic() + 30
        while not mem.load(w("ctl", C_DIE)) and time.monotonic() < t:
            time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)


def _start_holder(ctx, procs, region, run_id, kind, die_after_s=0.0):
    p = ctx.Process(target=holder_then_die, args=(run_id, kind, 7, die_after_s))
    procs.append(p)
    p.start()
    wait_until(lambda: region.mem.load(region.word("ctl", C_HOLD)) == 1, 30, what="holder")
    return p


def _lock_raises_dead_holder(lk, pid):
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="died") as ei:
        lk.lock(int(3 * BOUND_S * 1e9))  # the timeout is a backstop: it must raise long before
    took = time.monotonic() - t
    assert took < BOUND_S, f"dead holder noticed after {took:.1f} s"
    e = ei.value
    assert isinstance(e, locks.LockHolderDied)
    assert e.holder_pid == pid and e.owner_tag == 7
    assert str(pid) in str(e)
    return e


@pytest.mark.parametrize("kind", KINDS)
def test_waiter_of_dead_holder_raises(ctx, procs, region, run_id, kind):
    """The holder is already dead when the waiter comes."""
    p = _start_holder(ctx, procs, region, run_id, kind)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    lk = new_lock(kind, region.mem, region.word("locks", 0), region.word("lockstat", 0, 0), tag=1,
                  name="test_lock")
    e = _lock_raises_dead_holder(lk, p.pid)
    assert "test_lock" in str(e) and e.lock_name == "test_lock"
    assert e.lock_word == region.word("locks", 0)
    assert not lk.is_held() and lk.owner() == 7  # raising does not take or clear the lock
    assert lk.trylock() is False


@pytest.mark.parametrize("kind", KINDS)
def test_holder_dies_while_waited_for(ctx, procs, region, run_id, kind):
    """The waiter is spinning / sleeping on the futex when the holder dies."""
    p = _start_holder(ctx, procs, region, run_id, kind, die_after_s=0.3)
    lk = new_lock(kind, region.mem, region.word("locks", 0), -1, tag=1)
    _lock_raises_dead_holder(lk, p.pid)
    p.join(10)


@pytest.mark.parametrize("kind", KINDS)
def test_holder_identity_recorded_with_the_lock(ctx, procs, region, run_id, kind):
    """holder() = (pid, start time) of the process that took the lock -- also in a forked child
    (the C side caches its pid and start time per process)."""
    mem, w = region.mem, region.word
    me = (os.getpid(), proc_starttime(os.getpid()))
    lk = new_lock(kind, mem, w("locks", 1), -1, tag=3)
    assert lk.holder() == (0, 0)
    for take in (lk.lock, lk.trylock):
        assert take()
        assert lk.holder() == me
        assert mem.load(w("locks", 1)) >> 32 == me[0]  # the pid is part of the lock word itself
        lk.unlock()
        assert lk.holder() == (0, 0) and mem.load(w("locks", 1)) == 0
    p = _start_holder(ctx, procs, region, run_id, kind, die_after_s=-1)  # alive until told (C_DIE)
    start = proc_starttime(p.pid)
    holder = new_lock(kind, mem, w("locks", 0), -1, tag=3).holder()
    mem.store(w("ctl", C_DIE), 1)
    p.join(10)
    assert start is not None and holder == (p.pid, start) and holder != me


@pytest.mark.parametrize("kind", KINDS)
def test_pid_reuse_is_a_dead_holder(ctx, procs, region, run_id, kind):
    """A live process whose start time differs from the recorded one reused the holder's pid."""
    p = _start_holder(ctx, procs, region, run_id, kind)
    p.join(10)
    mem, w = region.mem, region.word
    lw = w("locks", 0)
    lk = new_lock(kind, mem, lw, -1, tag=1)
    # rewrite the record: the holder "was" this (live) process, but it started at another time
    mine = os.getpid()
    mem.store(lw, (mine << 32) | (mem.load(lw) & 0xFFFFFFFF))
    mem.store(lw + 4, proc_starttime(mine) - 1)
    e = _lock_raises_dead_holder(lk, mine)
    assert "reused" in str(e)
    # control: the right start time = a live holder: a timed wait just times out
    mem.store(lw + 4, proc_starttime(mine))
    assert lk.lock(300_000_000) is False


@pytest.mark.parametrize("kind", KINDS)
def test_recover_takes_over_from_a_dead_holder_only(ctx, procs, region, run_id, kind):
    p = _start_holder(ctx, procs, region, run_id, kind, die_after_s=-1)  # alive until told
    mem, w = region.mem, region.word
    lk = new_lock(kind, mem, w("locks", 0), w("lockstat", 0, 0), tag=1)
    start = proc_starttime(p.pid)
    assert lk.recover(p.pid, start) is False, "took the lock of a live holder"
    mem.store(w("ctl", C_DIE), 1)
    p.join(10)
    assert lk.recover(p.pid, start + 1) is False, "took a lock recorded for another process"
    assert lk.recover(p.pid, start) is True
    assert lk.is_held() and lk.owner() == 1 and lk.holder() == (os.getpid(), proc_starttime(os.getpid()))
    lk.unlock()
    assert mem.load(w("locks", 0)) == 0
    assert lk.lock(1_000_000_000) is True
    lk.unlock()
    s = merge_lockstat(region.v["lockstat"], ["l", "x"])["l"]
    # the dead process' hold never ended: it counts as an acquisition, not as a hold
    assert s["acquisitions"] == 3 and s["holds"] == 2
    assert s["hold_ns_min"] <= s["hold_ns_avg"] <= s["hold_ns_max"]
