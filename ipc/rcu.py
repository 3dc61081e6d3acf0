"""RCU and SRCU domains on shared memory, liburcu "memb"-like (readers use full barriers).

Layout of a domain named ``prefix`` inside a region (declare with ``RcuDomain.fields``):
- ``<prefix>_hdr``    8 words: [0] gp_ctr (phase bit 32 | GP_COUNT), [1] gp_seq (completed grace
  periods), [2] gp_futex (low 32 bits, -1 while a writer sleeps), [3] gp_state (kernel ``rcu_seq``
  style: even = idle, odd = a grace period is running -- or was, and aborted: the next grace
  period reuses that odd number, so a cookie can only complete when a grace period really ends),
  [4] owner tag and [5] pid of the last writer that died holding the gp lock (written by the
  writer that took the lock over; 0 = none), rest reserved
- ``<prefix>_gplock`` one lock block: the futex mutex that serializes writers; it records its
  holder (pid + start time, ``ipc.locks``) inside the C call that takes it
- ``<prefix>_slots``  (nslots, 8) words, one cache line per process: [0] ctr (gp_ctr snapshot |
  nesting), [1] owner tag, [2] pid, [3] start time of the registered process (pid + start time
  name a process for good: a dead reader is found even if its pid was reused)

Read side: ``read_lock()`` / ``read_unlock()`` are bound C methods (no Python frame); nesting
supported; also usable as a context manager (``with domain.reader:``).

``synchronize()``: writers serialized by the gp mutex; two-phase wait (wait for readers of the old
phase, flip the phase bit, wait again) spinning ~100 polls, then sleeping on a futex the last
reader wakes; callers that overlap share a grace period (``gp_state`` snapshot taken after a full
barrier: a caller returns without running its own GP only when a whole grace period started after
its call and has completed, like the kernel's ``rcu_seq_snap``/``rcu_seq_done``). While waiting it
warns once per reader slot that stays in its critical section past ``stall_ns`` (naming the
process) and raises :class:`GracePeriodBlocked` if a blocking reader's process is dead. A writer
that dies holding the gp lock (SIGKILL, or SIGTERM anywhere in ``synchronize``) leaves it recorded
as held by the dead process; the next writer's ``lock()`` notices (``LockHolderDied``) and takes
it over: the dead writer's grace period is simply not finished (``gp_state`` stays odd and is
reused), and a full grace period after the takeover is correct whatever step it died at.

``call_rcu(fn)`` queues ``fn`` behind a ``gp_state`` cookie; ``poll()`` (also run by this process'
``synchronize``) runs the callbacks whose grace period has completed; ``barrier()`` waits for them
all. ``get_state()`` / ``poll_state(cookie)`` / ``cond_synchronize(cookie)`` are the kernel's
``get_state_synchronize_rcu`` / ``poll_state_synchronize_rcu`` / ``cond_synchronize_rcu``.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable

import numpy as np

from ipc import _prims, fuzz, sched, trace
from ipc.locks import LOCK_WORDS, LockHolderDied, new_lock
from ipc.proc import identity_alive, pid_alive, proc_starttime

GP_COUNT = _prims.GP_COUNT
GP_CTR_PHASE = _prims.GP_CTR_PHASE
SLOT_WORDS = 8
HDR_WORDS = 8
HDR_GP_CTR, HDR_GP_SEQ, HDR_GP_FUTEX, HDR_GP_STATE, HDR_DEAD_TAG, HDR_DEAD_PID = 0, 1, 2, 3, 4, 5
SLOT_CTR, SLOT_TAG, SLOT_PID, SLOT_START = 0, 1, 2, 3
_POLL_NS = 50_000_000  # how often the waiter looks up from the C wait loop


class GracePeriodBlocked(RuntimeError):
    """A grace period cannot end: a reader's process died inside its read-side critical section."""


class RcuDomain:
    kind = "rcu"

    @staticmethod
    def fields(prefix: str, nslots: int) -> list:
        return [
            (f"{prefix}_hdr", "i8", (HDR_WORDS,)),
            (f"{prefix}_gplock", "i8", (LOCK_WORDS,)),
            (f"{prefix}_slots", "i8", (nslots, SLOT_WORDS)),
        ]

    @staticmethod
    def init(region, prefix: str) -> None:
        """Owner-side initialisation (fresh segment)."""
        region.v[f"{prefix}_hdr"][:] = 0
        region.v[f"{prefix}_hdr"][0] = GP_COUNT
        region.v[f"{prefix}_gplock"][:] = 0
        region.v[f"{prefix}_slots"][:] = 0

    def __init__(self, region, prefix: str, slot: int | None, tag: int, *, name: str | None = None,
                 gp_lock_stats_word: int = -1, gp_hist=None, broken: bool = False,
                 stall_ns: int = 1_000_000_000, on_stall: Callable[[int, int], None] | None = None,
                 slot_name: Callable[[int], str] | None = None):
        self.name = name or prefix
        self.region = region
        self.mem = region.mem
        self.hdr_w = region.word(f"{prefix}_hdr")
        self.slot0_w = region.word(f"{prefix}_slots")
        self.slots = region.v[f"{prefix}_slots"]
        self.nslots = self.slots.shape[0]
        self.slot = slot
        self.tag = tag
        self.broken = broken
        self.stall_ns = stall_ns
        self.on_stall = on_stall
        self.slot_name = slot_name or (lambda i: f"slot {i}")
        self.gp_hist = gp_hist
        self.gp_lock = new_lock("mutex", self.mem, region.word(f"{prefix}_gplock"), gp_lock_stats_word, tag,
                                name=f"{self.name}.gp_lock")
        tr = trace.ACTIVE  # grace periods and read-side sections are trace events (ipc/trace)
        self._emit = tr.emit if tr else None
        self._tr_sync = tr.pair(f"synchronize {self.name}") if tr else (0, 0)
        self._tr_gp = tr.pair(f"grace period {self.name}") if tr else (0, 0)
        self.stalls: list[tuple[int, int]] = []
        self.gp_lock_takeovers: list[tuple[int, int]] = []  # (pid, owner tag) of dead gp-lock holders
        self.shared_gps = 0  # synchronize calls that shared another caller's grace period
        self.gps = 0  # grace periods this object ran itself
        self._cbs: deque[tuple[int, Callable[[], None]]] = deque()
        if slot is not None:
            if not 0 <= slot < self.nslots:
                raise ValueError(f"{self.name}: reader slot {slot} outside 0..{self.nslots - 1}")
            self.reader = (_prims.TracedRcuReader if tr else _prims.RcuReader)(
                self.mem, self.hdr_w, self.slot0_w + SLOT_WORDS * slot)
            if tr:
                tr.name_object(self.reader, self.name)
            self.read_lock = self.reader.lock
            self.read_unlock = self.reader.unlock
        else:
            self.reader = None
        if sched.ACTIVE is not None:  # controlled scheduling (ipc/sched), decided at creation
            sched.wrap_domain(self, sched.ACTIVE)

    # -- registration ---------------------------------------------------------------------
    def register(self) -> None:
        """Claim this process' reader slot (owner tag, pid and start time, for stall and death
        diagnosis)."""
        s = self.slots[self.slot]
        pid = os.getpid()
        s[SLOT_CTR] = 0
        s[SLOT_START] = proc_starttime(pid) or 0
        s[SLOT_TAG] = self.tag
        s[SLOT_PID] = pid

    def unregister(self) -> None:
        if self.reader is not None and self.reader.nesting():
            raise RuntimeError(f"{self.name}: unregister inside a read-side critical section")
        self.slots[self.slot, SLOT_TAG:SLOT_START + 1] = 0

    # -- state ----------------------------------------------------------------------------
    @property
    def gp_seq(self) -> int:
        """Completed grace periods."""
        return self.mem.load(self.hdr_w + HDR_GP_SEQ)

    @property
    def gp_state(self) -> int:
        return self.mem.load(self.hdr_w + HDR_GP_STATE)

    def gp_lock_holder(self) -> int:
        """pid recorded as the holder of the gp lock (0 = free)."""
        return self.gp_lock.holder()[0]

    def gp_lock_dead_holder(self) -> tuple[int, int]:
        """(owner tag, pid) of the last writer that died holding the gp lock, (0, 0) if none."""
        return self.mem.load(self.hdr_w + HDR_DEAD_TAG), self.mem.load(self.hdr_w + HDR_DEAD_PID)

    def readers_inside(self) -> list[int]:
        """Slots currently inside a read-side critical section (diagnostics)."""
        return [i for i in range(self.nslots) if int(self.slots[i, 0]) & (GP_CTR_PHASE - 1)]

    def blocking_readers(self) -> list[int]:
        """Slots inside a critical section that began before the current phase (what the running
        grace period waits for)."""
        gp = self.mem.load(self.hdr_w)
        ctr = self.slots[:, 0]
        return [int(i) for i in np.flatnonzero(((ctr & (GP_CTR_PHASE - 1)) != 0) & (((ctr ^ gp) & GP_CTR_PHASE) != 0))]

    # -- polled grace periods (get_state_synchronize_rcu & co) -------------------------------
    def get_state(self) -> int:
        """A cookie that :meth:`poll_state` accepts once a full grace period has started after this
        call and completed (``get_state_synchronize_rcu``)."""
        _prims.smp_mb()  # order the caller's updates before the snapshot (store -> load)
        s = self.mem.load(self.hdr_w + HDR_GP_STATE)
        return (s + 3) & ~1

    def poll_state(self, cookie: int) -> bool:
        """Has the grace period of ``cookie`` completed? (``poll_state_synchronize_rcu``)"""
        done = self.mem.load(self.hdr_w + HDR_GP_STATE) >= cookie
        if done:
            _prims.smp_mb()  # the caller's frees come after the readers' last accesses
        return done

    def cond_synchronize(self, cookie: int) -> None:
        """``synchronize()`` unless the grace period of ``cookie`` already completed."""
        if not self.poll_state(cookie):
            self._synchronize(cookie)

    # -- update side ----------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until every read-side critical section that began before this call has ended."""
        self._synchronize(None)

    def _synchronize(self, target: int | None) -> int:
        """synchronize (or cond_synchronize with ``target``); returns how many of this process'
        call_rcu callbacks it ran afterwards."""
        if self.reader is not None and self.reader.nesting():
            raise RuntimeError(f"synchronize on {self.name} inside its own read-side critical section")
        mem, hdr, gp_lock, emit = self.mem, self.hdr_w, self.gp_lock, self._emit
        t0 = _prims.now_ns()
        if emit:
            emit(self._tr_sync[0])
        cookie = target is not None
        if target is None:
            target = self.get_state()
        if self.broken:  # fault injection: a grace period that does not wait
            mem.fetch_add(hdr + HDR_GP_SEQ, 1)
            mem.fetch_add(hdr + HDR_GP_STATE, 2)
        else:
            if gp_lock.is_held():
                raise RuntimeError(f"synchronize on {self.name} while holding its gp lock (recursion)")
            # Everything from the lock on is inside the try: an exception (SIGTERM -> SystemExit)
            # wherever it lands either finds the lock not taken, or taken -- then recorded as ours
            # by the C call itself -- and released here; if the process dies before, the lock
            # stays recorded as held by the dead process and the next writer takes it over.
            try:
                self._gp_lock_acquire()
                cur = mem.load(hdr + HDR_GP_STATE)
                if cur >= target:
                    self.shared_gps += 1  # a whole GP started after our call and completed
                    _prims.smp_mb()
                # synchronize(): one grace period that starts after the call; a cookie (barrier,
                # cond_synchronize) taken while a GP that later aborted was running is two GPs
                # away from the restart of that GP: run grace periods until it is reached
                while cur < target:
                    # idle (even): the next odd number; odd = a GP that aborted (exception, dead
                    # writer or reader) and never ended: reuse its number, so that no cookie reads
                    # as complete before a grace period really ends (cur + 2 would complete the
                    # cookies of cur + 1 while this GP still waits for their readers)
                    start = cur | 1
                    mem.store(hdr + HDR_GP_STATE, start)
                    if emit:
                        emit(self._tr_gp[0], start)
                    warned: set[int] = set()
                    self._wait_readers(t0, warned)  # begins with a full barrier
                    if fuzz.ACTIVE:
                        fuzz.point("rcu.gp.before_flip")
                    mem.store(hdr, mem.load(hdr) ^ GP_CTR_PHASE)
                    _prims.smp_mb()
                    if fuzz.ACTIVE:
                        fuzz.point("rcu.gp.after_flip")
                    self._wait_readers(t0, warned)
                    mem.fetch_add(hdr + HDR_GP_SEQ, 1)
                    mem.store(hdr + HDR_GP_STATE, start + 1)  # >= the target of every caller before
                    if emit:
                        emit(self._tr_gp[1], start + 1)
                    self.gps += 1
                    cur = start + 1
                    if not cookie:
                        break
            finally:
                if gp_lock.is_held():
                    gp_lock.unlock()
        if self.gp_hist is not None:
            self.gp_hist.record_since(t0)
        if emit:
            emit(self._tr_sync[1])
        return self.poll() if self._cbs else 0

    def _gp_lock_acquire(self) -> None:
        """Take the gp lock; take it over from a writer that died holding it (``lock()`` raises
        LockHolderDied within ~50 ms of waiting on a dead holder)."""
        while True:
            try:
                self.gp_lock.lock()
                return
            except LockHolderDied as e:
                if self.gp_lock.recover(e.holder_pid, e.holder_start):
                    # the dead writer's grace period never ended: gp_state stays odd and this GP
                    # reuses its number; record who died for the diagnosis
                    self.mem.store(self.hdr_w + HDR_DEAD_PID, e.holder_pid)
                    self.mem.store(self.hdr_w + HDR_DEAD_TAG, e.owner_tag)
                    self.gp_lock_takeovers.append((e.holder_pid, e.owner_tag))
                    return
                # another writer took it over first: wait for that one

    def _wait_readers(self, t0: int, warned: set[int]) -> None:
        while True:
            b = _prims.rcu_wait_readers(self.mem, self.hdr_w, self.slot0_w, self.nslots, _POLL_NS)
            if b < 0:
                return
            blocking = self.blocking_readers()  # may be empty: the reader left meanwhile
            for i in blocking:
                pid, start = int(self.slots[i, SLOT_PID]), int(self.slots[i, SLOT_START])
                if pid and not identity_alive(pid, start):
                    reused = ", its pid reused by another process" if pid_alive(pid) else ""
                    raise GracePeriodBlocked(
                        f"grace period of {self.name} blocked by dead reader slot of {self.slot_name(i)}"
                        f" (pid {pid}{reused})")
            elapsed = _prims.now_ns() - t0
            if elapsed < self.stall_ns:
                continue
            for i in blocking:
                if i in warned:
                    continue
                warned.add(i)
                self.stalls.append((i, elapsed))
                if self.on_stall is not None:
                    self.on_stall(i, elapsed)
                else:
                    print(f"{self.kind.upper()} stall: {self.slot_name(i)} in read-side critical section "
                          f"of {self.name} for {elapsed // 1_000_000} ms", file=sys.stderr)

    def call_rcu(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after a grace period (on a later ``synchronize``/``poll``/``barrier`` of this
        process). A ``broken`` domain runs it at once, as rcutorture's ``call_rcu_busted()``."""
        if self.broken:
            fn()
            return
        self._cbs.append((self.get_state(), fn))

    def poll(self) -> int:
        """Run the deferred callbacks whose grace period has completed; returns how many ran."""
        done = self.mem.load(self.hdr_w + HDR_GP_STATE)
        n = 0
        if self._cbs and self._cbs[0][0] <= done:
            _prims.smp_mb()
        while self._cbs and self._cbs[0][0] <= done:
            self._cbs.popleft()[1]()
            n += 1
        return n

    def barrier(self) -> int:
        """rcu_barrier: wait for the grace period of every pending callback and run them all."""
        n = 0
        if self._cbs and not self.poll_state(self._cbs[-1][0]):
            n = self._synchronize(self._cbs[-1][0])
        return n + self.poll()

    synchronize_rcu = synchronize


class SrcuDomain(RcuDomain):
    """Sleepable RCU: the same mechanism in its own domain (like page track's ``track_srcu``)."""

    kind = "srcu"
    synchronize_srcu = RcuDomain.synchronize
