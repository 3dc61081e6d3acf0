"""compare: the claims are judged on the numbers (both ways), and the command writes its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lab.compare import assess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _res(design, vcpus, rate, vmrun_per_s, wait_share=0.0):
    elapsed = 1.0
    return {"config": {"design": design, "vcpus": vcpus, "switch_rate": rate, "guest_time_us": 20.0,
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
                        "--duration", "0.4", "--dilate", "3", "--out", str(out)], cwd=ROOT, capture_output=True,
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
    p = subprocess.run([sys.executable, "launch.py", "compare", "--vcpus", "0", "--out", "/tmp/x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_compare_points_measure_without_the_trace_ring(tmp_path):
    from lab.compare import run_compare

    seen = []

    def run_one(cfg):
        seen.append(cfg)
        return {"verdict": "SUCCESS"}

    run_compare([1], [0.0], 0.1, 1, tmp_path, run_one, designs=("mirror",))
    assert [c["trace_events"] for c in seen] == [0]
