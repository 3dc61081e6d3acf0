"""KVM's own shadow-MMU page-track notifier, as the seed's kernel (v6.0) has it (``--page-track v6.0``).

arch/x86/kvm/mmu/mmu.c, v6.0, ``kvm_mmu_init_vm`` (called from ``kvm_arch_init_vm`` at VM creation):

    node->track_write = kvm_mmu_pte_write;
    node->track_flush_slot = kvm_mmu_invalidate_zap_pages_in_memslot;
    kvm_page_track_register_notifier(kvm, node);

and ``kvm_mmu_uninit_vm`` unregisters it. So before v6.6 the notifier list is never empty: every
emulated RAM write walks at least this node, and ``kvm_page_track_write``'s "empty list: return"
never runs. Sean's v6.6 cleanup ("KVM: x86/mmu: Don't bounce through page-track mechanism for guest
PTEs") calls ``kvm_mmu_track_write`` directly from ``kvm_page_track_write``, after the external
notifiers' walk, whether or not the list is empty; so ``--page-track v6.6`` registers nothing here
and the write path calls the same handler (vm/write_path.py).

The handler (v6.0 ``kvm_mmu_pte_write``, v6.6 ``kvm_mmu_track_write``, arch/x86/kvm/mmu/mmu.c)::

    if (!READ_ONCE(vcpu->kvm->arch.indirect_shadow_pages))
            return;
    write_lock(&vcpu->kvm->mmu_lock);
    ... for_each_gfn_valid_sp_with_gptes(): zap / update the shadow PTEs of guest page tables on gfn
    write_unlock(&vcpu->kvm->mmu_lock);

Nested AVIC needs nested NPT, and L2 runs on shadow (nested) NPT: once a vCPU has entered L2 its
shadow pages exist (``account_shadowed`` under mmu_lock for write; here ``kvm_mmu_account_nested``,
at each vCPU's first L2 entry, ``F_INDIRECT_SP``), and from then on every emulated RAM write takes
``mmu_lock`` for write — a VM-wide lock on the write path of every design (counted:
``mmu_pte_write`` calls, ``mmu_lock_write`` of them locked). The model's tracked pages are physid
tables and mirror pages, never guest page tables, so the locked section finds no shadow page to
zap: the lock is taken and released, as in KVM for such a gfn. ``--indirect-shadow-pages 0`` models
a VM without them (the early return on every write).
"""

from __future__ import annotations

from vm import layout as L
from vm import notifier

KVM_MMU_KIND = 2  # notifier kind of KVM's own node (kvm->arch.mmu_sp_tracker)


def bind_locked(kvm):
    """The handler's part past the early return, bound to ``kvm`` in this process:
    ``write_lock(&kvm->mmu_lock)``, no shadow page of a guest page table on the gfn to zap,
    ``write_unlock``; counted (``mmu_lock_write``)."""
    counts, c_locked = kvm.counts, L.C["mmu_lock_write"]
    lock, unlock = kvm.mmu_lock.lock, kvm.mmu_lock.unlock

    def locked() -> None:
        lock()
        counts[c_locked] += 1
        unlock()
    return locked


def bind_track_write(kvm):
    """``kvm_mmu_pte_write`` (v6.0, KVM's node on the list) of ``kvm`` in this process, a closure
    over its bound state (no attribute loads per call). v6.6's ``kvm_mmu_track_write`` is the same
    handler, inlined in the write path (vm/write_path.py): its early return there, this ``locked``."""
    counts, c_calls = kvm.counts, L.C["mmu_pte_write"]
    load, isp_w = kvm.mem.load, kvm.flags_w + L.F_INDIRECT_SP
    locked = bind_locked(kvm)

    def track_write(gpa: int, new: bytes, nbytes: int, node: int) -> None:
        counts[c_calls] += 1
        if load(isp_w):  # READ_ONCE(kvm->arch.indirect_shadow_pages) != 0
            locked()
    return track_write


def kvm_mmu_account_nested(kvm) -> None:
    """A vCPU's first entry into L2 builds its nested NPT shadow pages (``account_shadowed``:
    ``indirect_shadow_pages++`` under mmu_lock for write), unless ``--indirect-shadow-pages 0``."""
    if kvm.cfg.indirect_shadow_pages == "0":
        return
    with kvm.mmu_lock:
        kvm.mem.fetch_add(kvm.flags_w + L.F_INDIRECT_SP, 1)


@notifier.notifier_kind(KVM_MMU_KIND)
class KvmMmuNotifier(notifier.NotifierNode):
    """``kvm->arch.mmu_sp_tracker``: ``track_write = kvm_mmu_pte_write``."""

    def __init__(self, kvm, node: int, owner: int):
        super().__init__(kvm, node, owner)
        self.track_write = bind_track_write(kvm)

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
