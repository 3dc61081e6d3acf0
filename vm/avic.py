"""Nested AVIC shadow physical-APIC-ID tables: the three designs of the seed's debate, the four
notifier-registration variants, the oracle, and the scripted "kaboom" scenario.

Designs (``cfg.design``), all driven through the vm/nested.py interface:
- ``mutex-hash`` (Maxim, RFC v3): VM-wide ``tables_lock`` futex mutex, 256-bucket gfn hash, ONE
  shared page-track notifier node. Every nested VMRUN does get(gfn) under the mutex (lookup,
  create + write-protect + sync if missing); put() under the mutex; ``track_write`` takes the
  mutex and looks the gfn up in the hash, for every emulated write (MMIO included).
- ``rcu-list`` (Sean): RCU-protected list of tables, one shared node. A vCPU that already holds a
  reference on its L2's table takes no lock at all on VMRUN; a new reference is taken with an
  ``inc_not_zero`` under ``rcu_read_lock``; only the first user of a table (create) and the last
  (free) take the ``avic_tables_spin`` spinlock and wait ``synchronize_rcu``. ``track_write``
  walks the list under ``rcu_read_lock`` and takes no sleeping lock.
- ``per-table-notifier``: each table registers its own notifier node (``vm.notifier`` pool), so
  the walk is linear over all nodes and ``track_write`` goes straight to its table (no hash, no
  mutex); get/put, register and unregister (``synchronize_srcu``) run under ``tables_lock``.

Shadow entries are written only under the per-VM ``avic_physid_lock`` spinlock (which vCPU
load/put also take to flip IsRunning) with atomic 64-bit stores, so the "hardware" (the vCPU
running L2, the stale-entry check) reads whole entries without a lock. A ``track_write`` that
touches only the apic id / IsRunning bits of one valid entry updates that entry (re-reading the
guest entry, never trusting callback order); anything else invalidates the table and vCPUs in
guest mode on it get a reload request. More than nentries*1000 writes while unused (usecount 0)
drop the table (invalidated and un-write-protected until its next use).

Registration variants (``cfg.registration``) of the AVIC notifier(s): see ``_notifier_get``:
- ``refcount``: AVIC counts users, registers on 0->1, unregisters on 1->0 (page track WARNs on
  any redundant registration, so this must never trigger it);
- ``bool``: an idempotent "registered" flag (X registers, Y registers, X unregisters: Y's writes
  are no longer seen, a stale shadow entry follows);
- ``naive``: every user calls register/unregister (vm/notifier.py's redundant-registration WARN);
- ``split``: registration separate from enabling write tracking: the notifier is registered while
  tracking is still disabled (WARN naming the untracked notifier); tracking is enabled later, on
  first use.

Oracle: ``oracle()`` (coordinator, vCPUs stopped) and, during the run, a check at every nested
VMRUN that the vCPU's own entry (the only one it writes, ``vcpu % nentries``) is not stale
(``stale_entries`` counter + ``stale_entry`` WARN), poisoned-table detection by every reader
(``kvm.poisoned``), locktorture-style held flags on every lock taken here.

Locks (outer to inner; asserted with ``lockdep_assert_held`` where a function needs one):
``tables_lock`` (mutex) -> ``avic_physid_lock`` (spin) -> ``mmu_lock`` (spin), and
``avic_tables_spin`` -> ``avic_physid_lock``. ``avic_notifier_lock`` (this module's own mutex,
in the avic region) serializes the shared node's register/unregister; it is never taken under
``tables_lock`` / ``avic_tables_spin`` because unregister sleeps in ``synchronize_srcu`` while a
mutex-hash ``track_write`` walker may wait for ``tables_lock``. ``kvm_flush_remote_tlbs`` (a
``guest_mode`` grace period) is waited under ``tables_lock`` (mutex-hash, per-table-notifier), so
emulated writes must happen outside the guest-mode section (a VM exit); a notifier call that
arrives inside it is WARNed (``emulation_in_guest_mode``) and run outside. ``synchronize_rcu``
is never waited with a lock held.

Test hooks (``kvm.hooks``): ``no-synchronize-rcu`` (rcu-list frees without a grace period),
``avic-reader-delay`` (100 us inside rcu-list read-side sections: widens race windows);
vm/notifier.py's ``no-synchronize-srcu`` makes per-table-notifier free a table under a walker;
``busted-lock`` (vm/kvm.py: locks that do not lock) trips the held-flag checks.
"""

from __future__ import annotations

import random
import weakref

import msgspec
import numpy as np

from ipc import _prims
from ipc.errors import UsageError
from ipc.locks import init_lockstat, lockdep_assert_held, merge_lockstat, new_lock
from ipc.shm import Region
from vm import layout as L
from vm import notifier
from vm.avic_table import (
    ALLOC,
    AVIC_APIC_ID_MASK,
    AVIC_BACKING_MASK,
    AVIC_IS_RUNNING,
    AVIC_UPDATABLE,
    AVIC_VALID,
    CS,
    CS_FAILS,
    CS_HOLDER,
    CS_NOTIFIER,
    CS_PHYSID,
    CS_SPIN,
    CS_TABLES,
    DESIGN_IDS,
    DROPPED,
    DUMMY_HPA,
    FLOOD_PER_ENTRY,
    FREE,
    H_DESIGN,
    H_GEN,
    H_LIST,
    H_LIVE,
    H_MAXLIVE,
    H_NENTRIES,
    H_NODE,
    H_REGISTERED,
    H_REGVAR,
    H_SEQ,
    H_UNTRACKED_REG,
    H_USERS,
    HASH_BUCKETS,
    HPA_BASE,
    INVALID,
    LIVE,
    LOCK_NOTIFIER,
    MYLOCKS,
    NO_HOST_APIC,
    POISON,
    POISON_ENTRY,
    POISON_NEXT,
    POISON_REF,
    REGISTRATION_IDS,
    RETIRING,
    STATE_NAMES,
    STATS,
    T_FLOOD,
    T_GEN,
    T_GFN,
    T_L2,
    T_NENTRIES,
    T_NEXT,
    T_NODE,
    T_REF,
    T_REGISTERED,
    T_STATE,
    T_SYNCS,
    T_TRACKED,
    T_USE,
    T_WRITES,
    TRACKING,
    TW,
    UNTRACKED,
    V_CUR,
    V_INGUEST,
    V_LOADED,
    V_RELOAD,
    VALID,
    VW,
    S,
    avic_layout,
    describe,
    host_apic_id,
    make_entry,
    nentries,
    ntables,
    s64,
    u64,
)
from vm.nested import DESIGNS, NestedDesign, design, table_gfn, untracked_range
from vm.page_track import (
    PAGE_SHIFT,
    emulator_write_phys,
    kvm_flush_remote_tlbs,
    kvm_page_track_write_tracking_enable,
    kvm_page_track_write_tracking_enabled,
    kvm_write_track_add_gfn,
    kvm_write_track_remove_gfn,
    page_fault_handle_page_track,
)

AVIC_DESIGNS = ("mutex-hash", "rcu-list", "per-table-notifier")
REGISTRATIONS = ("refcount", "bool", "naive", "split")
AVIC_SHARED_KIND = 41   # notifier kind of the one shared AVIC node (mutex-hash, rcu-list)
AVIC_TABLE_KIND = 42    # notifier kind of a per-table node (owner = table index)
READER_DELAY_NS = 100_000
MMIO_APIC_GPA = 0xFEE00000

# the design object of each Kvm in this process (handlers find their design through it)
_BY_KVM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _design_for(kvm) -> AvicDesign:
    """This process' AVIC design for ``kvm`` (attaching the region and building one if a process
    walks the notifiers without having made a design, e.g. a coordinator deleting a memslot)."""
    d = _BY_KVM.get(kvm)
    if d is not None:
        return d
    region = kvm.regions.get("avic")
    if region is None:
        region = Region.attach(kvm.run_id, avic_layout(kvm.cfg))
        kvm.regions["avic"] = region
    did = region.mem.load(region.word("hdr") + H_DESIGN)
    name = next((n for n, i in DESIGN_IDS.items() if i == did), None)
    if name is None:
        raise RuntimeError(f"avic region of run {kvm.run_id} names unknown design id {did}")
    return DESIGNS[name](kvm, kvm.cfg)


def _outside_guest_mode(kvm, d, gpa: int, fn, *args) -> None:
    """The caller emulates a write while still inside its guest-mode section (in KVM emulation
    follows a VM exit): WARN once, then leave guest mode for the callback and re-enter after, so
    that a TLB flush waiting for this section cannot deadlock against the AVIC locks."""
    d.warn_emulation_in_guest_mode(gpa)
    gm = kvm.guest_mode
    n = gm.reader.nesting()
    for _ in range(n):
        gm.read_unlock()
    try:
        fn(*args)
    finally:
        for _ in range(n):
            gm.read_lock()


class _AvicNotifier(notifier.NotifierNode):
    """A node whose callbacks go to this process' AVIC design (run outside guest mode)."""

    def __init__(self, kvm, node: int, owner: int):
        super().__init__(kvm, node, owner)
        self.design = _design_for(kvm)
        reader = kvm.guest_mode.reader
        self.in_guest_mode = reader.nesting if reader is not None else (lambda: 0)


@notifier.notifier_kind(AVIC_SHARED_KIND)
class AvicSharedNotifier(_AvicNotifier):
    """The one shared node of mutex-hash / rcu-list: dispatches to this process' design."""

    def track_write(self, gpa: int, new: bytes, nbytes: int, node: int) -> None:
        if self.in_guest_mode():
            _outside_guest_mode(self.kvm, self.design, gpa, self.design.track_write, gpa, nbytes, node)
            return
        self.design.track_write(gpa, nbytes, node)

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        self.design.remove_region(gfn, nr_pages, -1)


@notifier.notifier_kind(AVIC_TABLE_KIND)
class AvicTableNotifier(_AvicNotifier):
    """A per-table node (per-table-notifier): ``owner`` is the table; no lookup at all."""

    def track_write(self, gpa: int, new: bytes, nbytes: int, node: int) -> None:
        if self.in_guest_mode():
            _outside_guest_mode(self.kvm, self.design, gpa, self.design.table_track_write, self.owner,
                                gpa, nbytes, node)
            return
        self.design.table_track_write(self.owner, gpa, nbytes, node)

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        self.design.remove_region(gfn, nr_pages, self.owner)


class AvicDesign(NestedDesign):
    """What the three designs share: the table pool, entry translation, sync/update/invalidate,
    IsRunning flips, the stale-entry check, registration variants, oracle and teardown."""

    name = "avic"
    shared_node = True

    def __init__(self, kvm, cfg):
        super().__init__(kvm, cfg)
        if cfg.registration not in REGISTRATIONS:
            raise ValueError(f"unknown registration variant {cfg.registration!r}")
        self.registration = cfg.registration
        self.nvcpus = cfg.vcpus
        self.ne = nentries(cfg)
        self.nt = ntables(cfg)
        self.flood_limit = self.ne * FLOOD_PER_ENTRY
        self.mem_pages = cfg.memory_pages
        self.gmem = kvm.guest_mem
        self.tables_lock = kvm.locks["tables_lock"]
        self.physid_lock = kvm.locks["avic_physid_lock"]
        self.tables_spin = kvm.locks["avic_tables_spin"]
        self.hooks = kvm.hooks
        self.reader_delay = READER_DELAY_NS if "avic-reader-delay" in kvm.hooks else 0
        self.tag = kvm.tag
        self._host_apic = [host_apic_id(v) for v in range(self.nvcpus)]
        self.region: Region | None = None
        self._owner = False
        self._warned_gm = False
        _BY_KVM[kvm] = self
        r = kvm.regions.get("avic")
        if r is not None:
            self._bind(r)

    # -- region ---------------------------------------------------------------------------------
    def _bind(self, region: Region) -> None:
        self.region = region
        self.amem = region.mem
        self.hdr0 = region.word("hdr")
        self.hash0 = region.word("hash")
        self.vw0 = region.word("vcpu")
        self.tw0 = region.word("tables")
        self.valid0 = region.word("valid")
        self.cache0 = region.word("cache")
        self.shadow0 = region.word("shadow")
        self.cs0 = region.word("cs")
        self.st0 = region.word("stats", self.kvm.proc)
        stats = self.cfg.stats
        self.notifier_lock = new_lock(
            "mutex", region.mem, region.word("locks", LOCK_NOTIFIER),
            region.word("lockstat", self.kvm.proc, LOCK_NOTIFIER) if stats else -1, self.tag,
            busted="busted-lock" in self.hooks)

    def _attach(self) -> None:
        if self.region is None or self.region.closed:
            r = self.kvm.regions.get("avic")
            if r is None or r.closed:
                r = Region.attach(self.kvm.run_id, avic_layout(self.cfg))
                self.kvm.regions["avic"] = r
            self._bind(r)

    def warn_emulation_in_guest_mode(self, gpa: int) -> None:
        """An emulated write reached the AVIC notifier while this vCPU is still inside its
        guest-mode section: in KVM emulation happens after a VM exit. Here it can deadlock
        (mutex-hash: a vCPU holding tables_lock waits in kvm_flush_remote_tlbs for this section,
        and this section waits for tables_lock). WARNed once per process; the notifier then runs
        the callback outside the section (``_outside_guest_mode``)."""
        if not self._warned_gm:
            self._warned_gm = True
            self.kvm.warn("emulation_in_guest_mode",
                          f"emulated write to gpa {gpa:#x} reached the nested AVIC notifier inside the "
                          f"guest_mode read-side section (emulate after leaving guest mode: a TLB flush "
                          f"waiting for this section can deadlock against tables_lock)", gpa=gpa)

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

    def _stat(self, name: str, n: int = 1) -> None:
        self.amem.fetch_add(self.st0 + S[name], n)

    def _h(self, w: int) -> int:
        return self.amem.load(self.hdr0 + w)

    def _tb(self, t: int) -> int:
        return self.tw0 + t * TW

    # -- locks with locktorture-style held flags -----------------------------------------------------
    def _cs_in(self, i: int) -> None:
        w = self.cs0 + i * 8
        if self.amem.xchg(w + CS_HOLDER, self.tag):
            self.amem.fetch_add(w + CS_FAILS, 1)

    def _cs_out(self, i: int) -> None:
        self.amem.cmpxchg(self.cs0 + i * 8 + CS_HOLDER, self.tag, 0)

    def _physid_lock(self) -> None:
        self.physid_lock.lock()
        self._cs_in(CS_PHYSID)

    def _physid_unlock(self) -> None:
        self._cs_out(CS_PHYSID)
        self.physid_lock.unlock()

    # -- coordinator ---------------------------------------------------------------------------------
    def setup(self) -> None:
        kvm, cfg = self.kvm, self.cfg
        region = Region.create(kvm.run_id, avic_layout(cfg))
        kvm.regions["avic"] = region
        self._owner = True
        v = region.v
        for f in v.values():
            f[...] = 0
        init_lockstat(v["lockstat"])
        del v, f
        self._bind(region)
        m, h = self.amem, self.hdr0
        m.store(h + H_DESIGN, DESIGN_IDS[self.name])
        m.store(h + H_NENTRIES, self.ne)
        m.store(h + H_REGVAR, REGISTRATION_IDS[self.registration])
        # the L2s' guest physid tables: entry e -> a backing page, L1 vCPU e, not running
        lo, hi = untracked_range(cfg)
        span = max(1, hi - lo)
        for l2 in range(cfg.l2s):
            base = table_gfn(cfg, l2) << 9
            for e in range(self.ne):
                backing = (lo + (l2 * self.ne + e) % span) << PAGE_SHIFT
                self.gmem.store(base + e, s64(make_entry(backing, e % self.nvcpus, False)))
        if self.registration != "split":
            kvm_page_track_write_tracking_enable(kvm)  # registration and tracking go together
        if self.shared_node:
            node = notifier.alloc_node(kvm, AVIC_SHARED_KIND, 0)
            m.store(h + H_NODE, node + 1)
            if self.registration == "split":
                # registered once, at VM creation, apart from enabling tracking (done on first use)
                self._register(node, "nested AVIC shared node")

    def vcpu_init(self, vcpu: int) -> None:
        self._attach()

    # -- translation ------------------------------------------------------------------------------
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

    # -- table pool ---------------------------------------------------------------------------------
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
        for w, val in ((T_GFN, gfn), (T_L2, l2), (T_NENTRIES, self.ne), (T_REF, 1), (T_USE, 0),
                       (T_FLOOD, 0), (T_NEXT, 0), (T_NODE, 0), (T_REGISTERED, 0), (T_TRACKED, 0),
                       (T_WRITES, 0), (T_SYNCS, 0)):
            m.store(b + w, val)
        m.store(b + T_GEN, m.fetch_add(self.hdr0 + H_GEN, 1) + 1)
        cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
        for e in range(self.ne):
            m.store(cb + e, 0)
            m.store(sb + e, 0)
        for i in range(4):
            m.store(self.valid0 + t * 4 + i, 0)
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
        return t

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
            m.store(cb + e, POISON_ENTRY)
            m.store(sb + e, POISON_ENTRY)
        m.store(b + T_STATE, POISON)  # release
        m.fetch_add(self.hdr0 + H_LIVE, -1)
        self.kvm.count("table_free")
        self._stat("table_free")

    # -- write tracking of the table's gfn --------------------------------------------------------------
    def _track(self, t: int) -> None:
        """Write-protect the table's gfn (kvm_write_track_add_gfn under mmu_lock, then flush)."""
        kvm = self.kvm
        b = self.tw0 + t * TW
        gfn = self.amem.load(b + T_GFN)
        if self.registration == "split" and not kvm_page_track_write_tracking_enabled(kvm):
            kvm_page_track_write_tracking_enable(kvm)  # enabled apart from registration, on first use
        with kvm.mmu_lock:
            ok = kvm_write_track_add_gfn(kvm, gfn)
            if ok:
                self.amem.store(b + T_TRACKED, 1)
        if ok:
            kvm_flush_remote_tlbs(kvm)
        self._stat("track_gfn")

    def _untrack(self, t: int) -> None:
        kvm = self.kvm
        b = self.tw0 + t * TW
        with kvm.mmu_lock:
            if self.amem.load(b + T_TRACKED):
                kvm_write_track_remove_gfn(kvm, self.amem.load(b + T_GFN))
                self.amem.store(b + T_TRACKED, 0)
                self._stat("untrack_gfn")

    # -- entries (avic_physid_lock held) ------------------------------------------------------------
    def _sync(self, t: int) -> None:
        """Read every guest entry, cache it, write its translation (atomic 64-bit stores)."""
        lockdep_assert_held(self.physid_lock, "avic_physid_lock")
        m, gl = self.amem, self.gmem.load
        b = self.tw0 + t * TW
        gbase = m.load(b + T_GFN) << 9
        cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
        bits = [0, 0, 0, 0]
        for e in range(self.ne):
            g = gl(gbase + e) & 0xFFFFFFFFFFFFFFFF
            m.store(cb + e, s64(g))
            m.store(sb + e, s64(self._translate(g)))
            if g & AVIC_VALID:
                bits[e >> 6] |= 1 << (e & 63)
        for i in range(4):
            m.store(self.valid0 + t * 4 + i, s64(bits[i]))
        m.store(b + T_FLOOD, 0)
        m.fetch_add(b + T_SYNCS, 1)
        m.store(b + T_STATE, VALID)

    def _invalidate(self, t: int) -> None:
        """The table no longer matches its guest table: vCPUs running on it must reload."""
        lockdep_assert_held(self.physid_lock, "avic_physid_lock")
        m = self.amem
        b = self.tw0 + t * TW
        if m.load(b + T_STATE) == VALID:
            m.store(b + T_STATE, INVALID)
        _prims.smp_mb()
        for v in range(self.nvcpus):
            if m.load(self.vw0 + v * VW + V_INGUEST) == t + 1:
                m.store(self.vw0 + v * VW + V_RELOAD, 1)
                self._stat("reload_request")
        self._stat("invalidate")

    def _drop(self, t: int) -> None:
        """Flood rule: stop shadowing (untrack) until the table is used again."""
        lockdep_assert_held(self.physid_lock, "avic_physid_lock")
        self.amem.store(self.tw0 + t * TW + T_STATE, DROPPED)
        self._untrack(t)
        self._stat("flood_drop")

    def _entry_write(self, t: int, gpa: int, nbytes: int) -> None:
        lockdep_assert_held(self.physid_lock, "avic_physid_lock")
        m = self.amem
        b = self.tw0 + t * TW
        gfn = m.load(b + T_GFN)
        off = gpa - (gfn << PAGE_SHIFT)
        first = off >> 3
        if first >= self.ne or off < 0:
            return  # past the table's entries
        if (off + nbytes - 1) >> 3 != first:
            self._invalidate(t)  # multi-entry / whole-page write
            return
        g = self.gmem.load((gfn << 9) + first) & 0xFFFFFFFFFFFFFFFF  # re-read, never trust the order
        cw = self.cache0 + t * self.ne + first
        c = m.load(cw) & 0xFFFFFFFFFFFFFFFF
        if not (g & c & AVIC_VALID) or (g ^ c) & ~AVIC_UPDATABLE:
            self._invalidate(t)  # other bits changed, or an invalid entry
            return
        m.store(cw, s64(g))
        m.store(self.shadow0 + t * self.ne + first, s64(self._translate(g)))
        self._stat("entry_update")

    def _table_write(self, t: int, gpa: int, nbytes: int, gen: int) -> bool:
        """A tracked write reached table ``t`` (found by the design's lookup with generation
        ``gen``, or -1 = no check). False if the table turned out to be freed memory."""
        m = self.amem
        b = self.tw0 + t * TW
        self._physid_lock()
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
            if m.load(b + T_USE) == 0:
                if m.fetch_add(b + T_FLOOD, 1) + 1 > self.flood_limit and st in (VALID, INVALID):
                    self._drop(t)
                    return True
            if st == VALID:
                self._entry_write(t, gpa, nbytes)
            return True
        finally:
            self._physid_unlock()

    def remove_region(self, gfn: int, nr_pages: int, only: int) -> None:
        """track_remove_region: a memslot goes away; tables inside it stop being shadowed."""
        m = self.amem
        self._physid_lock()
        try:
            for t in range(self.nt) if only < 0 else (only,):
                b = self.tw0 + t * TW
                if m.load(b + T_STATE) in (VALID, INVALID) and gfn <= m.load(b + T_GFN) < gfn + nr_pages:
                    self._drop(t)
        finally:
            self._physid_unlock()

    # -- vCPU state ---------------------------------------------------------------------------------
    def _cur(self, v: int) -> int:
        return self.amem.load(self.vw0 + v * VW + V_CUR) - 1

    def _set_cur(self, v: int, t: int) -> None:
        self.amem.store(self.vw0 + v * VW + V_CUR, t + 1)

    def _enter_guest(self, v: int, t: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        w = self.vw0 + v * VW + V_INGUEST
        old = m.load(w) - 1
        if old == t:
            return  # VMRUN without a VMEXIT in between: already counted
        if old >= 0:
            self._leave_guest(v, old)
        m.store(w, t + 1)
        if m.fetch_add(b + T_USE, 1) == 0:  # full barrier: in_guest is visible before the state read
            m.store(b + T_FLOOD, 0)

    def _leave_guest(self, v: int, t: int) -> None:
        m = self.amem
        w = self.vw0 + v * VW + V_INGUEST
        if m.load(w) == t + 1:
            m.store(w, 0)
            m.fetch_add(self.tw0 + t * TW + T_USE, -1)

    def _reload_check(self, v: int) -> None:
        w = self.vw0 + v * VW + V_RELOAD
        if self.amem.load(w):
            self.amem.store(w, 0)
            self.kvm.count("reloads")

    def _make_ready(self, v: int, t: int) -> bool:
        """Bring the table the vCPU holds a reference on to VALID: write-protect it if it is not
        (new or dropped), resync it if it was invalidated."""
        m = self.amem
        b = self.tw0 + t * TW
        while True:
            st = m.load(b + T_STATE)
            if st == VALID:
                return True
            if st in (UNTRACKED, DROPPED):
                if m.cmpxchg(b + T_STATE, st, TRACKING) == st:
                    self._track(t)
                    m.store(b + T_STATE, INVALID)
            elif st == TRACKING:
                _prims.sched_yield()  # another user is write-protecting it
            elif st == INVALID:
                self._physid_lock()
                try:
                    if m.load(b + T_STATE) == INVALID:
                        self._stat("sync" if m.load(b + T_SYNCS) == 0 else "resync")
                        self._sync(t)
                finally:
                    self._physid_unlock()
            else:
                self.kvm.poisoned(f"avic_physid_table slot {t} (state {STATE_NAMES[st] if 0 <= st < 9 else st})"
                                  f" at nested VMRUN of vCPU {v}", table=t, vcpu=v)
                return False

    def _check_stale(self, v: int, t: int, l2: int, gfn: int) -> None:
        """The hardware is about to use the vCPU's own entry: it must be the translation of the
        guest entry (the vCPU's own writes to it have all completed)."""
        m = self.amem
        b = self.tw0 + t * TW
        e = v % self.ne
        seq_w = self.hdr0 + H_SEQ
        for _ in range(16):
            s1 = m.load(seq_w)
            if s1 & 1:
                _prims.sched_yield()
                continue
            if m.load(b + T_STATE) != VALID:
                self._stat("stale_check_skipped")  # invalidated meanwhile: a reload is pending
                return
            sh = m.load(self.shadow0 + t * self.ne + e) & 0xFFFFFFFFFFFFFFFF
            g = self.gmem.load((gfn << 9) + e) & 0xFFFFFFFFFFFFFFFF
            exp = self._translate(g)
            if m.load(seq_w) == s1:
                break
        else:
            self._stat("stale_check_skipped")
            return
        self._stat("stale_check")
        if sh != exp:
            self.kvm.count("stale_entries")
            gpa = (gfn << PAGE_SHIFT) + e * 8
            self.kvm.warn("stale_entry",
                          f"vCPU {v} nested VMRUN into L2 {l2} on a stale shadow physid entry: table gfn "
                          f"{gfn:#x} entry {e}: shadow {sh:#018x} != translation {exp:#018x} of guest entry "
                          f"{describe(g)} (lost write to gpa {gpa:#x})",
                          vcpu=v, l2=l2, gfn=gfn, entry=e, shadow=sh, expected=exp)

    # -- the nested interface --------------------------------------------------------------------------
    def nested_vmrun(self, vcpu: int, l2: int) -> None:
        if self.region is None:
            self._attach()
        gfn = table_gfn(self.cfg, l2)
        self._reload_check(vcpu)
        t = self._vmrun_get(vcpu, gfn, l2)
        if t >= 0:  # -1: the table turned out to be freed memory (reported)
            self._check_stale(vcpu, t, l2, gfn)

    def nested_vmexit(self, vcpu: int, l2: int, leaving: bool) -> None:
        if self.region is None:
            self._attach()
        t = self._cur(vcpu)
        if t >= 0:
            self._leave_guest(vcpu, t)
        self._reload_check(vcpu)
        if leaving and t >= 0:
            self._put(vcpu, t)

    def vcpu_load(self, vcpu: int) -> None:
        self._set_running(vcpu, True)

    def vcpu_put(self, vcpu: int) -> None:
        self._set_running(vcpu, False)

    def _set_running(self, v: int, running: bool) -> None:
        """Flip IsRunning in every shadow entry that maps L1 vCPU ``v`` (per-VM spinlock)."""
        if self.region is None:
            self._attach()
        m = self.amem
        seq_w = self.hdr0 + H_SEQ
        self._physid_lock()
        try:
            m.fetch_add(seq_w, 1)
            m.store(self.vw0 + v * VW + V_LOADED, 1 if running else 0)
            flips = 0
            for t in range(self.nt):
                if m.load(self.tw0 + t * TW + T_STATE) != VALID:
                    continue
                cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
                for e in range(self.ne):
                    c = m.load(cb + e) & 0xFFFFFFFFFFFFFFFF
                    if c & AVIC_VALID and c & AVIC_IS_RUNNING and (c & AVIC_APIC_ID_MASK) == v:
                        s = m.load(sb + e) & 0xFFFFFFFFFFFFFFFF
                        ns = s | AVIC_IS_RUNNING if running else s & ~AVIC_IS_RUNNING
                        if ns != s:
                            m.store(sb + e, s64(ns))
                            flips += 1
            m.fetch_add(seq_w, 1)
        finally:
            self._physid_unlock()
        if flips:
            self._stat("isrunning_flip", flips)

    def entry_write(self, l2: int, entry: int, apic: int, running: bool) -> tuple[int, bytes]:
        """L1 rewrites the apic-id / IsRunning part of ``entry`` of ``l2``'s physid table:
        the (gpa, 8 bytes) of that guest store (the caller performs it)."""
        if not 0 <= l2 < self.cfg.l2s or not 0 <= entry < nentries(self.cfg) or not 0 <= apic <= 0xFF:
            raise ValueError(f"write_entry: l2 {l2} / entry {entry} / apic {apic} out of range")
        gpa = (table_gfn(self.cfg, l2) << PAGE_SHIFT) + entry * 8
        g = u64(self.kvm.guest_mem.load(gpa >> 3))
        new = (g & ~AVIC_UPDATABLE) | apic | (AVIC_IS_RUNNING if running else 0)
        return gpa, new.to_bytes(8, "little")

    def tracked_write(self, vcpu: int, rng: random.Random) -> tuple[int, bytes]:
        """L1 vCPU ``vcpu`` rewrites its own entry (``vcpu % nentries``) of a random L2's table:
        mostly apic-id / IsRunning updates (8-byte, 1-byte apic id, 4-byte high dword), sometimes a
        backing-page change or a Valid flip (those invalidate the table)."""
        if self.region is None:
            self._attach()
        cfg = self.cfg
        gfn = table_gfn(cfg, int(rng.random() * cfg.l2s))
        e = vcpu % self.ne
        gpa = (gfn << PAGE_SHIFT) + e * 8
        g = self.gmem.load((gfn << 9) + e) & 0xFFFFFFFFFFFFFFFF
        r = rng.random()
        if not g & AVIC_VALID:
            new = make_entry(self._backing(rng), int(rng.random() * self.nvcpus), rng.random() < 0.5)
        elif r < 0.80:
            apic = int(rng.random() * self.nvcpus)
            new = (g & ~AVIC_UPDATABLE) | apic | (AVIC_IS_RUNNING if rng.random() < 0.5 else 0)
            r2 = rng.random()
            if r2 < 0.15:
                return gpa, bytes((apic,))  # the apic id byte alone
            if r2 < 0.30:
                return gpa + 4, ((new >> 32) & 0xFFFFFFFF).to_bytes(4, "little")  # IsRunning dword
        elif r < 0.95:
            new = make_entry(self._backing(rng), g & AVIC_APIC_ID_MASK, bool(g & AVIC_IS_RUNNING))
        else:
            new = g & ~AVIC_VALID
        return gpa, new.to_bytes(8, "little")

    def _backing(self, rng: random.Random) -> int:
        if rng.random() < 0.1:  # a bad address: the shadow entry points at the dummy page
            return (self.mem_pages + int(rng.random() * 1024)) << PAGE_SHIFT
        lo, hi = untracked_range(self.cfg)
        return (lo + int(rng.random() * max(1, hi - lo))) << PAGE_SHIFT

    # -- notifier registration variants ------------------------------------------------------------------
    def _register(self, node: int, what: str) -> bool:
        kvm = self.kvm
        if not kvm_page_track_write_tracking_enabled(kvm):
            self.amem.fetch_add(self.hdr0 + H_UNTRACKED_REG, 1)
            kvm.warn("untracked_notifier",
                     f"page-track notifier node {node} ({what}) registered while write tracking is "
                     f"disabled: nothing it watches is write-protected, writes to it are not emulated",
                     node=node)
        self._stat("register")
        return notifier.kvm_page_track_register_notifier(kvm, node)

    def _unregister(self, node: int) -> bool:
        self._stat("unregister")
        return notifier.kvm_page_track_unregister_notifier(self.kvm, node)

    def _notifier_get(self) -> None:
        """A new table becomes a user of the shared node (called with no AVIC lock held except
        the notifier lock taken here: unregister waits synchronize_srcu, and a track_write walker
        may be waiting for tables_lock)."""
        m, h = self.amem, self.hdr0
        reg = self.registration
        lk = self.notifier_lock
        lk.lock()
        self._cs_in(CS_NOTIFIER)
        try:
            users = m.fetch_add(h + H_USERS, 1) + 1
            node = m.load(h + H_NODE) - 1
            if reg == "refcount":
                if users == 1:
                    self._register(node, "nested AVIC shared node, first user")
            elif reg == "bool":
                if not m.load(h + H_REGISTERED):
                    self._register(node, "nested AVIC shared node")
                    m.store(h + H_REGISTERED, 1)
            elif reg == "naive":
                self._register(node, "nested AVIC shared node")
        finally:
            self._cs_out(CS_NOTIFIER)
            lk.unlock()

    def _notifier_put(self) -> None:
        m, h = self.amem, self.hdr0
        reg = self.registration
        lk = self.notifier_lock
        lk.lock()
        self._cs_in(CS_NOTIFIER)
        try:
            users = m.fetch_add(h + H_USERS, -1) - 1
            node = m.load(h + H_NODE) - 1
            if reg == "refcount":
                if users == 0:
                    self._unregister(node)
            elif reg == "bool":
                if m.load(h + H_REGISTERED):
                    self._unregister(node)
                    m.store(h + H_REGISTERED, 0)
            elif reg == "naive":
                self._unregister(node)
        finally:
            self._cs_out(CS_NOTIFIER)
            lk.unlock()

    # -- design-specific -----------------------------------------------------------------------------
    def _vmrun_get(self, v: int, gfn: int, l2: int) -> int:
        raise NotImplementedError

    def _put(self, v: int, t: int) -> None:
        raise NotImplementedError

    def track_write(self, gpa: int, nbytes: int, node: int) -> None:
        raise NotImplementedError

    def table_track_write(self, t: int, gpa: int, nbytes: int, node: int) -> None:
        raise NotImplementedError

    # -- oracle ---------------------------------------------------------------------------------------
    def oracle(self) -> list[str]:
        """Coordinator, vCPUs stopped: every violation, in words (empty = good)."""
        kvm = self.kvm
        if self.region is None or self.region.closed:
            return ["nested AVIC: no avic region (setup() not run)"]
        kvm.flush_counts()  # this process' count() tallies (in-process scenarios)
        m = self.amem
        bad: list[str] = []
        cur = [m.load(self.vw0 + v * VW + V_CUR) - 1 for v in range(self.nvcpus)]
        inguest = [m.load(self.vw0 + v * VW + V_INGUEST) - 1 for v in range(self.nvcpus)]
        live_by_gfn: dict[int, list[int]] = {}
        tracked_by_gfn: dict[int, int] = {}
        nlive = 0
        for t in range(self.nt):
            b = self.tw0 + t * TW
            st = m.load(b + T_STATE)
            if st in (ALLOC, TRACKING, RETIRING):
                bad.append(f"avic_physid_table slot {t} stuck in state {STATE_NAMES[st]} after the run")
            if st not in LIVE:
                continue
            nlive += 1
            gfn, l2 = m.load(b + T_GFN), m.load(b + T_L2)
            name = f"shadow physid table gfn {gfn:#x} (L2 {l2}, slot {t})"
            live_by_gfn.setdefault(gfn, []).append(t)
            if m.load(b + T_TRACKED):
                tracked_by_gfn[gfn] = tracked_by_gfn.get(gfn, 0) + 1
            ref, use = m.load(b + T_REF), m.load(b + T_USE)
            holders = [v for v in range(self.nvcpus) if cur[v] == t]
            if ref != len(holders):
                bad.append(f"{name}: refcount {ref} but {len(holders)} vCPUs hold it {holders}")
            users = [v for v in range(self.nvcpus) if inguest[v] == t]
            if use != len(users):
                bad.append(f"{name}: usecount {use} but {len(users)} vCPUs in guest mode on it")
            if not self.shared_node:
                node = m.load(b + T_NODE) - 1
                if node < 0 or notifier.node_state(kvm, node) != L.NODE_LIVE:
                    bad.append(f"{name} is live but its notifier node {node} is not registered: writes "
                               f"to it are not seen")
            if st == VALID:
                gbase = gfn << 9
                cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
                for e in range(self.ne):
                    g = u64(self.gmem.load(gbase + e))
                    c, sh = u64(m.load(cb + e)), u64(m.load(sb + e))
                    exp = self._translate(g)
                    if sh != exp:
                        bad.append(f"lost write: {name} entry {e}: shadow {sh:#018x} != translation "
                                   f"{exp:#018x} of guest entry {describe(g)} (cached {c:#018x})")
                    elif c != g:
                        bad.append(f"lost write: {name} entry {e}: cached guest entry {describe(c)} != "
                                   f"guest entry {describe(g)}")
                    vb = (u64(m.load(self.valid0 + t * 4 + (e >> 6))) >> (e & 63)) & 1
                    if vb != (c >> 63):
                        bad.append(f"{name} entry {e}: valid bitmap {vb} != cached Valid {c >> 63}")
        self._check_structure(bad)
        for gfn, ts in live_by_gfn.items():
            if len(ts) > 1:
                bad.append(f"gfn {gfn:#x} has {len(ts)} live shadow tables (slots {ts})")
        # page-track counts of the table pages: exactly one per tracking table, never wrapped
        for l2 in range(self.cfg.l2s):
            gfn = table_gfn(self.cfg, l2)
            have, want = int(kvm.gfn_track[gfn]), tracked_by_gfn.get(gfn, 0)
            if have != want:
                wrapped = " (wrapped)" if have > 0x8000 else ""
                bad.append(f"gfn_write_track[{gfn:#x}] = {have}{wrapped}, but {want} live tables "
                           f"write-protect it")
        if self.shared_node:
            node = self._h(H_NODE) - 1
            live = node >= 0 and notifier.node_state(kvm, node) == L.NODE_LIVE
            if nlive and not live:
                bad.append(f"nested AVIC notifier node {node} is not registered while {nlive} shadow "
                           f"tables are live: writes to them are lost")
            users = self._h(H_USERS)
            if users != nlive:
                bad.append(f"shared notifier node: {users} users counted, {nlive} live tables")
            if self.registration == "refcount" and not nlive and live:
                bad.append(f"nested AVIC notifier node {node} still registered with no table live")
        redundant = kvm.mem.load(kvm.notifier_w + L.NH_REDUNDANT)
        if redundant:
            bad.append(f"{redundant} redundant registration(s) of a live page-track notifier node (WARN)")
        untracked = self._h(H_UNTRACKED_REG)
        if untracked:
            bad.append(f"{untracked} page-track notifier registration(s) while write tracking was "
                       f"disabled (WARN: untracked notifier)")
        counters = kvm.vm.v["counters"]
        stale = int(counters[:, L.C["stale_entries"]].sum())
        if stale:
            bad.append(f"{stale} nested VMRUN(s) ran on a stale shadow physid entry")
        del counters
        if kvm.poison_reads:
            bad.append(f"{kvm.poison_reads} read(s) of poisoned (freed) memory")
        for i, lname in enumerate(CS):
            fails = m.load(self.cs0 + i * 8 + CS_FAILS)
            if fails:
                bad.append(f"lock {lname}: mutual exclusion violated {fails} times")
        for lname in ("tables_lock", "avic_physid_lock", "avic_tables_spin", "mmu_lock"):
            owner = kvm.locks[lname].owner()
            if owner:
                bad.append(f"lock {lname} still held (owner tag {owner}) after the run")
        return bad

    def _check_structure(self, bad: list[str]) -> None:
        """The design's index (hash chains, RCU list) links exactly the live tables."""

    def _check_chain(self, bad: list[str], what: str, head_w: int, seen: dict[int, str]) -> None:
        m = self.amem
        n, steps = m.load(head_w), 0
        while n:
            if not 0 < n <= self.nt or steps > self.nt:
                bad.append(f"{what}: corrupt link {n} after {steps} tables")
                return
            t = n - 1
            st = m.load(self.tw0 + t * TW + T_STATE)
            if st not in LIVE:
                bad.append(f"{what}: links slot {t} in state {STATE_NAMES[st] if 0 <= st < 9 else st}")
            if t in seen:
                bad.append(f"{what}: slot {t} linked twice (also on {seen[t]})")
                return
            seen[t] = what
            n = m.load(self.tw0 + t * TW + T_NEXT)
            steps += 1

    def _check_linked(self, bad: list[str], seen: dict[int, str], what: str) -> None:
        for t in range(self.nt):
            if self.amem.load(self.tw0 + t * TW + T_STATE) in LIVE and t not in seen:
                bad.append(f"live avic_physid_table slot {t} is not on the {what}: lookups miss it")

    def stats(self) -> dict:
        if self.region is None or self.region.closed:
            return {}
        v = self.region.v
        st = v["stats"].sum(axis=0)
        out = {name: int(st[i]) for i, name in enumerate(STATS)}
        out["live_tables"] = self._h(H_LIVE)
        out["max_live_tables"] = self._h(H_MAXLIVE)
        out["lock_stat"] = merge_lockstat(np.array(v["lockstat"]), list(MYLOCKS))
        out["lock_fails"] = {name: int(v["cs"][i, CS_FAILS]) for i, name in enumerate(CS)}
        del v, st
        return out

    # -- teardown -------------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Coordinator, vCPUs stopped: free every table, untrack its gfn, unregister and free the
        notifier nodes (takes locks; the coordinator skips it after a vCPU died)."""
        kvm = self.kvm
        if self.region is None or self.region.closed:
            return
        m = self.amem
        for t in range(self.nt):
            b = self.tw0 + t * TW
            st = m.load(b + T_STATE)
            if st in (FREE, POISON):
                continue
            self._untrack(t)
            node = m.load(b + T_NODE) - 1
            if node >= 0:
                if notifier.node_state(kvm, node) == L.NODE_LIVE:
                    notifier.kvm_page_track_unregister_notifier(kvm, node)
                notifier.free_node(kvm, node)
            self._poison_table(t)
        for v in range(self.nvcpus):
            m.store(self.vw0 + v * VW + V_CUR, 0)
            m.store(self.vw0 + v * VW + V_INGUEST, 0)
        node = m.load(self.hdr0 + H_NODE) - 1
        if node >= 0:
            if notifier.node_state(kvm, node) == L.NODE_LIVE:
                notifier.kvm_page_track_unregister_notifier(kvm, node)
            notifier.free_node(kvm, node)
            m.store(self.hdr0 + H_NODE, 0)

    def close(self) -> None:
        """Drop (and, in the coordinator, unlink) the avic region; never blocks; idempotent.
        ``Kvm.close`` also closes it (it is in ``kvm.regions``)."""
        kvm, region = self.kvm, self.region
        if region is not None:
            if kvm.regions.get("avic") is region:
                del kvm.regions["avic"]
            region.close()
        if _BY_KVM.get(kvm) is self:
            del _BY_KVM[kvm]


class _MutexTables(AvicDesign):
    """get/put under the VM-wide ``tables_lock`` mutex, tables found by a 256-bucket gfn hash."""

    @staticmethod
    def _bucket(gfn: int) -> int:
        return ((gfn * 0x61C88647) & 0xFFFFFFFF) >> 24  # hash_32(gfn, 8)

    def _hash_lookup(self, gfn: int) -> int:
        lockdep_assert_held(self.tables_lock, "tables_lock")
        return self._chain_find(self.hash0 + self._bucket(gfn), gfn, "gfn hash chain")

    def _hash_add(self, t: int) -> None:
        lockdep_assert_held(self.tables_lock, "tables_lock")
        m = self.amem
        head = self.hash0 + self._bucket(m.load(self.tw0 + t * TW + T_GFN))
        m.store(self.tw0 + t * TW + T_NEXT, m.load(head))
        m.store(head, t + 1)

    def _hash_del(self, t: int) -> None:
        lockdep_assert_held(self.tables_lock, "tables_lock")
        head = self.hash0 + self._bucket(self.amem.load(self.tw0 + t * TW + T_GFN))
        self._chain_unlink(head, t, "hash chain", "avic_hash_corrupt")

    def _check_structure(self, bad: list[str]) -> None:
        seen: dict[int, str] = {}
        for bkt in range(HASH_BUCKETS):
            before = set(seen)
            self._check_chain(bad, f"gfn hash bucket {bkt}", self.hash0 + bkt, seen)
            for t in set(seen) - before:
                gfn = self.amem.load(self.tw0 + t * TW + T_GFN)
                if self.amem.load(self.tw0 + t * TW + T_STATE) in LIVE and self._bucket(gfn) != bkt:
                    bad.append(f"slot {t} (gfn {gfn:#x}) on hash bucket {bkt}, belongs on {self._bucket(gfn)}")
        self._check_linked(bad, seen, "gfn hash")

    # registration hooks (tables_lock held)
    def _on_create(self, t: int) -> None:
        pass

    def _on_ref(self, v: int, t: int) -> None:
        pass

    def _on_unref(self, v: int, t: int) -> None:
        pass

    def _on_free(self, t: int) -> None:
        pass

    def _vmrun_get(self, v: int, gfn: int, l2: int) -> int:
        m = self.amem
        cur = self._cur(v)
        if cur >= 0 and m.load(self.tw0 + cur * TW + T_GFN) != gfn:
            self._put(v, cur)  # switching L2 drops the old reference
            cur = -1
        lk = self.tables_lock
        spare_user = False
        lk.lock()
        self._cs_in(CS_TABLES)
        try:
            t = self._hash_lookup(gfn)
            created = False
            if t < 0:
                if self.shared_node:
                    # the new table's user reference on the shared node, taken without tables_lock
                    self._cs_out(CS_TABLES)
                    lk.unlock()
                    try:
                        self._notifier_get()
                    finally:
                        lk.lock()
                        self._cs_in(CS_TABLES)
                    t = self._hash_lookup(gfn)
                    spare_user = t >= 0
                if t < 0:
                    t = self._create_table(gfn, l2)
                    self._hash_add(t)
                    self._on_create(t)
                    created = True
                self._stat("get_slow")
            if t != cur:
                if cur >= 0:
                    self.kvm.warn("avic_cur_mismatch", f"vCPU {v} holds slot {cur} but gfn {gfn:#x} is slot {t}")
                if not created:
                    m.fetch_add(self.tw0 + t * TW + T_REF, 1)
                self._set_cur(v, t)
                self._on_ref(v, t)
            else:
                self._stat("get_fast")
            self._enter_guest(v, t)
            ready = self._make_ready(v, t)
        finally:
            self._cs_out(CS_TABLES)
            lk.unlock()
        if spare_user:
            self._notifier_put()
        return t if ready else -1

    def _put(self, v: int, t: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        lk = self.tables_lock
        freed = False
        lk.lock()
        self._cs_in(CS_TABLES)
        try:
            self._set_cur(v, -1)
            self._on_unref(v, t)
            r = m.fetch_add(b + T_REF, -1) - 1
            if r < 0:
                self.kvm.warn("avic_refcount_underflow", f"avic_physid_table slot {t}: refcount underflow")
            elif r == 0:
                self._hash_del(t)
                self._physid_lock()
                try:
                    m.store(b + T_STATE, RETIRING)
                finally:
                    self._physid_unlock()
                self._on_free(t)
                self._untrack(t)
                self._poison_table(t)  # every reader holds tables_lock or avic_physid_lock
                freed = True
        finally:
            self._cs_out(CS_TABLES)
            lk.unlock()
        if freed and self.shared_node:
            self._notifier_put()


@design("mutex-hash")
class MutexHashDesign(_MutexTables):
    """Maxim v3: VM mutex + gfn hash + one shared notifier node."""

    def track_write(self, gpa: int, nbytes: int, node: int) -> None:
        lk = self.tables_lock
        lk.lock()
        self._cs_in(CS_TABLES)
        try:
            t = self._hash_lookup(gpa >> PAGE_SHIFT)
            if t >= 0:
                self._table_write(t, gpa, nbytes, -1)
            else:
                self._stat("track_write_miss")
        finally:
            self._cs_out(CS_TABLES)
            lk.unlock()


@design("per-table-notifier")
class PerTableNotifierDesign(_MutexTables):
    """Each table registers its own page-track notifier node; track_write needs no lookup and
    no mutex (the SRCU walk keeps the node and its table alive: free waits synchronize_srcu)."""

    shared_node = False

    def _node(self, t: int) -> int:
        return self.amem.load(self.tw0 + t * TW + T_NODE) - 1

    def _on_create(self, t: int) -> None:
        node = notifier.alloc_node(self.kvm, AVIC_TABLE_KIND, t)
        self.amem.store(self.tw0 + t * TW + T_NODE, node + 1)
        if self.registration in ("refcount", "split"):
            gfn = self.amem.load(self.tw0 + t * TW + T_GFN)
            self._register(node, f"shadow physid table gfn {gfn:#x}")

    def _on_ref(self, v: int, t: int) -> None:
        reg = self.registration
        if reg == "bool":
            w = self.tw0 + t * TW + T_REGISTERED
            if not self.amem.load(w):
                self._register(self._node(t), f"shadow physid table slot {t}, vCPU {v}")
                self.amem.store(w, 1)
        elif reg == "naive":
            self._register(self._node(t), f"shadow physid table slot {t}, vCPU {v}")

    def _on_unref(self, v: int, t: int) -> None:
        reg = self.registration
        if reg == "bool":
            w = self.tw0 + t * TW + T_REGISTERED
            if self.amem.load(w):
                self._unregister(self._node(t))
                self.amem.store(w, 0)
        elif reg == "naive":
            self._unregister(self._node(t))

    def _on_free(self, t: int) -> None:
        node = self._node(t)
        if node < 0:
            return
        if self.registration in ("refcount", "split"):
            self._unregister(node)  # waits synchronize_srcu: no walker still has the node
        elif notifier.node_state(self.kvm, node) == L.NODE_LIVE:
            self._unregister(node)
        notifier.free_node(self.kvm, node)

    def table_track_write(self, t: int, gpa: int, nbytes: int, node: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        st = m.load(b + T_STATE)
        if st == POISON:
            self.kvm.poisoned(f"avic_physid_table slot {t} through its notifier node {node} (gpa {gpa:#x})",
                              table=t, node=node)
            return
        if m.load(b + T_GFN) != gpa >> PAGE_SHIFT or m.load(b + T_NODE) != node + 1:
            return  # not this node's page: the linear walk asks every node
        self._table_write(t, gpa, nbytes, -1)


@design("rcu-list")
class RcuListDesign(AvicDesign):
    """Sean: RCU-protected list; lock-free VMRUN for a vCPU that keeps its table; spinlock +
    synchronize_rcu only for the first user (add) and the last (remove)."""

    def _lookup(self, gfn: int) -> int:
        """RCU read side (or avic_tables_spin held): the live table of ``gfn``, or -1."""
        return self._chain_find(self.hdr0 + H_LIST, gfn, "RCU list")

    def _check_structure(self, bad: list[str]) -> None:
        seen: dict[int, str] = {}
        self._check_chain(bad, "RCU table list", self.hdr0 + H_LIST, seen)
        self._check_linked(bad, seen, "RCU table list")

    def _list_add(self, t: int) -> None:
        lockdep_assert_held(self.tables_spin, "avic_tables_spin")
        m = self.amem
        m.store(self.tw0 + t * TW + T_NEXT, m.load(self.hdr0 + H_LIST))
        m.store(self.hdr0 + H_LIST, t + 1)  # release: the table is complete before it is visible

    def _list_del(self, t: int) -> None:
        lockdep_assert_held(self.tables_spin, "avic_tables_spin")
        self._chain_unlink(self.hdr0 + H_LIST, t, "RCU list", "avic_list_corrupt")

    def _inc_not_zero(self, t: int) -> bool:
        m = self.amem
        w = self.tw0 + t * TW + T_REF
        r = m.load(w)
        while r > 0:
            f = m.cmpxchg(w, r, r + 1)
            if f == r:
                return True
            r = f
            self._stat("rcu_retry")
        if r == POISON_REF:
            self.kvm.poisoned(f"avic_physid_table slot {t} refcount (freed under an RCU reader)", table=t)
        return False

    def _get_ref(self, gfn: int, l2: int) -> int:
        m = self.amem
        rcu = self.kvm.rcu
        rcu.read_lock()
        try:
            t = self._lookup(gfn)
            if t >= 0:
                b = self.tw0 + t * TW
                gen = m.load(b + T_GEN)
                if self.reader_delay:
                    _prims.spin_ns(self.reader_delay)
                if self._inc_not_zero(t):
                    if m.load(b + T_GEN) == gen and m.load(b + T_GFN) == gfn:
                        self._stat("get_fast")
                        return t
                    self.kvm.poisoned(f"avic_physid_table slot {t}: freed and reused between lookup and "
                                      f"get (gfn {gfn:#x})", table=t)
                    m.fetch_add(b + T_REF, -1)
        finally:
            rcu.read_unlock()
        # slow path: under the spinlock; the first user of the table creates it
        self._stat("get_slow")
        spin = self.tables_spin
        created = spare_user = False
        spin.lock()
        self._cs_in(CS_SPIN)
        try:
            t = self._lookup(gfn)
            if t < 0:
                # the new table's user reference on the shared node, taken without the spinlock
                # (registering takes mmu_lock, unregistering sleeps in synchronize_srcu)
                self._cs_out(CS_SPIN)
                spin.unlock()
                try:
                    self._notifier_get()
                finally:
                    spin.lock()
                    self._cs_in(CS_SPIN)
                t = self._lookup(gfn)
                spare_user = t >= 0
            if t >= 0:
                m.fetch_add(self.tw0 + t * TW + T_REF, 1)  # linked tables have refcount >= 1
            else:
                t = self._create_table(gfn, l2)
                self._list_add(t)
                created = True
        finally:
            self._cs_out(CS_SPIN)
            spin.unlock()
        if spare_user:
            self._notifier_put()
        if created and "no-synchronize-rcu" not in self.hooks:
            self.kvm.rcu.synchronize()  # walkers that missed the new table are done
            self._stat("synchronize_rcu_add")
        return t

    def _vmrun_get(self, v: int, gfn: int, l2: int) -> int:
        cur = self._cur(v)
        if cur >= 0 and self.amem.load(self.tw0 + cur * TW + T_GFN) != gfn:
            self._put(v, cur)  # switching L2 drops the old reference
            cur = -1
        if cur >= 0:
            t = cur  # our reference keeps it alive: no lock, no RCU
            self._stat("get_fast")
        else:
            t = self._get_ref(gfn, l2)
            self._set_cur(v, t)
        self._enter_guest(v, t)
        return t if self._make_ready(v, t) else -1

    def _put(self, v: int, t: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        self._set_cur(v, -1)
        w = b + T_REF
        r = m.load(w)
        while r > 1:  # refcount_dec_and_lock: only the last reference takes the lock
            f = m.cmpxchg(w, r, r - 1)
            if f == r:
                return
            r = f
        spin = self.tables_spin
        spin.lock()
        self._cs_in(CS_SPIN)
        try:
            r = m.fetch_add(w, -1) - 1
            if r != 0:
                if r < 0:
                    self.kvm.warn("avic_refcount_underflow", f"avic_physid_table slot {t}: refcount underflow")
                return
            self._list_del(t)
            self._physid_lock()
            try:
                m.store(b + T_STATE, RETIRING)
            finally:
                self._physid_unlock()
        finally:
            self._cs_out(CS_SPIN)
            spin.unlock()
        self._untrack(t)
        self._notifier_put()
        if "no-synchronize-rcu" not in self.hooks:
            self.kvm.rcu.synchronize()  # no reader still sees the table
            self._stat("synchronize_rcu_del")
        self._poison_table(t)

    def track_write(self, gpa: int, nbytes: int, node: int) -> None:
        m = self.amem
        rcu = self.kvm.rcu
        rcu.read_lock()
        try:
            t = self._lookup(gpa >> PAGE_SHIFT)
            if t < 0:
                self._stat("track_write_miss")
                return
            b = self.tw0 + t * TW
            gen = m.load(b + T_GEN)
            if self.reader_delay:
                _prims.spin_ns(self.reader_delay)
            if self._table_write(t, gpa, nbytes, gen) and m.load(b + T_GEN) != gen:
                self.kvm.poisoned(f"avic_physid_table slot {t} freed under an RCU reader (track_write gpa "
                                  f"{gpa:#x})", table=t, gpa=gpa)
        finally:
            rcu.read_unlock()


# -- the scripted kaboom -------------------------------------------------------------------------------

def kaboom_steps(registration: str, design_name: str = "mutex-hash") -> list[tuple[int, str, dict]]:
    """The seed's sequence as (vcpu, op, args): X registers, Y registers, X unregisters, L1 (vCPU
    Y) writes Y's table, Y VMRUNs. With one shared node X and Y use different L2s (X's table going
    away is what unregisters); with per-table nodes they share one L2's table."""
    if registration not in REGISTRATIONS:
        raise UsageError(f"registration must be one of {', '.join(REGISTRATIONS)}")
    x, y = 0, 1
    lx, ly = (0, 0) if design_name == "per-table-notifier" else (0, 1)
    return [
        (x, "vmrun", {"l2": lx}),                                  # X registers
        (y, "vmrun", {"l2": ly}),                                  # Y registers
        (y, "vmexit", {"l2": ly, "leaving": False}),
        (x, "vmexit", {"l2": lx, "leaving": True}),                # X unregisters
        (y, "write_entry", {"l2": ly, "entry": y, "apic": x, "running": True}),  # L1 writes Y's table
        (y, "vmrun", {"l2": ly}),                                  # Y VMRUNs: must see the write
        (y, "vmexit", {"l2": ly, "leaving": False}),
    ]


def guest_write(kvm, gpa: int, data: bytes) -> bool:
    """An L1 store: a write to a write-tracked gfn faults and is emulated (notifier walk, after
    leaving guest mode), so is MMIO; anything else goes straight to memory inside the guest-mode
    section (which a remote TLB flush waits for). True if emulated."""
    gm = kvm.guest_mode
    gm.read_lock()
    gfn = gpa >> PAGE_SHIFT
    if gfn < kvm.memory_pages and not page_fault_handle_page_track(kvm, gfn, True):
        if len(data) == 8 and not gpa & 7:
            kvm.guest_mem.store(gpa >> 3, int.from_bytes(data, "little", signed=True))
        else:
            kvm.guest_bytes[gpa:gpa + len(data)] = np.frombuffer(data, dtype=np.uint8)
        gm.read_unlock()
        kvm.count("write_untracked")
        return False
    gm.read_unlock()
    emulator_write_phys(kvm, gpa, data)
    kvm.count("write_tracked")
    return True


def apply_step(d: AvicDesign, step: tuple[int, str, dict]) -> str:
    """Run one scripted step on design ``d``; returns a one-line log entry."""
    v, op, a = step
    if op == "vmrun":
        d.nested_vmrun(v, a["l2"])
        return f"vCPU {v}: nested VMRUN L2 {a['l2']}"
    if op == "vmexit":
        d.nested_vmexit(v, a["l2"], a.get("leaving", False))
        return f"vCPU {v}: nested VMEXIT L2 {a['l2']}{' (leaving: drops its table)' if a.get('leaving') else ''}"
    if op == "write_entry":
        kvm, cfg = d.kvm, d.cfg
        gfn = table_gfn(cfg, a["l2"])
        gpa, data = d.entry_write(a["l2"], a["entry"], a["apic"], bool(a.get("running")))
        new = int.from_bytes(data, "little")
        emulated = guest_write(kvm, gpa, data)
        return (f"vCPU {v} (L1): write gpa {gpa:#x} (table gfn {gfn:#x} entry {a['entry']}) = {new:#018x}"
                f" [{'emulated' if emulated else 'NOT emulated: gfn not write-tracked'}]")
    if op == "load":
        d.vcpu_load(v)
        return f"vCPU {v}: load"
    if op == "put":
        d.vcpu_put(v)
        return f"vCPU {v}: put"
    raise UsageError(f"unknown kaboom step op {op!r}")


def run_kaboom(kvm, cfg, registration: str, design_name: str | None = None) -> tuple[str, list[str]]:
    """Run the seed's kaboom in this process (vCPU 0 = X, vCPU 1 = Y) on a fresh VM ``kvm`` (made
    by ``Kvm.create`` with ``cfg``, vcpus >= 2). Returns ("SUCCESS" | "FAILURE", messages): the
    step log, every WARN raised, and the oracle's findings. Expected: refcount -> SUCCESS, bool ->
    FAILURE (stale entry naming the lost write), naive -> FAILURE (redundant registration WARN),
    split -> FAILURE (WARN naming the untracked notifier)."""
    name = design_name or (cfg.design if cfg.design in AVIC_DESIGNS else "mutex-hash")
    if name not in AVIC_DESIGNS:
        raise UsageError(f"kaboom: design must be one of {', '.join(AVIC_DESIGNS)}")
    if cfg.vcpus < 2:
        raise UsageError("kaboom needs vcpus >= 2 (X and Y)")
    cfg2 = msgspec.structs.replace(cfg, design=name, registration=registration)
    steps = kaboom_steps(registration, name)
    ev0, w0 = len(kvm.events), kvm.warns
    d = DESIGNS[name](kvm, cfg2)
    log = [f"kaboom: design {name}, registration {registration}"]
    try:
        d.setup()
        for v in (0, 1):
            d.vcpu_init(v)
            d.vcpu_load(v)
        for step in steps:
            log.append(apply_step(d, step))
        for v in (0, 1):
            d.vcpu_put(v)
        found = d.oracle()
    finally:
        try:
            d.teardown()
        finally:
            d.close()
    warns = [msg for _, msg, _ in kvm.events[ev0:]]
    failed = bool(found or warns or kvm.warns != w0)
    verdict = "FAILURE" if failed else "SUCCESS"
    return verdict, log + warns + [f"oracle: {f}" for f in found] + [f"kaboom: {verdict}"]


__all__ = [
    "AVIC_DESIGNS", "REGISTRATIONS", "AVIC_SHARED_KIND", "AVIC_TABLE_KIND", "AvicDesign", "MutexHashDesign",
    "RcuListDesign", "PerTableNotifierDesign", "kaboom_steps", "apply_step", "run_kaboom", "guest_write",
]
