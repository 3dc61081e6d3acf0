"""Spinlock, reader-writer spinlock and futex mutex on shm, lock_stat accounting per lock class,
lockdep-style asserts, dead-holder detection.

Word layouts (mirrors of ipc/prims/prims.h):
- lock block: ``LOCK_WORDS`` (8) int64 words, one cache line: [0] state: 0 = free, high 32 bits the
  holder's pid, low 32 bits the owner tag (spinlock) or the futex word (mutex); [1] acquire ns
  (CLOCK_MONOTONIC), [2] owner tag (mutex), [3] acquire time in stats-clock units (cycle counter,
  ``_prims.clock_source()``), [4] the holder's start time (/proc/<pid>/stat field 22), [5] readers
  inside (rw lock only), rest reserved.
- Reader-writer spinlock (``new_lock("rw", ...)``, ``RwLock``; the kernel's rwlock_t, what x86-64
  KVM's ``mmu_lock`` is): any number of readers or one writer. The write side is the SpinLock's
  interface and words ([0] state = the writer's pid | tag, [1], [3], [4]: ``owner()``, ``holder()``,
  ``recover()``, dead-holder checks, ``with lk:`` = write lock); the read side is ``read_lock()``
  (``timeout_ns`` like ``lock()``), ``read_unlock()``, ``read_trylock()``, ``read_held()`` (this
  object holds it for read; a per-object count: nested read_locks of one object only count up and
  never wait) and ``readers()`` (word [5], anonymous). Writer-preferring like qrwlock: a writer
  claims word [0] first, so new readers wait, then waits for the readers inside to leave; no queue
  (writers race like SpinLock's; readers can starve under a steady stream of writers). Waiters on
  either side spin with pause and ``sched_yield`` after ``spins`` polls, and check the *writer*
  field for a dead holder; readers are anonymous, so a reader that died inside is not detected (a
  writer waits for it until its timeout). Read acquisitions are counted in the same lock_stat
  block as write ones (no separate read class): an outermost read_lock is an acquisition (and a
  contention with its wait if it waited), its read_unlock a hold.
- Holder identity: the C call that takes a lock records the holder (pid in the same atomic
  instruction, start time before it returns) and ``unlock()`` clears it in the call that releases:
  no signal handler can run in between. ``holder()`` reads it: ``(pid, start)``, ``(0, 0)`` free.
- Every wait is bounded by dead-holder checks: after each 50 ms of waiting, ``lock()`` looks at the
  recorded holder and raises :class:`LockHolderDied` if that process is gone (or its pid now
  belongs to another process: the start time differs). The uncontended path checks nothing.
  ``recover(pid, start)`` takes a lock over from such a holder, for callers that can repair what it
  protected (the RCU grace-period lock).
- Wait and hold times are measured with the CPU cycle counter when the kernel trusts it (calibrated
  to ns once per process; ``PTS_PRIMS_CLOCK=monotonic`` forces clock_gettime) and stored in ns.
- ``lock()``/``unlock()`` called as a pair is the cheap form (~1.1x a no-op C call pair with stats
  on); ``with lock:`` costs about twice that (CPython builds bound ``__enter__``/``__exit__``
  method objects per use).
- lock-stat block: ``STAT_WORDS`` (16) int64 words per (process, lock class), written only by that
  process: ``STAT_FIELDS`` below (then reserved words); min words start at INT64_MAX
  (``init_lockstat``). ``holds`` counts completed (released) holds: the hold average divides by it,
  so a hold that never ended (a dead holder's) cannot pull it below the minimum.

A region that holds locks declares ``locks`` as ``(nlocks, LOCK_WORDS)`` and ``lockstat`` as
``(nprocs, nclasses, STAT_WORDS)``; ``merge_lockstat`` folds the processes together like
/proc/lock_stat does per class.
"""

from __future__ import annotations

import os

import numpy as np

from ipc import _prims, sched, trace

SpinLock = _prims.SpinLock
Mutex = _prims.Mutex
RwLock = _prims.RwLock
#: ``lock()`` found the lock's recorded holder dead (a RuntimeError; attributes ``holder_pid``,
#: ``holder_start``, ``owner_tag``, ``lock_word``, ``lock_name``, ``pid_reused``)
LockHolderDied = _prims.LockHolderDied

LOCK_WORDS = 8
STAT_WORDS = 16
assert (LOCK_WORDS, STAT_WORDS) == (_prims.LOCK_WORDS, _prims.STAT_WORDS), "ipc._prims is out of date"
STAT_FIELDS = (
    "acquisitions", "contentions", "wait_total", "wait_max", "wait_min",
    "hold_total", "hold_max", "hold_min", "holds",
)
_I64_MAX = np.iinfo(np.int64).max
KINDS = {"spin": SpinLock, "mutex": Mutex, "rw": RwLock}
TRACED = {"spin": _prims.TracedSpinLock, "mutex": _prims.TracedMutex,  # with ipc.trace on
          "rw": _prims.TracedRwLock}


class LockdepError(AssertionError):
    """A function that requires a lock was called without holding it."""


#: the lockdep-style asserts are on (``PTS_LOCKDEP=0`` switches every one of them off, read at import:
#: a self-test shows that the oracles behind them -- poison, I1 / I2, lost writes -- still catch a bug
#: the asserts now catch first)
LOCKDEP = os.environ.get("PTS_LOCKDEP", "1") != "0"


def always_held() -> int:
    """A ``*_read_lock_held()`` (reader nesting) check that always passes: bound instead of the real
    one when ``PTS_LOCKDEP=0``."""
    return 1


def new_lock(kind: str, mem, lock_word: int, stats_word: int = -1, tag: int = 1,
             busted: bool = False, spins: int = 1000, name: str | None = None):
    """A ``SpinLock`` ('spin'), ``Mutex`` ('mutex') or ``RwLock`` ('rw') on ``mem`` at ``lock_word``;
    ``stats_word`` < 0 turns accounting off; ``tag`` (1 .. 2**32-1) identifies the holder process;
    ``busted`` = a lock that does not lock (fault injection for torture self-tests); ``name`` is
    what a :class:`LockHolderDied` calls the lock. With tracing on (``ipc.trace.ACTIVE`` when the
    lock is made) it is the traced type: its waits and holds are events named ``name``."""
    tr = trace.ACTIVE
    try:
        cls = (TRACED if tr else KINDS)[kind]
    except KeyError:
        raise ValueError(f"unknown lock kind {kind!r} ({', '.join(KINDS)})") from None
    lk = cls(mem, lock_word, stats_word, tag, spins, busted, name)
    if tr:
        tr.name_object(lk, name or f"lock@{lock_word}")
    if sched.ACTIVE is None:
        return lk
    return sched.wrap_lock(lk, name or f"{kind} lock word {lock_word}", mem, stats_word)


def lockdep_assert_held(lock, name: str = "lock") -> None:
    """Cheap check (one C call) that this process holds ``lock``."""
    if LOCKDEP and not lock.is_held():
        raise LockdepError(f"lockdep: {name} not held by this process (owner tag {lock.owner()})")


def lockdep_assert_held_read(lock, name: str = "lock") -> None:
    """Cheap check that this process holds the rw ``lock`` for read (this object's read hold) or
    for write (``lockdep_assert_held(lock)`` would pass): "at least read access". Weaker than the
    kernel's ``lockdep_assert_held_read``, which wants a read hold; a write hold excludes every
    writer as well, which is what a read-side caller relies on."""
    if LOCKDEP and not (lock.read_held() or lock.is_held()):
        raise LockdepError(f"lockdep: {name} not held for read or write by this process "
                           f"(writer tag {lock.owner()})")


def init_lockstat(arr: np.ndarray) -> None:
    arr[...] = 0
    arr[..., 4] = _I64_MAX
    arr[..., 7] = _I64_MAX


def merge_lockstat(arr: np.ndarray, class_names: list[str]) -> dict[str, dict]:
    """Per class: acquisitions, contentions, wait/hold ns total/max/min/avg (lock_stat columns) and
    ``holds`` (completed holds, the divisor of the hold average: a hold that never ended, e.g. a dead
    holder's, has no length).

    ``arr`` is ``(nprocs, nclasses, STAT_WORDS)``; classes never acquired are left out."""
    out: dict[str, dict] = {}
    for c, name in enumerate(class_names):
        s = arr[:, c, :]
        acq = int(s[:, 0].sum())
        if acq == 0:
            continue
        con = int(s[:, 1].sum())
        wmin = int(s[:, 4].min())
        hmin = int(s[:, 7].min())
        holds = int(s[:, 8].sum())
        d = {
            "acquisitions": acq,
            "contentions": con,
            "wait_ns_total": int(s[:, 2].sum()),
            "wait_ns_max": int(s[:, 3].max()),
            "wait_ns_min": 0 if wmin == _I64_MAX else wmin,
            "hold_ns_total": int(s[:, 5].sum()),
            "hold_ns_max": int(s[:, 6].max()),
            "hold_ns_min": 0 if hmin == _I64_MAX else hmin,
            "holds": holds,
        }
        d["wait_ns_avg"] = d["wait_ns_total"] // con if con else 0
        d["hold_ns_avg"] = d["hold_ns_total"] // holds if holds else 0
        out[name] = d
    return out
