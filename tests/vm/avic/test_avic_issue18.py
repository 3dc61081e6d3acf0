# ruff: noqa: F811  (the avm fixture, imported from test_avic, is a parameter of each test)
"""Issue 18: the disputed paths as RFC v3 and the kernel run them (mutex-hash's VMRUN fast path, the
v6.6 KVM_BUG_ON, memslot removal by backing page, RFC v3's gentry + memcpy entry update)."""

from __future__ import annotations

import pytest
from test_avic import (  # noqa: F401  (avm: fixture)
    PAGE,
    _acq,
    avm,
    designs,
    entry_gpa,
    guest,
    shadow,
    stat,
    state,
    tables,
    write_entry,
)

from vm.avic.table import (
    AVIC_BACKING_MASK,
    AVIC_IS_RUNNING,
    AVIC_UPDATABLE,
    DROPPED,
    V_INL2,
    VALID,
    VW,
    make_entry,
    s64,
)
from vm.nested import table_gfn, untracked_range
from vm.page_track import kvm_page_track_delete_slot


@pytest.mark.parametrize("entry_update", ["reread", "gentry"])
def test_two_writers_of_one_entry_gentry_keeps_the_older_store(avm, entry_update):
    """Two L1 vCPUs store to one entry, A then B, and their emulated writes reach the notifier in the
    other order (B's handler, then A's). Re-reading guest memory (default) ends with B's value; RFC v3's
    cached gentry + memcpy of the written bytes ends with A's: a lost write the oracle reports."""
    from vm.page_track import kvm_page_track_write
    kvm, d = avm("mutex-hash", entry_update=entry_update)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    g = guest(kvm, gfn, 1)
    a = ((g & ~AVIC_UPDATABLE) | 0).to_bytes(8, "little")
    b = ((g & ~AVIC_UPDATABLE) | 1 | AVIC_IS_RUNNING).to_bytes(8, "little")
    gpa = entry_gpa(gfn, 1)
    kvm.guest_mem.store(gpa >> 3, s64(int.from_bytes(a, "little")))  # A's store lands
    kvm.guest_mem.store(gpa >> 3, s64(int.from_bytes(b, "little")))  # B's store lands
    kvm_page_track_write(kvm, gpa, b)  # B's handler runs first under tables_lock
    kvm_page_track_write(kvm, gpa, a)  # then A's
    bad = [f for f in d.oracle() if "lost write" in f]
    if entry_update == "reread":
        assert bad == [] and shadow(d, tables(d)[gfn], 1) == d._translate(int.from_bytes(b, "little"))
    else:
        assert bad and "entry 1" in bad[0], bad


@designs
def test_memslot_removal_erases_tables_with_a_backing_page_in_it(avm, design):
    """RFC v3 avic_physid_shadow_table_flush_memslot: not only the table whose own page is in the slot,
    every table any of whose entries' backing pages is (its pinned pages would be gone)."""
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    t = tables(d)[gfn]
    ms = kvm.vm.v["memslots"]
    base0, n0 = int(ms[0, 0]), int(ms[0, 1])
    assert not base0 <= gfn < base0 + n0, "the table's own page is not in slot 0"
    assert any(base0 <= (guest(kvm, gfn, e) & AVIC_BACKING_MASK) >> 12 < base0 + n0 for e in range(d.ne))
    del ms
    kvm_page_track_delete_slot(kvm, 0)
    assert state(d, t) == DROPPED and kvm.gfn_track[gfn] == 0 and stat(d, "invalidate") == 1


@pytest.mark.parametrize("design", ["mutex-hash", "per-table-notifier"])
def test_split_under_v66_is_a_kvm_bug_not_a_lost_write(avm, design):
    """v6.6 __kvm_write_track_add_gfn: KVM_BUG_ON(!kvm_page_track_write_tracking_enabled(kvm)): the
    VM is killed; no vCPU enters L2 on the unprotected table, so no write can be lost on it."""
    kvm, d = avm(design, registration="split", page_track="v6.6")
    d.nested_vmrun(1, 1)
    assert kvm.vm_dead
    bugs = [m for k, m, _ in kvm.events if k == "kvm_bug_on"]
    assert len(bugs) == 1 and "KVM_BUG_ON: write tracking not enabled" in bugs[0]
    assert not any(k == "tracking_disabled" for k, _, _ in kvm.events)
    assert d.amem.load(d.vw0 + 1 * VW + V_INL2) == 0, "vCPU 1 did not enter L2"
    assert all(st != VALID for st in (state(d, t) for t in tables(d).values()))
    assert not any("lost write" in f for f in d.oracle())


@pytest.mark.parametrize("design", ["mutex-hash", "per-table-notifier"])
@pytest.mark.parametrize("vmrun_lock", ["change", "every"])
def test_mutex_nested_vmrun_takes_tables_lock_only_on_a_change(avm, design, vmrun_lock):
    """RFC v3 13/19 nested_vmcb02_prepare_avic: same physid gfn, table held -> atomic_inc(usecount),
    no tables_lock (``--avic-vmrun-lock every``: the mutex on every VMRUN, as this model had it)."""
    kvm, d = avm(design, avic_vmrun_lock=vmrun_lock)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    m0 = _acq(kvm, "tables_lock")
    for _ in range(100):
        d.nested_vmrun(0, 0)
        d.nested_vmexit(0, 0, False)
    if vmrun_lock == "change":
        assert _acq(kvm, "tables_lock") - m0 <= 1, "<= 1 % of 100 nested VMRUNs take tables_lock"
        assert stat(d, "vmrun_nolock") == 100
    else:
        assert _acq(kvm, "tables_lock") == m0 + 100
    d.nested_vmrun(0, 1)  # a table change (switching L2): the slow path, under the mutex
    assert _acq(kvm, "tables_lock") > m0 + (100 if vmrun_lock == "every" else 0)
    # an erased table needs a sync: the next VMRUN takes the mutex and re-shadows it
    t = tables(d)[table_gfn(d.cfg, 1)]
    gfn = table_gfn(d.cfg, 1)
    lo, _ = untracked_range(d.cfg)
    d.nested_vmexit(0, 1, False)
    assert write_entry(kvm, gfn, 0, make_entry((lo + 7) * PAGE, 0, False))
    assert state(d, t) == DROPPED
    m1 = _acq(kvm, "tables_lock")
    d.nested_vmrun(0, 1)
    assert state(d, t) == VALID and _acq(kvm, "tables_lock") == m1 + 1
    d.nested_vmexit(0, 1, False)
    assert d.oracle() == []


@designs
def test_isrunning_flips_visit_only_the_tables_that_name_the_vcpu(avm, design):
    """RFC v3 physid_ref_entries: vcpu_load / put reach the entries that name the vCPU without
    scanning every table; here per-vCPU reference counts per table (``vref``), kept by sync, entry
    update and erase, checked by the final oracle."""
    kvm, d = avm(design, vcpus=3)
    g0, g1 = table_gfn(d.cfg, 0), table_gfn(d.cfg, 1)
    d.nested_vmrun(0, 0)
    d.nested_vmrun(1, 1)
    t0, t1 = tables(d)[g0], tables(d)[g1]

    def refs(v, t):
        return d.amem.load(d.vref0 + v * d.nt + t)

    assert refs(2, t0) == 1 and refs(2, t1) == 1  # setup: entry e names vCPU e % vcpus
    # L1 moves entry 2 of L2 0's table to vCPU 0, running: vCPU 2 is no longer named there
    g = guest(kvm, g0, 2)
    assert write_entry(kvm, g0, 2, (g & ~AVIC_UPDATABLE) | 0 | AVIC_IS_RUNNING)
    assert refs(2, t0) == 0 and refs(0, t0) == 2 and d.oracle() == []
    visited = []
    flip = d._flip_running
    d._flip_running = lambda t, v, running: visited.append(t) or flip(t, v, running)
    d.vcpu_put(2)
    assert visited == [t1], "only the table that still names vCPU 2"
    visited.clear()
    d.vcpu_put(0)
    assert sorted(visited) == sorted({t0, t1}) and not shadow(d, t0, 2) & AVIC_IS_RUNNING
    d.vcpu_load(0)
    assert shadow(d, t0, 2) & AVIC_IS_RUNNING, "IsRunning back in the moved entry"
    # an erase drops the table's references
    lo, _ = untracked_range(d.cfg)
    d.nested_vmexit(0, 0, False)
    assert write_entry(kvm, g0, 1, make_entry((lo + 3) * PAGE, 1, False))
    assert state(d, t0) == DROPPED and all(refs(v, t0) == 0 for v in range(3))
    d.nested_vmexit(1, 1, False)
    assert d.oracle() == []
