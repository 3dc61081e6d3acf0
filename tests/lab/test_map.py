"""compare --map: the verdict logic on synthetic numbers (both ways), the files' shape, and one tiny
real map on Dask (seconds), resumed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import launch_in_process

from lab import map as cmap

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DESIGNS = ("mutex-hash", "rcu-list", "per-table-notifier")
RATES, WRITES, VCPUS = [0.0, 0.5], [0.002, 0.02, 0.2, 2.0], [2, 4]
POINT = {"table_writes_per_vmrun": 0.02, "switch_rate": 0.0}


def _results(rate_fn, dilations=(1.0,)) -> list[dict]:
    out = []
    for x in dilations:
        for v in VCPUS:
            for sw in RATES:
                for tw in WRITES:
                    for d in DESIGNS:
                        out.append({"config": {"design": d, "vcpus": v, "switch_rate": sw, "dilate": x,
                                               "table_writes_per_vmrun": tw},
                                    "ops": {"nested_vmrun": {"per_s": rate_fn(d, v, sw, tw, x)}},
                                    "verdict": "SUCCESS", "point_id": f"{d}/{v}/{sw}/{tw}/{x}"})
    return out


def _mutex_falls(d, v, sw, tw, x):
    """rcu-list and per-table flat; mutex-hash falls with table writes, faster when switching is high
    and with more vCPUs; dilation (x > 1) halves the mutex's loss."""
    if d != "mutex-hash":
        return 10_000.0
    loss = min(0.9, tw * (1 + sw) * (v / 2) * 0.6) / x
    return 10_000.0 * (1 - loss)


def test_crossover_is_interpolated_on_log_table_writes():
    c = cmap.crossover([0.01, 0.1, 1.0], [1.0, 0.9, 0.7])
    assert c["kind"] == "within" and math.isclose(c["at"], math.sqrt(0.1 * 1.0), rel_tol=1e-9)
    assert cmap.crossover([0.01, 0.1], [0.7, 0.5]) == {"at": 0.01, "kind": "below"}
    assert cmap.crossover([0.01, 0.1], [1.0, 0.95]) == {"at": None, "kind": "above"}
    assert cmap.crossover([0.01, 0.1], [None, None]) == {"at": None, "kind": "none"}


def test_verdict_names_where_the_mutex_hurts_and_where_any_design_is_fine():
    maps = cmap.build(_results(_mutex_falls), DESIGNS, VCPUS, RATES, WRITES, [1.0])
    m = maps["undilated"]["4"]
    assert len(m["ratio"]) == len(RATES) and all(len(row) == len(WRITES) for row in m["ratio"])
    j = cmap.judge(m, RATES, WRITES)
    # 4 vCPUs: loss = tw * (1 + sw) * 1.2 -> >= 20 % from tw 0.2 (0.24 at switch 0)
    assert [0.2, 0.0] in j["hurts"] and [2.0, 0.5] in j["hurts"] and [0.02, 0.5] not in j["hurts"]
    assert [0.002, 0.0] in j["fine"] and [2.0, 0.0] not in j["fine"]
    assert j["crossover"]["0"]["kind"] == "within" and 0.02 < j["crossover"]["0"]["at"] < 0.2
    text, verdict = cmap.verdict_md(maps, RATES, WRITES, VCPUS, POINT, None)
    assert "rests on undilated numbers" in text and "switch 0: table writes 0.2, 2" in text
    assert "one run per design** (--repeats 1)" in text and "| 0 | 1.00 | 0.98 | **0.76** | **0.10** |" in text
    assert "mutex costs ≥ 20 % (one seed: indicative only)" in text
    assert verdict["undilated"]["2"]["hurts"] and "at the workload's point: ratio" in text


def test_verdict_says_nowhere_when_the_designs_are_equal():
    maps = cmap.build(_results(lambda *a: 5000.0), DESIGNS, VCPUS, RATES, WRITES, [1.0])
    text, verdict = cmap.verdict_md(maps, RATES, WRITES, VCPUS, POINT, None)
    for v in ("2", "4"):
        j = verdict["undilated"][v]
        assert j["hurts"] == [] and len(j["fine"]) == len(RATES) * len(WRITES)
        assert all(c["kind"] == "above" for c in j["crossover"].values())
    assert "mutex costs ≥ 20 % (one seed: indicative only): nowhere on this grid" in text


def test_a_slow_design_other_than_the_mutex_breaks_any_design_is_fine():
    maps = cmap.build(_results(lambda d, *a: 2000.0 if d == "per-table-notifier" else 5000.0), DESIGNS, VCPUS,
                      RATES, WRITES, [1.0])
    _, verdict = cmap.verdict_md(maps, RATES, WRITES, VCPUS, POINT, None)
    assert verdict["undilated"]["2"]["fine"] == [] and verdict["undilated"]["2"]["hurts"] == []


def test_dilated_verdict_rests_on_dilated_numbers_and_files_have_their_shape(tmp_path):
    dil = {"factor": 2.0, "low": 1.5, "high": 4.0, "method": "synthetic"}
    doc, text = cmap.write_outputs(tmp_path, _results(_mutex_falls, (1.0, 2.0)), designs=DESIGNS, vcpus=VCPUS,
                                   rates=RATES, writes=WRITES, dilations=[1.0, 2.0], point=POINT, dil_doc=dil)
    assert "rests on the dilated numbers" in text and "×2" in text and "range 1.5-4" in text
    assert text.index("## dilated") < text.index("## undilated")
    saved = json.loads((tmp_path / "map.json").read_text())
    assert saved["axes"] == {"table_writes_per_vmrun": WRITES, "switch_rate": RATES}
    assert set(saved["maps"]) == {"undilated", "dilated"} and saved["maps"]["dilated"]["factor"] == 2.0
    assert set(saved["verdict"]["dilated"]) == {"2", "4"} and saved["dilation"]["factor"] == 2.0
    # halving the loss moves the crossover to higher table-write rates
    cu = saved["verdict"]["undilated"]["4"]["crossover"]["0"]
    cd = saved["verdict"]["dilated"]["4"]["crossover"]["0"]
    assert cu["kind"] == "within" and (cd["kind"] == "above" or cd["at"] > cu["at"])
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "map.md").read_text() == text


def test_repeats_take_the_median_ratio_and_report_the_spread():
    runs = []
    for seed, (m, r) in {1: (8000.0, 10_000.0), 2: (4000.0, 10_000.0), 3: (9000.0, 10_000.0)}.items():
        for d, rate in (("mutex-hash", m), ("rcu-list", r)):
            runs.append({"config": {"design": d, "vcpus": 2, "switch_rate": 0.0, "dilate": 1.0,
                                    "table_writes_per_vmrun": 0.2, "seed": seed},
                         "ops": {"nested_vmrun": {"per_s": rate}}, "verdict": "SUCCESS", "point_id": f"{d}/{seed}"})
    maps = cmap.build(runs, ("mutex-hash", "rcu-list"), [2], [0.0], [0.2], [1.0])
    m = maps["undilated"]["2"]
    # every ratio an object over the seeds; the 0.4 outlier does not decide the median
    assert m["ratio"] == [[{"median": 0.8, "lo": 0.4, "hi": 0.9, "n": 3}]]
    assert m["rates"]["mutex-hash"] == [[{"median": 8000.0, "lo": 4000.0, "hi": 9000.0, "n": 3}]]
    assert m["cells"] == [{"vcpus": 2, "dilate": 1.0, "clock": "real", "switch_rate": 0.0, "table_writes": 0.2,
                           "ratio": {"median": 0.8, "lo": 0.4, "hi": 0.9, "n": 3}}]
    text, verdict = cmap.verdict_md(maps, [0.0], [0.2], [2], POINT, None)
    # 0.8 [0.4–0.9] straddles 0.8: not a finding either way, and the table shows the interval
    assert verdict["undilated"]["2"]["hurts"] == [] and verdict["undilated"]["2"]["hurts_unresolved"] == [[0.2, 0.0]]
    assert "| 0 | *0.80 [0.40–0.90]* |" in text and "not resolved (the seeds straddle the threshold)" in text
    g = cmap.grid_doc(DESIGNS, [2], RATES, WRITES, 0.5, 7, {}, [1.0], repeats=3)
    assert g["grid"]["seed"] == [7, 8, 9] and "seed" not in g["fixed"] and list(g["grid"])[-1] == "design"


def test_grid_covers_every_axis_and_keeps_the_workload():
    base = {"table_writes_per_vmrun": 0.02, "switch_rate": 0.01, "mmio_fraction": 0.0, "writes_per_exit": 1}
    g = cmap.grid_doc(DESIGNS, [2], RATES, WRITES, 0.5, 3, base, [1.0, 5.0])
    assert g["grid"]["table_writes_per_vmrun"] == WRITES and g["grid"]["dilate"] == [1.0, 5.0]
    assert g["fixed"]["writes_per_exit"] == 2  # room for 2 table writes between VMRUNs
    assert "switch_rate" not in g["fixed"] and g["fixed"]["mmio_fraction"] == 0.0 and g["fixed"]["fuzz"] == "off"


def _compare(args, timeout=240):
    return subprocess.run([sys.executable, "launch.py", "compare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--map", "--designs", "mutex-hash"], "--designs"),
    (["--map", "--designs", "nope"], "--designs"),
    (["--map", "--dilate", "0.5"], "--dilate"),
    (["--map", "--table-writes", "x"], "--table-writes"),
    (["--map", "--scheduler", "nope"], "--scheduler"),
])
def test_bad_map_input_is_one_line_exit_2(tmp_path, args, needle):
    p = launch_in_process("compare", *args, "--out", tmp_path / "m")  # (refused before anything starts)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_tiny_real_map_writes_its_files_and_resumes(tmp_path):
    out = tmp_path / "m"
    args = ["--map", "--vcpus", "2", "--switch-rates", "0", "--table-writes", "0.02,2", "--designs",
            "mutex-hash,rcu-list", "--duration", "0.3", "--dilate", "2", "--clock", "real", "--repeats", "1", "--out", str(out)]
    p = _compare(args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((out / "map.json").read_text())
    assert doc["points"] == 8 and doc["dilation"]["factor"] == 2.0
    for label in ("undilated", "dilated"):
        ratio = doc["maps"][label]["2"]["ratio"]
        assert len(ratio) == 1 and len(ratio[0]) == 2 and all(r is not None and r["median"] > 0 for r in ratio[0])
    assert (out / "map.png").read_bytes()[:4] == b"\x89PNG" and "mutex" in (out / "map.md").read_text()
    q = launch_in_process("compare", *args)  # resumable: nothing runs again (no cluster: in-process)
    assert q.returncode == 0 and "8 already done (skipped), 0 to run" in q.stderr, q.stderr[-2000:]


def test_the_maps_default_clock_is_virtual_and_its_seeds_spread_is_reported(tmp_path):
    out = tmp_path / "v"
    # one cell (2 designs x 2 seeds = 4 points): the clock and the seeds' spread need no second column
    # (test_tiny_real_map_... checks a map's columns)
    p = _compare(["--map", "--vcpus", "2", "--switch-rates", "0.5", "--table-writes", "2", "--designs",
                  "mutex-hash,rcu-list", "--duration", "0.004", "--repeats", "2", "--out", str(out)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((out / "map.json").read_text())
    assert doc["clock"] == "virtual" and doc["points"] == 4 and list(doc["maps"]) == ["virtual"]
    assert [(c["clock"], c["table_writes"], c["ratio"]["n"]) for c in doc["cells"]] == [("virtual", 2.0, 2)]
    m = doc["maps"]["virtual"]["2"]
    assert all(r is not None and r["median"] > 0 and r["n"] == 2 and r["lo"] <= r["median"] <= r["hi"]
               for r in m["ratio"][0])
    md = (out / "map.md").read_text()
    assert "virtual-time numbers" in md and "| 0.5 | " in md and "the median over 2 seeds" in md
    # report re-renders a map.json: the same verdict, map.md and map.png rewritten
    q = launch_in_process("report", out / "map.json", "--out", tmp_path / "re")
    assert q.returncode == 0, q.stderr
    assert (tmp_path / "re" / "map.md").read_text() == md and (tmp_path / "re" / "map.png").stat().st_size > 2000
