"""The AVIC oracle's continuous invariants (vm/avic/oracle.py), each shown to fire on the bug it
exists for and to stay quiet on the code that is right:
- (I1) a vCPU in L2 on a table that stopped being shadowed (the flood-drop race of the lock-free
  designs) with no reload request pending: forced by hand, then found by free-running runs;
- (I2) a completed L1 write missing from another vCPU's entry (the own-entry check alone missed it),
  while a store still in flight is not reported (a scripted ``write`` over several entries too).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from test_avic import avm, entry_gpa, guest, stat, tables  # noqa: F401  (avm: fixture)

from vcpu.vcpu import Vcpu
from vm.avic.table import (
    ALL_ENTRIES_EVERY,
    H_I1,
    H_REQSEQ,
    IF_COUNT,
    T_TRACKED,
    V_INL2,
    V_RELOAD,
    VW,
    make_entry,
    s64,
)
from vm.nested import table_gfn, untracked_range

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
LOCK_FREE = pytest.mark.parametrize("design", ["rcu-list", "per-table-notifier"])


def _warns(kvm, kind):
    return [m for k, m, _ in kvm.events if k == kind]


def _drop_under(d, t):
    """What a track_write that saw usecount 0 just before another vCPU entered L2 does next."""
    d._tlock(t)
    try:
        targets = d._invalidate(t, "flood_drop")
    finally:
        d._tunlock(t)
    if targets:
        d._reload_wait(t, targets)


@LOCK_FREE
def test_flood_drop_under_a_vcpu_in_l2_kicks_it(avm, design):
    kvm, d = avm(design)
    d.nested_vmrun(1, 0)  # vCPU 1 in L2 0
    t = tables(d)[table_gfn(d.cfg, 0)]
    _drop_under(d, t)
    assert d.amem.load(d.vw0 + 1 * VW + V_RELOAD) >= 1  # told to reload
    assert d.amem.load(d.vw0 + 1 * VW + V_INL2) == 0  # and kicked out of L2 (KVM_REQUEST_WAIT)
    d.sample()
    d.nested_vmexit(1, 0, False)
    assert not _warns(kvm, "l2_on_unshadowed_table") and d._h(H_I1) == 0
    d.nested_vmrun(1, 0)  # the reload: the table is write-protected and synced again
    assert d.amem.load(d._tb(t) + T_TRACKED) == 1 and d.oracle() == []


@LOCK_FREE
def test_flood_drop_race_hook_is_caught_by_i1(avm, design):
    kvm, d = avm(design, hooks=("flood-drop-race",))
    d.nested_vmrun(1, 0)
    t = tables(d)[table_gfn(d.cfg, 0)]
    _drop_under(d, t)  # the unfixed drop: no kick
    d.sample()  # the coordinator's sampling checker sees vCPU 1 in L2 on an unshadowed table
    d.nested_vmexit(1, 0, False)  # and so does vCPU 1's own check at VMEXIT
    found = _warns(kvm, "l2_on_unshadowed_table")
    assert len(found) == 2 and "(I1) vCPU 1" in found[0] and "dropped" in found[0], found
    assert any("(I1)" in b for b in d.oracle())


@LOCK_FREE
def test_an_older_reload_request_does_not_excuse_a_later_erase(avm, design):
    """Every erase requests a reload of every vCPU, so one is often pending: only a request at least
    as new as the table's latest erase tells a vCPU in L2 about it (else the flood-drop race hides
    behind another table's request)."""
    kvm, d = avm(design, hooks=("flood-drop-race",))
    d.nested_vmrun(1, 0)
    earlier = d.amem.fetch_add(d.hdr0 + H_REQSEQ, 1) + 1  # a request for another table, made while
    d.amem.store(d.vw0 + 1 * VW + V_RELOAD, earlier)  # vCPU 1 was in L2: its kick not yet taken
    t = tables(d)[table_gfn(d.cfg, 0)]
    _drop_under(d, t)  # the unfixed flood erase: no request of its own
    d.sample()
    d.nested_vmexit(1, 0, False)
    found = _warns(kvm, "l2_on_unshadowed_table")
    assert len(found) == 2 and "(I1) vCPU 1" in found[0], found


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list", "per-table-notifier"])
def test_i2_sees_a_lost_write_to_another_vcpus_entry(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    # vCPU 1's entry changes behind the notifier's back (a write that was never emulated)
    lo, _ = untracked_range(d.cfg)
    new = make_entry((lo + 5) << 12, 0, True)
    kvm.guest_mem.store(entry_gpa(gfn, 1) >> 3, s64(new))
    for _ in range(ALL_ENTRIES_EVERY):  # one of these VMRUNs checks every entry
        d.nested_vmrun(0, 0)
        d.nested_vmexit(0, 0, False)
    stale = _warns(kvm, "stale_entry")
    assert stale and "entry 1" in stale[0] and f"lost write to gpa {entry_gpa(gfn, 1):#x}" in stale[0], stale
    assert guest(kvm, gfn, 1) == new


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list"])
def test_i2_leaves_a_store_in_flight_alone(avm, design):
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    rng = random.Random(3)
    while d.tracked_write(1, rng)[0] >> 12 != gfn:  # vCPU 1 starts a store to L2 0's table ...
        pass
    lo, _ = untracked_range(d.cfg)  # ... its bytes land; the emulation has not run yet
    kvm.guest_mem.store(entry_gpa(gfn, 1) >> 3, s64(make_entry((lo + 9) << 12, 1, False)))
    before = stat(d, "entries_checked")
    for _ in range(ALL_ENTRIES_EVERY):
        d.nested_vmrun(0, 0)
        d.nested_vmexit(0, 0, False)
    assert not _warns(kvm, "stale_entry") and stat(d, "entries_checked") > before
    d.nested_vmrun(1, 1)  # vCPU 1 reaches its next VMRUN: the store has completed, never emulated
    d.nested_vmexit(1, 1, False)
    for _ in range(ALL_ENTRIES_EVERY):
        d.nested_vmrun(0, 0)
        d.nested_vmexit(0, 0, False)
    stale = _warns(kvm, "stale_entry")
    assert stale and "entry 1" in stale[0], stale


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list"])
def test_i2_leaves_a_scripted_multi_entry_store_alone_until_its_emulation_ends(avm, design, monkeypatch):
    """``explore invalidate`` (seed 1, schedule 72): vCPU 1's scripted ``write`` of 16 bytes over
    entries 0 and 1 is in guest memory, its emulation has not reached the notifier yet, and vCPU 0
    enters L2 on the still-valid shadow entry 0. The store has not completed (the erase, its reload
    request and the kick come before the emulated instruction ends): in flight, not a lost write.
    The scripted ``write`` used to mark nothing in flight, so I2 reported "lost write to gpa"."""
    kvm, d = avm(design)
    gfn = table_gfn(d.cfg, 0)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    t = tables(d)[gfn]
    track_write = d.track_write

    def vmrun_first(gpa, nbytes, node, new=None):  # the emulation, between the store and the walk
        d.nested_vmrun(0, 0)
        assert d.amem.load(d.vw0 + 0 * VW + V_INL2) == t + 1  # vCPU 0 in L2 on the old entries
        track_write(gpa, nbytes, node, new)

    monkeypatch.setattr(d, "track_write", vmrun_first)
    assert Vcpu(kvm, d, 1).execute("write", {"gpa": entry_gpa(gfn, 0), "data": bytes(16)})["emulated"]
    assert not _warns(kvm, "stale_entry"), _warns(kvm, "stale_entry")
    assert stat(d, "invalidate") == 1 and d.amem.load(d.vw0 + 0 * VW + V_INL2) == 0  # erased, kicked
    assert d.amem.load(d.vw0 + 0 * VW + V_RELOAD) >= 1
    monkeypatch.undo()
    d.nested_vmrun(0, 0)  # the reload: re-protected and synced, entries 0 and 1 now invalid
    assert guest(kvm, gfn, 0) == guest(kvm, gfn, 1) == 0
    assert d.amem.load(d.shadow0 + t * d.ne) == d.amem.load(d.shadow0 + t * d.ne + 1) == 0
    d.nested_vmexit(0, 0, False)
    assert not _warns(kvm, "stale_entry") and d.oracle() == []
    assert [d.amem.load(d.if0 + e * 2 + IF_COUNT) for e in (0, 1, 2)] == [1, 1, 0]  # still in flight
    d.nested_vmrun(1, 1)  # vCPU 1's next VMRUN: its store has completed
    assert [d.amem.load(d.if0 + e * 2 + IF_COUNT) for e in (0, 1, 2)] == [0, 0, 0]


def _run(args, tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "launch.py", "run", "--quiet", "--json", str(out), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    return p, json.loads(out.read_text())


@LOCK_FREE
def test_free_running_flood_drop_race_fails(design, tmp_path):
    p, res = _run(["--design", design, "--vcpus", "3", "--duration", "3", "--hook", "flood-drop-race"], tmp_path)
    assert p.returncode == 1 and res["verdict"] == "FAILURE", p.stdout[-2000:]
    assert "(I1)" in json.dumps(res["reasons"]) + json.dumps(res["warnings"])


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list", "per-table-notifier"])
def test_free_running_frequent_drops_are_fine_when_fixed(design, tmp_path):
    p, res = _run(["--design", design, "--vcpus", "3", "--duration", "3", "--seed", "3",
                   "--hook", "avic-flood-often"], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:]
    assert res["design"]["flood_drop"] > 100 and res["design"]["reload_request"] > 0


def _run_failing(args, tmp_path):
    """A 1-second self-test run; if it ends in SUCCESS, once more for 3 s. The 1-second figure on 20
    seeds is bench.selftests' to measure on a quiet host: here, on a CI host that other work loads
    (2 cores), a 1 s run can be starved of the interleaving (CI at d34fb75: seed 3 of both tests
    under load 8), while a detector that stopped working fails the 3 s run too."""
    p, res = _run(["--duration", "1", *args], tmp_path)
    if p.returncode == 0:
        p, res = _run(["--duration", "3", *args], tmp_path)
    return p, res


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flood_drop_race_fails_in_one_second(seed, tmp_path):
    """Issue 23 item 3: the README's 1-second self-test (default --vcpus) fails on every seed: the
    steered drop waits with the table's locks dropped, so the vCPU it waits for can reach L2."""
    p, res = _run_failing(["--design", "rcu-list", "--seed", str(seed), "--hook", "flood-drop-race"], tmp_path)
    assert p.returncode == 1 and res["verdict"] == "FAILURE", p.stdout[-2000:]
    assert "(I1)" in json.dumps(res["reasons"]) + json.dumps(res["warnings"])
    # the drop that skipped its reload happened; whether the steer met a vCPU or the race came
    # unsteered (CI at 6754d2a, seed 3 under load: I1 with flood_steered 0) is the host's timing
    assert res["design"]["flood_drop"] > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_tlb_flush_fails_in_one_second(seed, tmp_path):
    """no-tlb-flush's widening (frequent drops, stores steered past the re-protect's sync) makes the
    lost write show within 1 s on every seed; the oracle that sees it is unchanged (I2)."""
    p, res = _run_failing(["--design", "mutex-hash", "--seed", str(seed), "--hook", "no-tlb-flush"], tmp_path)
    assert p.returncode == 1 and res["verdict"] == "FAILURE", p.stdout[-2000:]
    assert "stale shadow physid entry" in json.dumps(res["reasons"]) + json.dumps(res["warnings"])
