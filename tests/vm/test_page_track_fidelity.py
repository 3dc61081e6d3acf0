"""Issue 11 fidelity of the page-track API (items 1-6): MMIO walks only with --mmio-walk (x86.c
emulator_write_phys), KVM's own kvm_mmu_pte_write node in v6.0, mainline's redundant registration (a
cycle the walk names in bounded time), node-refcount, and re-registration while RETIRING."""

from __future__ import annotations

import json
import os

import pytest
from conftest import launch_in_process

from vm import layout as L
from vm import mmu, notifier, page_track
from vm.config import from_dict
from vm.kvm import Kvm
from vm.mirror import MIRROR_KIND, mirror_track

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MMIO = 0xFEE00000


@pytest.fixture
def make_kvm():
    made = []

    def make(**kw):
        cfg = from_dict({"vcpus": 1, "memory_mib": 1, "notifiers": 0, "tracked_pages": 2, "l2s": 1,
                         "fuzz": "off", **kw})
        k = Kvm.create(cfg, f"tf{len(made)}x{os.getpid()}")
        made.append(k)
        page_track.kvm_page_track_write_tracking_enable(k)
        return k

    yield make
    for k in made:
        k.close()


def _mirror(kvm) -> int:
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0)
    assert notifier.kvm_page_track_register_notifier(kvm, n)
    return n


# -- item 2: KVM's own node (v6.0) ------------------------------------------------------------------

def test_v60_registers_kvm_mmu_pte_write_at_vm_creation(make_kvm):
    kvm = make_kvm()  # default page_track v6.0
    node = mmu.mmu_node(kvm)
    assert node >= 0 and notifier.live_nodes(kvm) == [node], "the list is never empty"
    m = _mirror(kvm)
    mirror_track(kvm, 1)
    with page_track.record_walks(kvm) as visited:
        assert page_track.emulator_write_phys(kvm, 4096, b"\1" * 8) == 2
    assert visited == [m, node]
    assert kvm.counts[L.C["mmu_pte_write"]] == 1, "kvm_mmu_pte_write is called and counted"


def test_v66_has_no_kvm_node_and_calls_kvm_mmu_track_write_directly(make_kvm):
    kvm = make_kvm(page_track="v6.6")
    assert mmu.mmu_node(kvm) == -1 and notifier.live_nodes(kvm) == []
    assert page_track.emulator_write_phys(kvm, 4096, b"\1" * 8) == 0, "no notifier on the list"
    assert kvm.counts[L.C["mmu_pte_write"]] == 1, "kvm_mmu_track_write runs even on an empty list"
    m = _mirror(kvm)
    mirror_track(kvm, 1)
    with page_track.record_walks(kvm) as visited:
        assert page_track.emulator_write_phys(kvm, 4096, b"\2" * 8) == 1
    assert visited == [m] and kvm.counts[L.C["mmu_pte_write"]] == 2


def _mmu_lock_acquisitions(kvm) -> int:
    return int(kvm.vm.v["lockstat"][:, L.CLASS["mmu_lock"], 0].sum())


@pytest.mark.parametrize("page_track_version", ["v6.0", "v6.6"])
@pytest.mark.parametrize("isp", ["auto", "0"])
def test_kvm_write_handler_takes_mmu_lock_for_write_once_l2_has_run(make_kvm, page_track_version, isp):
    """v6.0 kvm_mmu_pte_write / v6.6 kvm_mmu_track_write: an early return while
    indirect_shadow_pages == 0, else write_lock(&kvm->mmu_lock) on every emulated RAM write. Nested
    AVIC runs L2 on nested (shadow) NPT: after a vCPU's first L2 entry every emulated write locks."""
    kvm = make_kvm(page_track=page_track_version, indirect_shadow_pages=isp)
    assert kvm.mmu_lock.__class__.__name__.endswith("RwLock"), "x86's mmu_lock is an rwlock_t"
    for _ in range(3):
        page_track.emulator_write_phys(kvm, 4096, b"\1" * 8)
    assert kvm.counts[L.C["mmu_pte_write"]] == 3 and kvm.counts[L.C["mmu_lock_write"]] == 0
    mmu.kvm_mmu_account_nested(kvm)  # a vCPU entered L2: its nested NPT shadow pages exist
    a0 = _mmu_lock_acquisitions(kvm)
    for _ in range(5):
        page_track.emulator_write_phys(kvm, 4096, b"\1" * 8)
    locked = 5 if isp == "auto" else 0
    assert kvm.counts[L.C["mmu_pte_write"]] == 8 and kvm.counts[L.C["mmu_lock_write"]] == locked
    assert _mmu_lock_acquisitions(kvm) - a0 == locked
    page_track.emulator_write_phys(kvm, MMIO, b"\1" * 4)  # MMIO: no walk, no handler
    assert kvm.counts[L.C["mmu_pte_write"]] == 8


# -- item 1: MMIO ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mmio_walk", [False, True])
def test_mmio_write_walks_only_with_mmio_walk(make_kvm, mmio_walk):
    kvm = make_kvm(mmio_walk=mmio_walk)
    _mirror(kvm)
    assert page_track.emulator_write_phys(kvm, MMIO, b"\1\0\0\0") == (2 if mmio_walk else 0)
    assert kvm.counts[L.C["mmu_pte_write"]] == int(mmio_walk)


def _run_json(tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--design", "mirror", "--vcpus", "2", "--duration", "0.6", "--quiet", "--fuzz", "off", "--json", str(out), *args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(out.read_text())


def test_run_json_counts_mmio_walks_only_with_the_flag(tmp_path):
    """mirror design: every tracked write is emulated (its pages stay tracked), so KVM's own node is
    called once per tracked write, plus once per MMIO write only with --mmio-walk."""
    off = _run_json(tmp_path)
    assert off["config"]["mmio_walk"] is False and off["config"]["page_track"] == "v6.0"
    c = off["counters"]
    assert c["write_mmio"] > 0 and c["write_tracked"] > 0
    assert c["mmu_pte_write"] == c["write_tracked"], c
    on = _run_json(tmp_path, "--mmio-walk")
    assert on["config"]["mmio_walk"] is True
    c = on["counters"]
    assert c["write_mmio"] > 0 and c["mmu_pte_write"] == c["write_tracked"] + c["write_mmio"], c


# -- item 3: mainline redundant registration ------------------------------------------------------

@pytest.mark.parametrize("page_track_v", ["v6.0", "v6.6"])
def test_mainline_redundant_registration_makes_a_cycle_the_walk_names(make_kvm, page_track_v):
    kvm = make_kvm(redundant_registration="mainline", page_track=page_track_v)
    a = _mirror(kvm)
    b = _mirror(kvm)  # head -> b -> a (-> KVM's node in v6.0)
    assert notifier.kvm_page_track_register_notifier(kvm, a)  # mainline: no check, linked again
    assert not [e for e in kvm.events if e[0] == "redundant_registration"]
    assert kvm.mem.load(kvm.nodes_w + a * 8 + L.N_NEXT) == b + 1  # a -> b -> a -> ...
    mirror_track(kvm, 1)
    calls = page_track.emulator_write_phys(kvm, 4096, b"\2" * 8)
    assert calls == kvm.cfg.max_nodes, "the walk is bounded by the pool size"
    cyc = [m for k, m, _ in kvm.events if k == "notifier_cycle"]
    nreg = 4 if page_track_v == "v6.0" else 3
    assert len(cyc) == 1 and f"notifier list cycle at node {a}" in cyc[0]
    assert "kvm_page_track_write would never finish (soft lockup)" in cyc[0]
    assert f"registration #{nreg} (by the coordinator) of notifier node {a}" in cyc[0], cyc[0]
    page_track.emulator_write_phys(kvm, 4096, b"\3" * 8)
    assert len([k for k, _, _ in kvm.events if k == "notifier_cycle"]) == 1, "named once per process"
    assert len(notifier.live_nodes(kvm)) == kvm.cfg.max_nodes  # the diagnostic walk is bounded too


def test_warn_mode_refuses_the_redundant_registration(make_kvm):
    kvm = make_kvm(page_track="v6.6")
    a = _mirror(kvm)
    assert not notifier.kvm_page_track_register_notifier(kvm, a)
    assert kvm.events[-1][0] == "redundant_registration" and notifier.live_nodes(kvm) == [a]


# -- item 4: node-refcount ------------------------------------------------------------------------

def test_node_refcount_changes_the_list_only_on_0_1(make_kvm):
    kvm = make_kvm(page_track="v6.6")
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0, refcounted=True)
    refs = kvm.nodes_w + n * 8 + L.N_REFS
    assert notifier.kvm_page_track_register_notifier(kvm, n)
    assert notifier.kvm_page_track_register_notifier(kvm, n)  # X registers, Y registers: counted
    assert kvm.mem.load(refs) == 2 and notifier.live_nodes(kvm) == [n] and kvm.events == []
    gp = kvm.track_srcu.gp_seq
    assert notifier.kvm_page_track_unregister_notifier(kvm, n)  # X unregisters: still listed
    assert notifier.live_nodes(kvm) == [n] and kvm.track_srcu.gp_seq == gp, "no unlink, no grace period"
    assert notifier.kvm_page_track_unregister_notifier(kvm, n)  # Y: 1 -> 0, unlinked
    assert notifier.live_nodes(kvm) == [] and kvm.mem.load(refs) == 0
    assert notifier.node_state(kvm, n) == L.NODE_ALLOCATED and kvm.events == []


# -- item 6: re-registration while RETIRING -------------------------------------------------------

def test_reregistration_during_unregister_grace_period_is_refused(make_kvm, monkeypatch):
    """Another path registers the node while its unregister waits in synchronize_srcu. Before the fix
    the registration was accepted and unregister then set the listed node ALLOCATED: a free poisoned
    a node still on the list."""
    kvm = make_kvm(page_track="v6.6")
    n = _mirror(kvm)
    got = []
    real = kvm.track_srcu.synchronize

    def synchronize_with_a_racing_register():
        assert notifier.node_state(kvm, n) == L.NODE_RETIRING
        got.append(notifier.kvm_page_track_register_notifier(kvm, n))
        real()

    monkeypatch.setattr(kvm.track_srcu, "synchronize", synchronize_with_a_racing_register)
    assert notifier.kvm_page_track_unregister_notifier(kvm, n)
    assert got == [False]
    assert any(k == "register_retiring" and f"node {n}" in m for k, m, _ in kvm.events)
    assert notifier.live_nodes(kvm) == [], "not on the list once unregister returned"
    assert notifier.node_state(kvm, n) == L.NODE_ALLOCATED
    monkeypatch.undo()
    notifier.free_node(kvm, n)
    assert not [k for k, _, _ in kvm.events if k == "free_live_node"]
    assert notifier.kvm_page_track_register_notifier(kvm, notifier.alloc_node(kvm, MIRROR_KIND, 0))


# -- review fixes -----------------------------------------------------------------------------------

def test_release_node_drops_every_registration_and_free_node_warns_on_a_counted_listed_node(make_kvm):
    kvm = make_kvm(page_track="v6.6")
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0, refcounted=True)
    for _ in range(3):
        assert notifier.kvm_page_track_register_notifier(kvm, n)
    notifier.release_node(kvm, n)  # teardown: all three registrations go, one unlink, then free
    assert notifier.live_nodes(kvm) == [] and kvm.events == []
    assert notifier.node_state(kvm, n) == L.NODE_POISON
    m = notifier.alloc_node(kvm, MIRROR_KIND, 0, refcounted=True)
    for _ in range(2):
        assert notifier.kvm_page_track_register_notifier(kvm, m)
    notifier.free_node(kvm, m)  # a caller bug: two registrations still held
    assert [(k, msg) for k, msg, _ in kvm.events] == [
        ("free_live_node", f"WARN coordinator: freeing notifier node {m} that is still registered "
                           f"(2 registrations held)")]


def test_a_never_allocated_slot_is_not_a_counted_node(make_kvm):
    """A FREE slot registered directly (the scripted ``reregister`` op) is a plain node, as before
    node-refcount: the second registration is redundant (WARN), not silently counted."""
    kvm = make_kvm(page_track="v6.6")
    assert notifier.node_state(kvm, 5) == L.NODE_FREE
    assert notifier.kvm_page_track_register_notifier(kvm, 5)
    assert not notifier.kvm_page_track_register_notifier(kvm, 5)
    assert [k for k, _, _ in kvm.events] == ["redundant_registration"]
    assert notifier.kvm_page_track_unregister_notifier(kvm, 5)
    notifier.free_node(kvm, 5)
    assert kvm.mem.load(kvm.nodes_w + 5 * 8 + L.N_REFS) == -1, "a freed slot is not counted either"


def test_mmu_node_is_kvms_own_not_any_node_of_its_kind(make_kvm):
    """The scripted ``register`` op can allocate a node of any kind: it is not KVM's node."""
    kvm = make_kvm(page_track="v6.6")
    other = notifier.alloc_node(kvm, mmu.KVM_MMU_KIND, 0)
    assert mmu.mmu_node(kvm) == -1
    mmu.kvm_mmu_uninit_vm(kvm)
    assert notifier.node_state(kvm, other) == L.NODE_ALLOCATED
    kvm0 = make_kvm()
    own = mmu.mmu_node(kvm0)
    mmu.kvm_mmu_uninit_vm(kvm0)
    assert notifier.node_state(kvm0, own) == L.NODE_POISON and mmu.mmu_node(kvm0) == -1


def test_an_overrun_on_a_list_that_changed_meanwhile_is_not_called_a_cycle(make_kvm):
    from vm.faults import notifier_cycle

    kvm = make_kvm(page_track="v6.6")
    _mirror(kvm)  # an acyclic list: the walker's overrun was caused by changes since
    msg = notifier_cycle(kvm)
    assert "list changed meanwhile" in msg and "cycle at node -1" not in msg, msg


@pytest.mark.parametrize("page_track_v,nodes,ok", [("v6.0", 2, False), ("v6.0", 3, True), ("v6.6", 2, True),
                                                    ("v6.6", 1, False)])
def test_pool_too_small_for_the_notifiers_is_a_usage_error(page_track_v, nodes, ok):
    from ipc.errors import UsageError

    d = {"notifiers": 2, "max_nodes": nodes, "page_track": page_track_v}
    if ok:
        from_dict(d)
        return
    with pytest.raises(UsageError, match=r"max_nodes = \d+ is too small"):
        from_dict(d)


def test_pool_too_small_is_one_line_exit_2(tmp_path):
    toml = tmp_path / "small.toml"
    toml.write_text("[config]\nmax_nodes = 2\n")
    p = launch_in_process("run", "--notifiers", "2", "--duration", "0.3", "--quiet", "--scenario", str(toml))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "max_nodes" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_summary_of_an_older_results_file_says_unknown():
    from rich.console import Console

    from vm import results

    r = {"config": {"design": "mirror", "registration": "refcount", "vcpus": 1, "l2s": 1, "switch_rate": 0.0},
         "seed": 1, "elapsed_s": 1.0}
    con = Console(record=True, width=200)
    try:
        results.render(r, con)
    except (KeyError, TypeError):
        pass  # the rest of an older file may lack other keys: only the page-track line matters here
    text = con.export_text()
    assert "page track: unknown (older results)" in text, text
    assert "v6.0" not in text and "do not walk" not in text


def test_the_summary_names_every_fidelity_option():
    """A run's summary and compare's report say what the numbers assume (docs/fidelity.md)."""
    import msgspec

    from vm.results import fidelity_line

    base = msgspec.to_builtins(from_dict({}))
    assert fidelity_line(base) == (
        "page track: v6.0, MMIO writes do not walk (as x86.c), redundant registration warn; nested VMRUN takes "
        "tables_lock on a table change (RFC v3), KVM's write handler takes mmu_lock once L2 has run, entry "
        "update re-reads guest memory, 0.10% of table writes erase")
    other = fidelity_line({**base, "avic_vmrun_lock": "every", "indirect_shadow_pages": "0",
                           "entry_update": "gentry", "table_invalidate_fraction": 0.2})
    assert ("on every VMRUN" in other and "never (no indirect shadow pages)" in other
            and "cached gentry" in other and "20.00% of table writes erase" in other), other
