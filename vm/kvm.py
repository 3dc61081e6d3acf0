"""``struct kvm`` as one process sees it: the VM's shm regions, locks, SRCU/RCU domains, stats.

The coordinator builds it with ``Kvm.create`` (creates and initialises every segment, unlinks them
on ``close``); a vCPU process with ``Kvm.attach``. Both run the same vm/ functions on it.
"""

from __future__ import annotations

from collections.abc import Callable

from ipc import _prims, fuzz, hist, procstat, sched, trace
from ipc.locks import init_lockstat, new_lock
from ipc.shm import Region, ShmError, check_run_id
from vm import layout as L
from vm import mmu


def _domain_classes(hooks) -> tuple:
    """The VM's RCU / SRCU domains (vm/layout.py ``DOMAINS``); hook ``gp-share-early``: each with
    torture's grace-period bug of that name (ipc/torture/gpbugs.py: synchronize shares a grace
    period that began before the call)."""
    if "gp-share-early" not in hooks:
        return L.DOMAINS
    from ipc.torture.gpbugs import gp_bug_domain

    return tuple((prefix, gp_bug_domain(cls, "gp-share-early")) for prefix, cls in L.DOMAINS)


class Kvm:
    def __init__(self, cfg, run_id: str, proc: int, regions: dict[str, Region], owner: bool,
                 hooks: frozenset[str] = frozenset()):
        self.cfg = cfg
        self.run_id = run_id
        self.proc = proc
        self.tag = proc + 1
        self.owner = owner
        self.hooks = frozenset(hooks)
        fuzz.configure(cfg.fuzz, cfg.seed, proc, cfg.dilate)  # this process' preemption points (ipc/fuzz.py)
        self.tracer = trace.configure(regions.get("trace"), proc)  # before any lock: they bind it
        self.regions = regions
        vm = self.vm = regions["vm"]
        self.guest = regions["guest"]
        self.mirror = regions["mirror"]
        self.mem = vm.mem
        self.flags_w = vm.word("flags")
        self.notifier_w = vm.word("notifier")
        self.nodes_w = vm.word("nodes")
        self.nodes = vm.v["nodes"]
        self.gfn_track = vm.v["gfn_track"]
        # fast lock-free reads of the u16 counts (a memoryview indexes in ~30 ns)
        self.gfn_track_mv = memoryview(self.guest_buf(vm, "gfn_track")).cast("B").cast("H")
        self.guest_mem = self.guest.mem  # word access to guest memory (8-byte stores)
        self.guest_bytes = self.guest.v["mem"]
        self.mirror_bytes = self.mirror.v["mem"]
        self.memory_pages = cfg.memory_pages
        stats = cfg.stats

        def stats_word(cls: str) -> int:
            return vm.word("lockstat", proc, L.CLASS[cls]) if stats else -1

        self.locks = {
            name: new_lock(L.LOCK_KIND[name], vm.mem, vm.word("locks", i), stats_word(name), self.tag,
                           busted="busted-lock" in self.hooks, name=name)
            for i, name in enumerate(L.LOCKS)
        }
        self.mmu_lock = self.locks["mmu_lock"]
        self.hist = {name: (_prims.Histogram(vm.mem, vm.word("hist", proc, i),
                                             cfg.latency_sample if name in L.SAMPLED_HISTS else 1)
                            if stats else None)
                     for i, name in enumerate(L.HISTS)}
        self.settle_samples: dict[str, Callable[[], None]] = {}  # sampled paths: count their unsampled ops
        self.h_notifier_walk = self.hist["notifier_walk"]
        self.h_emulated_write = self.hist["emulated_write"]
        slot_name = self.proc_name
        self.domains = {
            prefix: cls(vm, prefix, proc, self.tag, name=prefix,
                        gp_lock_stats_word=stats_word(f"{prefix}.gp_lock"),
                        gp_hist=self.hist.get("synchronize_srcu" if prefix == "track_srcu" else
                                              "tlb_flush" if prefix == "guest_mode" else "synchronize_rcu"),
                        stall_ns=cfg.stall_ms * 1_000_000, slot_name=slot_name,
                        on_stall=self._on_stall(prefix))
            for prefix, cls in _domain_classes(self.hooks)
        }
        self.track_srcu = self.domains["track_srcu"]
        self.guest_mode = self.domains["guest_mode"]
        self.rcu = self.domains["rcu"]
        self.counters = vm.v["counters"][proc]
        self.counts = [0] * L.NCOUNTERS  # kvm.count() tallies; flush_counts() publishes them
        self.events: list[tuple[str, str, dict]] = []  # WARNs not yet reported
        self.on_warn: Callable[[str, str, dict], None] | None = None
        self.handlers: dict[int, tuple[int, object]] = {}  # node index -> (gen, handler)
        self.walk_cache: dict[int, tuple] = {}  # list pointer -> the write path's view of the node (vm/write_path.py)
        self.trace_nodes: list[int] | None = None  # page_track.record_walks: nodes the walks called
        self.write_path = None  # vm.page_track.write_path(): this VM's bound write path (vm/write_path.py)
        self.write_acct = None  # vm.mirror.WriteAccounting: per-write track_write accounting (mirror)
        self.cycle_warned = False  # vm.faults.notifier_cycle: the soft-lockup diagnosis, once per process
        self.closed = False
        # a scheduled process (ipc/sched): its accesses of shared VM state are scheduling points too
        # (every one, or the read-modify-writes: sched.POINTS), statistics words never; decided here
        # once (free-running: the plain Mem, nothing changes)
        self.mem = sched.shared_points(vm, "vm", L.STATISTICS)

    @staticmethod
    def guest_buf(region: Region, field: str):
        f = region.layout[field]
        return region._buf[f.offset:f.offset + f.nbytes]

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def layouts(cfg) -> list:
        lays = [L.vm_layout(cfg), L.guest_layout(cfg), L.mirror_layout(cfg)]
        return lays + [L.trace_layout(cfg)] if cfg.trace_events else lays

    @classmethod
    def create(cls, cfg, run_id: str, hooks=frozenset()) -> Kvm:
        check_run_id(run_id)
        regions: dict[str, Region] = {}
        try:
            for lay in cls.layouts(cfg):
                regions[lay.name] = Region.create(run_id, lay)
            vm = regions["vm"]
            v = vm.v
            for name in ("flags", "locks", "notifier", "nodes", "counters"):
                v[name][...] = 0
            # no slot is a counted node until its owner makes it one (alloc_node(refcounted=True))
            v["nodes"][:, L.N_REFS] = -1
            init_lockstat(v["lockstat"])
            hist.init(v["hist"])
            for prefix, dom in L.DOMAINS:
                dom.init(vm, prefix)
            # memslots: contiguous, equal-sized (the last takes the remainder)
            per = cfg.memory_pages // cfg.memslots
            for i in range(cfg.memslots):
                npages = per if i < cfg.memslots - 1 else cfg.memory_pages - per * (cfg.memslots - 1)
                v["memslots"][i, L.MS_BASE_GFN] = i * per
                v["memslots"][i, L.MS_NPAGES] = npages
                v["memslots"][i, L.MS_LIVE] = 1
            v["gfn_track"][:] = 0
            if "trace" in regions:
                trace.init(regions["trace"])
            kvm = cls(cfg, run_id, 0, regions, owner=True, hooks=hooks)
            if cfg.page_track == "v6.0":  # kvm_arch_init_vm -> kvm_mmu_init_vm (vm/mmu.py)
                mmu.kvm_mmu_init_vm(kvm)
            return kvm
        except BaseException:
            for r in regions.values():
                r.close()
            raise

    @classmethod
    def attach(cls, cfg, run_id: str, proc: int, hooks=frozenset()) -> Kvm:
        regions: dict[str, Region] = {}
        try:
            for lay in cls.layouts(cfg):
                regions[lay.name] = Region.attach(run_id, lay)
        except ShmError:
            for r in regions.values():
                r.close()
            raise
        kvm = cls(cfg, run_id, proc, regions, owner=False, hooks=hooks)
        for d in kvm.domains.values():
            d.register()
        return kvm

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.flush_counts()
        if not self.owner:
            for d in self.domains.values():
                try:
                    d.unregister()
                except RuntimeError:
                    pass
        self.handlers.clear()
        self.walk_cache.clear()
        if self.tracer is not None and trace.ACTIVE is self.tracer:
            trace.configure(None)
        self.tracer = None
        self.settle_samples.clear()
        self.write_path = None
        self.locks.clear()
        self.domains.clear()
        self.hist.clear()
        self.h_notifier_walk = self.h_emulated_write = None
        self.gfn_track_mv.release()
        self.track_srcu = self.guest_mode = self.rcu = self.mmu_lock = None
        self.nodes = self.gfn_track = self.counters = None
        self.guest_bytes = self.mirror_bytes = None
        for r in self.regions.values():
            r.close()

    # -- naming, WARNs ------------------------------------------------------------------------
    @staticmethod
    def proc_name(proc: int) -> str:
        return "coordinator" if proc == 0 else f"vCPU {proc - 1}"

    def _on_stall(self, prefix: str):
        def report(slot: int, elapsed_ns: int) -> None:
            pid = int(self.domains[prefix].slots[slot, 2])
            kind, why = procstat.classify_stall(pid, self.cfg.vcpus / procstat.cpus()) if pid else ("gone", "")
            self.warn("rcu_stall", f"{'SRCU' if prefix == 'track_srcu' else 'RCU'} stall: "
                      f"{self.proc_name(slot)} in read-side critical section of {prefix} for "
                      f"{elapsed_ns // 1_000_000} ms ({why or kind})", slot=slot, domain=prefix,
                      ms=elapsed_ns // 1_000_000, stall=kind)

        return report

    def reset_stats(self) -> None:
        """Zero this process' lock_stat and latency-histogram rows: a virtual-time run measures from
        the moment its clocks start (set-up before it ran on the host's clock)."""
        v = self.vm.v
        init_lockstat(v["lockstat"][self.proc])
        hist.init(v["hist"][self.proc])

    def warn(self, kind: str, message: str, **data) -> None:
        """WARN(): counted in shm, kept for the telemetry channel, never fatal by itself."""
        self.mem.fetch_add(self.flags_w + L.F_WARNS, 1)
        self.count("warns")
        ev = (kind, f"WARN {self.proc_name(self.proc)}: {message}", dict(data))
        self.events.append(ev)
        if self.tracer is not None:
            self.tracer.emit(self.tracer.instant(f"WARN {kind}"))
        if self.on_warn is not None:
            self.on_warn(*ev)

    def bug_on(self, message: str, **data) -> None:
        """``KVM_BUG_ON`` fired: ``kvm_vm_bugged`` (a WARN) and ``kvm_vm_dead`` (``F_VM_BUGGED``:
        every vCPU gets KVM_REQ_VM_DEAD and enters no guest again; the VM's ioctls fail with -EIO)."""
        self.mem.store(self.flags_w + L.F_VM_BUGGED, 1)
        self.warn("kvm_bug_on", f"KVM_BUG_ON: {message}: the VM is dead", **data)

    @property
    def vm_dead(self) -> bool:
        return self.mem.load(self.flags_w + L.F_VM_BUGGED) != 0

    def count(self, name: str, n: int = 1) -> None:
        """Per-process event count, kept in Python (no shm write on the hot path)."""
        self.counts[L.C[name]] += n

    def flush_counts(self) -> None:
        """Publish ``count()`` tallies into this process' shm counter block (and the operations
        of the sampled latency histograms that ran since their last sample)."""
        for settle in self.settle_samples.values():
            settle()
        c = self.counters
        for i, v in enumerate(self.counts):
            if v:
                c[i] = v

    @property
    def warns(self) -> int:
        return self.mem.load(self.flags_w + L.F_WARNS)

    @property
    def poison_reads(self) -> int:
        return self.mem.load(self.flags_w + L.F_POISON_READS)

    def poisoned(self, what: str, **data) -> None:
        self.mem.fetch_add(self.flags_w + L.F_POISON_READS, 1)
        self.warn("poison", f"read of poisoned {what}", **data)
