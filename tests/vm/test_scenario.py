"""Issue 5 end to end through launch.py: the kaboom scenario over ZeroMQ, and each design free-running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _launch(args, tmp_path, timeout=120):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "launch.py", *args, "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    res = json.loads(out.read_text()) if out.exists() else None
    return p, res


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list", "per-table-notifier"])
@pytest.mark.parametrize("registration,rc,needle", [
    ("refcount", 0, None),
    ("bool", 1, "lost write to gpa"),
    ("naive", 1, "redundant registration of live notifier node"),
    ("split", 1, "write tracking"),
])
def test_kaboom_scenario(design, registration, rc, needle, tmp_path):
    p, res = _launch(["scenario", "kaboom", "--design", design, "--registration", registration, "--quiet"],
                     tmp_path)
    assert p.returncode == rc, p.stdout + p.stderr
    assert res["steps"] and all(s["ok"] for s in res["steps"])
    text = json.dumps(res["warnings"]) + json.dumps(res["reasons"]) + json.dumps(res["oracle"])
    if needle is None:
        assert res["verdict"] == "SUCCESS" and not res["warnings"]
    else:
        assert res["verdict"] == "FAILURE" and needle in text, text[:2000]


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list", "per-table-notifier"])
def test_design_free_run_passes_oracle(design, tmp_path):
    p, res = _launch(["run", "--design", design, "--vcpus", "3", "--duration", "1.5", "--switch-rate", "0.3",
                      "--quiet"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert res["verdict"] == "SUCCESS" and res["counters"]["vmrun"] > 100
    assert res["counters"]["table_create"] > 0


def test_rcu_list_without_synchronize_rcu_fails(tmp_path):
    p, res = _launch(["run", "--design", "rcu-list", "--vcpus", "3", "--duration", "2", "--switch-rate", "0.5",
                      "--l2s", "6", "--hook", "no-synchronize-rcu", "--hook", "avic-reader-delay", "--quiet"],
                     tmp_path)
    assert p.returncode == 1, p.stdout[-2000:]
    assert res["verdict"] == "FAILURE"


@pytest.mark.parametrize("argv", [["scenario", "kaboom", "--registration", "sometimes"],
                                  ["scenario", "nope"], ["run", "--design", "hash"], ["run", "--l2s", "0"],
                                  ["run", "--switch-rate", "-0.1"], ["run", "--hook", "nope"]])
def test_bad_design_input_exit_2(argv):
    p = subprocess.run([sys.executable, "launch.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
