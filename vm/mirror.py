"""The simple notifier kind of the VM issue: a mirror that copies every tracked write into a
shadow copy of guest memory (the ``mirror`` region). Oracle: for every tracked gfn the mirror page
equals the guest page — a write to a tracked page that escaped the notifier shows as a difference.
"""

from __future__ import annotations

import numpy as np

from vm import notifier
from vm.layout import C
from vm.page_track import PAGE_SHIFT, PAGE_SIZE, track_gfn

MIRROR_KIND = 1


@notifier.notifier_kind(MIRROR_KIND)
class MirrorNotifier(notifier.NotifierNode):
    def __init__(self, kvm, node: int, owner: int):
        super().__init__(kvm, node, owner)
        self.pages = kvm.memory_pages
        self.write = kvm.mirror.mem.write
        self.counts = kvm.counts
        self.c_calls = C["notifier_calls"]

    def track_write(self, gpa: int, new: bytes, nbytes: int, node: int) -> None:
        if (gpa >> PAGE_SHIFT) >= self.pages:  # MMIO: nothing to mirror
            return
        self.counts[self.c_calls] += 1
        self.write(gpa, new)

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        pass


def mirror_track(kvm, gfn: int) -> bool:
    """Start tracking ``gfn`` for the mirror: add + flush, then copy the current page (writes
    racing with the copy are emulated and mirrored, so the result is consistent)."""
    if not track_gfn(kvm, gfn):
        return False
    lo = gfn << PAGE_SHIFT
    kvm.mirror_bytes[lo:lo + PAGE_SIZE] = kvm.guest_bytes[lo:lo + PAGE_SIZE]
    return True


def oracle(kvm) -> list[str]:
    """Differences between guest and mirror on every tracked gfn (empty = consistent)."""
    bad = []
    track = kvm.gfn_track
    for gfn in np.flatnonzero(track):
        lo = int(gfn) << PAGE_SHIFT
        g = kvm.guest_bytes[lo:lo + PAGE_SIZE]
        m = kvm.mirror_bytes[lo:lo + PAGE_SIZE]
        if not np.array_equal(g, m):
            off = int(np.flatnonzero(g != m)[0])
            bad.append(f"lost write: tracked gfn {int(gfn):#x} offset {off:#x}: guest {int(g[off]):#04x} "
                       f"!= mirror {int(m[off]):#04x}")
    return bad
