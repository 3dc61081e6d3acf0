"""Issue 20 (1): a scripted run's ops table agrees with its counters (a scripted VMRUN is counted,
not timed: the count comes from the counter), and it shows no rate (the elapsed time of a script is
the commands' round trips, not a duration to rate over): ``per_s`` stays a number for
``launch.py report`` but is 0.0, ``rate_meaningful`` is false and the table's "per s" column is "–"."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from conftest import launch_in_process
from rich.console import Console

from lab import report
from vm import results

ROOT = Path(__file__).resolve().parents[2]
# ops with a counter: the histogram ops that have one, and the counter-only ops
OP_COUNTERS = {"nested_vmrun": "vmrun", "tlb_flush": "tlb_flush", **results.COUNT_OPS}


def _launch(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "r.json"
    p = launch_in_process(*args, "--json", str(out), "--quiet")
    assert out.exists(), p.stdout[-2000:] + p.stderr[-2000:]
    return p, json.loads(out.read_text())


def _ops_rows(res: dict) -> dict[str, list[str]]:
    buf = io.StringIO()
    results.render(res, console=Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    rows = {}
    for line in text.split("lock_stat")[0].splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 7 and cells[0] in res["ops"]:
            rows[cells[0]] = cells
    assert set(rows) == set(res["ops"]), text
    return rows


def _check_counts(res: dict) -> None:
    c = res["counters"]
    for op, cname in OP_COUNTERS.items():
        if op in res["ops"]:
            assert res["ops"][op]["count"] == c[cname], (op, res["ops"][op], c[cname])
        else:
            assert c[cname] == 0, (op, c[cname])


@pytest.mark.parametrize("registration,rc", [("refcount", 0), ("bool", 1)])
def test_scripted_kaboom_ops_agree_with_counters_and_show_no_rate(registration, rc, tmp_path):
    p, res = _launch(["scenario", "kaboom", "--registration", registration], tmp_path)
    assert p.returncode == rc, p.stdout[-2000:] + p.stderr[-2000:]
    assert res["counters"]["vmrun"] == 3  # three scripted VMRUNs (kaboom_steps)
    assert res["ops"]["nested_vmrun"]["count"] == 3
    _check_counts(res)
    assert res["rate_meaningful"] is False
    assert all(o["per_s"] == 0.0 and isinstance(o["per_s"], float) for o in res["ops"].values())
    assert res["ops"]["nested_vmrun"]["p99_ns"] is None  # counted, never timed: no latency to show
    report.check(res, "scripted")  # still a valid results document for `launch.py report`
    (row,) = report.summarize([res])  # ... whose table shows no rate either
    assert row["vmrun_per_s"] is None and report.format_row(row)[5:7] == ["–", "–"]
    rows = _ops_rows(res)
    assert all(cells[2] == "–" for cells in rows.values()), rows
    assert rows["nested_vmrun"][1] == "3"


def test_scenario_file_scripted_run_ops_agree(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[config]\nvcpus = 2\n"
                 "[[step]]\nvcpu = 0\nop = 'vmrun'\nl2 = 0\n"
                 "[[step]]\nvcpu = 0\nop = 'vmexit'\nl2 = 0\n"
                 "[[step]]\nvcpu = 1\nop = 'vmrun'\nl2 = 1\n"
                 "[[step]]\nvcpu = 1\nop = 'vmrun'\nl2 = 1\n")
    p, res = _launch(["run", "--scenario", str(f)], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert res["ops"]["nested_vmrun"]["count"] == res["counters"]["vmrun"] == 3
    _check_counts(res)
    assert res["rate_meaningful"] is False
    assert all(cells[2] == "–" for cells in _ops_rows(res).values())


def test_free_run_keeps_rates_and_counts(tmp_path):
    p, res = _launch(["run", "--design", "mutex-hash", "--duration", "0.05", "--clock", "virtual"], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert res["rate_meaningful"] is True
    _check_counts(res)
    vm = res["ops"]["nested_vmrun"]
    assert vm["count"] > 0 and vm["per_s"] == pytest.approx(vm["count"] / res["elapsed_s"], rel=0.01)
    assert vm["p99_ns"] > 0
    rows = _ops_rows(res)
    assert rows["nested_vmrun"][2] == f"{vm['per_s']:,.0f}"
