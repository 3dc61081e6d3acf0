"""compare: the claims are judged on the numbers (both ways), and the command writes its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import launch_in_process

from lab.compare import assess, point_ratios
from lab.uncertainty import interference

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _res(design, vcpus, rate, vmrun_per_s, wait_share=0.0, seed=1):
    elapsed = 1.0
    return {"config": {"design": design, "vcpus": vcpus, "switch_rate": rate, "guest_time_us": 20.0, "seed": seed,
                       "writes_per_exit": 8, "tracked_fraction": 0.25, "mmio_fraction": 0.1},
            "ops": {"nested_vmrun": {"per_s": vmrun_per_s}}, "elapsed_s": elapsed, "verdict": "SUCCESS",
            "point_id": f"{design}/{vcpus}/{rate}",
            "locks": {"tables_lock": {"wait_ns_total": int(wait_share * elapsed * 1e9 * vcpus)}}}


def _grid(rates_fn):
    return [_res(d, v, r, rates_fn(d, v, r)) for r in (0.0, 0.5) for v in (1, 4)
            for d in ("mutex-hash", "rcu-list", "per-table-notifier")]


def test_claims_hold_when_the_numbers_say_so():
    # mutex-hash flat under switching, the others scale; at rate 0 everyone equal
    text = assess(_grid(lambda d, v, r: 1000 * (1 if (d == "mutex-hash" and r > 0) else v)), cpus=4)
    part1, part2 = text.split("### 2.")
    assert "**Holds on these numbers**" in part1 and "0.25×" in part1
    assert "**Holds on these numbers**" in part2


def test_claims_do_not_hold_when_the_numbers_say_otherwise():
    # mutex-hash is the fastest everywhere; at rate 0 per-table-notifier is far behind
    text = assess(_grid(lambda d, v, r: {"mutex-hash": 3000, "rcu-list": 2900, "per-table-notifier": 1000}[d] * v),
                  cpus=4)
    part1, part2 = text.split("### 2.")
    assert "**Does not hold on these numbers**" in part1
    assert "**Does not hold on these numbers**" in part2 and "per-table-notifier" in part2


def test_compare_command_writes_table_plots_and_verdict(tmp_path):
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, "launch.py", "compare", "--vcpus", "1,2", "--switch-rates", "0,0.5",
                        "--duration", "0.4", "--dilate", "3", "--repeats", "1", "--out", str(out)], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((out / "compare.json").read_text())
    # every point undilated and dilated, the realistic workload by default
    assert len(doc["points"]) == 24 and "Verdict on the seed's claims" in doc["assessment"]
    assert sorted({r["config"]["dilate"] for r in doc["points"]}) == [1.0, 3.0] and doc["workload"] == "realistic"
    assert {r["config"]["table_writes_per_vmrun"] for r in doc["points"]} == {0.02}
    text = doc["assessment"]
    assert "rest on the **dilated** numbers" in text and "— dilated ×3" in text and "— undilated" in text
    md = (out / "report.md").read_text()
    assert "nested VMRUN/s" in md and ("Holds on these numbers" in md or "Does not hold" in md)
    pngs = sorted(f.name for f in out.glob("*.png"))
    assert "lock_wait.png" in pngs and len(pngs) >= 3
    assert (out / "lock_wait.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_bad_input():
    p = launch_in_process("compare", "--vcpus", "0", "--out", "/tmp/x")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_compare_points_measure_without_the_trace_ring(tmp_path):
    from lab.compare import run_compare

    seen = []

    def run_one(cfg):
        seen.append(cfg)
        return {"verdict": "SUCCESS"}

    run_compare([1], [0.0], 0.1, 1, tmp_path, run_one, designs=("mirror",))
    assert [c["trace_events"] for c in seen] == [0]


def _seeded(rates_fn, seeds=(1, 2, 3)):
    return [_res(d, v, r, rates_fn(d, v, r, sd), seed=sd) for sd in seeds for r in (0.0, 0.5) for v in (1, 4)
            for d in ("mutex-hash", "rcu-list", "per-table-notifier")]


def test_a_verdict_whose_seeds_straddle_the_threshold_is_not_resolved_and_shows_its_numbers():
    # at (4 vCPUs, 0.5) mutex-hash is at 0.70, 0.90, 0.75 of rcu-list by seed: straddles 0.8
    share = {1: 0.70, 2: 0.90, 3: 0.75}
    verdicts: dict = {}
    text = assess(_seeded(lambda d, v, r, sd: 1000 * v * (share[sd] if d == "mutex-hash" and r > 0 else 1)),
                  cpus=4, verdicts=verdicts)
    part1 = text.split("### 2.")[0]
    assert "**Not resolved on these numbers**" in part1 and "0.75× [0.70–0.90, n=3]" in part1
    assert verdicts["claim1"]["verdict"] == "not resolved"
    assert verdicts["claim1"]["ratio"] == {"median": 0.75, "lo": 0.7, "hi": 0.9, "n": 3}
    # the table the sentence rests on: one row per seed with both rates and the ratio
    rows = [ln for ln in part1.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [ln.split("|")[-2].strip() for ln in rows] == ["0.700", "0.900", "0.750"]


def test_compare_json_ratios_are_objects_over_seeds():
    res = _seeded(lambda d, v, r, sd: 1000 * v * (0.5 + 0.1 * sd if d == "mutex-hash" else 1))
    rows = point_ratios(res)
    assert len(rows) == 4  # (vCPUs, switch rate) points
    row = next(r for r in rows if r["vcpus"] == 4 and r["switch_rate"] == 0.5)
    assert row["mutex_over_rcu"] == {"median": 0.7, "lo": 0.6, "hi": 0.8, "n": 3}
    assert row["rates"]["rcu-list"] == {"median": 4000.0, "lo": 4000.0, "hi": 4000.0, "n": 3}
    assert row["share_of_best"]["mutex-hash"]["hi"] == 0.8


def test_interference_is_flagged_not_averaged():
    # one point's rate differs 3x between seeds (real clock); one run has a 700 ms lock wait
    res = _seeded(lambda d, v, r, sd: 1000 * v * (3 if (d, v, r, sd) == ("rcu-list", 4, 0.5, 2) else 1))
    res[0]["locks"]["tables_lock"].update(wait_ns_max=700_000_000, hold_ns_max=650_000_000)
    flags = interference(res)
    kinds = sorted(f["kind"] for f in flags)
    assert kinds == ["lock_wait", "repeat_spread"], flags
    spread = next(f for f in flags if f["kind"] == "repeat_spread")
    assert spread["point"] == "rcu-list, 4 vCPUs, switch 0.5" and "3.0×" in spread["detail"]
    wait = next(f for f in flags if f["kind"] == "lock_wait")
    assert "tables_lock" in wait["detail"] and "700" in wait["detail"] and wait["run"].endswith("seed 1")
    # the virtual clock: the host cannot interfere, and the seeds' spread is the model's own
    for r in res:
        r["config"]["clock"] = "virtual"
    assert interference(res) == []


def test_a_run_with_a_host_sized_lock_wait_says_so_in_its_summary():
    from io import StringIO

    from rich.console import Console

    from vm.results import interference as run_interference
    from vm.results import render

    r = _res("mutex-hash", 4, 0.5, 1000.0)
    r["locks"]["tables_lock"].update(wait_ns_max=716_000_000, hold_ns_max=700_000_000)
    assert run_interference(r) and run_interference({**r, "config": {**r["config"], "clock": "virtual"}}) == []
    r["locks"]["tables_lock"]["wait_ns_max"] = 2_000_000  # 2 ms: a few time slices, the model's own contention
    assert run_interference(r) == []
    r["locks"]["tables_lock"]["wait_ns_max"] = 716_000_000
    doc = {**r, "seed": 1, "ops": {"nested_vmrun": {"count": 1000, "per_s": 1000.0}}, "gp": {}, "warnings": [],
           "warn_count": 0, "oracle": [], "reasons": [], "interference": run_interference(r),
           "config": {**r["config"], "registration": "refcount", "l2s": 4, "seed": 1}, "locks": {}}
    buf = StringIO()
    render(doc, console=Console(file=buf, width=200))
    assert "host interference: tables_lock: one wait of 716.00ms" in buf.getvalue()
