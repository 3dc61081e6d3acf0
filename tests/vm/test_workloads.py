"""The table-write knob, the named workload points and the newcomer's default ``run``."""

from __future__ import annotations

import json
import os

import pytest
from conftest import launch_in_process

from ipc.errors import UsageError
from vm.config import from_dict
from vm.workloads import WORKLOADS, workload

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_table_writes_per_vmrun_decides_the_tracked_fraction():
    c = from_dict({"table_writes_per_vmrun": 0.02, "writes_per_exit": 8})
    assert c.tracked_fraction == 0.02 / 8
    assert from_dict({"table_writes_per_vmrun": 2, "writes_per_exit": 2, "mmio_fraction": 0}).tracked_fraction == 1.0
    assert from_dict({}).table_writes_per_vmrun is None and from_dict({}).tracked_fraction == 0.25
    with pytest.raises(UsageError, match="table_writes_per_vmrun"):
        from_dict({"table_writes_per_vmrun": 3, "writes_per_exit": 2})
    with pytest.raises(UsageError, match="tracked_fraction"):
        from_dict({"table_writes_per_vmrun": 2, "writes_per_exit": 2, "mmio_fraction": 0.5})


def test_named_points_are_valid_and_heavy_is_the_old_default():
    for name in WORKLOADS:
        from_dict({**workload(name), "design": "mutex-hash"})
    heavy, default = from_dict(workload("heavy")), from_dict({})
    for k in ("writes_per_exit", "tracked_fraction", "mmio_fraction", "switch_rate", "guest_time_us"):
        assert getattr(heavy, k) == getattr(default, k), k
    real = from_dict(workload("realistic"))
    assert real.writes_per_exit * real.tracked_fraction == pytest.approx(0.02)


def test_bare_run_is_a_nested_avic_tour_at_the_realistic_point(tmp_path):
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--duration", "1", "--json", str(out))
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("next:") and "compare" in last and "scenario" in last
    res = json.loads(out.read_text())
    c = res["config"]
    assert c["design"] == "mutex-hash" and c["vcpus"] == 2 and c["table_writes_per_vmrun"] == 0.02
    # RFC v3: nested VMRUN takes tables_lock only on a table change or sync, not on every VMRUN
    assert 0 < res["locks"]["tables_lock"]["acquisitions"] < res["ops"]["nested_vmrun"]["count"]
    # about 0.02 table writes per nested VMRUN (a seeded binomial draw)
    assert 0.005 < res["ops"]["tracked_write"]["count"] / res["ops"]["nested_vmrun"]["count"] < 0.05
    # naming a design keeps the Config defaults (scripts and the mutation catalogue rely on that)
    q = launch_in_process("run", "--design", "mirror", "--duration", "0.3", "--quiet", "--json", str(out))
    assert q.returncode == 0 and "next:" not in q.stdout
    assert json.loads(out.read_text())["config"]["tracked_fraction"] == 0.25
