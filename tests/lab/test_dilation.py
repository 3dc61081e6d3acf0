"""Time dilation: the operation count, the C estimate, the weighting, a real in-process measurement,
the config's dilated times, and --dilate on the command line (recorded in the results JSON)."""

from __future__ import annotations

import json
import math
import os

from conftest import _logged_creates, launch_in_process

from ipc import _prims, fuzz
from lab import dilation
from vm.config import from_dict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_count_ops_sees_every_primitive_and_the_bytecodes():
    def path():
        _prims.nop()
        _prims.nop()
        _prims.now_ns()
        return len("abc")

    bc, prims, other = dilation.count_ops(path)
    assert prims == {"nop": 2, "now_ns": 1} and other == 1  # len()
    assert bc >= 8

    def longer():
        for _ in range(10):
            _prims.nop()

    bc2, prims2, _ = dilation.count_ops(longer)
    assert prims2 == {"nop": 10} and bc2 > bc


def test_c_estimate_and_weighted_factor_arithmetic():
    c = dilation.c_estimate(100, {"Mem.load": 10, "Mem.fetch_add": 2, "unknown": 1}, 4,
                            bc_ns=0.5, other_ns=3.0)
    assert math.isclose(c, 100 * 0.5 + 4 * 3.0 + 10 * 1.0 + 2 * 6.0 + 1 * dilation.DEFAULT_PRIM_NS)
    measured = {"paths": {p: {"py_ns": 1000.0, "c_ns": 100.0, "c_ns_range": [50.0, 200.0]} for p in dilation.PATHS}}
    measured["paths"]["track_write"] = {"py_ns": 3000.0, "c_ns": 100.0, "c_ns_range": [50.0, 200.0]}
    w = {"vmrun_get_put": 1.0, "vmrun_switch": 0.0, "track_write": 1.0, "register_unregister": 0.0}
    f = dilation.combine(measured, w)
    assert math.isclose(f["factor"], 4000 / 200) and math.isclose(f["low"], 4000 / 400)
    assert math.isclose(f["high"], 4000 / 100)


def test_weights_follow_the_workload():
    w = dilation.weights({"switch_rate": 0.1, "table_writes_per_vmrun": 0.02, "l2s": 4})
    assert math.isclose(w["vmrun_get_put"], 0.9) and w["vmrun_switch"] == 0.1 and w["track_write"] == 0.02
    w = dilation.weights({"switch_rate": 0.5, "writes_per_exit": 8, "tracked_fraction": 0.25, "l2s": 1})
    assert w["vmrun_switch"] == 0.0 and w["track_write"] == 2.0 and w["register_unregister"] == 0.0


def test_measure_design_in_process_counts_the_design_s_locks_and_leaks_nothing():
    before = set(os.listdir("/dev/shm"))
    m = dilation.measure_design("mutex-hash", budget_s=0.005)
    for p in dilation.PATHS:
        path = m["paths"][p]
        assert path["py_ns"] > 0 and 0 < path["c_ns_range"][0] < path["c_ns"] < path["c_ns_range"][1]
        assert path["dilation"] > 1  # Python is slower than the C estimate of the same sequence
    # the mutex design takes tables_lock on a table change (RFC v3) and on every table write
    assert m["paths"]["vmrun_get_put"]["prims"].get("Mutex.lock", 0) == 0
    assert m["paths"]["vmrun_switch"]["prims"].get("Mutex.lock", 0) >= 1
    assert m["paths"]["track_write"]["prims"].get("Mutex.lock", 0) >= 1
    r = dilation.measure_design("rcu-list", budget_s=0.005)
    assert r["paths"]["track_write"]["prims"].get("Mutex.lock", 0) == 0  # no sleeping lock in track_write
    assert r["paths"]["track_write"]["prims"].get("RcuReader.lock", 0) >= 1
    # (other runs and pytest-xdist workers may come and go meanwhile: only the measurement's own
    # segments count, pts_rdil* made by this process: tests/conftest.py logs them)
    made_here = _logged_creates()
    assert {f for f in set(os.listdir("/dev/shm")) - before if f.startswith("pts_rdil") and f in made_here} == set()


def test_config_dilates_guest_time_and_delays_once():
    c = from_dict({"guest_time_us": 20.0, "dilate": 3.0})
    assert c.guest_ns == 60_000 and c.dilated_ns(1000) == 3000 and c.guest_time_us == 20.0
    assert from_dict(c.to_dict()).guest_ns == 60_000  # a worker's round trip does not dilate twice
    assert from_dict({}).guest_ns == 20_000
    f = fuzz.Fuzz("light", 1, 0, dilate=4.0)
    g = fuzz.Fuzz("light", 1, 0)
    assert f.spin_max == 4 * g.spin_max and math.isclose(f.sleep_max_s, 4 * g.sleep_max_s)


def test_run_dilate_auto_prints_and_records_the_factor(tmp_path):
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--design", "rcu-list", "--duration", "0.3", "--dilate", "auto", "--quiet", "--json", str(out))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "dilate auto: factor" in p.stderr and "C estimate" in p.stderr
    res = json.loads(out.read_text())
    f = res["dilation"]["factor"]
    assert f >= 1 and res["config"]["dilate"] == f and res["dilation"]["low"] <= f <= res["dilation"]["high"]
    assert set(res["dilation"]["designs"]["rcu-list"]["paths"]) == set(dilation.PATHS)
    q = launch_in_process("run", "--design", "rcu-list", "--duration", "0.2", "--dilate", "5", "--quiet", "--json", str(out))
    assert q.returncode == 0 and json.loads(out.read_text())["config"]["dilate"] == 5.0, q.stderr[-2000:]
