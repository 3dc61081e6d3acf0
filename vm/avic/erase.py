"""Erasing a shadow table (RFC v3 ``avic_physid_shadow_table_erase``) and the reload request that
follows it; the flood widening; memslot removal. A mixin of :class:`vm.avic.base.AvicDesign` beside
vm/avic/pool.py (the table pool) and vm/avic/guest.py (``_request_reload_all`` / ``_reload_wait``)."""

from __future__ import annotations

from ipc import _prims, fuzz
from vm.avic import oracle
from vm.avic.table import (
    AVIC_BACKING_MASK,
    AVIC_VALID,
    CS_TABLES,
    DROPPED,
    H_BUSY,
    H_REQSEQ,
    H_SEQ,
    INVALID,
    T_EPOCH,
    T_GEN,
    T_GFN,
    T_NENTRIES,
    T_REQSEQ,
    T_STATE,
    TW,
    V_CUR,
    V_INL2,
    V_STEER,
    VALID,
    VW,
)
from vm.page_track import PAGE_SHIFT


class TableErase:
    """Erase a table, widen the flood race, erase the tables a memslot removal concerns."""

    def _seq_begin(self) -> None:
        """A shadow change the checks must not see half-done begins (oracle ``seq_stable``)."""
        self.amem.fetch_add(self.hdr0 + H_BUSY, 1)
        self.amem.fetch_add(self.hdr0 + H_SEQ, 1)

    def _seq_end(self) -> None:
        self.amem.fetch_add(self.hdr0 + H_SEQ, 1)
        self.amem.fetch_add(self.hdr0 + H_BUSY, -1)

    def _invalidate(self, t: int, why: str = "invalidate") -> list | None:
        """``avic_physid_shadow_table_erase`` (RFC v3 11/19, 15/19): stop write-protecting the gfn,
        zero (and unpin) the entries, ``nentries = 0``, then
        ``kvm_make_all_cpus_request(KVM_REQ_APIC_PAGE_RELOAD)``: every vCPU gets the request; each
        one in L2 is kicked, and the caller waits (``KVM_REQUEST_WAIT``) for those to leave L2 —
        that wait is ``_reload_wait``, which the caller runs once it has dropped the table lock, with
        the list this returns (None: nobody to wait for). The table is re-shadowed (write-protected
        again, then synced) by its next user. Hook ``flood-drop-race``: a flood's erase requests
        nothing (the unfixed race)."""
        self._tlock_held(t)
        m = self.amem
        b = self.tw0 + t * TW
        if self._emit:
            self._emit(self._tp["table_drop"][0], t, m.load(b + T_GFN))
        self._seq_begin()
        # untrack before DROPPED is visible: a user that sees DROPPED write-protects the page again,
        # and must not do it while this untrack is still to come (it would drop that user's count)
        self._untrack(t)
        self._zero_entries(t)
        m.store(b + T_NENTRIES, 0)
        m.store(b + T_STATE, DROPPED)
        m.fetch_add(b + T_EPOCH, 1)
        seq = m.fetch_add(self.hdr0 + H_REQSEQ, 1) + 1  # the request this erase owes its table's users
        m.store(b + T_REQSEQ, seq)
        targets = None if (self.flood_race and why == "flood_drop") else self._request_reload_all(seq)
        if targets is not None:  # no vCPU in L2 on t unseen by the scan (none kicked: no wait checks it)
            oracle.check_missed(self, t, targets)
        if targets:  # owed a KVM_REQUEST_WAIT before the write completes (oracle.check_write_done)
            self.reload_owed.append((t, targets))
        self._seq_end()
        self._stat(why)
        if self._emit:
            self._emit(self._tp["table_drop"][1])
        return targets

    def _steer_flood_drop(self, t: int) -> bool:
        """Widening (hooks ``avic-flood-often``, ``flood-drop-race``): having seen usecount 0, wait up to
        ``FLOOD_RACE_DELAY_NS`` (dilated) for a vCPU to enter L2 on the table: the worst interleaving.
        Under those hooks the wait is made with the table's entries lock dropped (and mutex-hash's
        ``tables_lock``, which its track_write holds): the vCPU's own L1 stores to table pages take
        them on its way to VMRUN, so holding them let nobody in and the steer almost never met a
        vCPU. They are taken again (same order) before the drop; False: the table was freed, reused
        or no longer shadowed meanwhile, and is not dropped. (A fuzz-early drop waits with the
        locks held, as before.)"""
        if getattr(fuzz.ACTIVE, "controlled", False):  # ipc/sched: no timed wait, the scheduler
            fuzz.point("avic.flood_steer")  # decides who enters L2 before the drop
            return True
        m, end = self.amem, _prims.now_ns() + self.flood_race_ns
        me = self.kvm.proc - 1  # this vCPU (the coordinator: -1) cannot enter while it waits here
        # a holder waiting in a steer of its own (two vCPUs flooding each other's tables) cannot
        # enter L2 either: waiting for it would only make both miss
        if not any(m.load(self.vw0 + v * VW + V_CUR) == t + 1 and not m.load(self.vw0 + v * VW + V_STEER)
                   for v in range(self.nvcpus) if v != me):
            return True  # nobody else holds the table: nobody can enter it
        words = [self.vw0 + v * VW + V_INL2 for v in range(self.nvcpus)]
        release = self.flood_steer
        b = self.tw0 + t * TW
        gen = m.load(b + T_GEN)
        tables = release and self.tables_lock.is_held()
        steer_w = self.vw0 + me * VW + V_STEER if me >= 0 else -1
        if release:
            self._tunlock(t)
            if tables:
                self._cs_out(CS_TABLES)
                self.tables_lock.unlock()
        if steer_w >= 0:
            m.store(steer_w, 1)
        try:
            while _prims.now_ns() < end:
                if any(m.load(w) == t + 1 for w in words):
                    self._stat("flood_steered")
                    break
                self.steer_pause()
        finally:
            if steer_w >= 0:
                m.store(steer_w, 0)
            if release:
                if tables:
                    self.tables_lock.lock()
                    self._cs_in(CS_TABLES)
                self._tlock(t)
        return not release or (m.load(b + T_GEN) == gen and m.load(b + T_STATE) in (VALID, INVALID))

    def remove_region(self, gfn: int, nr_pages: int, only: int) -> None:
        """track_remove_region: a memslot goes away. Every shadowed table whose own page or any of
        whose entries' backing pages lies in it is erased (RFC v3
        ``avic_physid_shadow_table_flush_memslot``): its pinned pages would be gone."""
        m = self.amem
        for t in range(self.nt) if only < 0 else (only,):
            b = self.tw0 + t * TW
            if m.load(b + T_STATE) not in (VALID, INVALID):
                continue
            targets = None
            self._tlock(t)
            try:
                if m.load(b + T_STATE) in (VALID, INVALID) and (
                        gfn <= m.load(b + T_GFN) < gfn + nr_pages or self._backing_in(t, gfn, nr_pages)):
                    targets = self._invalidate(t)
            finally:
                self._tunlock(t)
                if targets:
                    self._reload_wait(t, targets)

    def _backing_in(self, t: int, gfn: int, nr_pages: int) -> bool:
        """A valid cached entry of table ``t`` has its backing page in gfns [gfn, gfn + nr_pages)."""
        m, cb = self.amem, self.cache0 + t * self.ne
        lo, hi = gfn << PAGE_SHIFT, (gfn + nr_pages) << PAGE_SHIFT
        for e in range(self.ne):
            c = m.load(cb + e) & 0xFFFFFFFFFFFFFFFF
            if c & AVIC_VALID and lo <= c & AVIC_BACKING_MASK < hi:
                return True
        return False
