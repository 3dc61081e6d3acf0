"""Nested AVIC shadow physid tables (vm/avic/): unit tests per design, in one process.

vCPU ids are just arguments here (one process plays every vCPU); the multiprocess stress runs are
in test_avic_stress.py, the scripted kaboom in test_avic_kaboom.py.
"""

from __future__ import annotations

import os
import random

import pytest

from ipc.locks import LockdepError
from vm import layout as L
from vm import notifier
from vm.avic import AVIC_DESIGNS, guest_write
from vm.avic.table import (
    AVIC_IS_RUNNING,
    AVIC_UPDATABLE,
    AVIC_VALID,
    DROPPED,
    DUMMY_HPA,
    FLOOD_PER_ENTRY,
    H_NODE,
    HPA_BASE,
    LIVE,
    NO_HOST_APIC,
    POISON,
    POISON_ENTRY,
    T_GEN,
    T_GFN,
    T_NODE,
    T_REF,
    T_STATE,
    T_USE,
    V_INL2,
    V_RELOAD,
    VALID,
    VW,
    S,
    host_apic_id,
    make_entry,
    s64,
    u64,
)
from vm.config import Config
from vm.kvm import Kvm
from vm.nested import make_design, table_gfn, untracked_range
from vm.page_track import kvm_page_track_delete_slot, kvm_page_track_write_tracking_enabled

PAGE = 4096


@pytest.fixture
def avm(run_id):
    """``make(design, registration="refcount", hooks=(), **cfg)`` -> (kvm, design): a VM with the
    design set up and every vCPU initialised and loaded; torn down, closed and unlinked after."""
    made = []

    def make(design, registration="refcount", hooks=(), **kw):
        kw.setdefault("vcpus", 2)
        kw.setdefault("l2s", 4)
        kw.setdefault("fuzz", "off")  # in-process unit tests: deterministic, no race widening
        kw.setdefault("page_track", "v6.6")  # the lists hold the designs' nodes only (v6.0: + KVM's own)
        cfg = Config(design=design, registration=registration, **kw)
        kvm = Kvm.create(cfg, run_id, frozenset(hooks))
        d = None
        try:
            d = make_design(kvm, cfg)
            made.append((kvm, d))
            d.setup()
            for v in range(cfg.vcpus):
                d.vcpu_init(v)
                d.vcpu_load(v)
        except BaseException:
            if not made or made[-1][0] is not kvm:
                kvm.close()
            raise
        return kvm, d

    yield make
    for kvm, d in made:
        try:
            d.teardown()
        finally:
            d.close()
            kvm.close()


# -- helpers ------------------------------------------------------------------------------------------
def tables(d) -> dict[int, int]:
    """gfn -> slot of every live table."""
    out = {}
    for t in range(d.nt):
        if d.amem.load(d._tb(t) + T_STATE) in LIVE:
            out[d.amem.load(d._tb(t) + T_GFN)] = t
    return out


def word(d, t, w):
    return d.amem.load(d._tb(t) + w)


def state(d, t):
    return word(d, t, T_STATE)


def shadow(d, t, e):
    return u64(d.amem.load(d.shadow0 + t * d.ne + e))


def guest(kvm, gfn, e):
    return u64(kvm.guest_mem.load((gfn << 9) + e))


def stat(d, name):
    return int(d.region.v["stats"][:, S[name]].sum())


def count(kvm, name):
    return kvm.counts[L.C[name]]


def entry_gpa(gfn, e):
    return gfn * PAGE + e * 8


def write_entry(kvm, gfn, e, value, nbytes=8, offset=0):
    """An L1 store of ``value``'s bytes [offset, offset + nbytes) to entry ``e``."""
    data = value.to_bytes(8, "little")[offset:offset + nbytes]
    return guest_write(kvm, entry_gpa(gfn, e) + offset, data)


def assert_synced(kvm, d, t):
    gfn = word(d, t, T_GFN)
    for e in range(d.ne):
        g = guest(kvm, gfn, e)
        assert shadow(d, t, e) == d._translate(g), f"entry {e}: guest {g:#x}"


def node_live(kvm, d, t) -> bool:
    node = (word(d, t, T_NODE) if not d.shared_node else d.amem.load(d.hdr0 + H_NODE)) - 1
    return node >= 0 and notifier.node_state(kvm, node) == L.NODE_LIVE


designs = pytest.mark.parametrize("design", AVIC_DESIGNS)


# -- translation ---------------------------------------------------------------------------------------
def test_entry_translation(avm):
    kvm, d = avm("mutex-hash", vcpus=3)
    lo, _ = untracked_range(d.cfg)
    gpa = (lo + 5) * PAGE
    assert d._translate(0) == 0
    assert d._translate(make_entry(gpa, 1, True, valid=False)) == 0
    e = d._translate(make_entry(gpa, 1, False))
    assert e == AVIC_VALID | (HPA_BASE + gpa) | host_apic_id(1)
    # IsRunning = guest IsRunning AND the mapped L1 vCPU is loaded
    assert d._translate(make_entry(gpa, 1, True)) == e | AVIC_IS_RUNNING
    d.vcpu_put(1)
    assert d._translate(make_entry(gpa, 1, True)) == e
    # a backing page outside guest RAM -> the dummy page; an apic id naming no L1 vCPU -> 0xFF
    bad = d._translate(make_entry((d.mem_pages + 7) * PAGE, 0, False))
    assert bad == AVIC_VALID | DUMMY_HPA | host_apic_id(0)
    assert d._translate(make_entry(gpa, 200, True)) == AVIC_VALID | (HPA_BASE + gpa) | NO_HOST_APIC
    assert s64(u64(-1)) == -1 and u64(s64(AVIC_VALID | 5)) == AVIC_VALID | 5


# -- get / put ---------------------------------------------------------------------------------------
@designs
def test_vmrun_creates_tracks_and_syncs_table(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    assert tables(d) == {} and kvm.gfn_track[gfn] == 0
    d.nested_vmrun(0, 0)
    t = tables(d)[gfn]
    assert state(d, t) == VALID
    assert (word(d, t, T_REF), word(d, t, T_USE)) == (1, 1)
    assert kvm.gfn_track[gfn] == 1, "the table page is write-tracked"
    assert node_live(kvm, d, t), "the AVIC notifier is registered"
    assert_synced(kvm, d, t)
    assert count(kvm, "table_create") == 1 and stat(d, "sync") == 1
    d.nested_vmexit(0, 0, False)
    assert (word(d, t, T_REF), word(d, t, T_USE)) == (1, 0)
    d.nested_vmrun(0, 0)  # same L2: same table, no new sync
    assert tables(d) == {gfn: t} and stat(d, "sync") == 1 and count(kvm, "table_create") == 1
    d.nested_vmexit(0, 0, False)
    assert d.oracle() == []


@designs
def test_refcount_usecount_and_free_at_zero(avm, design):
    kvm, d = avm(design, vcpus=3)
    gfn = table_gfn(d.cfg, 1)
    d.nested_vmrun(0, 1)
    d.nested_vmrun(1, 1)
    t = tables(d)[gfn]
    assert tables(d) == {gfn: t}, "one table per gfn, shared by its users"
    assert (word(d, t, T_REF), word(d, t, T_USE)) == (2, 2)
    d.nested_vmexit(1, 1, False)
    assert (word(d, t, T_REF), word(d, t, T_USE)) == (2, 1)
    d.nested_vmexit(0, 1, True)  # vCPU 0 leaves the L2: drops its reference
    assert (word(d, t, T_REF), word(d, t, T_USE)) == (1, 0)
    assert state(d, t) == VALID and kvm.gfn_track[gfn] == 1 and node_live(kvm, d, t)
    assert d.oracle() == []
    d.nested_vmrun(1, 1)
    d.nested_vmexit(1, 1, True)  # last reference: freed, untracked, notifier gone, poisoned
    assert tables(d) == {}
    assert state(d, t) == POISON and word(d, t, T_REF) < 0
    assert u64(d.amem.load(d.shadow0 + t * d.ne)) == POISON_ENTRY
    assert kvm.gfn_track[gfn] == 0
    if d.shared_node:
        assert notifier.node_state(kvm, d.amem.load(d.hdr0 + H_NODE) - 1) != L.NODE_LIVE
    assert notifier.live_nodes(kvm) == []
    assert count(kvm, "table_free") == 1
    assert d.oracle() == []


@designs
def test_switching_l2_drops_the_old_reference(avm, design):
    kvm, d = avm(design)
    g0, g1 = table_gfn(d.cfg, 0), table_gfn(d.cfg, 1)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    d.nested_vmrun(0, 1)  # L1 switched avic_physical_id without saying so at the exit
    assert set(tables(d)) == {g1}
    assert kvm.gfn_track[g0] == 0 and kvm.gfn_track[g1] == 1
    d.nested_vmexit(0, 1, True)
    assert tables(d) == {}
    for k in range(3):  # round-robin: never more tables than vCPUs
        d.nested_vmrun(0, k)
        d.nested_vmrun(1, (k + 1) % 4)
        assert len(tables(d)) <= 2
        d.nested_vmexit(0, k, True)
        d.nested_vmexit(1, (k + 1) % 4, True)
    assert d.oracle() == []


# -- track_write: update vs invalidation ------------------------------------------------------------------
@designs
def test_entry_update_versus_invalidation(avm, design):
    kvm, d = avm(design, vcpus=3)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)  # vCPU 0 runs L2 0 on the table
    t = tables(d)[gfn]
    g = guest(kvm, gfn, 1)
    # apic id / IsRunning of one valid entry: updated in place
    new = (g & ~AVIC_UPDATABLE) | 2 | AVIC_IS_RUNNING
    assert write_entry(kvm, gfn, 1, new), "a tracked page: the write is emulated"
    assert state(d, t) == VALID and shadow(d, t, 1) == d._translate(new)
    assert write_entry(kvm, gfn, 1, (new & ~0xFF) | 0, nbytes=1)  # the apic id byte alone
    assert shadow(d, t, 1) == d._translate(guest(kvm, gfn, 1)) and guest(kvm, gfn, 1) & 0xFF == 0
    assert write_entry(kvm, gfn, 1, guest(kvm, gfn, 1) & ~AVIC_IS_RUNNING, nbytes=4, offset=4)
    assert not shadow(d, t, 1) & AVIC_IS_RUNNING
    # a write past the table's entries does not concern it
    guest_write(kvm, entry_gpa(gfn, d.ne + 3), b"\x01" * 8)
    assert state(d, t) == VALID
    assert stat(d, "entry_update") == 3 and stat(d, "invalidate") == 0
    assert d.oracle() == []
    # the backing page changes: invalidate = erase (RFC v3): the gfn is no longer write-protected,
    # the entries are zeroed, every vCPU gets a reload request and the one in L2 is kicked out of it
    lo, _ = untracked_range(d.cfg)
    assert write_entry(kvm, gfn, 1, make_entry((lo + 99) * PAGE, 1, False))
    assert state(d, t) == DROPPED and stat(d, "invalidate") == 1
    assert kvm.gfn_track[gfn] == 0 and all(shadow(d, t, e) == 0 for e in range(d.ne))
    assert all(d.amem.load(d.vw0 + v * VW + V_RELOAD) >= 1 for v in range(3)), "every vCPU"
    assert d.amem.load(d.vw0 + 0 * VW + V_INL2) == 0 and stat(d, "kick_exit") == 1, "kicked out of L2"
    d.nested_vmexit(0, 0, False)
    assert count(kvm, "reloads") == 1
    d.nested_vmrun(0, 0)  # the next VMRUN resyncs
    assert state(d, t) == VALID and stat(d, "resync") == 1
    assert_synced(kvm, d, t)
    # a whole-page write: invalidate
    page = bytearray(kvm.guest_bytes[gfn * PAGE:(gfn + 1) * PAGE].tobytes())
    page[0] ^= 1  # entry 0's apic id
    guest_write(kvm, gfn * PAGE, bytes(page))
    assert state(d, t) == DROPPED
    d.nested_vmrun(0, 0)
    assert state(d, t) == VALID
    # clearing Valid invalidates; so does any write to an entry that is not valid
    assert write_entry(kvm, gfn, 2, guest(kvm, gfn, 2) & ~AVIC_VALID)
    assert state(d, t) == DROPPED
    d.nested_vmrun(0, 0)
    assert state(d, t) == VALID and shadow(d, t, 2) == 0
    assert write_entry(kvm, gfn, 2, guest(kvm, gfn, 2) ^ 1)  # apic bits of an invalid entry
    assert state(d, t) == DROPPED
    d.nested_vmrun(0, 0)
    assert_synced(kvm, d, t)
    d.nested_vmexit(0, 0, False)
    assert d.oracle() == []


@designs
def test_flood_rule_drops_an_unused_table(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)  # still referenced, but unused (usecount 0)
    t = tables(d)[gfn]
    g = guest(kvm, gfn, 0)
    limit = d.ne * FLOOD_PER_ENTRY
    assert d.flood_limit == limit
    for i in range(limit):
        assert write_entry(kvm, gfn, 0, (g & ~0xFF) | (i & 1))
    assert state(d, t) == VALID, "exactly nentries*1000 writes are tolerated"
    assert write_entry(kvm, gfn, 0, g)
    assert state(d, t) == DROPPED and stat(d, "flood_drop") == 1
    assert kvm.gfn_track[gfn] == 0, "a dropped table is no longer write-protected"
    last = (g & ~AVIC_UPDATABLE) | 1 | AVIC_IS_RUNNING
    assert not write_entry(kvm, gfn, 0, last), "untracked now: the store is not emulated"
    d.nested_vmrun(0, 0)  # used again: write-protected and resynced (sees the plain store)
    assert state(d, t) == VALID and kvm.gfn_track[gfn] == 1
    assert shadow(d, t, 0) == d._translate(last)
    # writes while in use do not count towards the flood
    for _ in range(limit + 5):
        write_entry(kvm, gfn, 0, last)
    assert state(d, t) == VALID
    d.nested_vmexit(0, 0, False)
    assert d.oracle() == []


# -- IsRunning -----------------------------------------------------------------------------------------
@designs
def test_isrunning_follows_vcpu_load_and_put(avm, design):
    kvm, d = avm(design, vcpus=3)
    gfn = table_gfn(d.cfg, 0)
    lo, _ = untracked_range(d.cfg)
    # L2 vCPUs 0 and 2 run on L1 vCPU 1 (guest IsRunning set), entry 1 on L1 vCPU 0
    for e, apic in ((0, 1), (1, 0), (2, 1)):
        write_entry(kvm, gfn, e, make_entry((lo + e) * PAGE, apic, True))
    d.vcpu_put(1)
    d.nested_vmrun(0, 0)
    t = tables(d)[gfn]
    assert not shadow(d, t, 0) & AVIC_IS_RUNNING and not shadow(d, t, 2) & AVIC_IS_RUNNING
    assert shadow(d, t, 1) & AVIC_IS_RUNNING
    d.vcpu_load(1)
    assert shadow(d, t, 0) & AVIC_IS_RUNNING and shadow(d, t, 2) & AVIC_IS_RUNNING
    assert stat(d, "isrunning_flip") == 2
    d.vcpu_put(0)
    assert not shadow(d, t, 1) & AVIC_IS_RUNNING and shadow(d, t, 0) & AVIC_IS_RUNNING
    d.vcpu_load(0)
    assert_synced(kvm, d, t)
    d.nested_vmexit(0, 0, False)
    assert d.oracle() == []


# -- the oracle and its checks have teeth -------------------------------------------------------------
@designs
def test_stale_entry_at_vmrun_is_caught(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 2)
    d.nested_vmrun(1, 2)
    d.nested_vmexit(1, 2, False)
    t = tables(d)[gfn]
    # a write the notifier never saw (as if unregistered): straight into guest memory
    g = guest(kvm, gfn, 1)
    kvm.guest_mem.store((gfn << 9) + 1, s64((g & ~0xFF) | 0))
    d.nested_vmrun(1, 2)
    assert count(kvm, "stale_entries") == 1
    kinds = [k for k, _, _ in kvm.events]
    assert "stale_entry" in kinds
    msg = next(m for k, m, _ in kvm.events if k == "stale_entry")
    assert f"gfn {gfn:#x} entry 1" in msg and "vCPU 1" in msg and "lost write" in msg
    d.nested_vmexit(1, 2, False)
    found = d.oracle()
    assert any("lost write" in f and f"gfn {gfn:#x}" in f and "entry 1" in f for f in found), found
    assert any("stale shadow physid entry" in f for f in found), found
    assert state(d, t) == VALID


@designs
def test_oracle_reports_corruption(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    t = tables(d)[gfn]
    assert d.oracle() == []
    d.amem.store(d.shadow0 + t * d.ne + 1, 12345)
    d.amem.fetch_add(d._tb(t) + T_REF, 1)
    kvm.gfn_track[gfn] += 1
    found = d.oracle()
    assert any("lost write" in f and "entry 1" in f for f in found), found
    assert any("refcount 2 but 1 vCPUs hold it" in f for f in found), found
    assert any(f"gfn_write_track[{gfn:#x}] = 2" in f for f in found), found
    # restore what teardown relies on
    kvm.gfn_track[gfn] -= 1
    d.amem.fetch_add(d._tb(t) + T_REF, -1)


def test_oracle_reports_mutual_exclusion_failure(avm):
    kvm, d = avm("rcu-list")
    d._cs_in(1)
    d.amem.store(d.cs0 + 8, 99)  # another holder "inside" at the same time
    d._cs_in(1)
    d._cs_out(1)
    assert any("avic_physid_lock: mutual exclusion violated" in f for f in d.oracle())


def test_lockdep_asserts(avm):
    kvm, d = avm("mutex-hash")
    d.nested_vmrun(0, 0)
    t = tables(d)[table_gfn(d.cfg, 0)]
    with pytest.raises(LockdepError, match="avic_physid_lock"):
        d._sync(t)
    with pytest.raises(LockdepError, match="tables_lock"):
        d._hash_lookup(table_gfn(d.cfg, 0))
    d.nested_vmexit(0, 0, False)


# -- design specifics ------------------------------------------------------------------------------------
def _acq(kvm, lock):
    return int(kvm.vm.v["lockstat"][:, L.CLASS[lock], 0].sum())


def test_rcu_list_vmrun_takes_no_lock_for_a_kept_table(avm):
    kvm, d = avm("rcu-list")
    d.nested_vmrun(0, 0)  # first user: spinlock + synchronize_rcu
    d.nested_vmexit(0, 0, False)
    assert stat(d, "synchronize_rcu_add") == 1
    spin0, mtx0, gp0 = _acq(kvm, "avic_tables_spin"), _acq(kvm, "tables_lock"), kvm.rcu.gp_seq
    for _ in range(50):
        d.nested_vmrun(0, 0)
        d.nested_vmexit(0, 0, False)
    assert (_acq(kvm, "avic_tables_spin"), _acq(kvm, "tables_lock"), kvm.rcu.gp_seq) == (spin0, mtx0, gp0)
    d.nested_vmrun(1, 0)  # a second user: inc_not_zero under rcu_read_lock, no lock
    assert _acq(kvm, "avic_tables_spin") == spin0
    d.nested_vmexit(1, 0, True)
    d.nested_vmexit(0, 0, True)  # the last user: spinlock + synchronize_rcu before the free
    assert _acq(kvm, "avic_tables_spin") == spin0 + 1 and stat(d, "synchronize_rcu_del") == 1
    assert d.oracle() == []


@pytest.mark.parametrize("mmio_walk", [False, True])
def test_mutex_hash_serializes_every_write(avm, mmio_walk):
    kvm, d = avm("mutex-hash", mmio_walk=mmio_walk)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    m0 = _acq(kvm, "tables_lock")
    gfn = table_gfn(d.cfg, 0)
    g = guest(kvm, gfn, 0)
    for i in range(5):
        assert write_entry(kvm, gfn, 0, (g & ~0xFF) | (i & 1))
    assert _acq(kvm, "tables_lock") == m0 + 5, "track_write takes tables_lock on every tracked write"
    guest_write(kvm, 0xFEE00000, b"\0\0\0\0")  # MMIO walks the notifier only with --mmio-walk
    assert _acq(kvm, "tables_lock") == m0 + 5 + mmio_walk


def test_per_table_notifier_walk_is_linear(avm):
    kvm, d = avm("per-table-notifier")
    g0, g1 = table_gfn(d.cfg, 0), table_gfn(d.cfg, 1)
    d.nested_vmrun(0, 0)
    d.nested_vmrun(1, 1)
    assert len(notifier.live_nodes(kvm)) == 2, "one node per table"
    t0, t1 = tables(d)[g0], tables(d)[g1]
    from vm.page_track import emulator_write_phys
    g = guest(kvm, g0, 0)
    calls = emulator_write_phys(kvm, entry_gpa(g0, 0), ((g & ~0xFF) | 1).to_bytes(8, "little"))
    assert calls == 2, "every node is called"
    assert shadow(d, t0, 0) == d._translate(guest(kvm, g0, 0))
    assert stat(d, "track_write") == 1, "only the owner of the page acts on it"
    assert_synced(kvm, d, t1)
    d.nested_vmexit(0, 0, True)
    assert len(notifier.live_nodes(kvm)) == 1
    d.nested_vmexit(1, 1, False)
    assert d.oracle() == []


@designs
def test_shared_node_registration_is_refcounted(avm, design):
    kvm, d = avm(design, vcpus=3)
    for v in range(3):
        d.nested_vmrun(v, v)  # three tables
    assert len(notifier.live_nodes(kvm)) == (1 if d.shared_node else 3)
    for v in range(3):
        d.nested_vmexit(v, v, True)
        assert len(notifier.live_nodes(kvm)) == (0 if v == 2 else 1 if d.shared_node else 2 - v)
    assert kvm.mem.load(kvm.notifier_w + L.NH_REDUNDANT) == 0
    assert not [e for e in kvm.events if e[0] in ("redundant_registration", "unregister_unregistered")]
    assert d.oracle() == []


def test_rcu_list_free_without_grace_period_is_a_poisoned_read(avm):
    kvm, d = avm("rcu-list", hooks=("no-synchronize-rcu",))
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    kvm.rcu.read_lock()  # a track_write reader has found the table ...
    try:
        t = d._lookup(gfn)
        gen = word(d, t, T_GEN)
        d.nested_vmexit(0, 0, True)  # ... the last user frees it: no synchronize_rcu
        assert state(d, t) == POISON
        assert not d._table_write(t, entry_gpa(gfn, 0), 8, gen), "the reader meets freed memory"
    finally:
        kvm.rcu.read_unlock()
    assert kvm.poison_reads == 1
    assert any("read(s) of poisoned (freed) memory" in f for f in d.oracle())


def test_rcu_list_free_waits_for_readers(avm):
    kvm, d = avm("rcu-list")
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    kvm.rcu.read_lock()
    try:  # the free waits for this read-side section (in-process: refused instead of deadlocking)
        with pytest.raises(RuntimeError, match="inside its own read-side critical section"):
            d.nested_vmexit(0, 0, True)
    finally:
        kvm.rcu.read_unlock()
    assert kvm.poison_reads == 0


@designs
def test_memslot_removal_drops_tables(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    t = tables(d)[gfn]
    kvm_page_track_delete_slot(kvm, d.cfg.memslots - 1)  # the last slot holds the tables
    assert state(d, t) == DROPPED and kvm.gfn_track[gfn] == 0
    d.nested_vmrun(0, 0)
    assert state(d, t) == VALID and kvm.gfn_track[gfn] == 1
    d.nested_vmexit(0, 0, False)
    assert d.oracle() == []


@designs
def test_tracked_write_rewrites_mostly_the_vcpus_own_entry(avm, design):
    kvm, d = avm(design, vcpus=3)
    gfns = {table_gfn(d.cfg, k) for k in range(d.cfg.l2s)}
    rng = random.Random(5)
    sizes = set()
    cross = 0
    for v in range(3):
        for _ in range(300):
            gpa, data = d.tracked_write(v, rng)
            assert gpa >> 12 in gfns
            if (gpa & 0xFFF) >> 3 != v % d.ne:  # another vCPU's entry: apic id / IsRunning only
                cross += 1
                g = guest(kvm, gpa >> 12, (gpa & 0xFFF) >> 3)
                assert len(data) < 8 or not (int.from_bytes(data, "little") ^ g) & ~AVIC_UPDATABLE
            assert (gpa & 7) + len(data) <= 8
            sizes.add(len(data))
            guest_write(kvm, gpa, data)
            d._store_end(v)
    assert sizes == {1, 4, 8}
    assert 0.05 * 900 < cross < 0.2 * 900, f"{cross} of 900 writes to another vCPU's entry (CROSS_ENTRY_RATE)"


@pytest.mark.parametrize("design", ["mutex-hash", "per-table-notifier"])
def test_split_registers_before_tracking_is_enabled(avm, design):
    """split: registration (VM creation, or table creation for per-table nodes) and activation (vCPU
    0's nested VMRUN) are separate paths; vCPU 1 may make and use a table before activation."""
    kvm, d = avm(design, registration="split", page_track="v6.0")
    assert not kvm_page_track_write_tracking_enabled(kvm)
    d.nested_vmrun(1, 1)  # not the activation path: tracking stays off, the table is not write-protected
    assert not kvm_page_track_write_tracking_enabled(kvm)
    warns = [m for k, m, _ in kvm.events if k == "untracked_notifier"]
    assert len(warns) == 1 and "notifier node" in warns[0] and "write tracking is disabled" in warns[0]
    assert any(k == "tracking_disabled" for k, _, _ in kvm.events), "kvm_write_track_add_gfn WARNs, refuses"
    d.nested_vmrun(0, 0)  # the activation path enables tracking before its own table
    assert kvm_page_track_write_tracking_enabled(kvm)
    d.nested_vmexit(0, 0, False)
    d.nested_vmexit(1, 1, False)
    assert any("while write tracking was disabled" in f for f in d.oracle())


@designs
def test_teardown_and_close_leave_nothing(avm, run_id, design):
    kvm, d = avm(design, vcpus=3)
    for v in range(3):
        d.nested_vmrun(v, v % 2)
    d.teardown()
    assert not kvm.gfn_track.any()
    assert notifier.live_nodes(kvm) == []
    assert all(notifier.node_state(kvm, n) in (L.NODE_FREE, L.NODE_POISON) for n in range(kvm.cfg.max_nodes))
    d.close()
    assert "avic" not in kvm.regions
    assert not os.path.exists(f"/dev/shm/pts_{run_id}_avic")
