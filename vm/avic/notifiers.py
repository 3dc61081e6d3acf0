"""The nested AVIC wing's page-track notifier nodes: the one shared node of mutex-hash / rcu-list
and the per-table nodes of per-table-notifier. Every process that walks the notifier list finds its
AVIC design through ``design_for(kvm)`` (built on demand, e.g. in a coordinator deleting a
memslot); a callback that arrives inside the vCPU's guest-mode section is WARNed and run outside."""

from __future__ import annotations

import weakref

from ipc.shm import Region
from vm import notifier
from vm.avic import oracle
from vm.avic.table import (
    DESIGN_IDS,
    H_DESIGN,
    avic_layout,
)
from vm.nested import DESIGNS, NestedDesign

AVIC_SHARED_KIND = 41   # notifier kind of the one shared AVIC node (mutex-hash, rcu-list)
AVIC_TABLE_KIND = 42    # notifier kind of a per-table node (owner = table index)

# the design object of each Kvm in this process (handlers find their design through it)
BY_KVM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def design_for(kvm) -> NestedDesign:
    """This process' AVIC design for ``kvm`` (attaching the region and building one if a process
    walks the notifiers without having made a design, e.g. a coordinator deleting a memslot)."""
    d = BY_KVM.get(kvm)
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
        self.design = design_for(kvm)
        reader = kvm.guest_mode.reader
        self.in_guest_mode = reader.nesting if reader is not None else (lambda: 0)

    def _write(self, gpa: int, fn, *args) -> None:
        """The design's track_write ``fn(*args)``, outside guest mode; then the write is done."""
        if self.in_guest_mode():
            _outside_guest_mode(self.kvm, self.design, gpa, fn, *args)
        else:
            fn(*args)
        self._done()

    def _done(self) -> None:
        """The callback returns: every reload request its erases made was waited for."""
        if self.design.reload_owed:
            oracle.check_write_done(self.design)


@notifier.notifier_kind(AVIC_SHARED_KIND)
class AvicSharedNotifier(_AvicNotifier):
    """The one shared node of mutex-hash / rcu-list: dispatches to this process' design."""

    def track_write(self, gpa: int, new: bytes, nbytes: int, node: int) -> None:
        self._write(gpa, self.design.track_write, gpa, nbytes, node, new)

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        self.design.remove_region(gfn, nr_pages, -1)
        self._done()


@notifier.notifier_kind(AVIC_TABLE_KIND)
class AvicTableNotifier(_AvicNotifier):
    """A per-table node (per-table-notifier): ``owner`` is the table; no lookup at all."""

    def track_write(self, gpa: int, new: bytes, nbytes: int, node: int) -> None:
        self._write(gpa, self.design.table_track_write, self.owner, gpa, nbytes, node, new)

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        self.design.remove_region(gfn, nr_pages, self.owner)
        self._done()
