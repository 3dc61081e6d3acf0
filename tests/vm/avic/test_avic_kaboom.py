"""The seed's "X registers, Y registers, X unregisters, kaboom", scripted (vm/avic/kaboom.py):
refcount and node-refcount -> SUCCESS; bool -> FAILURE naming the lost write; naive -> FAILURE by the
redundant-registration WARN (warn) or by the named notifier-list cycle (mainline); split -> FAILURE by
the lost write the oracle sees (with or without the registration-time WARN)."""

from __future__ import annotations

import pytest

from ipc.errors import UsageError
from vm import layout as L
from vm import mmu, notifier
from vm.avic import AVIC_DESIGNS, REGISTRATIONS, kaboom_steps, run_kaboom
from vm.avic.kaboom import apply_step
from vm.config import Config
from vm.kvm import Kvm
from vm.nested import DESIGNS, table_gfn


def kaboom(run_id, design, registration, **kw):
    cfg = Config(vcpus=2, design=design, registration=registration, **kw)
    kvm = Kvm.create(cfg, run_id)
    try:
        return cfg, run_kaboom(kvm, cfg, registration)
    finally:
        kvm.close()


@pytest.mark.parametrize("design", AVIC_DESIGNS)
def test_kaboom_refcount_succeeds(run_id, design):
    _, (verdict, msgs) = kaboom(run_id, design, "refcount")
    assert verdict == "SUCCESS", msgs
    assert msgs[-1] == "kaboom: SUCCESS"
    assert not [m for m in msgs if m.startswith("WARN") or m.startswith("oracle")]


@pytest.mark.parametrize("design", AVIC_DESIGNS)
def test_kaboom_bool_loses_ys_write(run_id, design):
    cfg, (verdict, msgs) = kaboom(run_id, design, "bool")
    assert verdict == "FAILURE"
    ly = 0 if design == "per-table-notifier" else 1
    gfn = table_gfn(cfg, ly)
    stale = [m for m in msgs if "stale shadow physid entry" in m]
    assert stale, msgs
    assert "vCPU 1 nested VMRUN" in stale[0] and f"gfn {gfn:#x} entry 1" in stale[0]
    assert f"lost write to gpa {gfn * 4096 + 8:#x}" in stale[0]
    assert any(m.startswith("oracle: lost write") for m in msgs), msgs
    assert not any("redundant registration" in m for m in msgs), "bool never registers twice"


@pytest.mark.parametrize("design", AVIC_DESIGNS)
def test_kaboom_naive_is_caught_by_the_redundant_registration_warn(run_id, design):
    _, (verdict, msgs) = kaboom(run_id, design, "naive")
    assert verdict == "FAILURE"
    assert any(m.startswith("WARN") and "redundant registration of live notifier node" in m for m in msgs), msgs
    # the WARN comes at Y's registration, before the lost write
    i_warn = next(i for i, m in enumerate(msgs) if "redundant registration" in m)
    assert i_warn < next(i for i, m in enumerate(msgs) if "stale shadow physid entry" in m)


@pytest.mark.parametrize("design", AVIC_DESIGNS)
@pytest.mark.parametrize("page_track", ["v6.0", "v6.6"])
def test_kaboom_naive_mainline_makes_a_cycle_named_in_bounded_time(run_id, design, page_track):
    """Mainline has no redundant-registration check: Y's registration links the node again (a cycle);
    L1's write then walks a list that never ends. The walk stops and names the cycle and who made it."""
    _, (verdict, msgs) = kaboom(run_id, design, "naive", redundant_registration="mainline",
                                page_track=page_track)
    assert verdict == "FAILURE"
    cyc = [m for m in msgs if "notifier list cycle at node" in m]
    assert cyc and "kvm_page_track_write would never finish (soft lockup)" in cyc[0], msgs
    nreg = 3 if page_track == "v6.0" else 2  # KVM's own node is registration #1 in v6.0
    assert f"made by registration #{nreg}" in cyc[0] and "already on the list" in cyc[0], cyc[0]
    assert not any("redundant registration of live" in m for m in msgs), "mainline does not WARN"


@pytest.mark.parametrize("design", AVIC_DESIGNS)
def test_kaboom_node_refcount_succeeds(run_id, design):
    """Maxim's alternative: the count lives in the notifier node; redundant registration is counted."""
    _, (verdict, msgs) = kaboom(run_id, design, "node-refcount")
    assert verdict == "SUCCESS", msgs
    assert not [m for m in msgs if m.startswith("WARN") or m.startswith("oracle")]


@pytest.mark.parametrize("design", AVIC_DESIGNS)
@pytest.mark.parametrize("split_warn", ["on", "off"])
def test_kaboom_split_loses_a_write_the_oracle_sees(run_id, design, split_warn):
    """Y's table is made before X's activation path enables write tracking: it is never
    write-protected and L1's write to it is lost — with Sean's registration WARN on or off."""
    cfg, (verdict, msgs) = kaboom(run_id, design, "split", split_warn=split_warn)
    assert verdict == "FAILURE"
    ly = 0 if design == "per-table-notifier" else 1
    lost = [m for m in msgs if m.startswith("oracle: lost write")]
    assert lost and f"gfn {table_gfn(cfg, ly):#x}" in lost[0], msgs
    w = [m for m in msgs if m.startswith("WARN") and "registered while write tracking is disabled" in m]
    assert bool(w) == (split_warn == "on"), msgs


def test_kaboom_steps_shape():
    for reg in REGISTRATIONS:
        for design in AVIC_DESIGNS:
            steps = kaboom_steps(reg, design)
            ops = [(v, op) for v, op, _ in steps]
            # split: Y's table is in use before X (the activation path) VMRUNs
            assert ops[:2] == ([(1, "vmrun"), (0, "vmrun")] if reg == "split" else [(0, "vmrun"), (1, "vmrun")])
            assert (0, "vmexit") in ops and steps[ops.index((0, "vmexit"))][2]["leaving"]
            assert ops[-3:] == [(1, "write_entry"), (1, "vmrun"), (1, "vmexit")]
    with pytest.raises(UsageError):
        kaboom_steps("sometimes")


def test_kaboom_needs_two_vcpus(run_id):
    cfg = Config(vcpus=1, design="mutex-hash")
    kvm = Kvm.create(cfg, run_id)
    try:
        with pytest.raises(UsageError, match="vcpus >= 2"):
            run_kaboom(kvm, cfg, "refcount")
    finally:
        kvm.close()


@pytest.mark.parametrize("registration", REGISTRATIONS)
def test_kaboom_default_design_is_mutex_hash(run_id, registration):
    cfg = Config(vcpus=2)  # design "mirror": the kaboom runs on mutex-hash
    kvm = Kvm.create(cfg, run_id)
    try:
        verdict, msgs = run_kaboom(kvm, cfg, registration)
    finally:
        kvm.close()
    assert msgs[0] == f"kaboom: design mutex-hash, registration {registration}"
    assert verdict == ("SUCCESS" if registration in ("refcount", "node-refcount") else "FAILURE")


def _two_users(run_id, design):
    """node-refcount, X and Y both in L2 (two live tables on the shared node, or two vCPUs on one
    per-table node): the node's count is 2 when the coordinator tears the design down."""
    cfg = Config(vcpus=2, design=design, registration="node-refcount", fuzz="off")
    kvm = Kvm.create(cfg, run_id)
    d = DESIGNS[design](kvm, cfg)
    d.setup()
    for v in (0, 1):
        d.vcpu_init(v)
        d.vcpu_load(v)
    for step in kaboom_steps("node-refcount", design)[:2]:  # X VMRUNs, Y VMRUNs
        apply_step(d, step)
    for v in (0, 1):
        d.vcpu_put(v)
    return kvm, d


def _counted_twice(kvm) -> list[int]:
    return [n for n in notifier.live_nodes(kvm) if kvm.mem.load(kvm.nodes_w + n * 8 + L.N_REFS) == 2]


@pytest.mark.parametrize("design", AVIC_DESIGNS)
def test_teardown_drops_every_registration_of_a_counted_node(run_id, design):
    """Teardown with N_REFS = 2: it must unlink the node (all its registrations), not free a node
    that is still on the list (a WARN, then kvm_mmu_uninit_vm walks into the poisoned slot)."""
    kvm, d = _two_users(run_id, design)
    try:
        assert len(_counted_twice(kvm)) == 1, "the setting under test: one node held twice"
        assert d.oracle() == []
        d.teardown()
        d.close()
        mmu.kvm_mmu_uninit_vm(kvm)
        assert [m for _, m, _ in kvm.events] == [] and kvm.poison_reads == 0
        assert notifier.live_nodes(kvm) == []
    finally:
        kvm.close()


@pytest.mark.parametrize("design", AVIC_DESIGNS)
def test_oracle_checks_the_count_in_the_node(run_id, design):
    """node-refcount: the node's N_REFS must equal its users (shared node: H_USERS; per-table: the
    table's T_REF). A count one short would unlink the node while a user still needs it."""
    kvm, d = _two_users(run_id, design)
    try:
        (n,) = _counted_twice(kvm)
        kvm.mem.store(kvm.nodes_w + n * 8 + L.N_REFS, 1)
        bad = d.oracle()
        assert any(f"notifier node {n}" in b and "holds 1 registration" in b for b in bad), bad
        kvm.mem.store(kvm.nodes_w + n * 8 + L.N_REFS, 2)
        assert d.oracle() == []
        d.teardown()
    finally:
        d.close()
        kvm.close()
