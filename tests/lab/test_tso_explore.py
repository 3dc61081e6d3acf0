"""explore / replay under the memory model tso (ipc/sched/tso.py): the model and its seed are saved
in failing-schedule.toml, sealed by its hash and validated on replay (a file without them is sc); a
store->load barrier dropped from the code under test is found under tso."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from lab.explore import builtin, explore
from lab.schedule_file import load, rehash, replay

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def saved_tso(tmp_path_factory):
    out = tmp_path_factory.mktemp("kaboom-tso")
    res = explore(builtin("kaboom", "bool", None, ()), "pct", 3, 50, 1, str(out), shrink=False, memory_model="tso")
    assert res["verdict"] == "FAILURE" and res["memory_model"] == "tso", res.get("reasons")
    return (out / "failing-schedule.toml").read_text()


def _file(tmp_path, text: str, seal: bool = True):
    f = tmp_path / "failing-schedule.toml"
    f.write_text(text)
    if seal:
        rehash(str(f))
    return f


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=180)


def test_the_model_and_its_seed_are_saved_and_replayed(tmp_path, saved_tso):
    f = _file(tmp_path, saved_tso, seal=False)
    _, _, doc = load(str(f))
    assert doc["explore"]["memory_model"] == "tso" and type(doc["explore"]["memory_seed"]) is int
    r = replay(str(f))
    assert r["verdict"] == "FAILURE" and r["memory_model"] == "tso" and r["reasons"][:20] == r["expected"]


def test_an_edited_model_is_refused(tmp_path, saved_tso):
    as_sc = saved_tso.replace('memory_model = "tso"', 'memory_model = "sc"')
    p = _cli("replay", str(_file(tmp_path, as_sc, seal=False)))
    assert p.returncode == 2 and "edited" in p.stderr, p.stderr
    bogus = saved_tso.replace('memory_model = "tso"', 'memory_model = "arm"')
    p = _cli("replay", str(_file(tmp_path, bogus)))
    assert p.returncode == 2 and "memory_model 'arm'" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    no_seed = "\n".join(ln for ln in saved_tso.splitlines() if not ln.startswith("memory_seed"))
    p = _cli("replay", str(_file(tmp_path, no_seed)))
    assert p.returncode == 2 and "memory_seed" in p.stderr, p.stderr


def test_a_file_without_a_model_is_sc(tmp_path):
    out = tmp_path / "sc"
    res = explore(builtin("kaboom", "bool", None, ()), "pct", 3, 50, 1, str(out), shrink=False)
    text = (out / "failing-schedule.toml").read_text()
    assert 'memory_model = "sc"' in text
    old = "\n".join(ln for ln in text.splitlines() if not ln.startswith("memory_"))  # as written before
    f = _file(tmp_path, old, seal=False)  # sc is hashed as before: the seal still holds
    r = replay(str(f))
    assert res["verdict"] == "FAILURE" and r["verdict"] == "FAILURE" and r["memory_model"] == "sc"


def test_bad_model_on_the_command_line_is_one_line_exit_2():
    p = _cli("explore", "kaboom", "--memory-model", "arm")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "memory-model" in p.stderr, p.stderr


def test_a_dropped_store_load_barrier_is_found_under_tso(tmp_path, monkeypatch):
    """vm/avic/guest.py without its smp_mb()s (_set_running's V_LOADED before the vref counts,
    Dekker with _vref's locked increment): `running` on rcu-list fails under tso (the forked vCPU
    processes inherit the patch)."""
    from ipc import _prims
    from vm.avic import guest

    class NoBarrier(types.ModuleType):  # guest.py's view of ipc._prims: smp_mb() a no-op, the rest live
        def __getattr__(self, name):
            return getattr(_prims, name)

        @staticmethod
        def smp_mb() -> None:
            pass

    monkeypatch.setattr(guest, "_prims", NoBarrier("_prims"))
    res = explore(builtin("running", None, "rcu-list", ()), "pct", 3, 150, 1, str(tmp_path), shrink=False,
                  memory_model="tso")
    assert res["verdict"] == "FAILURE", "tso: no failure in 150 schedules of running without the barrier"
    assert any("stale shadow physid entry" in r for r in res["reasons"]), res["reasons"]
