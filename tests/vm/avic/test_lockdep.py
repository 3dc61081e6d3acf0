"""The nested AVIC wing's lockdep-style assertions and its KVM_REQUEST_WAIT check at a notifier
callback's return, each shown to fire on the bug it exists for (the caller's lock pair, read-side
section or wait dropped, injected by replacing the caller's lock / domain / wait in this process)
and to stay quiet on the code that is right. (tests/vm/avic/test_avic.py is at its size limit.)"""

from __future__ import annotations

import pytest
import test_avic
from test_avic import PAGE, guest, tables, write_entry

from ipc.locks import LockdepError
from vm.avic import guest_write
from vm.avic.table import AVIC_BACKING_MASK, V_INL2, VW
from vm.nested import table_gfn, untracked_range
from vm.page_track import kvm_page_track_delete_slot


class _Dropped:
    """A caller's lock pair dropped (the bug): ``lock`` / ``unlock`` do nothing; the held query
    asks the real lock."""

    def __init__(self, lk):
        self.lk = lk

    def lock(self, *a):
        pass

    def unlock(self):
        pass

    def is_held(self):
        return self.lk.is_held()

    def owner(self):
        return self.lk.owner()


avm = test_avic.avm  # the fixture: a VM with a design set up, torn down after


def _warns(kvm, kind):
    return [m for k, m, _ in kvm.events if k == kind]


@pytest.mark.parametrize("design, lock", [("mutex-hash", "avic_physid_lock"), ("rcu-list", "avic_table_lock")])
def test_isrunning_flip_asserts_the_entries_lock(avm, design, lock):
    kvm, d = avm(design)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    d.vcpu_put(0)  # right: under the lock
    d.vcpu_load(0)
    assert d.oracle() == []
    t = tables(d)[table_gfn(d.cfg, 0)]
    with pytest.raises(LockdepError, match=lock):
        d._flip_running(t, 0, False)  # what _set_running does once its lock pair is dropped
    if design == "mutex-hash":  # the caller's pair dropped: the first vcpu_put fails at once
        d.physid_lock = _Dropped(d.physid_lock)
        with pytest.raises(LockdepError, match=lock):
            d.vcpu_put(0)
        d.physid_lock = d.physid_lock.lk


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list"])
def test_shared_node_users_and_registration_assert_the_notifier_lock(avm, design):
    kvm, d = avm(design)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, True)  # first and last user: register, unregister, both under the lock
    assert d.oracle() == []
    d.notifier_lock = _Dropped(d.notifier_lock)  # _notifier_get / _notifier_put without their pair
    try:
        with pytest.raises(LockdepError, match="avic_notifier_lock"):
            d._notifier_put()
        with pytest.raises(LockdepError, match="avic_notifier_lock"):
            d._register(0, "test")
    finally:
        d.notifier_lock = d.notifier_lock.lk


def test_per_table_registration_asserts_tables_lock(avm):
    kvm, d = avm("per-table-notifier")
    d.nested_vmrun(0, 0)  # registered under tables_lock at create: fine
    t = tables(d)[table_gfn(d.cfg, 0)]
    with pytest.raises(LockdepError, match="tables_lock"):
        d._unregister(d._node(t))
    d.nested_vmexit(0, 0, True)
    assert d.oracle() == []


def test_rcu_list_walk_asserts_a_reader_or_the_spinlock(avm, monkeypatch):
    kvm, d = avm("rcu-list")
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    with pytest.raises(LockdepError, match="non-reader section"):
        d._lookup(gfn)
    kvm.rcu.read_lock()
    try:
        assert d._lookup(gfn) >= 0
    finally:
        kvm.rcu.read_unlock()
    d.tables_spin.lock()
    try:
        assert d._lookup(gfn) >= 0
    finally:
        d.tables_spin.unlock()
    # _get_ref's read-side pair dropped: the next new reference fails at its lookup
    monkeypatch.setattr(kvm.rcu, "read_lock", lambda: None)
    monkeypatch.setattr(kvm.rcu, "read_unlock", lambda: None)
    with pytest.raises(LockdepError, match="avic_tables traversed"):
        d.nested_vmrun(1, 0)
    monkeypatch.undo()
    d.nested_vmexit(0, 0, False)


def test_store_through_the_writable_mapping_asserts_guest_mode(avm, monkeypatch):
    kvm, d = avm("mutex-hash")
    lo, _ = untracked_range(d.cfg)
    assert guest_write(kvm, lo * PAGE, bytes(range(8))) is False  # untracked RAM, inside guest mode
    monkeypatch.setattr(kvm.guest_mode, "read_lock", lambda: None)  # guest_write's section dropped
    monkeypatch.setattr(kvm.guest_mode, "read_unlock", lambda: None)
    with pytest.raises(LockdepError, match="outside guest mode"):
        guest_write(kvm, lo * PAGE, bytes(8))


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list", "per-table-notifier"])
@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("erase", ["write", "delete_slot"])
def test_a_write_that_completes_before_its_kicked_vcpu_left_l2_is_caught(avm, design, wait, erase, monkeypatch):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(1, 0)  # vCPU 1 in L2 on the table
    if not wait:  # the caller's KVM_REQUEST_WAIT dropped (_table_write's, or remove_region's)
        monkeypatch.setattr(d, "_reload_wait", lambda t, targets: None)
    if erase == "write":  # an L1 store giving entry 1 a new backing page
        write_entry(kvm, gfn, 1, guest(kvm, gfn, 1) ^ (AVIC_BACKING_MASK & -AVIC_BACKING_MASK))
    else:  # the memslot holding the table goes away (track_remove_region)
        kvm_page_track_delete_slot(kvm, d.cfg.memslots - 1)
    in_l2 = d.amem.load(d.vw0 + 1 * VW + V_INL2) != 0
    found = _warns(kvm, "l2_on_erased_table")
    bad = [b for b in d.oracle() if "KVM_REQUEST_WAIT" in b]
    if wait:
        assert not in_l2 and not found and not bad  # kicked out of L2 before the write completed
    else:
        assert in_l2 and len(found) == 1 and "vCPU 1 still in L2" in found[0] and bad, (found, bad)
    d.nested_vmexit(1, 0, False)


@pytest.mark.parametrize("design, lock", [("mutex-hash", "avic_physid_lock"), ("rcu-list", "avic_table_lock")])
def test_the_last_put_marks_retiring_under_the_entries_lock(avm, design, lock):
    """A last put that marks its table RETIRING without the table's entries lock (the lock pair of
    _put dropped) could let a remove_region that checked VALID under that lock erase a freed table:
    _retire asserts the lock, so the bug fails at the first last put."""
    kvm, d = avm(design)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, True)  # right: the last put, under the lock
    assert d.oracle() == []
    d.nested_vmrun(0, 0)
    t = tables(d)[table_gfn(d.cfg, 0)]
    with pytest.raises(LockdepError, match=lock):
        d._retire(t)  # what _put does once its _tlock / _tunlock pair is dropped
