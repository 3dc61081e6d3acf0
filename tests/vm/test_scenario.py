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
    ("node-refcount", 0, None),
    ("bool", 1, "lost write to gpa"),
    ("naive", 1, "redundant registration of live notifier node"),
    ("naive --redundant-registration mainline", 1, "kvm_page_track_write would never finish (soft lockup)"),
    ("split", 1, "lost write"),
    ("split --split-warn off", 1, "lost write"),
])
def test_kaboom_scenario(design, registration, rc, needle, tmp_path):
    p, res = _launch(["scenario", "kaboom", "--design", design, "--registration", *registration.split(),
                      "--quiet"], tmp_path)
    assert p.returncode == rc, p.stdout + p.stderr
    assert res["steps"] and all(s["ok"] for s in res["steps"])
    text = json.dumps(res["warnings"]) + json.dumps(res["reasons"]) + json.dumps(res["oracle"])
    if needle is None:
        assert res["verdict"] == "SUCCESS" and not res["warnings"]
    else:
        assert res["verdict"] == "FAILURE" and needle in text, text[:2000]
    if "mainline" in registration:  # the cycle names the registration that made it: vCPU 1 (Y)
        assert "made by registration #3 (by vCPU 1)" in text, text[:2000]
    if registration.startswith("split"):
        assert ("registered while write tracking is disabled" in text) == ("off" not in registration)


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
                                  ["run", "--switch-rate", "-0.1"], ["run", "--hook", "nope"],
                                  ["run", "--page-track", "v5.16"], ["run", "--split-warn", "maybe"],
                                  ["scenario", "kaboom", "--redundant-registration", "sometimes"],
                                  ["scenario", "kaboom", "--registration", "node-count"]])
def test_bad_design_input_exit_2(argv):
    p = subprocess.run([sys.executable, "launch.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_kaboom_table_command_prints_every_verdict():
    p = subprocess.run([sys.executable, "launch.py", "scenario", "kaboom", "--table"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| registration")}
    assert set(rows) == {"refcount", "node-refcount", "bool", "naive (warn)", "naive (mainline)",
                         "split (WARN on)", "split (WARN off)"}
    assert all(len(cells) == 3 for cells in rows.values())
    assert rows["refcount"] == rows["node-refcount"] == ["SUCCESS"] * 3
    assert all(c.startswith("FAILURE: lost write") for c in rows["bool"] + rows["split (WARN off)"])
    assert all("redundant-registration WARN" in c for c in rows["naive (warn)"])
    assert all("notifier list cycle" in c for c in rows["naive (mainline)"])
    assert all("lost write" in c and "untracked-notifier WARN" in c for c in rows["split (WARN on)"])


@pytest.mark.parametrize("design", ["mutex-hash", "per-table-notifier"])
def test_split_free_run_loses_a_write_the_oracle_sees(design, tmp_path):
    """The split ordering in a free run: a vCPU's first nested VMRUN before vCPU 0's activation path
    makes a table that is never write-protected. Seeded runs with --fuzz heavy until one shows it;
    the oracle must name a lost write (I2 at VMRUN), with the registration WARN off."""
    found = None
    split_kinds = {"stale_entry", "l2_on_unshadowed_table", "tracking_disabled"}  # what the split causes
    for seed in range(1, 13):  # about one seed in two shows it (measured: 5 of 8, both designs)
        p, res = _launch(["run", "--design", design, "--registration", "split", "--split-warn", "off",
                          "--vcpus", "3", "--duration", "1", "--seed", str(seed), "--fuzz", "heavy", "--quiet"],
                         tmp_path)
        assert res is not None, p.stderr[-2000:]
        kinds = {w["kind"] for w in res["warnings"]}
        if res["verdict"] == "FAILURE":
            assert kinds <= split_kinds, kinds  # never the registration WARN (off), nothing unrelated
            if "stale_entry" in kinds:
                found = res
                break
            continue  # (timing: L2 ran on the unshadowed table, I1 said so first, no write was lost)
        assert not res["warnings"], res["warnings"][:3]
    assert found is not None, "no seed lost a write"
    assert any("lost write to gpa" in w["message"] for w in found["warnings"])
