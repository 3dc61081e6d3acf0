"""Issue 20 (2): the files under examples/ work as their comments say: examples/grid.toml is a valid
sweep grid (2 points, virtual clock) whose sweep succeeds; examples/scenario.toml (the seed's kaboom
as [[step]]s) ends in SUCCESS with the refcounted registration and in FAILURE (a lost write) with
``--registration bool``."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import launch_in_process

from lab import report, sweep
from vm import config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GRID = EXAMPLES / "grid.toml"
SCENARIO = EXAMPLES / "scenario.toml"


def test_grid_parses_to_two_cheap_points():
    points = sweep.load_grid(str(GRID))
    assert [p.config["design"] for p in points] == ["mutex-hash", "rcu-list"]
    for p in points:
        assert p.config["clock"] == "virtual" and p.config["duration"] <= 0.05 and p.config["vcpus"] == 2


def test_grid_sweep_runs(tmp_path):
    out = tmp_path / "out"
    assert sweep.main(Namespace(grid=str(GRID), out=str(out), scheduler=None, workers=1)) == 0
    docs = report.load(out / "sweep.json")
    assert len(docs) == 2 and all(d["verdict"] == "SUCCESS" for d in docs)


def test_scenario_file_is_the_kaboom():
    cfg, steps = config.load_toml(str(SCENARIO))
    assert cfg["registration"] == "refcount"
    parsed = config.parse_steps(steps, config.build(cfg, {}))
    from vm.avic.kaboom import kaboom_steps

    assert parsed == kaboom_steps("refcount", cfg["design"])
    text = SCENARIO.read_text()  # the comments give both commands
    assert "python launch.py run --scenario examples/scenario.toml --registration bool" in text
    assert "python launch.py run --scenario examples/scenario.toml\n" in text


@pytest.mark.parametrize("design", ["mutex-hash", "rcu-list"])
@pytest.mark.parametrize("flags,rc,verdict", [([], 0, "SUCCESS"), (["--registration", "bool"], 1, "FAILURE")])
def test_scenario_file_verdicts(design, flags, rc, verdict, tmp_path):
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--scenario", str(SCENARIO), "--design", design, *flags, "--json", str(out), "--quiet")
    assert p.returncode == rc, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["verdict"] == verdict and len(res["steps"]) == 7 and all(s["ok"] for s in res["steps"])
    if verdict == "FAILURE":
        assert "lost write" in json.dumps(res["oracle"]) + json.dumps(res["warnings"])
    else:
        assert not res["warnings"]
