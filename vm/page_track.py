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
  writes guest memory, then ``kvm_page_track_write`` walks every notifier under the SRCU read lock
  (MMIO addresses outside every memslot walk too). Untracked pages take the fast path and never
  touch the list.
"""

from __future__ import annotations

from ipc import _prims, fuzz, trace
from ipc.locks import lockdep_assert_held
from vm import layout as L
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
    mapping of a newly write-protected gfn survives)."""
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


def write_path(kvm):
    """This process' emulated-write path, bound once to ``kvm``: ``(emulator_write_phys,
    kvm_page_track_write)`` as closures over every constant they need (the hot path of each tracked
    or MMIO write: no attribute lookups per call)."""
    wp = kvm.write_path
    if wp is None:
        wp = kvm.write_path = _bind_write_path(kvm)
    return wp


def _bind_write_path(kvm):
    load = kvm.mem.load
    head_w = kvm.notifier_w + L.NH_HEAD
    nodes_w = kvm.nodes_w
    nmax = kvm.cfg.max_nodes
    handlers = kvm.handlers
    srcu_lock, srcu_unlock = kvm.track_srcu.read_lock, kvm.track_srcu.read_unlock
    now = _prims.now_ns
    rec_walk = kvm.h_notifier_walk.record_since if kvm.h_notifier_walk is not None else None
    rec_emul = kvm.h_emulated_write.record_since if kvm.h_emulated_write is not None else None
    guest_write = kvm.guest_mem.write
    pages = kvm.memory_pages
    S_POISON, O_STATE, O_GEN, O_NEXT = L.NODE_POISON, L.N_STATE, L.N_GEN, L.N_NEXT
    fz = fuzz.ACTIVE  # this process' preemption points (configured with its Kvm)
    tr = trace.ACTIVE  # this process' trace ring (vm/tracepoints.py): None = no emission
    emit = tr.emit if tr else None
    (W_B, W_E), (T_B, T_E) = (tr.pair("emulated_write"), tr.pair("track_write")) if tr else ((0, 0), (0, 0))

    def page_track_write(gpa: int, new: bytes) -> int:
        if not load(head_w):  # empty list: return at once
            return 0
        t0 = now() if rec_walk is not None else 0
        nbytes = len(new)
        trace = kvm.trace_nodes
        calls = 0
        srcu_lock()
        try:
            n = load(head_w)
            while n:
                if not 0 < n <= nmax:
                    kvm.poisoned("notifier list pointer", pointer=n, poison=n == POISON_NEXT + 1)
                    break
                if calls >= nmax:  # longer than the pool: the list has a cycle
                    kvm.warn("list_corrupt", "notifier list longer than the node pool (cycle)")
                    break
                base = nodes_w + (n - 1) * 8
                if load(base + O_STATE) == S_POISON:
                    kvm.poisoned("notifier node (walk)", node=n - 1)
                    break
                gen = load(base + O_GEN)
                e = handlers.get(n - 1)
                if e is None or e[0] != gen:
                    e = handler_entry(kvm, n - 1, gen)
                if emit:
                    emit(T_B, n - 1, gpa)
                try:  # no cost unless it raises; then the slice still ends
                    e[2](gpa, new, nbytes, n - 1)
                finally:
                    if emit:
                        emit(T_E)
                if trace is not None:
                    trace.append(n - 1)
                calls += 1
                if fz:
                    fz.hit("page_track.walk.call_to_next")  # still standing on the node
                n = load(base + O_NEXT)
        finally:
            srcu_unlock()
        if rec_walk is not None:
            rec_walk(t0)
        return calls

    def emulate_write(gpa: int, new: bytes) -> int:
        t0 = now() if rec_emul is not None else 0
        if emit:
            emit(W_B, gpa, len(new))
        try:
            if (gpa >> PAGE_SHIFT) < pages:
                guest_write(gpa, new)
            calls = page_track_write(gpa, new)
            if rec_emul is not None:
                rec_emul(t0)
        finally:
            if emit:
                emit(W_E)
        return calls

    acct = getattr(kvm, "write_acct", None)
    if acct is None:
        return emulate_write, page_track_write

    # exact call accounting (vm.mirror.WriteAccounting): each emulated RAM write counts down; the
    # one that reaches 0 walks through ``checkpoint``, which judges it alone and the others in aggregate
    checkpoint, walk_outside_write = acct.checkpoint, acct.walk_outside_write
    left = acct.period

    def emulate_write_accounted(gpa: int, new: bytes) -> int:
        nonlocal left
        t0 = now() if rec_emul is not None else 0
        if emit:
            emit(W_B, gpa, len(new))
        try:
            if (gpa >> PAGE_SHIFT) < pages:
                guest_write(gpa, new)
                left -= 1
                if left:
                    calls = page_track_write(gpa, new)
                else:
                    calls = checkpoint(gpa, new, page_track_write)
                    left = acct.period
            else:
                calls = page_track_write(gpa, new)
            if rec_emul is not None:
                rec_emul(t0)
        finally:
            if emit:
                emit(W_E)
        return calls

    def page_track_write_accounted(gpa: int, new: bytes) -> int:
        return walk_outside_write(page_track_write, gpa, new)

    return emulate_write_accounted, page_track_write_accounted


def kvm_page_track_write(kvm, gpa: int, new: bytes) -> int:
    """Call every notifier's ``track_write`` under the SRCU read lock; returns how many ran.
    Returns at once when the list is empty."""
    return write_path(kvm)[1](gpa, new)


def emulator_write_phys(kvm, gpa: int, new: bytes) -> int:
    """Write guest memory (if ``gpa`` is RAM), then the notifier walk (also for MMIO)."""
    return write_path(kvm)[0](gpa, new)


def kvm_page_track_delete_slot(kvm, slot: int) -> None:
    """A memslot goes away: every notifier's ``track_remove_region`` for its range."""
    ms = kvm.vm.v["memslots"]
    base, npages = int(ms[slot, L.MS_BASE_GFN]), int(ms[slot, L.MS_NPAGES])
    walk(kvm, lambda hd, i: hd.track_remove_region(base, npages, i))
