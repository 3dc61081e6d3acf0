"""lab.sweep (``launch.py sweep``): grid validation, point commands, a real 2-point sweep on a
LocalCluster, resume, crashed / FAILURE points (a fake launch.py) on an external scheduler."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import launch_in_process

from ipc.errors import UsageError
from lab import report, sweep, uncertainty

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(grid: Path, out: Path, scheduler: str | None = None, workers: int = 1) -> Namespace:
    return Namespace(grid=str(grid), out=str(out), scheduler=scheduler, workers=workers)


def _scratch_dirs() -> set[str]:
    """This process's sweep scratch dirs (by their owner marker): other tests (pytest-xdist workers) and
    other users' sweeps may make and remove theirs meanwhile."""
    tmp, mine = tempfile.gettempdir(), set()
    for n in os.listdir(tmp):
        if n.startswith("pagetrack-sweep-dask-"):
            try:
                owner = (Path(tmp) / n / ".pagetrack-owner").read_text().split()[0]
            except (OSError, IndexError):
                continue
            if owner == str(os.getpid()):
                mine.add(n)
    return mine


# -- grid --------------------------------------------------------------------------------------------


def test_flag_keys_are_launch_run_flags():
    import launch

    run = next(a for a in launch.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    dests = {a.dest for a in run._actions}
    assert set(sweep.FLAG_KEYS) <= dests


def test_grid_is_a_cartesian_product_in_key_order():
    pts = sweep.parse_grid({"grid": {"design": ["mirror", "rcu-list"], "vcpus": [1, 2], "switch_rate": [0, 0.1]},
                            "fixed": {"seed": 7, "duration": 1}})
    assert len(pts) == 8
    assert [p.varying for p in pts[:3]] == [{"design": "mirror", "vcpus": 1, "switch_rate": 0},
                                            {"design": "mirror", "vcpus": 1, "switch_rate": 0.1},
                                            {"design": "mirror", "vcpus": 2, "switch_rate": 0}]
    assert all(p.config["seed"] == 7 and p.config["duration"] == 1.0 for p in pts)
    assert pts[0].config["switch_rate"] == 0.0 and isinstance(pts[0].config["switch_rate"], float)
    ids = [p.point_id for p in pts]
    assert len(set(ids)) == 8 and all(len(i) == 12 for i in ids)
    # stable: the same configuration, however written, has the same id
    again = sweep.parse_grid({"grid": {"switch_rate": [0.0]}, "fixed": {"design": "mirror", "vcpus": 1,
                                                                        "seed": 7, "duration": 1.0}})
    assert again[0].point_id == ids[0]


def test_fixed_only_is_one_point():
    (p,) = sweep.parse_grid({"fixed": {"vcpus": 3}})
    assert p.config["vcpus"] == 3 and p.varying == {} and p.desc == "(single point)"


@pytest.mark.parametrize("doc,expect", [
    ({"grid": {"vcpu": [1]}}, "grid.vcpu: unknown key"),
    ({"grid": {"vcpus": ["2"]}}, "grid.vcpus: expected `int`, got `str` (point vcpus='2')"),
    ({"grid": {"vcpus": [1, 2.5]}}, "grid.vcpus: expected `int`, got `float`"),
    ({"grid": {"vcpus": []}}, "grid.vcpus: empty list"),
    ({"grid": {"vcpus": 2}}, "grid.vcpus: expected a list of values, got int"),
    ({"grid": {"vcpus": [[1, 2]]}}, "grid.vcpus: expected a list of single values"),
    ({"grid": {"vcpus": [1, 1]}}, "grid.vcpus: duplicate values"),
    ({"grid": {"switch_rate": [0, 0.0]}}, "are the same configuration"),
    ({"grid": {"vcpus": [0]}}, "grid.vcpus: expected `int` >= 1"),
    ({"grid": {"design": ["mirror", "nope"]}}, "grid.design: invalid enum value 'nope'"),
    ({"grid": {"vcpus": [1]}, "fixed": {"vcpus": 2}}, "fixed.vcpus: also in [grid]"),
    ({"fixed": {"seed": [1, 2]}}, "fixed.seed: expected a single value"),
    ({"fixed": {"duration": -1.0}}, "fixed.duration: expected `float` >= 0.001"),
    ({"fixed": {"nope": 1}}, "fixed.nope: unknown key"),
    ({"grid": {"tracked_fraction": [0.9]}, "fixed": {"mmio_fraction": 0.5}}, "tracked_fraction + mmio_fraction"),
    ({"grid": {"vcpus": [1]}, "extra": {}}, "unknown table 'extra'"),
    ({"grid": [1]}, "grid must be a table"),
    ({}, "no [grid] table"),
])
def test_bad_grid_is_usage_error_naming_the_key(doc, expect):
    with pytest.raises(UsageError) as ei:
        sweep.parse_grid(doc, "g.toml")
    assert expect in str(ei.value) and str(ei.value).startswith("g.toml: ")


def test_grid_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid\nvcpus = [1]\n")
    with pytest.raises(UsageError, match="invalid TOML"):
        sweep.load_grid(str(bad))
    with pytest.raises(UsageError, match="not found"):
        sweep.load_grid(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize("grid,expect", [
    ("[grid]\nvcpu = [1, 2]\n", "grid.vcpu: unknown key"),
    ('[grid]\nvcpus = [1, "two"]\n', "grid.vcpus: expected `int`, got `str`"),
    ("[grid]\nvcpus = []\n", "grid.vcpus: empty list"),
])
def test_cli_bad_grid_exit_2(tmp_path, grid, expect):
    g = tmp_path / "grid.toml"
    g.write_text(grid)
    out = tmp_path / "out"
    p = launch_in_process("sweep", str(g), "--out", str(out))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1 and expect in p.stderr
    assert not out.exists()  # nothing started, nothing created


@pytest.mark.parametrize("addr", ["http://127.0.0.1:8786", "127.0.0.1:8786", "tcp://host", "tcp://h:99999",
                                  "tcp://h:1;x"])
def test_bad_scheduler_address(addr):
    from lab.scheduler import check_scheduler

    with pytest.raises(UsageError, match="--scheduler"):
        check_scheduler(addr)
    assert check_scheduler("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    assert check_scheduler("tcp://[::1]:8786") == "tcp://[::1]:8786"
    assert check_scheduler("tls://sched.example:8786") == "tls://sched.example:8786"


def test_point_command_flags_and_scenario(tmp_path):
    (p,) = sweep.parse_grid({"grid": {"switch_rate": [0]}, "fixed": {"vcpus": 2, "design": "rcu-list",
                                                                     "guest_time_us": 5, "stats": False,
                                                                     "churn_rate": 0.25, "max_nodes": 64}})
    cmd, scenario = sweep.point_command(p, tmp_path, Path("/x/launch.py"))
    assert cmd[:7] == [sys.executable, "/x/launch.py", "run", "--json", str(tmp_path / f"{p.point_id}.json"),
                       "--quiet", "--vcpus"]
    flags = cmd[6:]
    assert flags[:flags.index("--scenario")] == ["--vcpus", "2", "--design", "rcu-list", "--guest-time-us", "5.0",
                                                 "--no-stats", "--fuzz", "off", "--trace-events", "0",
                                                 "--switch-rate", "0.0"]
    assert flags[-2:] == ["--scenario", str(tmp_path / f"{p.point_id}.toml")]
    import tomllib

    assert tomllib.loads(scenario) == {"config": {"churn_rate": 0.25, "max_nodes": 64}}
    (q,) = sweep.parse_grid({"fixed": {"vcpus": 1}})
    assert sweep.point_command(q, tmp_path, Path("/x/launch.py"))[1] is None


def test_run_point_records_a_crash_and_a_timeout(tmp_path):
    js = str(tmp_path / "x.json")
    oc = sweep.run_point([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], js, 30)
    assert oc["returncode"] == 3 and oc["stderr_tail"] == "boom" and oc["json"] is None and not oc["timed_out"]
    t0 = time.monotonic()
    oc = sweep.run_point([sys.executable, "-c", "import time; time.sleep(60)"], js, 0.5)
    assert oc["timed_out"] and oc["returncode"] != 0 and "timed out" in oc["stderr_tail"]
    assert time.monotonic() - t0 < 15


# -- real sweeps ---------------------------------------------------------------------------------------


def test_two_point_sweep_then_resume(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nvcpus = [1, 2]\n[fixed]\ndesign = "mirror"\nduration = 0.5\nseed = 3\n')
    out = tmp_path / "out"
    scratch_before = _scratch_dirs()
    t0 = time.monotonic()
    rc = sweep.main(_args(grid, out))
    took = time.monotonic() - t0
    assert rc == 0
    pts = sweep.load_grid(str(grid))
    for p in pts:
        (doc,) = report.load(out / "points" / f"{p.point_id}.json")
        assert doc["config"]["vcpus"] == p.config["vcpus"] and doc["config"]["seed"] == 3
        assert doc["verdict"] == "SUCCESS"
    merged = json.loads((out / "sweep.json").read_text())
    assert [r["point_id"] for r in merged] == [p.point_id for p in pts]
    assert [r["config"]["vcpus"] for r in merged] == [1, 2]
    status = json.loads((out / "status.json").read_text())
    assert status["ran"] == 2 and status["skipped"] == 0 and status["crashed"] == [] and status["failed"] == []
    assert status["mean_point_overhead_s"] is not None and status["mean_point_overhead_s"] >= 0
    md = (out / "report.md").read_text()
    assert md.count("| mirror | refcount |") == 2 and "![lock_wait](lock_wait.png)" in md
    assert (out / "vmrun_rate_sw0.1.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "lock_wait.png").read_bytes()[:8] == PNG_MAGIC
    assert _scratch_dirs() == scratch_before  # Dask's scratch space is gone
    print(f"2-point sweep: {took:.1f}s, status {status}")

    # again, through the CLI: both points are skipped and no cluster is started
    t0 = time.monotonic()
    p = launch_in_process("sweep", str(grid), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 already done (skipped), 0 to run" in p.stderr
    assert time.monotonic() - t0 < 20
    status = json.loads((out / "status.json").read_text())
    assert status["skipped"] == 2 and status["ran"] == 0 and status["results"] == 2
    assert json.loads((out / "sweep.json").read_text()) == merged


def test_failure_and_crash_are_recorded_on_an_external_scheduler(tmp_path, monkeypatch):
    """A FAILURE point (exit 1 with a document) and a crashed point (exit 3, no document) do not stop
    the sweep; both are reported and the exit code is 1. The points go to a scheduler given by
    address (--scheduler), here a LocalCluster the test owns."""
    import dask
    from distributed import LocalCluster

    out = tmp_path / "out"
    out.mkdir()
    (out / "template.json").write_text(json.dumps(_failure_doc()))
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nvcpus = [1, 2]\n[fixed]\nduration = 0.5\n")
    monkeypatch.setattr(sweep, "launch_py", lambda: DATA / "fake_launch.py")
    with dask.config.set({"temporary-directory": str(tmp_path / "dask")}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         memory_limit=0) as cluster:
        rc = sweep.main(Namespace(**vars(_args(grid, out, scheduler=cluster.scheduler_address)), insecure=True))
    assert rc == 1
    p1, p2 = sweep.load_grid(str(grid))
    status = json.loads((out / "status.json").read_text())
    assert status["failed"] == [p1.point_id] and status["results"] == 1
    (crash,) = status["crashed"]
    assert crash["point_id"] == p2.point_id and crash["returncode"] == 3 and "RuntimeError: boom" in crash["stderr_tail"]
    # a sweep measures: fuzz off, no trace ring
    assert crash["point"] == {"vcpus": 2, "duration": 0.5, "fuzz": "off", "trace_events": 0}
    merged = json.loads((out / "sweep.json").read_text())
    assert [r["point_id"] for r in merged] == [p1.point_id] and merged[0]["verdict"] == "FAILURE"
    md = (out / "report.md").read_text()
    assert "## Crashed points" in md and p2.point_id in md and "## FAILURE reasons" in md


def _failure_doc() -> dict:
    lock = dict.fromkeys(("acquisitions", "contentions", "wait_ns_total", "wait_ns_max", "wait_ns_min",
                          "wait_ns_avg", "hold_ns_total", "hold_ns_max", "hold_ns_min", "hold_ns_avg"), 1)
    return {
        "config": {"design": "mirror", "registration": "refcount", "vcpus": 1, "switch_rate": 0.1, "seed": 1,
                   "duration": 0.5},
        "seed": 1, "elapsed_s": 0.5,
        "ops": {"nested_vmrun": {"count": 10, "per_s": 20.0, "p99_ns": 100},
                "emulated_write": {"count": 5, "per_s": 10.0}},
        "locks": {"mmu_lock": lock}, "gp": {"rcu": 1}, "warnings": [], "warn_count": 0, "oracle": ["lost write"],
        "verdict": "FAILURE", "reasons": ["oracle: 1 violation(s); first: lost write"],
    }


def test_sweep_points_measure_without_the_trace_ring(tmp_path):
    (p,) = sweep.parse_grid({"grid": {"vcpus": [1]}, "fixed": {"duration": 1}})
    assert p.config["trace_events"] == 0
    cmd, _ = sweep.point_command(p, tmp_path, Path("launch.py"))
    assert cmd[cmd.index("--trace-events") + 1] == "0"
    (q,) = sweep.parse_grid({"grid": {"vcpus": [1]}, "fixed": {"trace_events": 64}})
    assert q.config["trace_events"] == 64  # a grid may still ask for it


def test_clock_and_prices_reach_every_point_and_its_command():
    doc = sweep.with_clock({"grid": {"vcpus": [1, 2]}}, "virtual", {"line": 40})
    pts = sweep.parse_grid(doc)
    assert [p.config["vcpus"] for p in pts] == [1, 2]
    assert all(p.config["clock"] == "virtual" and p.config["prices"] == {"line": 40} for p in pts)
    cmd, text = sweep.point_command(pts[0], Path("/tmp"), Path("launch.py"))
    assert cmd[cmd.index("--clock") + 1] == "virtual" and "prices = {line = 40}" in text
    assert sweep.point_timeout(pts[1]) > sweep.point_timeout(sweep.parse_grid({"grid": {"vcpus": [2]}})[0])


def test_repeats_run_every_point_at_consecutive_seeds_and_report_their_spread():
    doc = {"grid": {"design": ["mirror"], "vcpus": [1, 2]}, "fixed": {"seed": 5, "duration": 0.1}}
    pts = sweep.parse_grid(sweep.with_repeats(doc, 3, "g"), "g")
    assert sorted((p.config["vcpus"], p.config["seed"]) for p in pts) == [(v, s) for v in (1, 2) for s in (5, 6, 7)]
    assert sweep.with_repeats(doc, 1, "g") is doc
    with pytest.raises(UsageError, match="already lists its seeds"):
        sweep.with_repeats({"grid": {"seed": [1, 2]}}, 2, "g")

    def res(v, seed, rate):
        return {"config": {"design": "mirror", "vcpus": v, "seed": seed, "switch_rate": 0.1},
                "ops": {"nested_vmrun": {"per_s": rate}}}

    runs = [res(1, 5, 100.0), res(1, 6, 120.0), res(1, 7, 110.0), res(2, 5, 200.0), res(2, 6, 500.0), res(2, 7, 210.0)]
    table = uncertainty.seed_table(runs)
    assert "| 1 vCPUs | 110 | [100–120] | 3 | 1.20 |" in table and "| 2 vCPUs | 210 | [200–500] | 3 | 2.50 |" in table
    assert uncertainty.seed_table(runs[::3]) == ""  # one seed per point: nothing to add
