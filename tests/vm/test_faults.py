"""Fault injection: every fault kind ends the run in bounded time with a named diagnosis, exit 1,
results up to the fault saved, no orphan process, no leaked segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(args, tmp_path, timeout=90):
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "launch.py", "run", "--design", "mirror", "--quiet", "--json", str(out), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p, out, time.monotonic() - t0


@pytest.mark.parametrize("spec,diagnosis", [
    ("kill-vcpu:1@rcu-read", "grace period of rcu blocked by dead reader slot of vCPU 1"),
    ("kill-vcpu:1@srcu-read", "grace period of track_srcu blocked by dead reader slot of vCPU 1"),
    ("kill-vcpu:0@mmu-lock", "vCPU 0 died holding mmu_lock"),
    ("kill-vcpu:1@tables-lock", "vCPU 1 died holding tables_lock"),
    # killed anywhere: inside a read section the diagnosis names the blocked grace period instead
    ("kill-vcpu:1@random", "vCPU 1"),
    ("stall-vcpu:1:1500", "RCU stall: vCPU 1 in read-side critical section of rcu for"),
])
def test_fault_is_diagnosed(spec, diagnosis, tmp_path):
    p, out, took = _run(["--vcpus", "3", "--duration", "2", "--inject", spec, "--stall-ms", "1000"], tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert diagnosis in " ".join(p.stdout.split()), p.stdout  # (the summary is wrapped to the terminal)
    if spec.endswith("@random"):
        assert "signal 9" in p.stdout
    assert took < 30
    res = json.loads(out.read_text())
    assert res["verdict"] == "FAILURE" and any(diagnosis in r for r in res["reasons"])
    assert res["counters"]["vmrun"] > 0  # results up to the fault were kept


@pytest.mark.xdist_group("bare_clean")  # its `launch.py clean` removes any dead run's segments (tests/lab/test_cleanup.py)
def test_kill_coordinator_vcpus_exit_by_themselves(tmp_path):
    p = subprocess.Popen([sys.executable, "launch.py", "run", "--design", "mirror", "--vcpus", "3", "--duration", "5",
                          "--inject", "kill-coordinator"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    me = psutil.Process(p.pid)
    time.sleep(0.8)
    family = [c.pid for c in me.children(recursive=True)]
    _, err = p.communicate(timeout=60)
    assert p.returncode == -9
    run_id = err.split("run ", 1)[1].split(":", 1)[0]
    # the vCPUs are not our children (forkserver): find them by their parent, the fork server
    deadline = time.monotonic() + 10
    alive = family
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in family if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"processes of the dead run still alive: {alive}"
    c = subprocess.run([sys.executable, "launch.py", "clean"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert c.returncode == 0, c.stderr
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"pts_{run_id}_")]
    from ipc.rundir import run_base

    assert not (run_base() / f"pagetrack-sim-{run_id}").exists()


@pytest.mark.parametrize("spec", ["kill-vcpu:9@mmu-lock", "kill-vcpu:1@nowhere", "stall-vcpu:0:0", "explode"])
def test_bad_inject_spec_is_usage_error(spec, tmp_path):
    p, _, _ = _run(["--vcpus", "2", "--inject", spec], tmp_path)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "--inject" in p.stderr


def _fake_kvm(nprocs: int = 3):
    """Just the shared arrays diagnose_dead reads, laid out as in vm.layout."""
    from types import SimpleNamespace

    import numpy as np

    from ipc.locks import LOCK_WORDS
    from vm import layout as L

    v = {"locks": np.zeros((len(L.LOCKS), LOCK_WORDS), dtype=np.int64)}
    for prefix, _cls in L.DOMAINS:
        v[f"{prefix}_gplock"] = np.zeros(LOCK_WORDS, dtype=np.int64)
        v[f"{prefix}_hdr"] = np.zeros(8, dtype=np.int64)
        v[f"{prefix}_slots"] = np.zeros((nprocs, 8), dtype=np.int64)
    return SimpleNamespace(vm=SimpleNamespace(v=v))


def test_diagnose_dead_names_grace_period_lock():
    """A vCPU that died inside synchronize() holding a domain's gp mutex is reported as such
    (issue 12, defect 6), not only as 'died (signal 9)'."""
    from vm.faults import diagnose_dead

    kvm = _fake_kvm()
    vcpu, tag, pid = 1, 3, 4242  # vCPU 1 = proc 2, tag 3
    gl = kvm.vm.v["rcu_gplock"]
    gl[0] = (pid << 32) | 1  # futex word: locked; holder pid in the high half
    gl[2] = tag              # mutex owner tag
    out = diagnose_dead(kvm, vcpu, -9)
    assert out[0] == "vCPU 1 died holding the grace-period lock of rcu (signal 9)", out
    assert diagnose_dead(kvm, 0, -9) == ["vCPU 0 died (signal 9)"]
    gl[:] = 0
    assert diagnose_dead(kvm, vcpu, -9) == ["vCPU 1 died (signal 9)"]
    # another writer already took the lock over: the domain header remembers who died holding it
    from ipc.rcu import HDR_DEAD_PID, HDR_DEAD_TAG

    hdr = kvm.vm.v["track_srcu_hdr"]
    hdr[HDR_DEAD_TAG], hdr[HDR_DEAD_PID] = tag, pid
    assert diagnose_dead(kvm, vcpu, -9) == ["vCPU 1 died holding the grace-period lock of track_srcu (signal 9)"]


def test_diagnose_dead_spinlock_owner_tag_is_low_half():
    from vm import layout as L
    from vm.faults import diagnose_dead

    kvm = _fake_kvm()
    kvm.vm.v["locks"][L.LOCK_MMU, 0] = (4242 << 32) | 2  # tag 2 = vCPU 0, holder pid in the high half
    assert diagnose_dead(kvm, 0, -9)[0] == "vCPU 0 died holding mmu_lock (signal 9)"
