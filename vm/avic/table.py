"""Nested AVIC: the physical APIC ID table entry format, its translation, and the ``avic`` shm region
(the pool of shadow ``avic_physid_table`` objects), declared once here.

Entry (64 bits, guest and shadow alike): backing page address bits 12..51, host physical APIC id
bits 0..7, IsRunning bit 62, Valid bit 63. Words are stored as signed int64 in shm (``s64``) and
handled as unsigned Python ints (``u64``).

Translation (the function the oracle checks every live shadow table against), for guest entry g:
- not Valid -> 0 (the shadow entry is invalid too)
- backing page gpa -> "hpa" ``HPA_BASE + gpa`` if the gpa is guest RAM, else the dummy page
  ``DUMMY_HPA`` (Maxim's code points bad addresses at a dummy page)
- apic id a (an L1 vCPU) -> ``host_apic_id(a)`` (the physical APIC id of that L1 vCPU's pCPU);
  an apic id that names no L1 vCPU -> 0xFF and not running
- IsRunning -> guest IsRunning AND "L1 vCPU a is loaded" (``vcpu_load``/``vcpu_put`` flip it)

Region ``avic`` (segment ``pts_<run>_avic``; created by the design's ``setup()`` in the coordinator,
attached by vCPU processes; registered in ``kvm.regions`` so ``Kvm.close`` unmaps/unlinks it):
- ``hdr``     H_* words below
- ``hash``    256 bucket heads (table index + 1), mutex-hash / per-table-notifier
- ``vcpu``    (vcpus, 16) V_* words, two cache lines per vCPU
- ``tables``  (ntables, 16) T_* header words per table
- ``valid``   (ntables, 4) bitmap of valid entries
- ``cache``   (ntables, nentries) cached guest entries
- ``shadow``  (ntables, nentries) the shadow physid page (entries the "hardware" uses)
- ``locks`` / ``lockstat``  this module's own lock (``avic_notifier_lock``) and the lock_stat blocks
  of its classes (``avic_notifier_lock``, ``avic_table_lock``)
- ``tlocks``  (ntables, LOCK_WORDS) one spinlock per table (rcu-list: the table's entries)
- ``cs``      (len(CS), 8) locktorture-style held flags of the locks the AVIC code takes
- ``tcs``     (ntables, 8) the same for the per-table locks
- ``vref``    (vcpus, ntables) per L1 vCPU, how many valid cached entries of each table name it
  (RFC v3's ``physid_ref_entries``, as counts: vcpu_load / put visit only those tables)
- ``inflight`` (l2s * nentries, 2) per guest entry (l2 * nentries + entry): [IF_STARTS] L1 stores
  begun to it, [IF_COUNT] of them still in flight (the I2 check leaves such an entry out)
- ``stats``   (nprocs, NSTATS) per-process AVIC counters
"""

from __future__ import annotations

from ipc.locks import LOCK_WORDS, STAT_WORDS
from ipc.shm import Layout

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MASK64 = (1 << 64) - 1

AVIC_APIC_ID_MASK = 0xFF
AVIC_BACKING_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
AVIC_IS_RUNNING = 1 << 62
AVIC_VALID = 1 << 63
AVIC_UPDATABLE = AVIC_APIC_ID_MASK | AVIC_IS_RUNNING  # a write touching only these bits is an update
HPA_BASE = 1 << 40
DUMMY_HPA = (1 << 45) - PAGE_SIZE
NO_HOST_APIC = 0xFF
POISON_ENTRY = 0x6B6B6B6B6B6B6B6B
POISON_NEXT = -0x6B6B6B6B
UNINIT_NEXT = -0x5A5A5A5A  # a new table's link until it is linked (memory not yet written: garbage)
POISON_REF = -0x6B6B6B6B
HASH_BUCKETS = 256
MAX_NENTRIES = 256
FLOOD_PER_ENTRY = 1000

# -- table states (T_STATE) ------------------------------------------------------------------
FREE, ALLOC, UNTRACKED, TRACKING, INVALID, VALID, DROPPED, RETIRING, POISON = range(9)
STATE_NAMES = ("free", "alloc", "untracked", "tracking", "invalid", "valid", "dropped", "retiring",
               "poison")
LIVE = frozenset({UNTRACKED, TRACKING, INVALID, VALID, DROPPED})

# -- header words (avic.hdr) -----------------------------------------------------------------
H_USERS = 0          # users of the shared notifier node (tables), all variants
H_REGISTERED = 1     # the "bool registered" flag of the shared node (bool variant)
H_NODE = 2           # shared notifier node index + 1 (0 = none)
H_LIST = 3           # rcu-list: head of the RCU-protected table list (index + 1)
H_SEQ = 4            # seqcount of shadow changes the checks must not see half-done (odd while
                     # vcpu_load/put flip IsRunning, while a table is dropped or invalidated)
H_DESIGN = 5         # design id
H_NENTRIES = 6       # entries per table
H_GEN = 7            # table generation counter (bumped on every allocation)
H_REGVAR = 8         # registration variant id
H_UNTRACKED_REG = 9  # notifiers registered while write tracking was disabled
H_MAXLIVE = 10       # high-water mark of live tables
H_LIVE = 11          # live tables now
H_I1 = 12            # (I1) violations: a vCPU in L2 on a table no longer shadowed, no reload pending
H_I2 = 13            # (I2) violations: a completed L1 write missing from a shadow entry at VMRUN
H_BUSY = 14          # shadow changes in progress (erase, IsRunning flips): with per-table locks two
                     # run at once, so H_SEQ's parity alone cannot say "none half-done" (``seq_stable``)
H_RELOAD_BAD = 15    # vCPUs found still in L2 on an erased table after kvm_make_all_cpus_request(WAIT)
H_REQSEQ = 16        # reload requests made (kvm_make_all_cpus_request): each erase takes the next number
HDR_WORDS = 24

# -- per-vCPU words (avic.vcpu[v]) -----------------------------------------------------------
V_CUR = 0            # table the vCPU holds a reference on (index + 1)
V_INGUEST = 1        # table the vCPU runs L2 on right now (index + 1), for reload requests
V_RELOAD = 2         # KVM_REQ_APIC_PAGE_RELOAD pending: the number (H_REQSEQ) of the latest request, 0 = none
V_LOADED = 3         # the L1 vCPU is loaded (scheduled in): shadow IsRunning may be set
V_INL2 = 4           # table whose entries the hardware uses for this vCPU now (index + 1): set once
                     # nested VMRUN made it ready, cleared at VMEXIT (what the I1 checks look at)
V_L1STORE = 6        # this vCPU's L1 store to table entries still in flight (first ``inflight`` index
                     # + 1, entries - 1 << 32; 0 = none): from its start to the next store or nested VMRUN
V_PROC = 7           # tag of the process running this vCPU (set at nested VMRUN): a reload request's
                     # wait services a vCPU of its own process inline (one process, several vCPUs)
V_L2SEQ = 8          # seqcount of L2 runs: odd from nested VMRUN (table ready) to VMEXIT
V_STEER = 9          # flood hooks: the vCPU waits in a flood-drop steer (1; 0 = not): it cannot enter L2
V_GT = 10            # oracle (written through _smem only, no point): the table (index + 1) of the L2 run
                     # this vCPU committed to (its request check found none), from then to its VM exit
V_GSEEN = 11         # oracle: the newest reload request number this vCPU has consumed (served)
VW = 16

# -- table header words (avic.tables[t]) -----------------------------------------------------
T_STATE = 0
T_GFN = 1
T_L2 = 2
T_NENTRIES = 3
T_REF = 4            # refcount: vCPUs holding a reference
T_USE = 5            # usecount: vCPUs in guest mode on the table
T_FLOOD = 6          # writes while unused since the last use/sync
T_GEN = 7            # generation (allocation number), bumped again when poisoned
T_NEXT = 8           # hash chain / RCU list link (index + 1)
T_NODE = 9           # per-table notifier node (index + 1)
T_REGISTERED = 10    # per-table "bool registered" flag
T_TRACKED = 11       # this table holds a gfn_write_track count on its gfn
T_WRITES = 12        # track_write calls that reached the table
T_SYNCS = 13         # full syncs of the table
T_EPOCH = 14         # erasures (invalidate, flood, memslot; under the table lock): what a vCPU in L2 must be told of
T_TRACKER = 15       # pid << 32 | start time (low 32 bits) of the process write-protecting it (TRACKING)
T_REQSEQ = 16        # number (H_REQSEQ) of the reload request of the table's latest erase: a vCPU in L2 on
                     # it is excused (I1) only by a request at least that new
TW = 24

# -- this module's own locks, lock classes ---------------------------------------------------
MYLOCKS = ("avic_notifier_lock", "avic_table_lock")
LOCK_NOTIFIER, LOCK_TABLE = 0, 1  # lock_stat classes; avic_table_lock: every per-table lock (rcu-list)

# -- mutual-exclusion checks: held flag per lock (cs[i] = [holder tag, fails, entries, ...]) --
CS = ("tables_lock", "avic_physid_lock", "avic_tables_spin", "avic_notifier_lock")
CS_TABLES, CS_PHYSID, CS_SPIN, CS_NOTIFIER = range(len(CS))
# per-table locks (rcu-list) have their held flags in ``tcs`` (ntables, 8), same word layout
CS_HOLDER, CS_FAILS, CS_ENTRIES = 0, 1, 2

# -- per-process AVIC counters (avic.stats[proc]) --------------------------------------------
STATS = (
    "table_create", "table_free", "sync", "resync", "invalidate", "entry_update", "flood_drop",
    "reload_request", "stale_check", "stale_check_skipped", "get_fast", "get_slow",
    "synchronize_rcu_add", "synchronize_rcu_del", "isrunning_flip", "track_gfn", "untrack_gfn",
    "track_write", "track_write_miss", "register", "unregister", "rcu_retry", "invariant_check",
    "invariant_skipped", "entries_checked", "flood_steered", "reload_all", "kick_exit",
    "vmrun_nolock",
)
NSTATS = 32
S = {name: i for i, name in enumerate(STATS)}
assert len(STATS) <= NSTATS

# -- statistics: words that only count (ipc/sched: no scheduling points; vm/layout.STATISTICS) --
STATISTICS = {
    "hdr": (H_MAXLIVE, H_LIVE, H_UNTRACKED_REG, H_I1, H_I2, H_RELOAD_BAD),
    "tables": (T_WRITES, T_SYNCS),
    "lockstat": None,
    "stats": None,
    "cs": None,  # the mutual-exclusion checker's held flags (its own words, not the design's)
    "tcs": None,
}

DESIGN_IDS = {"mutex-hash": 1, "rcu-list": 2, "per-table-notifier": 3}
REGISTRATION_IDS = {"refcount": 1, "bool": 2, "naive": 3, "split": 4, "node-refcount": 5}
AVIC_DESIGNS = tuple(DESIGN_IDS)
REGISTRATIONS = tuple(REGISTRATION_IDS)
READER_DELAY_NS = 100_000  # avic-reader-delay hook: time inside rcu-list read-side sections
FLOOD_RACE_DELAY_NS = 500_000  # flood hooks: longest wait, after usecount 0, for a vCPU to enter
FLOOD_EARLY_SCALE = 0.1  # --fuzz: share of the level's probability with which a drop is taken early
FLOOD_RACE_LIMIT = 2  # flood-drop-race hook: writes while unused before a drop (else nentries * 1000)
IF_STARTS, IF_COUNT = 0, 1  # words of an ``inflight`` row
CROSS_ENTRY_RATE = 0.1  # share of L1's table writes to another vCPU's entry (an L2 vCPU moved to this
                        # L1 vCPU: its IsRunning / apic id set by the vCPU that runs it now)
ALL_ENTRIES_EVERY = 8  # (I2): every entry of the table is checked at one nested VMRUN in this many


def u64(x: int) -> int:
    return x & MASK64


def s64(x: int) -> int:
    return x - (1 << 64) if x & AVIC_VALID else x


def nentries(cfg) -> int:
    """Entries per physid table: one per L2 vCPU; the L2s have as many vCPUs as L1 (at least 2).
    L1 vCPU v mostly writes entry ``v % nentries``, and other entries at ``CROSS_ENTRY_RATE``."""
    return min(max(cfg.vcpus, 2), MAX_NENTRIES)


def ntables(cfg) -> int:
    """Pool size: at most one live table per vCPU (switching drops the old reference), plus one
    retiring per vCPU (waiting for its grace period), plus slack."""
    return 2 * cfg.vcpus + cfg.l2s + 2


def host_apic_id(vcpu: int) -> int:
    """Physical APIC id of the pCPU L1 vCPU ``vcpu`` runs on (a fixed mapping here)."""
    return (vcpu * 37 + 5) % 0xFF


def avic_layout(cfg) -> Layout:
    n, ne, nt = cfg.nprocs, nentries(cfg), ntables(cfg)
    return Layout("avic", [
        ("hdr", "i8", (HDR_WORDS,)),
        ("hash", "i8", (HASH_BUCKETS,)),
        ("vcpu", "i8", (cfg.vcpus, VW)),
        ("tables", "i8", (nt, TW)),
        ("valid", "i8", (nt, (MAX_NENTRIES + 63) // 64)),
        ("cache", "i8", (nt, ne)),
        ("shadow", "i8", (nt, ne)),
        ("locks", "i8", (len(MYLOCKS), LOCK_WORDS)),
        ("tlocks", "i8", (nt, LOCK_WORDS)),
        ("lockstat", "i8", (n, len(MYLOCKS), STAT_WORDS)),
        ("inflight", "i8", (cfg.l2s * ne, 2)),
        ("vref", "i8", (cfg.vcpus, nt)),
        ("cs", "i8", (len(CS), 8)),
        ("tcs", "i8", (nt, 8)),
        ("stats", "i8", (n, NSTATS)),
    ])


def make_entry(backing_gpa: int, apic_id: int, running: bool, valid: bool = True) -> int:
    """A guest physid entry (unsigned)."""
    return ((AVIC_VALID if valid else 0) | (AVIC_IS_RUNNING if running else 0)
            | (backing_gpa & AVIC_BACKING_MASK) | (apic_id & AVIC_APIC_ID_MASK))


def describe(e: int) -> str:
    e = u64(e)
    return (f"{e:#018x} (valid={e >> 63} running={(e >> 62) & 1} backing={e & AVIC_BACKING_MASK:#x} "
            f"apic={e & AVIC_APIC_ID_MASK})")
