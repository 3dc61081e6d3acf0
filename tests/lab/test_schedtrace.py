"""The trace of a controlled schedule (lab/schedtrace.py): explore writes it beside the failing
schedule, it passes the Chrome shape checker, shows ops / lock holds and waits / RCU sections /
grace periods per vCPU, and replay writes the same bytes every time."""

from __future__ import annotations

import json

from ipc.trace.chrome import problems
from lab import schedtrace
from lab.explore import TRACE_JSON, TRACE_TEXT, builtin, explore, replay


def _slices(doc: dict, proc: str) -> dict[str, list[dict]]:
    pid = next(e["pid"] for e in doc["traceEvents"] if e.get("name") == "process_name" and e["args"]["name"] == proc)
    out: dict[str, list[dict]] = {}
    for e in doc["traceEvents"]:
        if e.get("pid") == pid and e["ph"] in ("X", "i"):
            out.setdefault(e["name"], []).append(e)
    return out


def test_synthetic_log_ops_locks_rcu_grace_period():
    log = [(0, "op vmrun l2=0", False), (0, "tables_lock: lock", False), (1, "op write l2=0", False),
           (1, "tables_lock: lock", False), (0, "srcu: read_lock", False), (0, "srcu: read_lock", False),
           (1, "tables_lock: wait", True), (0, "srcu: read_unlock", False), (1, "tables_lock: wait", True),
           (0, "tables_lock: unlock", False), (1, "tables_lock: wait", True), (0, "srcu: read_unlock", False),
           (1, "tables_lock: unlock", False), (1, "track_srcu.gp_lock: lock", False),
           (1, "track_srcu: grace period waits for readers", True),
           (1, "track_srcu.gp_lock: unlock", False)]
    doc = schedtrace.to_chrome(schedtrace.snapshot(log, 2, [(12, 2, "WARN x")], "FAILURE", ("oracle: y",)), "t")
    assert problems(doc) == []
    v0, v1, co = _slices(doc, "vCPU 0"), _slices(doc, "vCPU 1"), _slices(doc, "coordinator")
    assert [(e["ts"], e["dur"]) for e in v0["tables_lock"]] == [(1.02, 8.0)]  # held steps 1..9
    assert len(v0["srcu read"]) == 1 and v0["srcu read"][0]["ts"] == 4.02  # outermost section only
    assert v0["srcu read"][0]["ts"] + v0["srcu read"][0]["dur"] == 11.02
    (w,) = v1["wait tables_lock"]
    assert (w["ts"], round(w["ts"] + w["dur"], 3)) == (3.02, 10.02)  # blocked at 3, got it at 10
    assert v1["tables_lock"][0]["ts"] == 10.021
    assert v1["grace period track_srcu"][0]["ts"] == 13.5 and "synchronize track_srcu" in v1
    assert len(v1["write l2=0"]) == 1 and "WARN x" in v1 and {"FAILURE", "oracle: y"} <= set(co)
    assert len([e for e in doc["traceEvents"] if e["ph"] == "i" and e["pid"] in (2, 3)]) == len(log) + 1
    assert "1 us = 1 step" in doc["otherData"]["clock"]


def test_explore_writes_the_failing_trace_and_replay_repeats_it_byte_for_byte(tmp_path):
    sc = builtin("kaboom", "bool", None, ())
    res = explore(sc, "pct", 3, 1000, 1, str(tmp_path), trace=str(tmp_path / "x.json"), shrink=False)
    assert res["verdict"] == "FAILURE"
    doc = json.loads((tmp_path / TRACE_JSON).read_text())
    assert problems(doc) == []
    procs = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    assert procs == {"coordinator", "vCPU 0", "vCPU 1"}
    names = {e["name"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {"vmrun l2=0", "tables_lock", "synchronize guest_mode"} <= names
    inst = [e for e in doc["traceEvents"] if e["ph"] == "i"]
    assert len([e for e in inst if "retry" in e.get("args", {})]) == res["failing_steps"]
    assert any(e["name"] == "FAILURE" for e in inst)
    assert any(e["name"].startswith("oracle: ") for e in inst if e["pid"] == 1)
    assert "lock_acquired: tables_lock" in (tmp_path / TRACE_TEXT).read_text()
    assert (tmp_path / "x.json").read_bytes() == (tmp_path / TRACE_JSON).read_bytes()
    sched_file = str(tmp_path / "failing-schedule.toml")
    for name in ("r1.json", "r2.json"):
        assert replay(sched_file, str(tmp_path / name))["verdict"] == "FAILURE"
    r1 = (tmp_path / "r1.json").read_bytes()
    assert r1 == (tmp_path / "r2.json").read_bytes() == (tmp_path / TRACE_JSON).read_bytes()
    assert problems(json.loads(r1)) == []
