"""The trace as a user sees it: ``--trace`` writes Chrome trace JSON of the right shape (one track
per process, nesting slices, matched begins and ends, flows between existing slices), and every
FAILURE leaves the last events of every process beside its results, as JSON and ftrace text."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, launch_in_process

from ipc import trace
from ipc.trace import CAT_HOLD, CAT_OP, PH_B, PH_E, PH_I, Event, Snapshot, chrome


def _launch(*args, timeout=120):
    return launch_in_process(*args, cwd=ROOT)  # launch.main in this process (the vCPUs are processes)


def _events(*spec):
    """(ts, cat, phase, name) tuples -> one process' decoded events."""
    return [Event(ts, cat, ph, name, 0, 0, i) for i, (ts, cat, ph, name) in enumerate(spec)]


def test_free_run_trace_has_the_documented_shape(tmp_path):
    out = tmp_path / "t.json"
    p = _launch("run", "--design", "mutex-hash", "--vcpus", "2", "--duration", "0.5", "--quiet",
                "--trace", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert chrome.problems(doc) == []
    evs = doc["traceEvents"]
    procs = sorted(e["args"]["name"].split(" (")[0] for e in evs if e["ph"] == "M" and e["name"] == "process_name")
    assert procs == ["coordinator", "vCPU 0", "vCPU 1"]
    names = {e["name"] for e in evs if e["ph"] == "X"}
    for want in ("nested_vmrun", "L2", "nested_vmexit", "emulated_write", "track_write", "tables_lock",
                 "guest_mode read", "track_srcu read"):
        assert want in names, want
    flows = [e for e in evs if e["ph"] in "sf"]
    assert flows and {e["name"] for e in flows} == {"emulated_write -> track_write"}
    vmruns = [e for e in evs if e["ph"] == "X" and e["name"] == "nested_vmrun"]
    # the oldest may have lost its begin (and its arguments) to the ring's overwriting
    assert all(set(e["args"]) == {"l2", "vcpu"} for e in vmruns if "truncated" not in e.get("args", {}))
    assert sum("truncated" not in e.get("args", {}) for e in vmruns) > 10


def test_failure_saves_last_events_beside_results(tmp_path):
    res = tmp_path / "kaboom.json"
    p = _launch("scenario", "kaboom", "--registration", "bool", "--quiet", "--json", str(res))
    assert p.returncode == 1, p.stderr[-2000:]
    doc = json.loads(res.read_text())
    jp, tp = doc["failure_trace"]
    assert jp == str(tmp_path / "kaboom.failure-trace.json") and tp == str(tmp_path / "kaboom.failure-trace.txt")
    assert chrome.problems(json.loads(open(jp).read())) == []
    text = open(tp).read()
    assert text.startswith("# tracer: pagetrack-sim")
    # the story of the kaboom: X unregisters (a grace period of track_srcu), then Y's write is
    # emulated with no notifier call left, and Y's VMRUN WARNs on the stale entry
    assert "synchronize track_srcu: begin" in text and "emulated_write: begin gpa=0x" in text
    assert "WARN stale_entry" in text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    ts = [float(ln.split("]")[1].split(":")[0]) for ln in lines]
    assert ts == sorted(ts) and {ln.split("-")[0].strip() for ln in lines} >= {"vCPU0", "vCPU1"}


def test_success_writes_no_failure_trace(tmp_path):
    res = tmp_path / "ok.json"
    p = _launch("scenario", "kaboom", "--registration", "refcount", "--quiet", "--json", str(res))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "failure_trace" not in json.loads(res.read_text())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ok.json"]


@pytest.mark.parametrize("argv, msg", [
    (["--trace", "/nonexistent-dir/t.json"], "does not exist"),
    (["--trace", "t.json", "--trace-events", "0"], "trace ring is off"),
    (["--trace-events", "1"], "at least 2"),  # a 1-event ring keeps nothing readable
])
def test_bad_trace_arguments_exit_2(argv, msg):
    p = _launch("run", "--duration", "0.1", *argv)
    assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_checker_has_teeth():
    doc = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "p"}},
        {"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": 0, "dur": 10},
        {"ph": "X", "name": "b", "pid": 1, "tid": 1, "ts": 5, "dur": 10},   # overlaps a
        {"ph": "B", "name": "c", "pid": 1, "tid": 2, "ts": 0},              # never ends
        {"ph": "s", "name": "f", "id": 1, "pid": 1, "tid": 3, "ts": 1},     # no slice on tid 3
        {"ph": "f", "name": "f", "id": 1, "pid": 1, "tid": 1, "ts": 1},
        {"ph": "s", "name": "g", "id": 2, "pid": 1, "tid": 1, "ts": 1},     # no f
        {"ph": "X", "name": "d", "pid": 9, "tid": 1, "ts": 0, "dur": 1},    # unnamed process
    ]}
    got = "\n".join(chrome.problems(doc))
    for want in ("'a' and 'b' overlap", "B 'c' without E", "flow 1 s at 1 points at no slice",
                 "flow 2 has only ['s']", "unnamed process 9"):
        assert want in got, want
    assert chrome.problems({}) == ["no traceEvents list"]


def test_out_of_order_releases_go_to_a_second_lane():
    # A taken, B taken, A released, B released: the holds overlap without nesting
    snap = Snapshot(names=[], procs={1: (123, _events(
        (1000, CAT_HOLD, PH_B, "A"), (2000, CAT_HOLD, PH_B, "B"), (3000, CAT_HOLD, PH_E, "A"),
        (4000, CAT_HOLD, PH_E, "B")), 0)})
    doc = chrome.to_chrome(snap)
    assert chrome.problems(doc) == []
    lanes = {e["name"]: e["tid"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert lanes["A"] != lanes["B"]
    threads = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert threads == {"locks", "locks 2"}


def test_truncated_slices_and_flows():
    snap = Snapshot(names=[], procs={0: (1, _events(
        (1000, CAT_OP, PH_E, "old"),            # begin overwritten
        (2000, CAT_OP, PH_B, "emulated_write"),
        (2100, CAT_OP, PH_B, "track_write"), (2200, CAT_OP, PH_E, "track_write"),
        (2300, CAT_OP, PH_B, "track_write"), (2400, CAT_OP, PH_E, "track_write"),
        (2500, CAT_OP, PH_E, "emulated_write"),
        (2600, CAT_OP, PH_I, "WARN x"),
        (3000, CAT_OP, PH_B, "cut")), 0)})       # never ended: the process stopped inside
    doc = chrome.to_chrome(snap, flows=[("emulated_write", "track_write")])
    assert chrome.problems(doc) == []
    x = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X"}
    assert x["old"]["args"]["truncated"].startswith("begin") and x["old"]["ts"] == 0
    assert x["cut"]["args"]["truncated"].startswith("no end") and x["cut"]["dur"] == 0
    assert sum(e["ph"] == "f" for e in doc["traceEvents"]) == 2
    assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "i"] == ["WARN x"]
    text = chrome.to_text(snap)
    assert text.count("\n") == 5 + 9 and "WARN x" in text


def test_snapshot_decode_is_what_export_reads(tmp_path, region_factory):
    from ipc.shm import Layout

    r = region_factory(Layout("trace", trace.fields(1, 16)))
    trace.init(r)
    tr = trace.configure(r, 0)
    try:
        b, e = tr.pair("x")
        tr.emit(b, 5)
        tr.emit(e)
    finally:
        trace.configure(None)
    jp, tp = chrome.dump_dir(trace.snapshot(r), str(tmp_path / "d"), arg_names={"x": ("n", "")})
    doc = json.loads(open(jp).read())
    (x,) = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert x["name"] == "x" and x["args"] == {"n": 5} and "x: begin n=5" in open(tp).read()


def test_killed_vcpu_last_event_is_the_lock_it_died_holding(tmp_path):
    res = tmp_path / "kill.json"
    p = _launch("run", "--duration", "1", "--quiet", "--inject", "kill-vcpu:0@mmu-lock", "--json", str(res))
    assert p.returncode == 1, p.stderr[-2000:]
    jp, tp = json.loads(res.read_text())["failure_trace"]
    lines = open(tp).read().splitlines()
    vcpu0 = [ln for ln in lines if ln.lstrip().startswith("vCPU0-")]
    assert vcpu0[-1].endswith("lock_acquired: mmu_lock")
    assert any("inject kill-vcpu: vcpu=0" in ln for ln in lines)
    doc = json.loads(open(jp).read())
    assert chrome.problems(doc) == []
    held = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] == 2 and e["name"] == "mmu_lock"]
    assert held[-1]["args"]["truncated"].startswith("no end")


def test_a_broken_exporter_or_decoder_never_costs_the_verdict(monkeypatch):
    from types import SimpleNamespace

    from vm import tracepoints

    def boom(*a, **k):
        raise ValueError("decoder bug")

    monkeypatch.setattr(chrome, "dump_dir", boom)
    res = {"run_id": "r1", "verdict": "FAILURE"}
    tracepoints.save_failure(Snapshot(["x"]), res, None)
    assert res == {"run_id": "r1", "verdict": "FAILURE", "failure_trace": ["not saved: ValueError: decoder bug"]}
    monkeypatch.setattr(trace, "snapshot", boom)
    kvm = SimpleNamespace(regions={"trace": SimpleNamespace(closed=False)})
    assert tracepoints.snapshot(kvm, res) is None and res["trace_error"] == "snapshot: ValueError: decoder bug"


def test_failure_without_json_dumps_under_the_failure_dir_and_says_where(tmp_path, monkeypatch):
    from lab import cleanup

    env = {**__import__("os").environ, "PTS_FAILURE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), "scenario", "kaboom", "--registration", "bool",
                        "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    (d,) = tmp_path.iterdir()
    assert sorted(x.name for x in d.iterdir()) == ["failure-trace.json", "failure-trace.txt"]
    assert str(d / "failure-trace.json") in p.stderr
    monkeypatch.setenv("PTS_FAILURE_DIR", str(tmp_path))
    out = tmp_path.parent / "clean.txt"
    with open(out, "w") as f:
        assert cleanup.failure_dumps(False, f) == 0
    assert "failure dumps: 1 in" in out.read_text() and d.exists()
    with open(out, "w") as f:
        assert cleanup.failure_dumps(True, f) == 0
    assert "removed 1" in out.read_text() and list(tmp_path.iterdir()) == []
