"""The VM issue: page tracking, notifier registry, emulated writes, coordinator + vCPU processes."""

from __future__ import annotations

import os

import pytest
from conftest import launch_in_process

from vcpu.worker import vcpu_main
from vm import layout as L
from vm import notifier, page_track
from vm.config import from_dict
from vm.coordinator import Coordinator, RunError, run_script
from vm.kvm import Kvm
from vm.mirror import MIRROR_KIND, mirror_track, oracle
from vm.nested import tracked_gfns

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MMIO = 0xFEE00000


def _run_id(tag: str) -> str:
    return f"t{tag}{os.getpid()}"


@pytest.fixture
def kvm():
    # the registry's own tests: v6.6, no KVM node on the list (test_page_track_fidelity.py has v6.0)
    k = Kvm.create(from_dict({"vcpus": 1, "memory_mib": 1, "notifiers": 0, "tracked_pages": 2, "l2s": 1,
                              "page_track": "v6.6"}),
                   _run_id("k"))
    try:
        page_track.kvm_page_track_write_tracking_enable(k)
        yield k
    finally:
        k.close()


# -- in-process: page tracking and the registry ---------------------------------------------------

def test_add_remove_require_mmu_lock_and_enabled(kvm):
    with pytest.raises(AssertionError, match="mmu_lock"):
        page_track.kvm_write_track_add_gfn(kvm, 3)
    kvm.mem.store(kvm.flags_w, 0)  # tracking disabled
    with kvm.mmu_lock:
        assert not page_track.kvm_write_track_add_gfn(kvm, 3)
    # v6.0 WARN_ON + refuse; v6.6 KVM_BUG_ON (the VM is killed)
    assert kvm.events[-1][0] == ("kvm_bug_on" if kvm.cfg.page_track == "v6.6" else "tracking_disabled")
    assert kvm.vm_dead == (kvm.cfg.page_track == "v6.6")
    page_track.kvm_page_track_write_tracking_enable(kvm)
    with kvm.mmu_lock:
        assert page_track.kvm_write_track_add_gfn(kvm, 3)
        assert page_track.kvm_write_track_add_gfn(kvm, 3)
    assert kvm.gfn_track[3] == 2 and page_track.kvm_gfn_is_write_tracked(kvm, 3)
    with kvm.mmu_lock:
        assert page_track.kvm_write_track_remove_gfn(kvm, 3)
        assert page_track.kvm_write_track_remove_gfn(kvm, 3)
        assert not page_track.kvm_write_track_remove_gfn(kvm, 3)  # below 0: WARN, refused
    assert kvm.events[-1][0] == "gfn_track_underflow"
    assert kvm.gfn_track[3] == 0 and not page_track.kvm_gfn_is_write_tracked(kvm, 3)


def test_u16_count_overflow_warns_and_refuses(kvm):
    with kvm.mmu_lock:
        kvm.gfn_track[5] = 0xFFFE
        assert page_track.kvm_write_track_add_gfn(kvm, 5)
        assert not page_track.kvm_write_track_add_gfn(kvm, 5)
    assert kvm.gfn_track[5] == 0xFFFF  # never wraps
    assert kvm.events[-1][0] == "gfn_track_overflow"
    assert kvm.warns == 1


def test_fault_path_emulates_only_tracked_writes(kvm):
    page_track.track_gfn(kvm, 7)
    assert page_track.page_fault_handle_page_track(kvm, 7, write=True)
    assert not page_track.page_fault_handle_page_track(kvm, 7, write=False)
    assert not page_track.page_fault_handle_page_track(kvm, 8, write=True)


def test_register_walk_unregister_poison(kvm):
    nodes = [notifier.alloc_node(kvm, MIRROR_KIND, 0) for _ in range(3)]
    for n in nodes:
        assert notifier.kvm_page_track_register_notifier(kvm, n)
    assert notifier.live_nodes(kvm) == nodes[::-1]  # hlist_add_head
    mirror_track(kvm, 1)
    page_track.emulator_write_phys(kvm, 4096 + 8, b"\x10" * 8)  # the walk caches its view of each node
    with page_track.record_walks(kvm) as visited:
        assert page_track.emulator_write_phys(kvm, 4096 + 16, b"\x11" * 8) == 3
    assert visited == nodes[::-1]  # head first
    page_track.emulator_write_phys(kvm, 4096 + 24, b"\x12" * 8)  # (record_walks dropped the views: warm again)
    assert oracle(kvm) == []
    assert notifier.kvm_page_track_unregister_notifier(kvm, nodes[1])
    notifier.free_node(kvm, nodes[1])
    assert notifier.live_nodes(kvm) == [nodes[2], nodes[0]]
    assert kvm.track_srcu.gp_seq >= 1  # unregister waited for a grace period
    assert not notifier.kvm_page_track_unregister_notifier(kvm, nodes[1])
    assert kvm.events[-1][0] == "unregister_unregistered"
    # a reader that meets the freed node (as it would without synchronize_srcu) reports poison and
    # calls nothing, though it holds a view of the node from before the free
    kvm.mem.store(kvm.notifier_w, nodes[1] + 1)
    assert page_track.kvm_page_track_write(kvm, MMIO, b"\0" * 4) == 0
    assert kvm.poison_reads == 1
    assert kvm.events[-1][1].endswith("read of poisoned notifier node (walk)") and kvm.events[-1][2]["node"] == nodes[1]


class _Unlocked:
    """A ``with kvm.mmu_lock:`` that takes nothing (the caller's lock dropped); the held query asks the real lock."""

    def __init__(self, lk):
        self.lk = lk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def is_held(self):
        return self.lk.is_held()

    def owner(self):
        return self.lk.owner()


def test_node_pool_slots_are_claimed_under_mmu_lock(kvm):
    """The node pool, like the list, is mmu_lock's (asserted where a slot is claimed): alloc_node
    with its lock dropped fails at its first claim, deterministically; with it, a slot is claimed."""
    real = kvm.mmu_lock
    kvm.mmu_lock = _Unlocked(real)
    try:
        with pytest.raises(AssertionError, match="mmu_lock"):
            notifier.alloc_node(kvm, MIRROR_KIND, 0)
    finally:
        kvm.mmu_lock = real
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0)
    assert notifier.node_state(kvm, n) == L.NODE_ALLOCATED
    notifier.free_node(kvm, n)


def test_list_changes_assert_mmu_lock(kvm):
    """Register and unregister change the list under mmu_lock (asserted where the list's seqcount
    begins, like write_seqcount_begin on a seqcount_rwlock_t): with the lock dropped, each fails at once."""
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0)
    real = kvm.mmu_lock
    kvm.mmu_lock = _Unlocked(real)
    try:
        with pytest.raises(AssertionError, match="mmu_lock"):
            notifier.kvm_page_track_register_notifier(kvm, n)
        assert notifier.live_nodes(kvm) == []
        kvm.mmu_lock = real
        assert notifier.kvm_page_track_register_notifier(kvm, n)
        kvm.mmu_lock = _Unlocked(real)
        with pytest.raises(AssertionError, match="mmu_lock"):
            notifier.kvm_page_track_unregister_notifier(kvm, n)
    finally:
        kvm.mmu_lock = real
    assert notifier.live_nodes(kvm) == [n]
    assert notifier.kvm_page_track_unregister_notifier(kvm, n) and notifier.live_nodes(kvm) == []
    notifier.free_node(kvm, n)


def test_the_walks_assert_their_srcu_read_side_section(kvm, monkeypatch):
    """hlist_for_each_entry_srcu(..., srcu_read_lock_held(&track_srcu)): the write path's walk and
    ``walk`` (track_remove_region) with their SRCU read-side pair dropped fail at once."""
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0)
    notifier.kvm_page_track_register_notifier(kvm, n)
    assert page_track.kvm_page_track_write(kvm, 4096, b"\x01" * 8) == 1
    monkeypatch.setattr(kvm.track_srcu, "read_lock", lambda: None)
    monkeypatch.setattr(kvm.track_srcu, "read_unlock", lambda: None)
    kvm.write_path = None  # bound again: with the section dropped
    with pytest.raises(AssertionError, match="outside an SRCU read-side"):
        page_track.kvm_page_track_write(kvm, 4096, b"\x02" * 8)
    with pytest.raises(AssertionError, match="outside an SRCU read-side"):
        notifier.walk(kvm, lambda hd, i: None)
    monkeypatch.undo()
    kvm.write_path = None
    assert page_track.kvm_page_track_write(kvm, 4096, b"\x03" * 8) == 1
    assert notifier.kvm_page_track_unregister_notifier(kvm, n)
    notifier.free_node(kvm, n)


def test_a_lockdep_splat_at_vm_creation_is_a_failure_verdict(monkeypatch):
    """The coordinator's own lockdep splat (VM creation: the notifier nodes are made there) ends the run
    as launch.py's FAILURE with the splat as its reason (RunError), not as a traceback."""
    def unlocked_alloc(kvm, kind, owner, refcounted=False):  # alloc_node with its mmu_lock dropped
        notifier._init_node(kvm, 0, kind, owner, refcounted)
        return 0

    monkeypatch.setattr(notifier, "alloc_node", unlocked_alloc)
    with pytest.raises(RunError, match="lockdep splat at VM creation: lockdep: mmu_lock not held"):
        with Coordinator(_cfg(), vcpu_main, preload=("vcpu.worker",)):
            pass


def test_redundant_registration_warns(kvm):
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0)
    assert notifier.kvm_page_track_register_notifier(kvm, n)
    assert not notifier.kvm_page_track_register_notifier(kvm, n)
    assert kvm.events[-1][0] == "redundant_registration"
    assert notifier.live_nodes(kvm) == [n]  # not linked twice


def test_mirror_oracle_sees_a_write_that_escaped_the_notifier(kvm):
    n = notifier.alloc_node(kvm, MIRROR_KIND, 0)
    notifier.kvm_page_track_register_notifier(kvm, n)
    mirror_track(kvm, 2)
    page_track.emulator_write_phys(kvm, 2 * 4096, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert oracle(kvm) == []
    kvm.guest_bytes[2 * 4096 + 100] = 0x5A  # a store that bypassed emulation
    bad = oracle(kvm)
    assert len(bad) == 1 and "lost write" in bad[0] and "0x2" in bad[0]


# -- multiprocess: scripted and free-running -----------------------------------------------------

def _cfg(**kw):
    base = {"vcpus": 2, "duration": 1.0, "memory_mib": 4, "notifiers": 0, "tracked_pages": 4, "l2s": 2}
    base.update(kw)
    return from_dict(base)


def _script(cfg, steps, hooks=()):
    with Coordinator(cfg, vcpu_main, preload=("vcpu.worker",), hooks=hooks) as co:
        return run_script(co, steps)


def test_scripted_writes_reach_each_notifier_exactly_once():
    cfg = _cfg()
    gfn = tracked_gfns(cfg)[0]
    steps = [(0, "register", {"kind": MIRROR_KIND}), (1, "register", {"kind": MIRROR_KIND}),
             (0, "register", {"kind": MIRROR_KIND}), (1, "track", {"gfn": gfn}),
             (0, "write", {"gpa": gfn * 4096 + 8, "data": 0x1122334455667788}),  # tracked
             (1, "write", {"gpa": (gfn + 50) * 4096, "data": 7}),                 # untracked
             (1, "write", {"gpa": MMIO, "data": b"\x01\x00\x00\x00"}),             # MMIO
             (0, "read", {"gpa": gfn * 4096 + 8})]
    res = _script(cfg, steps)
    assert res["verdict"] == "SUCCESS", res["reasons"]
    log = res["steps"]
    # page_track v6.0 (the default): KVM's own kvm_mmu_pte_write node (0, registered at VM creation)
    # is walked too; MMIO never walks (x86.c emulator_write_phys) unless --mmio-walk
    nodes = sorted([0] + [s["value"]["node"] for s in log[:3]])
    tracked, untracked, mmio = log[4]["value"], log[5]["value"], log[6]["value"]
    assert tracked["emulated"] and tracked["calls"] == 4 and sorted(tracked["nodes"]) == nodes
    assert not untracked["emulated"] and untracked["calls"] == 0 and untracked["nodes"] == []
    assert mmio["emulated"] and mmio["calls"] == 0 and mmio["nodes"] == []
    assert log[7]["value"] == 0x1122334455667788


def test_scripted_redundant_registration_is_a_failure_with_a_warn():
    res = _script(_cfg(), [(0, "register", {"kind": MIRROR_KIND}), (1, "reregister", {"node": 1})])
    assert res["verdict"] == "FAILURE"
    assert any(w["kind"] == "redundant_registration" and w["vcpu"] == 1 for w in res["warnings"])


def test_scripted_bad_command_is_reported_not_fatal():
    res = _script(_cfg(), [(0, "vmrun", {"l2": 99}), (0, "read", {"gpa": 0})])
    assert res["verdict"] == "FAILURE"
    assert res["steps"][0]["ok"] is False and "l2" in res["steps"][0]["error"]
    assert res["steps"][1]["ok"] is True


@pytest.mark.parametrize("hooks,expect", [((), "SUCCESS"), (("no-synchronize-srcu",), "FAILURE")])
def test_churn_never_lets_a_reader_touch_a_poisoned_node(hooks, expect):
    """Register/unregister concurrently with writers; without synchronize_srcu (test hook) the
    freed, poisoned node is met by a reader and the run fails — the test has teeth."""
    for seed in (1, 2, 3):  # the broken variant: a loaded host can starve one 1.5 s run of the race
        cfg = _cfg(vcpus=3, duration=1.5, churn_rate=0.3, notifiers=2, tracked_fraction=0.5, mmio_fraction=0.3,
                   fuzz="heavy", seed=seed)  # race widening: the window is a few loads wide
        with Coordinator(cfg, vcpu_main, preload=("vcpu.worker",), hooks=hooks) as co:
            res = co.run_free()
        assert res["counters"]["register"] > 100
        if expect == "SUCCESS" or res["verdict"] == "FAILURE":
            break
    assert res["verdict"] == expect, res["reasons"]
    if expect == "FAILURE":
        assert any("poisoned" in r for r in res["reasons"])


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_free_run_cli_json(vcpus, tmp_path):
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--design", "mirror", "--vcpus", str(vcpus), "--duration", "1", "--seed", "7", "--json", str(out), "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    res = json.loads(out.read_text())
    assert res["verdict"] == "SUCCESS" and res["seed"] == 7 and res["config"]["vcpus"] == vcpus
    for kind in ("nested_vmrun", "emulated_write", "notifier_walk", "synchronize_srcu"):
        assert {"count", "per_s", "p50_ns", "p99_ns", "p999_ns", "max_ns"} <= set(res["ops"][kind])
    assert res["ops"]["nested_vmrun"]["count"] > 0 and res["ops"]["untracked_write"]["count"] > 0
    assert "mmu_lock" in res["locks"]
    assert "SUCCESS" in p.stdout


@pytest.mark.parametrize("argv,needle", [
    (["--vcpus", "0"], "--vcpus"),
    (["--vcpus", "100000"], "--vcpus"),
    (["--duration", "-1"], "--duration"),
    (["--switch-rate", "2"], "--switch-rate"),
    (["--design", "nope"], "--design"),
    (["--tracked-fraction", "0.9", "--mmio-fraction", "0.5"], "tracked_fraction"),
    (["--memory-mib", "1", "--tracked-pages", "4000"], "tracked_pages"),
    (["--vcpus", "256", "--memory-mib", "1024"], "shared memory"),
])
def test_bad_cli_input_is_one_line_exit_2(argv, needle):
    p = launch_in_process("run", *argv)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr


@pytest.mark.parametrize("toml,needle", [
    ("[config]\nvcpus = 'two'\n", "vcpus"),
    ("[config]\nbogus = 1\n", "bogus"),
    ("[config]\nvcpus = -3\n", "vcpus"),
    ("[config]\nvcpus = 2\n[[step]]\nvcpu = 5\nop = 'vmrun'\nl2 = 0\n", "vcpu"),
    ("[config]\nl2s = 2\n[[step]]\nvcpu = 0\nop = 'vmrun'\nl2 = 3\n", "l2"),
    ("[config]\n[[step]]\nvcpu = 0\nop = 'explode'\n", "op"),
    ("not toml [", "TOML"),
    ("[other]\n", "other"),
])
def test_bad_scenario_file_is_one_line_exit_2(tmp_path, toml, needle):
    f = tmp_path / "s.toml"
    f.write_text(toml)
    p = launch_in_process("run", "--scenario", str(f))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_scenario_file_scripted_run(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[config]\nvcpus = 2\nmemory_mib = 4\nnotifiers = 0\n"
                 "[[step]]\nvcpu = 0\nop = 'register'\nkind = 1\n"
                 "[[step]]\nvcpu = 1\nop = 'track'\ngfn = 3\n"
                 "[[step]]\nvcpu = 1\nop = 'write'\ngpa = 12288\ndata = '0102030405060708'\n")
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--scenario", str(f), "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    steps = json.loads(out.read_text())["steps"]
    # the registered mirror and KVM's own kvm_mmu_pte_write node (page_track v6.0, the default)
    assert steps[2]["value"]["calls"] == 2 and steps[2]["value"]["emulated"] is True


def test_unregister_on_a_cyclic_list_ends_with_a_warn(kvm):
    """A corrupted (cyclic) registry must not make unregister spin under mmu_lock."""
    a, b = (notifier.alloc_node(kvm, MIRROR_KIND, 0) for _ in range(2))
    assert notifier.kvm_page_track_register_notifier(kvm, a)
    assert notifier.kvm_page_track_register_notifier(kvm, b)  # head -> b -> a
    kvm.mem.store(kvm.nodes_w + a * 8 + L.N_NEXT, a + 1)  # a -> a: the list loops past b
    kvm.mem.store(kvm.notifier_w + L.NH_HEAD, a + 1)  # head -> a -> a ...: b is live but unreachable
    assert notifier.kvm_page_track_unregister_notifier(kvm, b) is False
    assert any(k == "list_corrupt" and "loops" in m for k, m, _ in kvm.events)
    assert kvm.mmu_lock.owner() == 0

