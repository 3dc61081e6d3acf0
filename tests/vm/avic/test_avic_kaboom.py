"""The seed's "X registers, Y registers, X unregisters, kaboom", scripted (vm/avic/kaboom.py):
refcount -> SUCCESS; bool -> FAILURE naming the lost write; naive -> FAILURE by the
redundant-registration WARN; split -> FAILURE by the WARN naming the untracked notifier."""

from __future__ import annotations

import pytest

from ipc.errors import UsageError
from vm.avic import AVIC_DESIGNS, REGISTRATIONS, kaboom_steps, run_kaboom
from vm.config import Config
from vm.kvm import Kvm
from vm.nested import table_gfn


def kaboom(run_id, design, registration):
    cfg = Config(vcpus=2, design=design, registration=registration)
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
def test_kaboom_split_warns_about_the_untracked_notifier(run_id, design):
    _, (verdict, msgs) = kaboom(run_id, design, "split")
    assert verdict == "FAILURE"
    w = [m for m in msgs if m.startswith("WARN") and "registered while write tracking is disabled" in m]
    assert w and "notifier node" in w[0], msgs


def test_kaboom_steps_shape():
    for reg in REGISTRATIONS:
        for design in AVIC_DESIGNS:
            steps = kaboom_steps(reg, design)
            ops = [(v, op) for v, op, _ in steps]
            assert ops[:2] == [(0, "vmrun"), (1, "vmrun")]
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
    assert verdict == ("SUCCESS" if registration == "refcount" else "FAILURE")
