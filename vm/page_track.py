"""Page tracking (arch/x86/kvm/mmu/page_track.c): per-memslot ``gfn_write_track`` counts, the
write-tracking enable flag, the emulated-write notifier walk and the fault-path check (their
bound hot path, one Python frame per write, is vm/write_path.py).

- ``gfn_write_track``: one ``unsigned short`` per 4K gfn of each memslot (the memslots are
  contiguous here, so the per-slot arrays are slices of one shm array indexed by gfn).
  ``update_gfn_track`` WARNs and refuses on overflow past USHRT_MAX or below 0.
- add / remove require ``mmu_lock`` (asserted) and WARN if write tracking is not enabled (v6.6:
  ``KVM_BUG_ON``, the VM is killed: ``Kvm.bug_on``). After
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

from ipc.locks import lockdep_assert_held
from vm import layout as L
from vm.notifier import walk
from vm.write_path import bind

USHRT_MAX = 0xFFFF
PAGE_SHIFT = L.PAGE_SHIFT
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
        if kvm.cfg.page_track == "v6.6":  # __kvm_write_track_{add,remove}_gfn: KVM_BUG_ON(!enabled)
            kvm.bug_on(f"write tracking not enabled ({what}({gfn:#x}), v6.6)", gfn=gfn)
        else:  # v6.0 kvm_slot_page_track_add_page: WARN_ON(!enabled), return
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


def write_path(kvm):
    """This process' write path, bound once to ``kvm`` (vm/write_path.py): ``(emulator_write_phys,
    kvm_page_track_write, l1_store)``. ``l1_store(gpa, new)`` is an L1 store: a RAM gfn that is not
    write-tracked is written through the guest's writable mapping (returns -1), any other faults
    and is emulated (returns the notifier calls)."""
    wp = kvm.write_path
    if wp is None:
        wp = kvm.write_path = bind(kvm)
    return wp


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
