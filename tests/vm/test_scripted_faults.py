"""Faults in scripted mode (issue 12, defect 1): a vCPU killed while it holds a lock must end a
scripted run in bounded time with a named diagnosis: the coordinator notices the death between
batches, skips teardown (which would take the dead vCPU's locks), and a surviving vCPU that waits
on such a lock gets a dead-holder error instead of spinning forever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SCENARIO = """
[config]
vcpus = 2
notifiers = 1

[[step]]
vcpu = 1
op = "sleep"
us = {sleep_us}

[[step]]
vcpu = 1
op = "{op}"
{arg}
"""


def _scripted(tmp_path, sleep_us: int, op: str = "vmrun", arg: str = "l2 = 0"):
    toml = tmp_path / "s.toml"
    toml.write_text(SCENARIO.format(sleep_us=sleep_us, op=op, arg=arg))
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "launch.py", "run", "--scenario", str(toml), "--quiet",
                        "--inject", "kill-vcpu:0@mmu-lock", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    return p, json.loads(out.read_text()) if out.exists() else None, time.monotonic() - t0


def test_dead_mmu_lock_holder_ends_a_scripted_run(tmp_path):
    # vCPU 1 first sleeps, so vCPU 0 has died holding mmu_lock before vCPU 1 needs it
    p, res, took = _scripted(tmp_path, 300_000)
    assert p.returncode == 1, p.stdout + p.stderr
    assert took < 10.0, f"scripted run took {took:.1f} s"
    assert "vCPU 0 died holding mmu_lock" in p.stdout, p.stdout
    assert res is not None and res["verdict"] == "FAILURE"


def test_death_before_the_first_batch(tmp_path):
    p, res, took = _scripted(tmp_path, 0)
    assert p.returncode == 1, p.stdout + p.stderr
    assert took < 10.0
    assert "vCPU 0 died holding mmu_lock" in p.stdout, p.stdout


def test_a_survivor_waiting_on_the_dead_holders_lock_is_told_so(tmp_path):
    # vCPU 1 needs mmu_lock (write-tracking a gfn) after vCPU 0 died holding it: its wait ends
    # with the dead holder named, not an endless spin
    p, res, took = _scripted(tmp_path, 300_000, op="track", arg="gfn = 200")
    assert p.returncode == 1, p.stdout + p.stderr
    assert took < 10.0, f"scripted run took {took:.1f} s"
    assert "mmu_lock" in p.stdout and "died holding it" in p.stdout, p.stdout
    assert "vCPU 0 died holding mmu_lock" in p.stdout
