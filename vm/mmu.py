"""KVM's own shadow-MMU page-track notifier, as the seed's kernel (v6.0) has it (``--page-track v6.0``).

arch/x86/kvm/mmu/mmu.c, v6.0, ``kvm_mmu_init_vm`` (called from ``kvm_arch_init_vm`` at VM creation):

    node->track_write = kvm_mmu_pte_write;
    node->track_flush_slot = kvm_mmu_invalidate_zap_pages_in_memslot;
    kvm_page_track_register_notifier(kvm, node);

and ``kvm_mmu_uninit_vm`` unregisters it. So before v6.6 the notifier list is never empty: every
emulated RAM write walks at least this node, and ``kvm_page_track_write``'s "empty list: return"
never runs. ``kvm_mmu_pte_write`` begins with ``if (!READ_ONCE(vcpu->kvm->arch.indirect_shadow_pages))
return;`` — the model has no indirect (shadow) MMU pages, so its handler is that early return: one
walk step, one Python call, counted (``mmu_pte_write``). Sean's v6.6 cleanup ("KVM: x86/mmu: Don't
bounce through page-track mechanism for guest PTEs") calls ``kvm_mmu_track_write`` directly from
``kvm_page_track_write`` instead, so ``--page-track v6.6`` registers nothing here.
"""

from __future__ import annotations

from vm import layout as L
from vm import notifier

KVM_MMU_KIND = 2  # notifier kind of KVM's own node (kvm->arch.mmu_sp_tracker)


def _bind_pte_write(counts: list, c_calls: int):
    """``kvm_mmu_pte_write``, a closure over its bound state (no attribute loads per call)."""
    def track_write(gpa: int, new: bytes, nbytes: int, node: int) -> None:
        # kvm_mmu_pte_write: no indirect shadow pages in this model -> return at once
        counts[c_calls] += 1
    return track_write


@notifier.notifier_kind(KVM_MMU_KIND)
class KvmMmuNotifier(notifier.NotifierNode):
    """``kvm->arch.mmu_sp_tracker``: ``track_write = kvm_mmu_pte_write``."""

    def __init__(self, kvm, node: int, owner: int):
        super().__init__(kvm, node, owner)
        self.track_write = _bind_pte_write(kvm.counts, L.C["mmu_pte_write"])

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        pass  # kvm_mmu_invalidate_zap_pages_in_memslot: no shadow pages to zap


def kvm_mmu_init_vm(kvm) -> int:
    """Register KVM's own node (v6.0) and remember it (``kvm->arch.mmu_sp_tracker``: ``NH_MMU_NODE``,
    in shm so every process finds the same node); returns its index."""
    node = notifier.alloc_node(kvm, KVM_MMU_KIND, 0)
    kvm.mem.store(kvm.notifier_w + L.NH_MMU_NODE, node + 1)
    notifier.kvm_page_track_register_notifier(kvm, node)
    return node


def kvm_mmu_uninit_vm(kvm) -> None:
    """Unregister and free KVM's own node, if there is one (VM destruction)."""
    node = mmu_node(kvm)
    if node >= 0:
        kvm.mem.store(kvm.notifier_w + L.NH_MMU_NODE, 0)
        notifier.release_node(kvm, node)


def mmu_node(kvm) -> int:
    """Index of KVM's own node, -1 if there is none (v6.6, or after ``kvm_mmu_uninit_vm``)."""
    return kvm.mem.load(kvm.notifier_w + L.NH_MMU_NODE) - 1
