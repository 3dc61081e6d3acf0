"""Page tracking (arch/x86/kvm/mmu/page_track.c): per-memslot ``gfn_write_track`` counts, the
write-tracking enable flag, the emulated-write notifier walk and the fault-path check.

- ``gfn_write_track``: one ``unsigned short`` per 4K gfn of each memslot (the memslots are
  contiguous here, so the per-slot arrays are slices of one shm array indexed by gfn).
  ``update_gfn_track`` WARNs and refuses on overflow past USHRT_MAX or below 0.
- add / remove require ``mmu_lock`` (asserted) and WARN if write tracking is not enabled. After
  adding, the caller flushes remote TLBs (``kvm_flush_remote_tlbs``): here that is a grace period
  of the ``guest_mode`` domain, which vCPUs hold while running guest code, so once it returns no
  vCPU can still be writing the gfn through a stale writable mapping.
- a write fault on a tracked gfn is emulated (``page_fault_handle_page_track``); the emulator
  writes guest memory, then ``kvm_page_track_write`` walks every notifier under the SRCU read lock.
  Untracked pages take the fast path and never touch the list.
- MMIO (a gpa in no memslot) never walks by default: arch/x86/kvm/x86.c ``emulator_write_phys``
  returns when ``kvm_vcpu_write_guest`` fails, before ``kvm_page_track_write``, and MMIO goes on
  through ``read_write_mmio`` (``emulator_read_write_onepage``), which calls no notifier (v6.0 and
  v6.6 alike). ``cfg.mmio_walk`` (``--mmio-walk``) makes MMIO writes walk as Maxim's "even just for
  mmio write" in the seed describes.
- the list is never empty in ``cfg.page_track == "v6.0"``: KVM's own ``kvm_mmu_pte_write`` node
  (vm/mmu.py) is on it from VM creation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ipc import _prims, fuzz, trace
from ipc.locks import lockdep_assert_held
from vm import layout as L
from vm.faults import notifier_cycle
from vm.notifier import POISON_NEXT, handler_entry, walk

USHRT_MAX = 0xFFFF
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def kvm_page_track_write_tracking_enabled(kvm) -> bool:
    return kvm.mem.load(kvm.flags_w + L.F_WRITE_TRACKING) != 0


def kvm_page_track_write_tracking_enable(kvm) -> None:
    """Maxim's patch 4: enable tracking on demand; the flag is published with a release store
    (the per-slot arrays exist from the start here, so nothing else needs allocating)."""
    kvm.mem.store(kvm.flags_w + L.F_WRITE_TRACKING, 1)


def gfn_to_memslot(kvm, gfn: int) -> int:
    """Index of the live memslot holding ``gfn``, or -1 (MMIO / no memory)."""
    ms = kvm.vm.v["memslots"]
    for i in range(ms.shape[0]):
        base, npages, live = int(ms[i, 0]), int(ms[i, 1]), int(ms[i, 2])
        if live and base <= gfn < base + npages:
            return i
    return -1


def update_gfn_track(kvm, gfn: int, delta: int) -> bool:
    lockdep_assert_held(kvm.mmu_lock, "mmu_lock")
    val = int(kvm.gfn_track[gfn]) + delta
    if val < 0 or val > USHRT_MAX:
        kvm.warn("gfn_track_overflow" if val > 0 else "gfn_track_underflow",
                 f"gfn_write_track[{gfn:#x}] would {'overflow past USHRT_MAX' if val > 0 else 'go below 0'}",
                 gfn=gfn, count=int(kvm.gfn_track[gfn]))
        return False
    kvm.gfn_track[gfn] = val
    return True


def _track_change(kvm, gfn: int, delta: int, what: str) -> bool:
    lockdep_assert_held(kvm.mmu_lock, "mmu_lock")
    if not kvm_page_track_write_tracking_enabled(kvm):
        kvm.warn("tracking_disabled", f"{what}({gfn:#x}) while write tracking is not enabled", gfn=gfn)
        return False
    if gfn_to_memslot(kvm, gfn) < 0:
        kvm.warn("no_memslot", f"{what}({gfn:#x}): gfn is in no memslot", gfn=gfn)
        return False
    return update_gfn_track(kvm, gfn, delta)


def kvm_write_track_add_gfn(kvm, gfn: int) -> bool:
    """count += 1 (write-protects the gfn). Caller holds mmu_lock, then flushes remote TLBs."""
    return _track_change(kvm, gfn, +1, "kvm_write_track_add_gfn")


def kvm_write_track_remove_gfn(kvm, gfn: int) -> bool:
    """count -= 1 (the gfn becomes writable again when it reaches 0). Caller holds mmu_lock."""
    return _track_change(kvm, gfn, -1, "kvm_write_track_remove_gfn")


def kvm_gfn_is_write_tracked(kvm, gfn: int) -> bool:
    return 0 <= gfn < kvm.memory_pages and kvm.gfn_track_mv[gfn] != 0


def kvm_flush_remote_tlbs(kvm) -> None:
    """Wait until every vCPU has left the guest-mode section it was in (no stale writable
    mapping of a newly write-protected gfn survives). Hook ``no-tlb-flush``: no wait (the bug)."""
    if "no-tlb-flush" in kvm.hooks:
        return
    kvm.guest_mode.synchronize()
    kvm.count("tlb_flush")


def track_gfn(kvm, gfn: int) -> bool:
    """add + flush, the way a tracking user does it (mmu_lock around the count)."""
    with kvm.mmu_lock:
        ok = kvm_write_track_add_gfn(kvm, gfn)
    if ok:
        kvm_flush_remote_tlbs(kvm)
    return ok


def untrack_gfn(kvm, gfn: int) -> bool:
    with kvm.mmu_lock:
        return kvm_write_track_remove_gfn(kvm, gfn)


def page_fault_handle_page_track(kvm, gfn: int, write: bool) -> bool:
    """True when the fault must be emulated (RET_PF_EMULATE): a write to a tracked gfn."""
    return write and kvm_gfn_is_write_tracked(kvm, gfn)


# how a call of the bound write path begins (each step falls through into the next, like the
# kernel's call chain): FAULT = an L1 store (page_fault_handle_page_track), EMULATE =
# emulator_write_phys, WALK = kvm_page_track_write alone
FAULT, EMULATE, WALK = 0, 1, 2


def write_path(kvm):
    """This process' write path, bound once to ``kvm``: ``(emulator_write_phys,
    kvm_page_track_write, l1_store)`` as closures over every constant they need (the hot path of
    each tracked or MMIO write: no attribute lookups per call). ``l1_store(gpa, new)`` is an L1
    store: a RAM gfn that is not write-tracked is written through the guest's writable mapping
    (returns -1), any other faults and is emulated (returns the notifier calls)."""
    wp = kvm.write_path
    if wp is None:
        wp = kvm.write_path = _bind_write_path(kvm)
    return wp


class _Unaccounted:
    """The write path of a process without call accounting: its countdown (a small int: a larger
    one would be re-allocated at every decrement) wraps every 2**30 - 1 writes through a plain walk."""

    period = (1 << 30) - 1

    @staticmethod
    def checkpoint(gpa: int, new: bytes, page_track_write) -> int:
        return page_track_write(gpa, new)


def _bind_write_path(kvm):
    """The three entry points of the write path are one function (``write``, made three times
    with a different default ``how``): a tracked L1 store is one Python frame down to the
    notifiers' ``track_write`` calls, as it is one call chain in the kernel."""
    load = kvm.mem.load
    head_w = kvm.notifier_w + L.NH_HEAD
    nodes_w = kvm.nodes_w
    nmax = kvm.cfg.max_nodes
    clock = _prims.stats_clock  # spans in stats-clock readings (the TSC: no vDSO page, often cold)
    # sampled latency (ipc/hist.py): each path counts down to the one operation in about
    # cfg.latency_sample it times (``*_left``: operations to go, the last one timed; with no stats
    # it starts at 0 and never reaches 0 again);
    # ``sample`` records it weighted by its interval and returns the next, ``settle`` counts the
    # operations run since (at each counter flush), so the histogram counts stay exact
    h_walk, h_emul = kvm.h_notifier_walk, kvm.h_emulated_write
    settle_old = kvm.settle_samples.get("write_path")
    if settle_old is not None:  # re-bound: the old closures' operations are counted first
        settle_old()
    w_left = h_walk.start() if h_walk is not None else 0
    e_left = h_emul.start() if h_emul is not None else 0
    sample_walk = h_walk.sample if h_walk is not None else None
    sample_emul = h_emul.sample if h_emul is not None else None
    guest_write = kvm.guest_mem.write
    track_mv = kvm.gfn_track_mv
    ram_end = kvm.memory_pages << PAGE_SHIFT  # the memslots are contiguous from gpa 0
    mmio_walk = kvm.cfg.mmio_walk
    S_POISON, O_STATE, O_GEN, O_NEXT = L.NODE_POISON, L.N_STATE, L.N_GEN, L.N_NEXT
    # this process' view of each list node it has walked, by list pointer (index + 1):
    # ``(gen word, generation, track_write, index, next word)``; valid while the node's N_GEN
    # word holds that generation (alloc and free both bump it: a freed node never passes)
    cache = kvm.walk_cache
    fz = fuzz.ACTIVE  # this process' preemption points (configured with its Kvm)
    tr = trace.ACTIVE  # this process' trace ring (vm/tracepoints.py): None = no emission
    emit = tr.emit if tr else None
    (W_B, W_E), (T_B, T_E) = (tr.pair("emulated_write"), tr.pair("track_write")) if tr else ((0, 0), (0, 0))

    def node_entry(n: int):
        """The walk met list pointer ``n`` with no valid cached view: check it (a poisoned pointer
        or node is reported, None = stop the walk), cache and return its view."""
        if not 0 < n <= nmax:
            kvm.poisoned("notifier list pointer", pointer=n, poison=n == POISON_NEXT + 1)
            return None
        i = n - 1
        base = nodes_w + i * 8
        gen = load(base + O_GEN)  # before the state: free_node poisons, then bumps N_GEN
        if load(base + O_STATE) == S_POISON:
            kvm.poisoned("notifier node (walk)", node=i)
            return None
        track_write = handler_entry(kvm, i, gen)[2]
        if kvm.trace_nodes is not None:  # record_walks(): this view records its calls
            track_write = _recording(track_write, kvm.trace_nodes)
        e = cache[n] = (base + O_GEN, gen, track_write, i, base + O_NEXT)
        return e

    # exact call accounting (vm.mirror.WriteAccounting), when this process has it: each emulated RAM
    # write counts down; the one that reaches 0 walks through ``checkpoint``, which judges it alone
    # and the others in aggregate
    acct = getattr(kvm, "write_acct", None) or _Unaccounted
    checkpoint = acct.checkpoint
    left = acct.period

    def bind(default_how: int):
        def write(gpa: int, new: bytes, how: int = default_how) -> int:
            nonlocal left, e_left, w_left
            if how == FAULT and gpa < ram_end and not track_mv[gpa >> PAGE_SHIFT]:
                guest_write(gpa, new)  # not write-protected: the guest's writable mapping
                return -1
            te = 0
            try:
                if how != WALK:
                    # emulator_write_phys
                    if emit:
                        emit(W_B, gpa, len(new))
                    e_left -= 1
                    if not e_left:
                        te = clock()
                    if gpa < ram_end:
                        guest_write(gpa, new)
                        left -= 1
                        if not left:
                            calls = checkpoint(gpa, new, page_track_write)
                            left = acct.period  # (after: a violation makes it 1)
                            if te:
                                e_left = sample_emul(te)
                            return calls
                    elif not mmio_walk:  # MMIO: read_write_mmio, no notifier (module doc)
                        if te:
                            e_left = sample_emul(te)
                        return 0
                # kvm_page_track_write
                if not load(head_w):  # empty list: return at once
                    if te:
                        e_left = sample_emul(te)
                    return 0
                tw = 0
                w_left -= 1
                if not w_left:
                    tw = clock()
                nbytes = len(new)
                calls = 0
                srcu_lock()
                try:
                    n = load(head_w)
                    while n:
                        try:
                            gen_w, gen, track_write, i, next_w = cache[n]
                            if load(gen_w) != gen:
                                raise KeyError(n)
                        except KeyError:
                            e = node_entry(n)
                            if e is None:
                                break
                            gen_w, gen, track_write, i, next_w = e
                        if calls >= nmax:  # longer than the pool: a cycle (the kernel's walk never ends)
                            notifier_cycle(kvm)
                            break
                        if emit:
                            emit(T_B, i, gpa)
                            try:  # no cost unless it raises; then the slice still ends
                                track_write(gpa, new, nbytes, i)
                            finally:
                                emit(T_E)
                        else:
                            track_write(gpa, new, nbytes, i)
                        calls += 1
                        if fz:
                            fz.hit("page_track.walk.call_to_next")  # still standing on the node
                        n = load(next_w)
                finally:
                    srcu_unlock()
                if tw:
                    w_left = sample_walk(tw)
                if te:
                    e_left = sample_emul(te)
                return calls
            finally:  # no cost unless it raises; then the slice still ends
                if emit and how != WALK:
                    emit(W_E)
        return write

    srcu_lock, srcu_unlock = kvm.track_srcu.read_lock, kvm.track_srcu.read_unlock
    emulate_write, page_track_write, l1_store = bind(EMULATE), bind(WALK), bind(FAULT)

    def settle() -> None:
        if h_walk is not None:
            h_walk.settle(w_left)
        if h_emul is not None:
            h_emul.settle(e_left)

    kvm.settle_samples["write_path"] = settle
    if acct is _Unaccounted:
        return emulate_write, page_track_write, l1_store

    def page_track_write_accounted(gpa: int, new: bytes) -> int:
        return walk_outside_write(page_track_write, gpa, new)

    walk_outside_write = acct.walk_outside_write
    return emulate_write, page_track_write_accounted, l1_store


def _recording(track_write, visited: list):
    def recorded(gpa: int, new: bytes, nbytes: int, node: int) -> None:
        track_write(gpa, new, nbytes, node)
        visited.append(node)
    return recorded


@contextmanager
def record_walks(kvm) -> Iterator[list[int]]:
    """The notifier nodes every walk of this process calls while in the block, in order (the
    scripted ``write`` command, tests): the write path's node views are re-made to record."""
    visited: list[int] = []
    kvm.trace_nodes = visited
    kvm.walk_cache.clear()
    try:
        yield visited
    finally:
        kvm.trace_nodes = None
        kvm.walk_cache.clear()


def kvm_page_track_write(kvm, gpa: int, new: bytes) -> int:
    """Call every notifier's ``track_write`` under the SRCU read lock; returns how many ran.
    Returns at once when the list is empty."""
    return write_path(kvm)[1](gpa, new)


def emulator_write_phys(kvm, gpa: int, new: bytes) -> int:
    """Write guest memory and walk the notifiers if ``gpa`` is RAM; MMIO walks only with
    ``cfg.mmio_walk``."""
    return write_path(kvm)[0](gpa, new)


def kvm_page_track_delete_slot(kvm, slot: int) -> None:
    """A memslot goes away: every notifier's ``track_remove_region`` for its range."""
    ms = kvm.vm.v["memslots"]
    base, npages = int(ms[slot, L.MS_BASE_GFN]), int(ms[slot, L.MS_NPAGES])
    walk(kvm, lambda hd, i: hd.track_remove_region(base, npages, i))
