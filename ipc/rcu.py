"""RCU and SRCU domains on shared memory, liburcu "memb"-like (readers use full barriers).

Layout of a domain named ``prefix`` inside a region (declare with ``RcuDomain.fields``):
- ``<prefix>_hdr``    8 words: [0] gp_ctr (phase bit 32 | GP_COUNT), [1] gp_seq (completed grace
  periods), [2] gp_futex (low 32 bits, -1 while a writer sleeps), rest reserved
- ``<prefix>_gplock`` one lock block: the futex mutex that serializes writers
- ``<prefix>_slots``  (nslots, 8) words, one cache line per process: [0] ctr (gp_ctr snapshot |
  nesting), [1] owner tag, [2] pid

Read side: ``read_lock()`` / ``read_unlock()`` are bound C methods (no Python frame); nesting
supported; also usable as a context manager (``with domain.reader:``).

``synchronize()``: writers serialized by the gp mutex; two-phase wait (wait for readers of the old
phase, flip the phase bit, wait again) spinning ~100 polls, then sleeping on a futex the last
reader wakes; callers that overlap share a grace period (gp_seq snapshot: a caller returns as soon
as a full grace period has started and ended after its call began). While waiting it warns once
per reader slot that stays in its critical section past ``stall_ns`` (naming the process) and
raises :class:`GracePeriodBlocked` if that reader's process is dead.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable

from ipc import _prims
from ipc.locks import LOCK_WORDS, Mutex
from ipc.proc import pid_alive

GP_COUNT = _prims.GP_COUNT
GP_CTR_PHASE = _prims.GP_CTR_PHASE
SLOT_WORDS = 8
HDR_WORDS = 8
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
        self.shared_gps = 0
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
        return self.mem.load(self.hdr_w + 1)

    def readers_inside(self) -> list[int]:
        """Slots currently inside a read-side critical section (diagnostics)."""
        return [i for i in range(self.nslots) if int(self.slots[i, 0]) & (GP_CTR_PHASE - 1)]

    # -- update side ----------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until every read-side critical section that began before this call has ended."""
        if self.reader is not None and self.reader.nesting():
            raise RuntimeError(f"synchronize on {self.name} inside its own read-side critical section")
        mem, hdr = self.mem, self.hdr_w
        t0 = _prims.now_ns()
        snap = mem.load(hdr + 1)
        if self.broken:  # fault injection: a grace period that does not wait
            mem.fetch_add(hdr + 1, 1)
        else:
            self.gp_lock.lock()
            try:
                if mem.load(hdr + 1) >= snap + 2:
                    self.shared_gps += 1  # a whole GP ran since we were called
                else:
                    self._wait_readers(t0)
                    mem.store(hdr, mem.load(hdr) ^ GP_CTR_PHASE)
                    _prims.smp_mb()
                    self._wait_readers(t0)
                    mem.fetch_add(hdr + 1, 1)
            finally:
                self.gp_lock.unlock()
        if self.gp_hist is not None:
            self.gp_hist.record_since(t0)
        if self._cbs:
            self.poll()

    def _wait_readers(self, t0: int) -> None:
        warned: set[int] = set()
        while True:
            b = _prims.rcu_wait_readers(self.mem, self.hdr_w, self.slot0_w, self.nslots, _POLL_NS)
            if b < 0:
                return
            pid = int(self.slots[b, 2])
            if pid and not pid_alive(pid):
                raise GracePeriodBlocked(
                    f"grace period of {self.name} blocked by dead reader slot of {self.slot_name(b)}")
            elapsed = _prims.now_ns() - t0
            if elapsed >= self.stall_ns and b not in warned:
                warned.add(b)
                self.stalls.append((b, elapsed))
                if self.on_stall is not None:
                    self.on_stall(b, elapsed)
                else:
                    print(f"{self.kind.upper()} stall: {self.slot_name(b)} in read-side critical section "
                          f"of {self.name} for {elapsed // 1_000_000} ms", file=sys.stderr)

    def call_rcu(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after a grace period (on a later ``synchronize``/``poll``/``barrier`` of this
        process)."""
        self._cbs.append((self.gp_seq + 2, fn))

    def poll(self) -> int:
        """Run the deferred callbacks whose grace period has completed; returns how many ran."""
        done = self.gp_seq
        n = 0
        while self._cbs and self._cbs[0][0] <= done:
            self._cbs.popleft()[1]()
            n += 1
        return n

    def barrier(self) -> int:
        """rcu_barrier: wait for a grace period and run every pending callback."""
        if self._cbs:
            self.synchronize()
            self.synchronize()
        return self.poll()

    synchronize_rcu = synchronize


class SrcuDomain(RcuDomain):
    """Sleepable RCU: the same mechanism in its own domain (like page track's ``track_srcu``)."""

    kind = "srcu"
    synchronize_srcu = RcuDomain.synchronize
