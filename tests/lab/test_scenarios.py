"""explore's scenarios (issue 22 items 1 and 2): every built-in is a scripted run (the vCPU executor
and L1 write path of ``run --scenario``), so a bug in that path is found from a built-in; the
built-ins reach invalidation, memslot removal and grace periods of two updaters beside a reader; the
coverage report says which named paths ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lab.explore import explore
from lab.scenarios import BUILTINS, builtin, check

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_is_a_scripted_run_of_valid_commands(name):
    sc = builtin(name, None, None, ())
    assert sc.executor == "vcpu"
    check(sc)  # every step as run --scenario checks a file's [[step]]s
    assert sc.n == sc.cfg["vcpus"] == (3 if name in ("gp-share", "notifier") else 2)


def test_share_finds_a_lookup_that_resurrects_a_table_being_freed(monkeypatch):
    """``share``: two vCPUs get and put both tables. An RCU lookup that takes its reference with a
    plain increment (``r >= 0``: a count at 0, the last put's unlink under way, is taken) uses a table
    being freed; kaboom (each vCPU its own L2) never races a lookup with a last put."""
    from vm.avic.rcu_list import RcuListDesign
    from vm.avic.table import T_REF, TW

    def inc_any(self, t: int) -> bool:  # BUG: refcount_inc, not refcount_inc_not_zero
        m, w = self.amem, self.tw0 + t * TW + T_REF
        r = m.load(w)
        while r >= 0:
            f = m.cmpxchg(w, r, r + 1)
            if f == r:
                return True
            r = f
        return False

    monkeypatch.setattr(RcuListDesign, "_inc_not_zero", inc_any)  # (the vCPU processes fork after this)
    res = explore(builtin("share", None, "rcu-list", ()), "pct", 3, 60, 3, None, shrink=False)
    assert res["verdict"] == "FAILURE", res["schedules"]
    assert any("not on the RCU list" in r or "freed" in r for r in res["reasons"]), res["reasons"][:3]
    assert explore(builtin("kaboom", None, "rcu-list", ()), "pct", 3, 20, 3, None)["verdict"] == "SUCCESS"


def test_a_bug_in_the_l1_store_path_is_found_from_a_builtin(monkeypatch):
    """The scripted write path is the one `run` takes: an l1_store that stores to a write-protected
    page without emulating it (no notifier walk) loses Y's write in kaboom, with the correct
    registration."""
    import vcpu.vcpu as vv

    real = vv.write_path

    def buggy_write_path(kvm):
        emulate, walk, _ = real(kvm)

        def l1_store(gpa: int, new: bytes) -> int:  # BUG: the fault is not emulated, the walk skipped
            kvm.guest_mem.write(gpa, new)
            return 0

        return emulate, walk, l1_store

    sc = builtin("kaboom", "refcount", None, ())
    assert explore(sc, "pct", 3, 5, 1, None)["verdict"] == "SUCCESS"
    monkeypatch.setattr(vv, "write_path", buggy_write_path)  # (the vCPU processes fork after this)
    res = explore(sc, "pct", 3, 5, 1, None, shrink=False)
    assert res["verdict"] == "FAILURE" and res["schedules"] == 1, res.get("reasons")
    assert any("stale shadow physid entry" in r or "lost write" in r for r in res["reasons"]), res["reasons"][:3]


def test_running_finds_a_flip_that_skips_a_table_being_synced(monkeypatch):
    """``running``: vCPU 0's IsRunning flips race vCPU 1's syncs of a table naming it. A flip (rcu-list:
    per-table locks) that reads the table's state before taking its lock skips a table being synced,
    which then ends VALID with the old IsRunning: vCPU 1's VMRUN check sees its entry stale."""
    from ipc import _prims
    from vm.avic.guest import GuestEntry
    from vm.avic.table import T_STATE, TW, V_LOADED, VALID, VW

    def set_running(self, v: int, running: bool) -> None:  # the per-table-lock path, with the bug
        if self.region is None:
            self._attach()
        m, row = self.amem, self.vref0 + v * self.nt
        self._seq_begin()
        m.store(self.vw0 + v * VW + V_LOADED, 1 if running else 0)
        _prims.smp_mb()
        for t in range(self.nt):
            if m.load(row + t) <= 0 or m.load(self.tw0 + t * TW + T_STATE) != VALID:  # BUG: unlocked
                continue
            self._tlock(t)
            try:
                self._flip_running(t, v, running)
            finally:
                self._tunlock(t)
        self._seq_end()

    sc = builtin("running", None, "rcu-list", ())
    assert explore(sc, "pct", 3, 25, 3, None)["verdict"] == "SUCCESS"
    monkeypatch.setattr(GuestEntry, "_set_running", set_running)  # (the vCPU processes fork after this)
    res = explore(sc, "pct", 3, 60, 3, None, shrink=False)
    assert res["verdict"] == "FAILURE" and any("stale shadow physid entry" in r for r in res["reasons"]), \
        res.get("reasons", [])[:3]


@pytest.fixture(scope="module")
def coverage():
    out = {}
    for name in ("invalidate", "memslot", "gp-share", "kaboom", "tlb-flush"):
        res = explore(builtin(name, None, None, ()), "pct", 3, 6, 1, None, coverage=True)
        assert res["verdict"] == "SUCCESS", (name, res.get("reasons"))
        out[name] = res["coverage"]
    return out


def test_invalidate_reaches_update_and_invalidation(coverage):
    n = coverage["invalidate"]["named"]
    assert n["table invalidate"] > 0 and n["entry update"] > 0, n
    # the old built-ins change only apic id / IsRunning: they never invalidate
    assert coverage["kaboom"]["named"]["table invalidate"] == 0
    assert coverage["tlb-flush"]["named"]["table invalidate"] == 0


def test_memslot_removal_is_reached(coverage):
    c = coverage["memslot"]
    assert c["named"]["memslot removal"] == 1 and "vm/avic/erase.py:TableErase.remove_region" in c["functions"]
    assert "vm/page_track.py:kvm_page_track_delete_slot" in c["functions"]
    assert coverage["invalidate"]["named"]["memslot removal"] == 0


def test_gp_share_has_two_updaters_and_a_reader(coverage):
    n = coverage["gp-share"]["named"]
    assert n["grace periods of two updaters in one schedule"] > 0 and n["synchronize_rcu"] > 0, n
    assert n["track_write on a table"] > 0 and n["table free"] > 0, n  # the reader's lookups, the frees


def test_coverage_counts_functions_of_vm(coverage):
    c = coverage["invalidate"]
    assert 0 < c["functions_reached"] < c["functions_total"] == len(c["functions"]) + len(c["functions_missed"])
    assert "vm/avic/erase.py:TableErase._invalidate" in c["functions"]
    assert "vm/avic/pool.py:TablePool._sync" in c["functions"]
    assert "vm/coordinator.py:Coordinator.run_free" in c["functions_missed"]


def test_cli_explore_coverage(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "explore", "memslot", "--schedules", "3",
                        "--coverage", "--json", str(tmp_path / "e.json")], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "coverage of memslot:" in p.stdout and "x memslot removal" in p.stdout, p.stdout
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["coverage"]["named"]["memslot removal"] == 1 and doc["coverage"]["functions_total"] > 100
