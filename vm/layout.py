"""The VM's shared-memory layouts, declared once (numpy fields; word meanings below).

Regions of a run (segment ``pts_<run>_<region>``):
- ``vm``     page-track state, notifier registry, locks, RCU/SRCU domains, per-process stats
- ``guest``  guest physical memory (bytes)
- ``mirror`` the mirror notifier's shadow copy of guest memory (oracle for the write path)
- ``trace``  one event ring per process (``ipc.trace``), only when ``trace_events`` > 0

Process index ``proc``: 0 = coordinator, vCPU i = i + 1; lock/owner ``tag`` = proc + 1.
"""

from __future__ import annotations

from ipc import hist, trace
from ipc.locks import LOCK_WORDS, STAT_WORDS
from ipc.rcu import RcuDomain, SrcuDomain
from ipc.shm import Layout

# -- flags words (vm.flags) -----------------------------------------------------------------
F_WRITE_TRACKING = 0   # write_tracking_enabled, published with a release store
F_RUN_STATE = 1        # RUN_* below
F_WARNS = 2            # WARNs raised by any process
F_POISON_READS = 3     # reads of a poisoned notifier node / freed object
F_EPOCH = 4            # bumped by the coordinator at start
F_INDIRECT_SP = 5      # kvm->arch.indirect_shadow_pages: shadow pages of nested NPT (counted, under
                       # mmu_lock for write, at each vCPU's first L2 entry; read with READ_ONCE)
F_VM_BUGGED = 6        # KVM_BUG_ON fired: the VM is dead (kvm_vm_dead: every vCPU stops entering)

RUN_INIT, RUN_RUNNING, RUN_STOP = 0, 1, 2

# -- memslot words (vm.memslots[i]) --------------------------------------------------------
MS_BASE_GFN, MS_NPAGES, MS_LIVE = 0, 1, 2
PAGE_SHIFT = 12  # 4K pages: gfn = gpa >> PAGE_SHIFT (vm/page_track.py exports it)

# -- notifier registry (vm.notifier head words, vm.nodes[i] words) ---------------------------
NH_HEAD = 0            # index + 1 of the first node, 0 = empty list
NH_LIVE = 1            # nodes on the list
NH_REGISTERED = 2      # total registrations
NH_UNREGISTERED = 3    # total unregistrations
NH_REDUNDANT = 4       # redundant registrations caught (WARN)
NH_SEQ = 5             # registry seqcount: odd while register/unregister changes the list (the
                       # exact call accounting, vm.mirror, caches the live set per even value)
NH_CYCLE = 6           # node (index + 1) a mainline redundant registration re-linked, making the
                       # list cyclic (0 = none; simulation bookkeeping for the soft-lockup diagnosis)
NH_CYCLE_BY = 7        # who made it: registering proc tag << 32 | the registration's number (NH_REGISTERED)
NH_MMU_NODE = 8        # kvm->arch.mmu_sp_tracker: index + 1 of KVM's own node (page_track v6.0), 0 = none

N_NEXT = 0             # index + 1 of the next node, 0 = end
N_KIND = 1             # notifier kind id (vm.notifier.KINDS)
N_OWNER = 2            # owner object index (e.g. a physid table), kind-specific
N_STATE = 3            # NODE_* below
N_GEN = 4              # generation: even while allocated (the next even one at every allocation),
                       # odd once freed (free_node's first store: poison + end of cached views)
N_HITS = 5             # track_write calls (relaxed, statistics only)
N_REGSEQ = 6           # NH_SEQ (odd) of the registration that made the node live: its identity
N_REFS = 7             # --registration node-refcount: registrations held (-1: the node is not counted)

NODE_FREE, NODE_LIVE, NODE_RETIRING, NODE_POISON, NODE_ALLOCATED = 0, 1, 2, 3, 4

# -- locks: instance index in vm.locks, class index in vm.lockstat ---------------------------
LOCKS = ("mmu_lock", "tables_lock", "avic_physid_lock", "avic_tables_spin")
LOCK_MMU, LOCK_TABLES, LOCK_PHYSID, LOCK_TABLES_SPIN = range(len(LOCKS))
LOCK_KIND = {"mmu_lock": "rw", "tables_lock": "mutex", "avic_physid_lock": "spin",
             "avic_tables_spin": "spin"}
# classes: the locks above, then the grace-period mutexes of the RCU/SRCU domains
LOCK_CLASSES = LOCKS + ("track_srcu.gp_lock", "guest_mode.gp_lock", "rcu.gp_lock")
CLASS = {name: i for i, name in enumerate(LOCK_CLASSES)}

# -- RCU / SRCU domains --------------------------------------------------------------------
DOMAINS = (("track_srcu", SrcuDomain), ("guest_mode", RcuDomain), ("rcu", RcuDomain))

# -- per-process counters (vm.counters[proc]) -----------------------------------------------
COUNTERS = (
    "vmrun", "vmexit", "l2_switch", "write_tracked", "write_mmio", "write_untracked",
    "notifier_calls", "tlb_flush", "register", "unregister", "warns", "stale_entries",
    "reloads", "table_create", "table_free", "iterations",
    # exact call accounting of emulated writes (vm.mirror.WriteAccounting): writes judged, notifier
    # calls found missing or repeated (each one a WARN), and nodes that joined or left the list
    # within a judged interval and got fewer calls than its walks (not decidable per walk)
    "track_checked", "track_violations", "track_indeterminate",
    # calls of KVM's own write handler (v6.0 kvm_mmu_pte_write on the list, v6.6 kvm_mmu_track_write
    # called directly; vm/mmu.py) and how many took mmu_lock for write (indirect shadow pages exist)
    "mmu_pte_write", "mmu_lock_write",
    # L2 runs cut short by a reload request's kick and re-entered (vcpu/vcpu.py)
    "kick_reentry",
)
NCOUNTERS = 22
C = {name: i for i, name in enumerate(COUNTERS)}
assert len(COUNTERS) == NCOUNTERS

# -- statistics: words that only count (nothing is decided on them) -----------------------
# field -> the word indices of each of its rows (the last axis) that are statistics, None = all of
# them. A process scheduled by ipc/sched reaches them without a scheduling point (ipc/sched/points.py).
STATISTICS = {
    "flags": (F_WARNS, F_POISON_READS),
    "notifier": (NH_REGISTERED, NH_UNREGISTERED, NH_REDUNDANT),
    "nodes": (N_HITS,),
    "lockstat": None,
    "counters": None,
    "hist": None,
}

# -- latency histograms (vm.hist[proc, h]) --------------------------------------------------
HISTS = ("nested_vmrun", "emulated_write", "notifier_walk", "synchronize_srcu",
         "synchronize_rcu", "tlb_flush", "track_write", "avic_get")
H = {name: i for i, name in enumerate(HISTS)}
SAMPLED_HISTS = ("nested_vmrun", "emulated_write", "notifier_walk")  # 1 in cfg.latency_sample timed


def vm_layout(cfg) -> Layout:
    n = cfg.nprocs
    fields = [
        ("flags", "i8", (8,)),
        ("memslots", "i8", (cfg.memslots, 8)),
        ("gfn_track", "u2", (cfg.memory_pages,)),
        ("locks", "i8", (len(LOCKS), LOCK_WORDS)),
        ("lockstat", "i8", (n, len(LOCK_CLASSES), STAT_WORDS)),
        ("notifier", "i8", (16,)),
        ("nodes", "i8", (cfg.max_nodes, 8)),
        ("counters", "i8", (n, NCOUNTERS)),
        ("hist", "i8", (n, len(HISTS), hist.HIST_WORDS)),
    ]
    for prefix, cls in DOMAINS:
        fields += cls.fields(prefix, n)
    return Layout("vm", fields)


def guest_layout(cfg) -> Layout:
    return Layout("guest", [("mem", "u1", (cfg.memory_pages * 4096,))])


def mirror_layout(cfg) -> Layout:
    return Layout("mirror", [("mem", "u1", (cfg.memory_pages * 4096,))])


def trace_layout(cfg) -> Layout:
    """The per-process event rings (``ipc.trace.fields``); ``trace_events`` = 0: none (empty)."""
    return Layout("trace", trace.fields(cfg.nprocs, cfg.trace_events) if cfg.trace_events else [])
