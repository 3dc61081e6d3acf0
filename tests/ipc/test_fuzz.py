"""ipc.fuzz: named preemption points, seeded; off costs nothing, light / heavy delay some hits."""

from __future__ import annotations

import json
import os

import pytest
from conftest import launch_in_process

from ipc import fuzz

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(autouse=True)
def _restore():
    yield
    fuzz.configure("off", 0, 0)


def _decisions(level, seed, proc, n=2000):
    fuzz.configure(level, seed, proc)
    out = []
    for _ in range(n):
        before = fuzz.ACTIVE.delays
        fuzz.point("x")
        out.append(fuzz.ACTIVE.delays - before)
    return out


def test_off_is_inactive():
    fuzz.configure("off", 1, 1)
    assert fuzz.ACTIVE is None and fuzz.hits() == {}
    fuzz.point("anything")  # a no-op


def test_levels_delay_a_seeded_share_of_hits():
    light, heavy = _decisions("light", 1, 1), _decisions("heavy", 1, 1)
    assert 10 <= sum(light) <= 90  # ~1 in 50 of 2000
    assert 150 <= sum(heavy) <= 400  # ~1 in 8
    assert _decisions("light", 1, 1) == light  # same seed and process: same choices
    assert _decisions("light", 1, 2) != light  # another process: other choices
    assert fuzz.hits() == {"x": 2000}


def test_bad_level():
    with pytest.raises(ValueError, match="fuzz level"):
        fuzz.configure("medium", 1, 1)


def test_run_records_the_level_and_compare_measures_without(tmp_path):
    out = tmp_path / "r.json"
    p = launch_in_process("run", "--design", "rcu-list", "--duration", "0.5", "--quiet", "--fuzz", "heavy", "--json", str(out))
    assert p.returncode == 0, p.stdout[-2000:]
    assert json.loads(out.read_text())["config"]["fuzz"] == "heavy"
    from lab import compare

    seen = []
    compare.run_compare([1], [0.0], 0.1, 1, tmp_path, lambda cfg: seen.append(cfg) or {"config": cfg},
                        designs=("rcu-list",))
    assert seen and seen[0]["fuzz"] == "off"
