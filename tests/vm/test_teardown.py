"""Teardown (the design's unregister / untrack / free, then kvm_mmu_uninit_vm) runs after the oracle
but before the verdict is final, in a run and in an explored schedule alike: a WARN or a lockdep
splat there is the code's bug like any other (it was lost when teardown ran after the verdict).

The bug each test plants is the one next to the right code: a teardown that frees a notifier node
it never unregistered (``free_node`` where ``release_node`` belongs)."""

from __future__ import annotations

from lab.explore import builtin, explore
from vcpu.worker import vcpu_main
from vm import notifier
from vm.config import from_dict
from vm.coordinator import Coordinator, run_script


def _script(cfg, steps):
    with Coordinator(cfg, vcpu_main, preload=("vcpu.worker",)) as co:
        return run_script(co, steps)


def test_a_warn_at_teardown_fails_the_run(monkeypatch):
    cfg = from_dict({"vcpus": 2, "memory_mib": 4, "notifiers": 1, "tracked_pages": 4, "l2s": 2})
    assert _script(cfg, [(0, "read", {"gpa": 0})])["verdict"] == "SUCCESS"
    monkeypatch.setattr(notifier, "release_node", notifier.free_node)
    res = _script(cfg, [(0, "read", {"gpa": 0})])
    assert res["verdict"] == "FAILURE"
    assert any("at teardown" in r and "still registered" in r for r in res["reasons"]), res["reasons"]


def test_a_warn_at_teardown_fails_the_schedule(monkeypatch):
    sc = builtin("tlb-flush", "refcount", "rcu-list", ())
    assert explore(sc, "pct", 3, 1, 1, None, shrink=False)["verdict"] == "SUCCESS"
    monkeypatch.setattr(notifier, "release_node", notifier.free_node)
    res = explore(sc, "pct", 3, 1, 1, None, shrink=False)
    assert res["verdict"] == "FAILURE"
    assert any("at teardown" in r and "still registered" in r for r in res["reasons"]), res["reasons"]


def test_a_registration_left_at_vm_destruction_fails_under_v6_6(monkeypatch):
    """v6.6: each registration holds a VM reference (kvm_get_kvm); a teardown that leaves one
    (the design's release_node dropped) leaks the VM. v6.0 takes none: nothing to see there."""
    def cfg(era):
        return from_dict({"vcpus": 2, "memory_mib": 4, "notifiers": 1, "tracked_pages": 4, "l2s": 2,
                          "page_track": era})

    assert _script(cfg("v6.6"), [(0, "read", {"gpa": 0})])["verdict"] == "SUCCESS"
    monkeypatch.setattr(notifier, "release_node", lambda kvm, node: None)
    res = _script(cfg("v6.6"), [(0, "read", {"gpa": 0})])
    assert res["verdict"] == "FAILURE"
    assert any("still registered at VM destruction" in r for r in res["reasons"]), res["reasons"]
    assert _script(cfg("v6.0"), [(0, "read", {"gpa": 0})])["verdict"] == "SUCCESS"


def test_an_avic_registration_left_fails_the_schedule_under_v6_6(monkeypatch):
    sc = builtin("tlb-flush", "refcount", "rcu-list", ())
    sc.cfg = {**sc.cfg, "page_track": "v6.6"}
    assert explore(sc, "pct", 3, 1, 1, None, shrink=False)["verdict"] == "SUCCESS"
    monkeypatch.setattr(notifier, "release_node", lambda kvm, node: None)
    res = explore(sc, "pct", 3, 1, 1, None, shrink=False)
    assert res["verdict"] == "FAILURE"
    assert any("still registered at VM destruction" in r for r in res["reasons"]), res["reasons"]


def test_a_vcpu_still_there_after_sigkill_counts_as_dead(monkeypatch):
    """``reap`` returns None for a process SIGKILL did not take (uninterruptible sleep): it may
    still hold locks, so the run is a FAILURE and neither the oracle nor teardown touches them."""
    from vm import coordinator

    real = coordinator.reap

    def reap_one_stuck(procs, timeout=5.0):
        codes = real(procs, timeout)
        return [None, *codes[1:]]

    monkeypatch.setattr(coordinator, "reap", reap_one_stuck)
    cfg = from_dict({"vcpus": 2, "memory_mib": 4, "notifiers": 1, "tracked_pages": 4, "l2s": 2})
    res = _script(cfg, [(0, "read", {"gpa": 0})])
    assert res["verdict"] == "FAILURE"
    assert "vCPU 0 did not exit after SIGKILL" in res["reasons"], res["reasons"]
    assert any("oracle skipped" in r for r in res["reasons"]), res["reasons"]
