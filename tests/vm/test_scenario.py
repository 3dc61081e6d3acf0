"""Issue 5 end to end through launch.py: the kaboom scenario over ZeroMQ, and each design free-running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import launch_in_process

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _launch(args, tmp_path):
    """``launch.py ARGS --json`` in this process (launch.main: the vCPUs are processes all the same);
    what runs is the scenario's logic, not the CLI process (test_issue_case_through_the_cli_... is)."""
    out = tmp_path / "r.json"
    p = launch_in_process(*args, "--json", out, cwd=ROOT)
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
    p = launch_in_process(*argv)
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


# --------------------------------------------------------------------------------------------
# issue 21 item 5: every step field is checked (type and range) before anything starts
# --------------------------------------------------------------------------------------------

STEP = "[config]\nvcpus = 2\nl2s = 2\nmemory_mib = 1\nmax_nodes = 16\n[[step]]\nvcpu = 0\nop = 'vmrun'\nl2 = 0\n" \
       "[[step]]\n{step}\n"
# (the second step, the field its error must name)
BAD_STEPS = [
    # the issue's cases: a datetime, an array, a 27-digit integer for gpa
    ("vcpu = 1\nop = 'write'\ngpa = 1979-05-27T07:32:00Z\ndata = 1", "gpa", "date/time"),
    ("vcpu = 1\nop = 'write'\ngpa = [4096, 8192]\ndata = 1", "gpa", "array"),
    ("vcpu = 1\nop = 'write'\ngpa = 123456789012345678901234567\ndata = 1", "gpa", "27 digits"),
    ("vcpu = 1\nop = 'write'\ngpa = true\ndata = 1", "gpa", "boolean"),
    ("vcpu = 1\nop = 'write'\ngpa = -8\ndata = 1", "gpa", "-8"),
    ("vcpu = 1\nop = 'write'\ngpa = 8.0\ndata = 1", "gpa", "float"),
    ("vcpu = 1\nop = 'write'\ngpa = { a = 1 }\ndata = 1", "gpa", "table"),
    ("vcpu = 1\nop = 'write'\ngpa = 0\ndata = 1979-05-27", "data", "date/time"),
    ("vcpu = 1\nop = 'write'\ngpa = 0\ndata = 123456789012345678901234567", "data", "27 digits"),
    ("vcpu = 1\nop = 'write'\ngpa = 0\ndata = [1]", "data", "array"),
    ("vcpu = 1\nop = 'write'\ngpa = 0\ndata = 'zz'", "data", "hex"),
    ("vcpu = 1\nop = 'write'\ngpa = 4095\ndata = 1", "data", "page boundary"),
    ("vcpu = 1\nop = 'write'\ngpa = 0", "data", "missing"),
    ("vcpu = 1\nop = 'read'\ngpa = 1048576", "gpa", "0..1048568"),  # 1 MiB of memory
    ("vcpu = 1\nop = 'read'\ngpa = 07:32:00", "gpa", "date/time"),
    ("vcpu = 1\nop = 'track'\ngfn = 256", "gfn", "0..255"),
    ("vcpu = 1\nop = 'untrack'\ngfn = false", "gfn", "boolean"),
    ("vcpu = 1\nop = 'reregister'\nnode = 16", "node", "0..15"),
    ("vcpu = 1\nop = 'unregister'\nnode = 1\nfree = 1", "free", "boolean"),
    ("vcpu = 1\nop = 'register'\nkind = 0", "kind", "1..65536"),
    ("vcpu = 1\nop = 'register'\nowner = -1", "owner", "-1"),
    ("vcpu = 1\nop = 'sleep'\nus = 1e3", "us", "float"),
    ("vcpu = 1\nop = 'write_entry'\nl2 = 0\nentry = 512\napic = 0", "entry", "0..511"),
    ("vcpu = 1\nop = 'write_entry'\nl2 = 0\nentry = 1\napic = 256", "apic", "0..255"),
    ("vcpu = 1\nop = 'write_entry'\nl2 = 0\nentry = 1\napic = 1\nrunning = 'yes'", "running", "boolean"),
    ("vcpu = 1\nop = 'vmexit'\nleaving = 1", "leaving", "boolean"),
    ("vcpu = 1\nop = 'vmrun'\nl2 = 2", "l2", "no L2"),
    ("vcpu = 1\nop = 'vmrun'\nl2 = true", "l2", "boolean"),
    ("vcpu = 1\nop = 'vmrun'", "l2", "missing"),
    ("vcpu = 1\nop = 'vmrun'\nl2 = 0\ngpa = 0", "gpa", "unknown field"),
    ("vcpu = 1\nop = 'load'\nl2 = 0", "l2", "unknown field"),
    ("vcpu = 2\nop = 'load'", "vcpu", "no vCPU"),
    ("vcpu = 2020-01-01\nop = 'load'", "vcpu", "date/time"),
    ("vcpu = true\nop = 'load'", "vcpu", "boolean"),
    ("vcpu = -1\nop = 'load'", "vcpu", "no vCPU"),
    ("op = 'load'", "vcpu", "missing"),
    ("vcpu = 1\nop = ['load']", "op", "array"),
    ("vcpu = 1\nop = 'explode'", "op", "unknown command"),
]


@pytest.mark.parametrize("step,field,needle", BAD_STEPS, ids=[f"{f}-{n}" for _, f, n in BAD_STEPS])
def test_bad_step_is_one_line_before_anything_starts(step, field, needle, tmp_path, monkeypatch, capsys):
    """In process, with the coordinator's constructor replaced: it must never be reached (no vCPU
    spawned, no segment, no socket), the exit code is 2 and stderr one line naming step 1's field."""
    import launch
    import vm.coordinator

    started = []
    monkeypatch.setattr(vm.coordinator, "Coordinator", lambda *a, **k: started.append(a) or 1 / 0)
    f = tmp_path / "s.toml"
    f.write_text(STEP.format(step=step))
    rc = launch.main(["run", "--scenario", str(f), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not started, err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: step[1].{field}:"), err
    assert needle in err, err


def test_every_step_field_kind_has_a_valid_form(tmp_path):
    """The checks refuse nothing a command takes: one valid step of every op parses."""
    from vm.config import SCRIPT_OPS, from_dict, parse_steps

    cfg = from_dict({"vcpus": 2, "l2s": 2, "memory_mib": 1, "max_nodes": 16})
    steps = [{"vcpu": 0, "op": "vmrun", "l2": 1}, {"vcpu": 0, "op": "vmexit", "l2": 1, "leaving": True},
             {"vcpu": 1, "op": "write", "gpa": (1 << 52) - 8, "data": -1},
             {"vcpu": 1, "op": "write", "gpa": 4088, "data": "0x0102030405060708"},
             {"vcpu": 1, "op": "l1_write"}, {"vcpu": 1, "op": "read", "gpa": 1048568},
             {"vcpu": 0, "op": "write_entry", "l2": 0, "entry": 511, "apic": 255, "running": False},
             {"vcpu": 0, "op": "register", "kind": 65536, "owner": 1 << 30}, {"vcpu": 0, "op": "reregister", "node": 15},
             {"vcpu": 0, "op": "unregister", "node": 0, "free": False}, {"vcpu": 0, "op": "track", "gfn": 255},
             {"vcpu": 0, "op": "untrack", "gfn": 0}, {"vcpu": 0, "op": "enable_tracking"}, {"vcpu": 0, "op": "load"},
             {"vcpu": 0, "op": "put"}, {"vcpu": 0, "op": "sleep", "us": 10_000_000}, {"vcpu": 0, "op": "counters"},
             {"vcpu": 0, "op": "delete_slot", "slot": cfg.memslots - 1}, {"vcpu": 1, "op": "churn"}]
    out = parse_steps(steps, cfg)
    assert {op for _, op, _ in out} == set(SCRIPT_OPS)
    assert out[3][2]["data"] == bytes(range(1, 9))


def test_issue_case_through_the_cli_is_fast_and_one_line(tmp_path):
    """The issue's reproduction as a user runs it: a 27-digit gpa, exit 2 well before a coordinator
    could start its vCPUs (which took over a second and then a traceback)."""
    f = tmp_path / "s.toml"
    f.write_text(STEP.format(step="vcpu = 1\nop = 'write'\ngpa = 123456789012345678901234567\ndata = 1"))
    p = subprocess.run([sys.executable, "launch.py", "run", "--scenario", str(f)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: step[1].gpa: expected an integer in 0..4503599627370495, got an integer of 27 digits"], p.stderr
