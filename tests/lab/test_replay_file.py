"""launch.py replay validates what it is given (issue 22 item 6): a saved schedule is sealed by a hash
of its body, so an edited file is told apart from code that changed; an unknown hook, vcpus that
disagree with the programs, steps after the failing one and a max_steps below it are one-line errors
(exit 2); a step bound (exit 3) and an outside stop (SIGSTOP of a vCPU process: exit 4) are outcomes
of their own, not the code's FAILURE."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import launch_in_process

from lab.explore import builtin, explore
from lab.schedule_file import load, rehash, replay

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _process(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=180)


_cli = launch_in_process  # the refusals: launch.main in this process (the exit-3 test runs the CLI process)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A failing schedule of kaboom (registration bool), as explore saved it."""
    out = tmp_path_factory.mktemp("kaboom")
    res = explore(builtin("kaboom", "bool", None, ()), "pct", 3, 50, 1, str(out), shrink=False)  # (test_shrink.py)
    assert res["verdict"] == "FAILURE", res.get("reasons")
    return (out / "failing-schedule.toml").read_text()


def _file(tmp_path, text: str, edit=None, seal: bool = True):
    f = tmp_path / "failing-schedule.toml"
    f.write_text(text if edit is None else edit(text))
    if edit is not None and seal:
        rehash(str(f))
    return f


def _one_line_exit_2(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout[-300:], p.stderr)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_the_file_is_sealed_and_replays_to_the_same_failure(tmp_path, saved):
    f = _file(tmp_path, saved)
    sc, steps, doc = load(str(f))
    assert doc["schedule"]["hash"].startswith("sha256:") and sc.executor == "vcpu"
    assert doc["explore"]["steps"] == len(steps) and doc["explore"]["switches"] >= 0
    r = replay(str(f))
    assert r["verdict"] == "FAILURE" and r["exit"] == 1 and r["reasons"][:20] == r["expected"]


def test_an_edited_file_is_refused_as_edited(tmp_path, saved):
    # a step renamed by hand, not re-sealed: edited (not "the code changed")
    f = _file(tmp_path, saved, lambda t: t.replace('"op vcpu_put"', '"op vcpu_putt"', 1), seal=False)
    _one_line_exit_2(_cli("replay", str(f)), "edited", "[schedule] hash")
    # the config edited (a scheduling-relevant value): edited too
    f = _file(tmp_path, saved, lambda t: t.replace("l2s = 2", "l2s = 3", 1), seal=False)
    _one_line_exit_2(_cli("replay", str(f)), "edited")


def test_a_schedule_the_code_no_longer_follows_is_not_called_edited(tmp_path, saved):
    # as if the code had renamed a point: the file is consistent (sealed), the run is not
    f = _file(tmp_path, saved, lambda t: t.replace('"op vcpu_put"', '"op vcpu_putt"', 1))
    p = _cli("replay", str(f))
    _one_line_exit_2(p, "no longer matches the code", "'op vcpu_putt'")
    assert "edited" not in p.stderr


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("hooks = []", 'hooks = ["no-such-hook"]', 1), "unknown hook 'no-such-hook'"),
    (lambda t: t.replace("vcpus = 2", "vcpus = 3", 1), "config vcpus = 3 disagrees with its 2 vCPU programs"),
    (lambda t: re.sub(r"(\nsteps = \[\n)  \[[^\n]*\n", r"\1", t, count=1), "1 step(s) missing before the failing step"),
    (lambda t: t[:t.rindex("]")] + '  [1, "op vcpu_put"],\n]\n', "1 extra trailing step(s) after the failing step"),
    (lambda t: re.sub(r"max_steps = \d+", "max_steps = 12", t, count=1), "max_steps = 12 is below the failing step"),
    (lambda t: t.replace('["vmrun", {l2 = 0}]', '["vmrun", {l2 = 7}]', 1), "no L2 7"),
], ids=["unknown-hook", "vcpus", "step-missing", "trailing-steps", "max-steps", "bad-program-step"])
def test_invalid_files_are_one_line_exit_2(tmp_path, saved, edit, needle):
    f = _file(tmp_path, saved, edit)
    assert f.read_text() != saved
    _one_line_exit_2(_cli("replay", str(f)), needle)


def test_replay_help_documents_the_exit_codes():
    p = _cli("replay", "-h")
    text = " ".join(p.stdout.split())
    for code in ("0 SUCCESS", "1 FAILURE", "2 bad input", "3 STEP-BOUND", "4 STOPPED"):
        assert code in text, text


def test_a_step_bound_replays_as_step_bound_exit_3(tmp_path):
    res = explore(builtin("kaboom", None, None, ()), "pct", 3, 1, 1, str(tmp_path), max_steps=20)
    assert res["verdict"] == "FAILURE" and res["reasons"][0].startswith("step-bound"), res["reasons"][:2]
    f = tmp_path / "failing-schedule.toml"
    r = replay(str(f))
    assert r["verdict"] == "STEP-BOUND" and r["exit"] == 3 and r["steps"] == 20, r["reasons"][:2]
    p = _process("replay", str(f))
    assert p.returncode == 3 and "STEP-BOUND" in p.stdout and "FAILURE" not in p.stdout, p.stdout[-500:]


def test_a_sigstopped_vcpu_process_is_stopped_not_failure(tmp_path, saved, monkeypatch):
    from ipc.sched import pool
    from vm.avic.base import AvicDesign

    f = _file(tmp_path, saved)
    pools, calls, stopped = [], [0], []
    real_init, real_sample = pool.Pool.__init__, AvicDesign.sample

    def init(self, *a, **k):
        real_init(self, *a, **k)
        pools.append(self)

    def sample(self):
        calls[0] += 1
        if calls[0] == 30 and pools:  # between two steps: one vCPU process is stopped from outside
            pid = pools[-1].pids[0]
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        real_sample(self)

    monkeypatch.setattr(pool.Pool, "__init__", init)
    monkeypatch.setattr(AvicDesign, "sample", sample)
    try:
        r = replay(str(f), hang_s=1.5)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert stopped, "the sampling checker never ran 30 times"
    assert r["verdict"] == "STOPPED" and r["exit"] == 4, r["reasons"][:3]
    assert "stopped from outside" in r["reasons"][0] and "SIGSTOP" in r["reasons"][0], r["reasons"][:3]
