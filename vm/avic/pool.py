"""The table pool of the nested AVIC wing: allocate / free (poison) shadow tables, write-protect
their gfn, sync / update / invalidate / drop their entries, and the chain walks the designs' indexes
(gfn hash, RCU list) share. A mixin of :class:`vm.avic.base.AvicDesign`; all state is in the
``avic`` shm region (vm/avic/table.py)."""

from __future__ import annotations

from ipc import fuzz
from vm.avic.table import (
    ALLOC,
    AVIC_APIC_ID_MASK,
    AVIC_BACKING_MASK,
    AVIC_IS_RUNNING,
    AVIC_UPDATABLE,
    AVIC_VALID,
    DUMMY_HPA,
    FLOOD_EARLY_SCALE,
    FREE,
    H_GEN,
    H_LIVE,
    H_MAXLIVE,
    HPA_BASE,
    INVALID,
    LIVE,
    NO_HOST_APIC,
    POISON,
    POISON_ENTRY,
    POISON_NEXT,
    POISON_REF,
    RETIRING,
    T_FLOOD,
    T_GEN,
    T_GFN,
    T_L2,
    T_NENTRIES,
    T_NEXT,
    T_NODE,
    T_REF,
    T_REGISTERED,
    T_REQSEQ,
    T_STATE,
    T_SYNCS,
    T_TRACKED,
    T_USE,
    T_WRITES,
    TW,
    UNINIT_NEXT,
    UNTRACKED,
    V_LOADED,
    VALID,
    VW,
    s64,
)
from vm.page_track import (
    PAGE_SHIFT,
    kvm_flush_remote_tlbs,
    kvm_write_track_add_gfn,
    kvm_write_track_remove_gfn,
)


class TablePool:
    """Shadow ``avic_physid_table`` objects: lifetime, write tracking of their page, entries."""

    def _chain_find(self, head_w: int, gfn: int, what: str) -> int:
        """The live table of ``gfn`` on the chain of table slots starting at word ``head_w`` (a
        gfn-hash bucket or the RCU list), or -1. A poisoned slot or a bad / cyclic pointer on the
        way is a read of freed memory: reported, and the walk stops."""
        m = self.amem
        n = m.load(head_w)
        steps = 0
        while n:
            steps += 1
            if not 0 < n <= self.nt or steps > self.nt:  # a cycle is corruption too
                self.kvm.poisoned(f"avic_physid_table {what} pointer {n} (step {steps})", pointer=n)
                return -1
            t = n - 1
            b = self.tw0 + t * TW
            st = m.load(b + T_STATE)
            if st == POISON:
                self.kvm.poisoned(f"avic_physid_table slot {t} on the {what}", table=t)
                return -1
            if st in LIVE and m.load(b + T_GFN) == gfn:
                return t
            n = m.load(b + T_NEXT)
        return -1

    def _chain_unlink(self, head_w: int, t: int, what: str, corrupt_kind: str) -> None:
        """Unlink table slot ``t`` from the chain starting at word ``head_w`` (writer side, its
        lock held). ``t`` keeps its next pointer, so a reader standing on it moves on."""
        m = self.amem
        b = self.tw0 + t * TW
        link = head_w
        for _ in range(self.nt + 1):
            n = m.load(link)
            if not 0 < n <= self.nt:
                if n:
                    self.kvm.poisoned(f"avic_physid_table {what} pointer {n} (unlinking slot {t})")
                else:
                    self.kvm.warn(corrupt_kind, f"avic_physid_table slot {t} not on the {what}")
                return
            if n == t + 1:
                m.store(link, m.load(b + T_NEXT))
                return
            link = self.tw0 + (n - 1) * TW + T_NEXT
        self.kvm.warn(corrupt_kind, f"avic_physid_table slot {t}: the {what} loops")

    def _translate(self, g: int) -> int:
        if not g & AVIC_VALID:
            return 0
        gpa = g & AVIC_BACKING_MASK
        hpa = HPA_BASE + gpa if (gpa >> PAGE_SHIFT) < self.mem_pages else DUMMY_HPA
        apic = g & AVIC_APIC_ID_MASK
        if apic < self.nvcpus:
            run = AVIC_IS_RUNNING if (g & AVIC_IS_RUNNING
                                      and self.amem.load(self.vw0 + apic * VW + V_LOADED)) else 0
            return AVIC_VALID | run | hpa | self._host_apic[apic]
        return AVIC_VALID | hpa | NO_HOST_APIC

    def _create_table(self, gfn: int, l2: int) -> int:
        """Allocate and initialise a table (refcount 1, not yet write-protected)."""
        m = self.amem
        for t in range(self.nt):
            b = self.tw0 + t * TW
            st = m.load(b + T_STATE)
            if st in (FREE, POISON) and m.cmpxchg(b + T_STATE, st, ALLOC) == st:
                break
        else:
            self.kvm.warn("avic_tables_exhausted", f"avic_physid_table pool ({self.nt}) exhausted")
            raise RuntimeError(f"avic_physid_table pool ({self.nt}) exhausted")
        if self._emit:  # from the claimed slot on: an exhausted pool opens no slice
            self._emit(self._tp["table_create"][0], t, gfn)
        for w, val in ((T_GFN, gfn), (T_L2, l2), (T_NENTRIES, self.ne), (T_REF, 1), (T_USE, 0),
                       (T_FLOOD, 0), (T_NEXT, UNINIT_NEXT), (T_NODE, 0), (T_REGISTERED, 0), (T_TRACKED, 0),
                       (T_WRITES, 0), (T_SYNCS, 0), (T_REQSEQ, 0)):
            m.store(b + w, val)
        m.store(b + T_GEN, m.fetch_add(self.hdr0 + H_GEN, 1) + 1)
        self._zero_entries(t)
        live = m.fetch_add(self.hdr0 + H_LIVE, 1) + 1
        mx = m.load(self.hdr0 + H_MAXLIVE)
        while live > mx:
            f = m.cmpxchg(self.hdr0 + H_MAXLIVE, mx, live)
            if f == mx:
                break
            mx = f
        m.store(b + T_STATE, UNTRACKED)  # release: complete before anyone can use it
        self.kvm.count("table_create")
        self._stat("table_create")
        if self._emit:
            self._emit(self._tp["table_create"][1], t, gfn)
        return t

    def _vref(self, t: int, c: int, n: int) -> None:
        """Cached entry ``c`` of table ``t`` comes (``n`` = 1) or goes (-1): if it names an L1 vCPU,
        that vCPU's count of references in ``t`` (``vref``, RFC v3 ``physid_ref_entries``) follows.
        A writer counts a new reference before it translates the entry (which reads V_LOADED), and
        ``_set_running`` stores V_LOADED before it reads the counts: one of them sees the other."""
        if c & AVIC_VALID and (c & AVIC_APIC_ID_MASK) < self.nvcpus:
            self.amem.fetch_add(self.vref0 + (c & AVIC_APIC_ID_MASK) * self.nt + t, n)

    def _zero_entries(self, t: int) -> None:
        """Table ``t``'s shadow and cached entries and its valid bitmap: all 0 (invalid)."""
        m = self.amem
        cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
        for e in range(self.ne):
            m.store(sb + e, 0)
            old = m.load(cb + e)
            m.store(cb + e, 0)
            self._vref(t, old, -1)
        for i in range(4):
            m.store(self.valid0 + t * 4 + i, 0)

    def _retire(self, t: int) -> None:
        """The last put marks table ``t`` RETIRING, with its entries lock held (asserted): a
        ``remove_region`` (an SRCU walker holding only that lock) that found the table VALID finishes
        its erase first, and one that comes after sees RETIRING and leaves the table alone."""
        self._tlock_held(t)
        self.amem.store(self.tw0 + t * TW + T_STATE, RETIRING)

    def _poison_table(self, t: int) -> None:
        """Free a table: nobody may still read it (the design's grace period has elapsed)."""
        m = self.amem
        b = self.tw0 + t * TW
        # scribble first, publish POISON last: a POISON slot may be reallocated at once
        m.fetch_add(b + T_GEN, 1)
        m.store(b + T_GFN, -1)
        m.store(b + T_REF, POISON_REF)
        m.store(b + T_USE, 0)
        m.store(b + T_NEXT, POISON_NEXT)
        m.store(b + T_NODE, 0)
        cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
        for e in range(self.ne):
            old = m.load(cb + e)
            m.store(cb + e, POISON_ENTRY)
            m.store(sb + e, POISON_ENTRY)
            self._vref(t, old, -1)
        m.store(b + T_STATE, POISON)  # release
        m.fetch_add(self.hdr0 + H_LIVE, -1)
        self.kvm.count("table_free")
        self._stat("table_free")

    def _track(self, t: int) -> bool:
        """Write-protect the table's gfn (kvm_write_track_add_gfn under mmu_lock, then flush)."""
        kvm = self.kvm
        b = self.tw0 + t * TW
        gfn = self.amem.load(b + T_GFN)
        with kvm.mmu_lock:
            ok = kvm_write_track_add_gfn(kvm, gfn)
            if ok:
                self.amem.store(b + T_TRACKED, 1)
        if ok:
            if fuzz.ACTIVE:
                fuzz.point("page_track.protect_to_flush")  # stores in flight may still land
            kvm_flush_remote_tlbs(kvm)
        self._stat("track_gfn")
        return ok

    def _untrack(self, t: int) -> None:
        kvm = self.kvm
        b = self.tw0 + t * TW
        with kvm.mmu_lock:
            if self.amem.load(b + T_TRACKED):
                kvm_write_track_remove_gfn(kvm, self.amem.load(b + T_GFN))
                self.amem.store(b + T_TRACKED, 0)
                self._stat("untrack_gfn")

    def _sync(self, t: int) -> None:
        """Read every guest entry, cache it, write its translation (atomic 64-bit stores)."""
        self._tlock_held(t)
        m, gl = self.amem, self.gmem.load
        b = self.tw0 + t * TW
        gbase = m.load(b + T_GFN) << 9
        if self._emit:
            self._emit(self._tp["table_sync"][0], t, gbase >> 9)
        cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
        bits = [0, 0, 0, 0]
        ref = self._vref
        for e in range(self.ne):
            g = gl(gbase + e) & 0xFFFFFFFFFFFFFFFF
            old = m.load(cb + e)
            ref(t, g, 1)  # (a full barrier) before _translate reads V_LOADED: see _vref
            m.store(cb + e, s64(g))
            m.store(sb + e, s64(self._translate(g)))
            ref(t, old, -1)
            if g & AVIC_VALID:
                bits[e >> 6] |= 1 << (e & 63)
        for i in range(4):
            m.store(self.valid0 + t * 4 + i, s64(bits[i]))
        m.store(b + T_NENTRIES, self.ne)
        m.store(b + T_FLOOD, 0)
        m.fetch_add(b + T_SYNCS, 1)
        m.store(b + T_STATE, VALID)
        if self._emit:
            self._emit(self._tp["table_sync"][1])

    def _entry_write(self, t: int, gpa: int, nbytes: int, new: bytes | None = None) -> list | None:
        """A write to one entry of a VALID table: update it if only apic id / IsRunning changed, else
        erase the table (returns the erase's reload targets). The new guest entry is re-read from
        guest memory (default), or, with ``--entry-update gentry`` (RFC v3), made of the cached entry
        and the written bytes: two L1 vCPUs writing one entry then leave the value of whichever
        handler ran last under the lock, not of the store that landed last (a lost write)."""
        self._tlock_held(t)
        m = self.amem
        b = self.tw0 + t * TW
        gfn = m.load(b + T_GFN)
        off = gpa - (gfn << PAGE_SHIFT)
        first = off >> 3
        if first >= self.ne or off < 0:
            return None  # past the table's entries
        if (off + nbytes - 1) >> 3 != first:
            return self._invalidate(t)  # multi-entry / whole-page write
        cw = self.cache0 + t * self.ne + first
        c = m.load(cw) & 0xFFFFFFFFFFFFFFFF
        if self.entry_gentry and new is not None:  # memcpy(&gentry + offset, new, bytes)
            sh = (off & 7) * 8
            mask = ((1 << (8 * nbytes)) - 1) << sh
            g = (c & ~mask) | (int.from_bytes(new, "little") << sh & mask)
        else:
            g = self.gmem.load((gfn << 9) + first) & 0xFFFFFFFFFFFFFFFF  # re-read, never trust the order
        if not (g & c & AVIC_VALID) or (g ^ c) & ~AVIC_UPDATABLE:
            return self._invalidate(t)  # other bits changed, or an invalid entry
        self._vref(t, g, 1)  # before the translation reads V_LOADED (_vref)
        m.store(cw, s64(g))
        m.store(self.shadow0 + t * self.ne + first, s64(self._translate(g)))
        self._vref(t, c, -1)
        self._stat("entry_update")
        return None

    def _table_write(self, t: int, gpa: int, nbytes: int, gen: int, new: bytes | None = None) -> bool:
        """A tracked write reached table ``t`` (found by the design's lookup with generation
        ``gen``, or -1 = no check). False if the table turned out to be freed memory.
        Flood rule (RFC v3): a write while no vCPU uses the table (usecount 0) counts; one while it
        is in use resets the count; past ``nentries * 1000`` the table is erased (``_invalidate``)."""
        m = self.amem
        b = self.tw0 + t * TW
        targets = None
        self._tlock(t)
        try:
            if gen >= 0 and m.load(b + T_GEN) != gen:
                self.kvm.poisoned(f"avic_physid_table slot {t}: freed and reused under a track_write "
                                  f"reader (gpa {gpa:#x})", table=t, gpa=gpa)
                return False
            st = m.load(b + T_STATE)
            if st not in LIVE:
                if st == POISON:
                    self.kvm.poisoned(f"avic_physid_table slot {t} in track_write (gpa {gpa:#x})",
                                      table=t, gpa=gpa)
                    return False
                return True
            m.fetch_add(b + T_WRITES, 1)
            self.kvm.count("notifier_calls")
            self._stat("track_write")
            if st not in (VALID, INVALID):
                return True  # not shadowed (dropped / being write-protected): synced at its next use
            if m.load(b + T_USE) == 0:
                flooded = m.fetch_add(b + T_FLOOD, 1) + 1 > self.flood_limit
                # widening: an erase is always allowed (the table is simply re-shadowed on its next
                # use), so the fuzzer sometimes takes the flood decision early, and steers that erase
                # onto a vCPU entering L2 on the table, the interleaving the reload request exists for
                early = not flooded and fuzz.ACTIVE is not None and fuzz.ACTIVE.chance("avic.flood_drop_early",
                                                                                      FLOOD_EARLY_SCALE)
                if flooded or early:
                    if self.flood_steer or early:
                        if not self._steer_flood_drop(t):
                            return True  # freed / reused / dropped while the steer waited
                    elif fuzz.ACTIVE:
                        fuzz.point("avic.flood_check_to_drop")
                    targets = self._invalidate(t, "flood_drop")
                    return True
            elif m.load(b + T_FLOOD):
                m.store(b + T_FLOOD, 0)  # a write while the table is in use: not a flood
            if st == VALID:
                targets = self._entry_write(t, gpa, nbytes, new)
            return True
        finally:
            self._tunlock(t)
            if targets:
                self._reload_wait(t, targets)
