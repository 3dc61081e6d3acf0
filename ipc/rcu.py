"""RCU and SRCU domains on shared memory, liburcu "memb"-like (readers use full barriers).

Layout of a domain named ``prefix`` inside a region (declare with ``RcuDomain.fields``):
- ``<prefix>_hdr``    8 words: [0] gp_ctr (phase bit 32 | GP_COUNT), [1] gp_seq (completed grace
  periods), [2] gp_futex (low 32 bits, -1 while a writer sleeps), [3] gp_state (kernel ``rcu_seq``
  style: even = idle, odd = a grace period is running; each GP ends at the next even value),
  [4] pid of the process holding the gp lock (0 = none), rest reserved
- ``<prefix>_gplock`` one lock block: the futex mutex that serializes writers
- ``<prefix>_slots``  (nslots, 8) words, one cache line per process: [0] ctr (gp_ctr snapshot |
  nesting), [1] owner tag, [2] pid

Read side: ``read_lock()`` / ``read_unlock()`` are bound C methods (no Python frame); nesting
supported; also usable as a context manager (``with domain.reader:``).

``synchronize()``: writers serialized by the gp mutex; two-phase wait (wait for readers of the old
phase, flip the phase bit, wait again) spinning ~100 polls, then sleeping on a futex the last
reader wakes; callers that overlap share a grace period (``gp_state`` snapshot taken after a full
barrier: a caller returns without running its own GP only when a whole grace period started after
its call and has completed, like the kernel's ``rcu_seq_snap``/``rcu_seq_done``). While waiting it
warns once per reader slot that stays in its critical section past ``stall_ns`` (naming the
process) and raises :class:`GracePeriodBlocked` if a blocking reader's process, or the process
holding the gp lock, is dead.

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

from ipc import _prims
from ipc.locks import LOCK_WORDS, Mutex
from ipc.proc import pid_alive

GP_COUNT = _prims.GP_COUNT
GP_CTR_PHASE = _prims.GP_CTR_PHASE
SLOT_WORDS = 8
HDR_WORDS = 8
HDR_GP_CTR, HDR_GP_SEQ, HDR_GP_FUTEX, HDR_GP_STATE, HDR_GP_HOLDER = 0, 1, 2, 3, 4
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
        self.gp_lock = Mutex(self.mem, region.word(f"{prefix}_gplock"), gp_lock_stats_word, tag)
        self.stalls: list[tuple[int, int]] = []
        self.shared_gps = 0  # synchronize calls that shared another caller's grace period
        self.gps = 0  # grace periods this object ran itself
        self._cbs: deque[tuple[int, Callable[[], None]]] = deque()
        if slot is not None:
            if not 0 <= slot < self.nslots:
                raise ValueError(f"{self.name}: reader slot {slot} outside 0..{self.nslots - 1}")
            self.reader = _prims.RcuReader(self.mem, self.hdr_w, self.slot0_w + SLOT_WORDS * slot)
            self.read_lock = self.reader.lock
            self.read_unlock = self.reader.unlock
        else:
            self.reader = None

    # -- registration ---------------------------------------------------------------------
    def register(self) -> None:
        """Claim this process' reader slot (owner tag + pid, for stall and death diagnosis)."""
        s = self.slots[self.slot]
        s[0] = 0
        s[1] = self.tag
        s[2] = os.getpid()

    def unregister(self) -> None:
        if self.reader is not None and self.reader.nesting():
            raise RuntimeError(f"{self.name}: unregister inside a read-side critical section")
        self.slots[self.slot, 1:3] = 0

    # -- state ----------------------------------------------------------------------------
    @property
    def gp_seq(self) -> int:
        """Completed grace periods."""
        return self.mem.load(self.hdr_w + HDR_GP_SEQ)

    @property
    def gp_state(self) -> int:
        return self.mem.load(self.hdr_w + HDR_GP_STATE)

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
        mem, hdr = self.mem, self.hdr_w
        t0 = _prims.now_ns()
        if target is None:
            target = self.get_state()
        if self.broken:  # fault injection: a grace period that does not wait
            mem.fetch_add(hdr + HDR_GP_SEQ, 1)
            mem.fetch_add(hdr + HDR_GP_STATE, 2)
        else:
            self._gp_lock_acquire()
            try:
                cur = mem.load(hdr + HDR_GP_STATE)
                if cur >= target:
                    self.shared_gps += 1  # a whole GP started after our call and completed
                    _prims.smp_mb()
                else:
                    # next odd value: a GP that aborted (dead reader) left an odd state, which
                    # must never read as completed
                    start = cur + 1 + (cur & 1)
                    mem.store(hdr + HDR_GP_STATE, start)
                    warned: set[int] = set()
                    self._wait_readers(t0, warned)  # begins with a full barrier
                    mem.store(hdr, mem.load(hdr) ^ GP_CTR_PHASE)
                    _prims.smp_mb()
                    self._wait_readers(t0, warned)
                    mem.fetch_add(hdr + HDR_GP_SEQ, 1)
                    mem.store(hdr + HDR_GP_STATE, start + 1)  # >= every waiter's target
                    self.gps += 1
            finally:
                mem.store(hdr + HDR_GP_HOLDER, 0)
                self.gp_lock.unlock()
        if self.gp_hist is not None:
            self.gp_hist.record_since(t0)
        return self.poll() if self._cbs else 0

    def _gp_lock_acquire(self) -> None:
        while not self.gp_lock.lock(_POLL_NS):
            holder = self.mem.load(self.hdr_w + HDR_GP_HOLDER)
            if holder and not pid_alive(holder):
                raise GracePeriodBlocked(
                    f"grace period of {self.name} blocked: process {holder} died holding its gp lock")
        self.mem.store(self.hdr_w + HDR_GP_HOLDER, os.getpid())

    def _wait_readers(self, t0: int, warned: set[int]) -> None:
        while True:
            b = _prims.rcu_wait_readers(self.mem, self.hdr_w, self.slot0_w, self.nslots, _POLL_NS)
            if b < 0:
                return
            blocking = self.blocking_readers()  # may be empty: the reader left meanwhile
            for i in blocking:
                pid = int(self.slots[i, 2])
                if pid and not pid_alive(pid):
                    raise GracePeriodBlocked(
                        f"grace period of {self.name} blocked by dead reader slot of {self.slot_name(i)}"
                        f" (pid {pid})")
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
        process)."""
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
