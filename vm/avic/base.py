"""What every nested AVIC design shares (:class:`AvicDesign`): the ``avic`` shm region and its
binding in each process, the locks with locktorture-style held flags, ``setup`` (coordinator: the
guest tables, write tracking, the shared notifier node), stats and teardown. The pieces it is made
of live beside it: vm/avic/pool.py (tables), guest.py (nested VMRUN / VMEXIT), l1.py (L1's stores),
registration.py (notifier variants), oracle.py (the checks)."""

from __future__ import annotations

import os
from functools import partial

import numpy as np

from ipc import _prims, fuzz, sched, trace
from ipc.locks import init_lockstat, lockdep_assert_held, merge_lockstat, new_lock
from ipc.proc import proc_starttime
from ipc.shm import Region
from vm import notifier
from vm.avic import oracle
from vm.avic.erase import TableErase
from vm.avic.guest import GuestEntry
from vm.avic.l1 import L1Writes, StaleStoreSteer
from vm.avic.notifiers import AVIC_SHARED_KIND, BY_KVM
from vm.avic.pool import TablePool
from vm.avic.registration import Registration
from vm.avic.table import (
    CS,
    CS_FAILS,
    CS_HOLDER,
    CS_PHYSID,
    DESIGN_IDS,
    FLOOD_PER_ENTRY,
    FLOOD_RACE_DELAY_NS,
    FLOOD_RACE_LIMIT,
    FREE,
    H_DESIGN,
    H_LIVE,
    H_MAXLIVE,
    H_NENTRIES,
    H_NODE,
    H_REGVAR,
    LOCK_NOTIFIER,
    LOCK_TABLE,
    MYLOCKS,
    POISON,
    READER_DELAY_NS,
    REGISTRATION_IDS,
    REGISTRATIONS,
    STATISTICS,
    STATS,
    T_NODE,
    T_STATE,
    TW,
    V_CUR,
    V_INGUEST,
    VW,
    S,
    avic_layout,
    host_apic_id,
    make_entry,
    nentries,
    ntables,
    s64,
)
from vm.nested import NestedDesign, table_gfn, untracked_range
from vm.page_track import (
    PAGE_SHIFT,
    kvm_page_track_write_tracking_enable,
)
from vm.tracepoints import TABLE_EVENTS


class AvicDesign(TablePool, TableErase, GuestEntry, L1Writes, Registration, NestedDesign):
    """What the three designs share: the ``avic`` region, locks with held flags, setup, stats and
    teardown; the table pool (``TablePool``), guest-mode entry (``GuestEntry``), L1's table writes
    (``L1Writes``) and registration variants (``Registration``) come from their own modules, the
    checks from vm/avic/oracle.py. A design subclass supplies ``_vmrun_get``, ``_put``,
    ``track_write`` / ``table_track_write`` and ``_check_structure``."""

    name = "avic"
    shared_node = True
    #: a spinlock per table guards its entries (rcu-list: Sean's "no 'real' locks" in the notifier);
    #: False: the VM-wide ``avic_physid_lock`` does (RFC v3's ``table_entries_lock``)
    per_table_lock = False

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
        # widening (rcutorture's reader delays): rcu-list's readers hold the table they looked up for
        # READER_DELAY_NS inside the read-side section; implied by the bug it widens (no-synchronize-rcu
        # FAILED 16-18 of 20 1-second runs on a quiet host without it)
        self.reader_delay = (cfg.dilated_ns(READER_DELAY_NS)
                             if {"avic-reader-delay", "no-synchronize-rcu"} & kvm.hooks else 0)
        self.flood_race_ns = cfg.dilated_ns(FLOOD_RACE_DELAY_NS)
        # the pause in a widening's bounded wait for another vCPU (flood-drop steer, stale-store
        # steer): on the real clock the waiter yields its CPU -- on a loaded host the vCPU waited
        # for may be queued behind it, and a spinning waiter took the window it was waiting for
        # (flood-drop-race FAILED 12/20 at load 8 spinning, 19/20 yielding); virtual clock: a spin
        self.steer_pause = _prims.sched_yield if cfg.clock == "real" else partial(_prims.spin_ns, 2_000)
        self.entry_gentry = cfg.entry_update == "gentry"  # RFC v3: cached gentry + the written bytes
        self.vmruns_checked = 0  # nested VMRUNs (of this process) since the last all-entries check
        self.entered_epoch: dict[int, int] = {}  # per vCPU in L2: its table's epoch at VMRUN (I1)
        # (table, kicked vCPUs) of this process' erases since its notifier callback began: by the
        # time the callback returns each must have been waited for (oracle.check_write_done)
        self.reload_owed: list[tuple[int, list[tuple[int, int]]]] = []
        pid = os.getpid()  # T_TRACKER: who is write-protecting a table
        self.identity = pid << 32 | (proc_starttime(pid) or 0) & 0xFFFFFFFF
        self.flood_race = "flood-drop-race" in kvm.hooks  # the unfixed drop: no kick
        tr = trace.ACTIVE  # table create / sync / drop slices (vm/tracepoints.py)
        self._emit, self._tp = (tr.emit, {n: tr.pair(n) for n in TABLE_EVENTS}) if tr else (None, {})
        self.flood_steer = self.flood_race or "avic-flood-often" in kvm.hooks
        if self.flood_steer:  # frequent drops, each steered onto a vCPU entering L2
            self.flood_limit = FLOOD_RACE_LIMIT
        if "no-tlb-flush" in kvm.hooks:
            # widening of the no-tlb-flush bug: frequent flood drops (avic-flood-often's limit, not
            # steered) un-protect the table pages L1 is writing, the table's holder write-protects
            # them again at its next nested VMRUN, and an L1 store that found the page writable is
            # steered to land after that write-protect's sync (l1.StaleStoreSteer)
            self.flood_limit = FLOOD_RACE_LIMIT
            if fuzz.ACTIVE is not None and not getattr(fuzz.ACTIVE, "controlled", False):
                fuzz.ACTIVE = StaleStoreSteer(fuzz.ACTIVE, self)
        self.tag = kvm.tag
        self._host_apic = [host_apic_id(v) for v in range(self.nvcpus)]
        self.region: Region | None = None
        self._owner = False
        self._warned_gm = False
        BY_KVM[kvm] = self
        r = kvm.regions.get("avic")
        if r is not None:
            self._bind(r)

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
            busted="busted-lock" in self.hooks, name="avic_notifier_lock")
        self.tcs0 = region.word("tcs")
        self.if0 = region.word("inflight")
        self.vref0 = region.word("vref")
        if self.per_table_lock:
            tstat = region.word("lockstat", self.kvm.proc, LOCK_TABLE) if stats else -1
            self.tlocks = [new_lock("spin", region.mem, region.word("tlocks", t), tstat, self.tag,
                                    busted="busted-lock" in self.hooks, name=f"avic_table_lock[{t}]")
                           for t in range(self.nt)]
        # scheduled (ipc/sched): accesses of the shared AVIC state are scheduling points (all, or the
        # RMWs: sched.POINTS); the declared statistics words (STATISTICS) and the stats / checker
        # words reached through _smem are not (under the memory model tso its loads still see this
        # process' own buffered stores: ipc/sched/tso.py PlainView)
        self.amem = sched.shared_points(region, "avic", STATISTICS)
        self._smem = getattr(self.amem, "plain", region.mem)

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

    def _stat(self, name: str, n: int = 1) -> None:
        self._smem.fetch_add(self.st0 + S[name], n)

    def _h(self, w: int) -> int:
        return self.amem.load(self.hdr0 + w)

    def _tb(self, t: int) -> int:
        return self.tw0 + t * TW

    def _cs_in(self, i: int) -> None:
        w = self.cs0 + i * 8
        if self._smem.xchg(w + CS_HOLDER, self.tag):  # the checker's own words: no scheduling point
            self._smem.fetch_add(w + CS_FAILS, 1)

    def _cs_out(self, i: int) -> None:
        self._smem.cmpxchg(self.cs0 + i * 8 + CS_HOLDER, self.tag, 0)

    def _physid_lock(self) -> None:
        self.physid_lock.lock()
        self._cs_in(CS_PHYSID)

    def _physid_unlock(self) -> None:
        self._cs_out(CS_PHYSID)
        self.physid_lock.unlock()

    # the lock of table t's entries: its own spinlock (per_table_lock) or the VM-wide one
    def _tlock(self, t: int) -> None:
        if not self.per_table_lock:
            self._physid_lock()
            return
        self.tlocks[t].lock()
        w = self.tcs0 + t * 8
        if self._smem.xchg(w + CS_HOLDER, self.tag):
            self._smem.fetch_add(w + CS_FAILS, 1)

    def _tunlock(self, t: int) -> None:
        if not self.per_table_lock:
            self._physid_unlock()
            return
        self._smem.cmpxchg(self.tcs0 + t * 8 + CS_HOLDER, self.tag, 0)
        self.tlocks[t].unlock()

    @classmethod
    def region_layouts(cls, cfg) -> tuple:
        return (avic_layout(cfg),)  # the ``avic`` region (vm/avic/table.py), for the VM's shm budget

    def _tlock_held(self, t: int) -> None:
        """lockdep: the caller holds table ``t``'s entries lock."""
        if self.per_table_lock:
            lockdep_assert_held(self.tlocks[t], f"avic_table_lock[{t}]")
        else:
            lockdep_assert_held(self.physid_lock, "avic_physid_lock")

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
            node = notifier.alloc_node(kvm, AVIC_SHARED_KIND, 0,
                                       refcounted=self.registration == "node-refcount")
            m.store(h + H_NODE, node + 1)
            if self.registration == "split":
                # registered once, at VM creation, apart from enabling tracking (done on first use)
                self.notifier_lock.lock()
                try:
                    self._register(node, "nested AVIC shared node")
                finally:
                    self.notifier_lock.unlock()

    def vcpu_init(self, vcpu: int) -> None:
        self._attach()

    def _vmrun_get(self, v: int, gfn: int, l2: int) -> int:
        raise NotImplementedError

    def _put(self, v: int, t: int) -> None:
        raise NotImplementedError

    def track_write(self, gpa: int, nbytes: int, node: int, new: bytes | None = None) -> None:
        raise NotImplementedError

    def table_track_write(self, t: int, gpa: int, nbytes: int, node: int, new: bytes | None = None) -> None:
        raise NotImplementedError

    def sample(self) -> None:
        """The coordinator's sampling checker (I1), called while the vCPUs run."""
        if self.region is not None and not self.region.closed:
            oracle.sample(self)

    def oracle(self) -> list[str]:
        """Coordinator, vCPUs stopped: every violation, in words (empty = good)."""
        return oracle.final(self)

    def _check_structure(self, bad: list[str]) -> None:
        """The design's index (hash chains, RCU list) links exactly the live tables."""

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
        out["lock_fails"]["avic_table_lock"] = int(v["tcs"][:, CS_FAILS].sum())
        del v, st
        return out

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
                notifier.release_node(kvm, node)  # every registration it still holds, then free
            self._poison_table(t)
        for v in range(self.nvcpus):
            m.store(self.vw0 + v * VW + V_CUR, 0)
            m.store(self.vw0 + v * VW + V_INGUEST, 0)
        node = m.load(self.hdr0 + H_NODE) - 1
        if node >= 0:
            notifier.release_node(kvm, node)  # every registration it still holds, then free
            m.store(self.hdr0 + H_NODE, 0)

    def close(self) -> None:
        """Drop (and, in the coordinator, unlink) the avic region; never blocks; idempotent.
        ``Kvm.close`` also closes it (it is in ``kvm.regions``)."""
        kvm, region = self.kvm, self.region
        if region is not None:
            if kvm.regions.get("avic") is region:
                del kvm.regions["avic"]
            region.close()
        if BY_KVM.get(kvm) is self:
            del BY_KVM[kvm]
