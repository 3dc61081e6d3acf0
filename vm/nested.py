"""Nested virtualization designs: what a vCPU does around nested VMRUN / VMEXIT, and which
guest writes are the "tracked" ones. A design is selected by name (``--design``).

Guest-memory map used by every design (gfns):
- ``table_gfn(l2)``: the L2's ``avic_physical_id`` table page (top of memory, one page per L2)
- ``tracked_gfns``: pages the ``mirror`` design tracks (bottom, from gfn 1)
- everything between: ordinary memory for untracked writes
MMIO: gpas above guest memory (e.g. the APIC page at 0xFEE00000).

Interface (called in the vCPU process on shared memory, except ``setup``/``oracle``/``teardown``,
which the coordinator calls):
- ``setup()``                         coordinator, after the VM is created, before vCPUs start
- ``vcpu_init(vcpu)``                 in the vCPU process, once
- ``nested_vmrun(vcpu, l2)``          enter L2 (AVIC get / attach the table)
- ``nested_vmexit(vcpu, l2, leaving)``  leave L2; ``leaving`` = L1 will switch to another L2
- ``vcpu_load(vcpu)`` / ``vcpu_put(vcpu)``  L1 vCPU scheduled in / out
- ``tracked_write(vcpu, rng) -> (gpa, bytes)``  pick the design's tracked guest write
- ``oracle() -> list[str]``            coordinator, vCPUs stopped: violations (empty = good)
- ``teardown()``                      coordinator
"""

from __future__ import annotations

import random

from vm import mirror, mmu, notifier
from vm.page_track import PAGE_SHIFT, kvm_page_track_write_tracking_enable

DESIGNS: dict[str, type] = {}


def design(name: str):
    def deco(cls):
        DESIGNS[name] = cls
        cls.name = name
        return cls

    return deco


def table_gfn(cfg, l2: int) -> int:
    return cfg.memory_pages - 1 - l2


def tracked_gfns(cfg) -> list[int]:
    return list(range(1, 1 + cfg.tracked_pages))


def untracked_range(cfg) -> tuple[int, int]:
    """[lo, hi) gfns never tracked by any design."""
    return 1 + cfg.tracked_pages, cfg.memory_pages - cfg.l2s


class NestedDesign:
    name = "base"

    def __init__(self, kvm, cfg):
        self.kvm = kvm
        self.cfg = cfg

    @classmethod
    def region_layouts(cls, cfg) -> tuple:
        """The shm regions this design creates beside the VM's own (vm/layout.py), for the run's
        shared-memory budget (``Config.check_budget``): a wing hands its sizes to the VM here, so
        that nothing in vm/ outside the wing imports it."""
        return ()

    def setup(self) -> None:
        kvm_page_track_write_tracking_enable(self.kvm)

    def vcpu_init(self, vcpu: int) -> None:
        pass

    def nested_vmrun(self, vcpu: int, l2: int) -> None:
        pass

    def nested_vmexit(self, vcpu: int, l2: int, leaving: bool) -> None:
        pass

    def vcpu_load(self, vcpu: int) -> None:
        pass

    def vcpu_put(self, vcpu: int) -> None:
        pass

    def tracked_write(self, vcpu: int, rng: random.Random) -> tuple[int, bytes]:
        raise NotImplementedError

    def oracle(self) -> list[str]:
        return []

    def sample(self) -> None:
        """Coordinator, while the vCPUs run: check what can be checked from outside (WARN on a
        violation); called every progress tick."""

    def teardown(self) -> None:
        """Undo kernel state (unregister, untrack); may take locks. Skipped after a vCPU died."""

    def close(self) -> None:
        """Release the design's own shm (never blocks); always called, after teardown."""

    def stats(self) -> dict:
        return {}


@design("mirror")
class MirrorDesign(NestedDesign):
    """No AVIC: ``notifiers`` mirror notifiers track ``tracked_pages`` pages; each vCPU writes its
    own 8-byte lane of them (lanes never overlap, so the mirror oracle is exact)."""

    def setup(self) -> None:
        super().setup()
        kvm = self.kvm
        self.nodes = []
        for _ in range(self.cfg.notifiers):
            n = notifier.alloc_node(kvm, mirror.MIRROR_KIND, 0)
            notifier.kvm_page_track_register_notifier(kvm, n)
            self.nodes.append(n)
        for gfn in tracked_gfns(self.cfg):
            mirror.mirror_track(kvm, gfn)

    def vcpu_init(self, vcpu: int) -> None:
        self.gfns = tracked_gfns(self.cfg)
        self.lane = (vcpu % 512) * 8
        mirror.enable_write_accounting(self.kvm)  # every emulated write checked (vm/mirror.py)

    def tracked_write(self, vcpu: int, rng: random.Random) -> tuple[int, bytes]:
        gfn = self.gfns[int(rng.random() * len(self.gfns))] if self.gfns else 1
        return (gfn << PAGE_SHIFT) + self.lane, rng.getrandbits(64).to_bytes(8, "little")

    def oracle(self) -> list[str]:
        return mirror.oracle(self.kvm) + mirror.accounting_oracle(self.kvm)

    def stats(self) -> dict:
        return {"accounting": mirror.accounting_totals(self.kvm)}

    def teardown(self) -> None:
        kvm = self.kvm
        for n in getattr(self, "nodes", []):
            notifier.release_node(kvm, n)  # every registration it still holds, then free


def make_design(kvm, cfg) -> NestedDesign:
    """The design ``cfg.design`` names. The nested AVIC designs register themselves when
    ``vm.avic`` is imported, which the composition roots do (launch.py, vcpu/worker.py); vm/ never
    imports the wing from here (no import circle)."""
    try:
        cls = DESIGNS[cfg.design]
    except KeyError:
        hint = "" if "mutex-hash" in DESIGNS else " (import vm.avic to register the nested AVIC designs)"
        raise ValueError(f"design {cfg.design!r} is not available (have: {', '.join(sorted(DESIGNS))}){hint}") \
            from None
    cfg.check_budget()  # now with the design's own regions (the wing may not have been imported at parse)
    return cls(kvm, cfg)


def destroy_vm(kvm, design: NestedDesign | None) -> list[str]:
    """VM destruction, vCPUs stopped (nobody else holds a lock): the design's teardown (unregister,
    untrack, free), then ``kvm_mmu_uninit_vm`` (KVM's own node, v6.0), then the v6.6 leak check
    (``notifier.registered_at_destroy``). Returns what went wrong -- a failed step (a lockdep splat
    is one), a registration left -- as FAILURE reasons; each step runs even if the one before failed.
    WARNs go where the caller's VM sends them. The run's coordinator and explore's schedule call it
    before their verdict."""
    reasons = []
    for what, fn in (("design teardown", design.teardown if design is not None else None),
                     ("kvm_mmu_uninit_vm", lambda: mmu.kvm_mmu_uninit_vm(kvm))):
        try:
            if fn is not None:
                fn()
        except Exception as e:  # teardown must not hide the run's outcome: it is part of it
            reasons.append(f"{what} failed: {e!r}")
    # (after a failed step the nodes it did not release say nothing new)
    return reasons or notifier.registered_at_destroy(kvm)
