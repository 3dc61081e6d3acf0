"""L1's side of the nested AVIC wing: the guest stores L1 makes to its physical APIC ID tables
(the workload's tracked writes, the scripted ``write_entry``) and :func:`guest_write`, one L1 store
as the hardware takes it (a write-protected gfn faults and is emulated, MMIO is emulated, anything
else goes straight to memory inside the guest-mode section)."""

from __future__ import annotations

import random

import numpy as np

from ipc import _prims, fuzz
from ipc.locks import LOCKDEP, LockdepError
from vm.avic.table import (
    AVIC_APIC_ID_MASK,
    AVIC_IS_RUNNING,
    AVIC_UPDATABLE,
    AVIC_VALID,
    CROSS_ENTRY_RATE,
    DROPPED,
    IF_COUNT,
    IF_STARTS,
    T_GFN,
    T_STATE,
    T_SYNCS,
    TRACKING,
    TW,
    UNTRACKED,
    V_CUR,
    V_L1STORE,
    VW,
    make_entry,
    nentries,
    u64,
)
from vm.nested import table_gfn, untracked_range
from vm.page_track import (
    PAGE_SHIFT,
    emulator_write_phys,
    page_fault_handle_page_track,
)

MMIO_APIC_GPA = 0xFEE00000
STALE_STORE_POINT = "vcpu.track_check_to_store"  # the run's fuzz point between the check and the store


class StaleStoreSteer:
    """Widening of the ``no-tlb-flush`` bug, at the run's fuzz point between an L1 store's "is the
    gfn write-tracked?" check and the store (``vcpu.track_check_to_store``): this process' fuzz
    (``fuzz.ACTIVE``) with one addition. When the store is the table-page store the design's
    ``tracked_write`` just chose, its page is writable and its table is unshadowed and held by
    another vCPU (whose next nested VMRUN write-protects and syncs it again), the store waits up to
    ``FLOOD_RACE_DELAY_NS`` (dilated) for that sync to complete before it lands: the store went
    through a writable TLB entry nobody flushed, the worst interleaving (with the flush, the
    write-protect would wait for this vCPU to leave guest mode first). Installed only under the
    hook (``AvicDesign``), like ``flood-drop-race``'s steered drops."""

    def __init__(self, inner, design):
        self._inner = inner
        self._design = design

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def hit(self, name: str) -> None:
        self._inner.hit(name)
        if name == STALE_STORE_POINT:
            self._design._steer_stale_store()


class L1Writes:
    """The design's ``tracked_write`` / ``entry_write``: which store L1 makes to a table page."""

    def entry_write(self, l2: int, entry: int, apic: int, running: bool, vcpu: int = -1) -> tuple[int, bytes]:
        """L1 rewrites the apic-id / IsRunning part of ``entry`` of ``l2``'s physid table:
        the (gpa, 8 bytes) of that guest store (the caller performs it). Made by L1 vCPU ``vcpu``
        (>= 0), the store is in flight from now to that vCPU's next store or nested VMRUN (I2)."""
        if not 0 <= l2 < self.cfg.l2s or not 0 <= entry < nentries(self.cfg) or not 0 <= apic <= 0xFF:
            raise ValueError(f"write_entry: l2 {l2} / entry {entry} / apic {apic} out of range")
        if vcpu >= 0:
            self._store_begin(vcpu, l2, entry)
        gpa = (table_gfn(self.cfg, l2) << PAGE_SHIFT) + entry * 8
        self._stale_gpa = gpa
        g = u64(self.kvm.guest_mem.load(gpa >> 3))
        new = (g & ~AVIC_UPDATABLE) | apic | (AVIC_IS_RUNNING if running else 0)
        return gpa, new.to_bytes(8, "little")

    def tracked_write(self, vcpu: int, rng: random.Random) -> tuple[int, bytes]:
        """L1 vCPU ``vcpu`` rewrites an entry of a random L2's table: its own (``vcpu % nentries``)
        or, at ``CROSS_ENTRY_RATE``, another vCPU's (apic id / IsRunning only: an L2 vCPU this L1 vCPU
        now runs): apic-id / IsRunning updates (8-byte, 1-byte apic id, 4-byte high dword), and at
        ``cfg.table_invalidate_fraction`` a backing-page change or a Valid flip (those erase the table)."""
        if self.region is None:
            self._attach()
        cfg = self.cfg
        l2 = int(rng.random() * cfg.l2s)
        gfn = table_gfn(cfg, l2)
        e = vcpu % self.ne
        cross = self.ne > 1 and rng.random() < CROSS_ENTRY_RATE
        if cross:
            e = (e + 1 + int(rng.random() * (self.ne - 1))) % self.ne
        gpa = (gfn << PAGE_SHIFT) + e * 8
        self._stale_gpa = gpa  # the table-page store the caller checks next (no-tlb-flush's steer)
        # the store the caller makes next is in flight until this vCPU's next store or nested VMRUN (I2)
        self._store_begin(vcpu, l2, e)
        g = self.gmem.load((gfn << 9) + e) & 0xFFFFFFFFFFFFFFFF
        inv = cfg.table_invalidate_fraction
        r = 1.0 if cross else rng.random()
        if not g & AVIC_VALID and not cross:  # (an entry made invalid before: valid again)
            new = make_entry(self._backing(rng), int(rng.random() * self.nvcpus), rng.random() < 0.5)
        elif r >= inv:  # avic_vcpu_load / put / blocking: IsRunning and the host APIC id
            apic = int(rng.random() * self.nvcpus)
            new = (g & ~AVIC_UPDATABLE) | apic | (AVIC_IS_RUNNING if rng.random() < 0.5 else 0)
            r2 = rng.random()
            if r2 < 0.15:
                return gpa, bytes((apic,))  # the apic id byte alone
            if r2 < 0.30:
                return gpa + 4, ((new >> 32) & 0xFFFFFFFF).to_bytes(4, "little")  # IsRunning dword
        elif r < inv * 0.75:  # a new backing page (vCPU re-created)
            new = make_entry(self._backing(rng), g & AVIC_APIC_ID_MASK, bool(g & AVIC_IS_RUNNING))
        else:  # the vCPU goes away
            new = g & ~AVIC_VALID
        return gpa, new.to_bytes(8, "little")

    _stale_gpa = -1

    def _steer_stale_store(self) -> None:
        """``StaleStoreSteer``: the store the vCPU is about to make through a writable mapping; if it is
        the table-page store ``tracked_write`` chose (its gfn still not write-tracked: not emulated)
        and another vCPU holds that table unshadowed, wait (bounded) for its next full sync."""
        gpa, self._stale_gpa = self._stale_gpa, -1
        if gpa < 0 or self.region is None:
            return
        gfn = gpa >> PAGE_SHIFT
        if self.kvm.gfn_track_mv[gfn]:
            return  # write-tracked: that store was emulated, this is another one
        m, me = self.amem, self.kvm.proc - 1
        for t in range(self.nt):
            b = self.tw0 + t * TW
            if m.load(b + T_GFN) == gfn and m.load(b + T_STATE) in (UNTRACKED, TRACKING, DROPPED):
                break
        else:
            return
        if not any(m.load(self.vw0 + v * VW + V_CUR) == t + 1 for v in range(self.nvcpus) if v != me):
            return  # nobody else is about to write-protect it again
        syncs, end = m.load(b + T_SYNCS), _prims.now_ns() + self.flood_race_ns
        while _prims.now_ns() < end and m.load(b + T_SYNCS) == syncs:
            self.steer_pause()

    def store_begin(self, vcpu: int, gpa: int, nbytes: int) -> None:
        """A scripted L1 store of ``nbytes`` at ``gpa`` by vCPU ``vcpu`` (the ``write`` command,
        vcpu/script.py): if it covers entries of an L2's table, those entries' stores are in flight
        from now to this vCPU's next store or nested VMRUN (I2), as ``entry_write`` / ``tracked_write``
        mark theirs. Without it the I2 check judged a store to a tracked table page complete as soon
        as its bytes were in guest memory, before its emulation had run the notifier (erase, reload
        request, kick, wait): a VMRUN in that window was a "lost write" (explore invalidate)."""
        if self.region is None:
            self._attach()
        gfn, off = gpa >> PAGE_SHIFT, gpa & ((1 << PAGE_SHIFT) - 1)
        first, last = off >> 3, min((off + nbytes - 1) >> 3, self.ne - 1)
        if nbytes <= 0 or first > last:
            return  # past the table's entries
        for l2 in range(self.cfg.l2s):
            if table_gfn(self.cfg, l2) == gfn:
                self._store_begin(vcpu, l2, first, last - first + 1)
                return

    def _store_begin(self, vcpu: int, l2: int, e: int, n: int = 1) -> None:
        """This vCPU's previous store has completed; one to entries ``e`` .. ``e + n - 1`` of
        ``l2``'s table begins (V_L1STORE: first ``inflight`` index + 1, (n - 1) << 32)."""
        m, w = self.amem, self.vw0 + vcpu * VW + V_L1STORE
        self._inflight_done(m.load(w))
        i = l2 * self.ne + e
        for k in range(i, i + n):
            m.fetch_add(self.if0 + k * 2 + IF_STARTS, 1)
            m.fetch_add(self.if0 + k * 2 + IF_COUNT, 1)
        m.store(w, i + 1 + ((n - 1) << 32))

    def _store_end(self, vcpu: int) -> None:
        """At nested VMRUN: this vCPU's L1 stores have all completed."""
        m, w = self.amem, self.vw0 + vcpu * VW + V_L1STORE
        prev = m.load(w)
        if prev:
            m.store(w, 0)
            self._inflight_done(prev)

    def _inflight_done(self, prev: int) -> None:
        """The store V_L1STORE value ``prev`` names (0: none) is no longer in flight."""
        if prev:
            i = (prev & 0xFFFFFFFF) - 1
            for k in range(i, i + (prev >> 32) + 1):
                self.amem.fetch_add(self.if0 + k * 2 + IF_COUNT, -1)

    def _backing(self, rng: random.Random) -> int:
        if rng.random() < 0.1:  # a bad address: the shadow entry points at the dummy page
            return (self.mem_pages + int(rng.random() * 1024)) << PAGE_SHIFT
        lo, hi = untracked_range(self.cfg)
        return (lo + int(rng.random() * max(1, hi - lo))) << PAGE_SHIFT


def guest_write(kvm, gpa: int, data: bytes) -> bool:
    """An L1 store: a write to a write-tracked gfn faults and is emulated (notifier walk, after
    leaving guest mode), so is MMIO; anything else goes straight to memory inside the guest-mode
    section (which a remote TLB flush waits for). True if emulated."""
    gm = kvm.guest_mode
    gm.read_lock()
    gfn = gpa >> PAGE_SHIFT
    if gfn < kvm.memory_pages and not page_fault_handle_page_track(kvm, gfn, True):
        if fuzz.ACTIVE:
            fuzz.point("l1.check_to_store")  # the mapping is writable; a write-protect may come now
        _mapped_store(kvm, gpa, data)
        gm.read_unlock()
        kvm.count("write_untracked")
        return False
    gm.read_unlock()
    emulator_write_phys(kvm, gpa, data)
    kvm.count("write_tracked")
    return True


def _mapped_store(kvm, gpa: int, data: bytes) -> None:
    """The hardware's store through the guest's writable mapping. Only a vCPU in guest mode makes
    one (inside the ``guest_mode`` read-side section that ``kvm_flush_remote_tlbs`` waits for: a
    store outside it could land after a write-protect's flush returned). Asserted, lockdep-style."""
    if LOCKDEP and not kvm.guest_mode.reader.nesting():
        raise LockdepError(f"lockdep: store to gpa {gpa:#x} through the guest's writable mapping outside "
                           f"guest mode (guest_mode read-side section not held)")
    if len(data) == 8 and not gpa & 7:
        kvm.guest_mem.store(gpa >> 3, int.from_bytes(data, "little", signed=True))
    else:
        kvm.guest_bytes[gpa:gpa + len(data)] = np.frombuffer(data, dtype=np.uint8)
