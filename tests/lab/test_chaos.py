"""lab.chaos (``launch.py chaos``): seeded cases, the judge of each outcome, and a real run of ten
cases in which every fault must end in bound, named, with nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
from conftest import launch_in_process

from lab import chaos

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_cases_are_seeded_and_in_range():
    a, b = chaos.make_cases(50, 7), chaos.make_cases(50, 7)
    assert a == b and a != chaos.make_cases(50, 8)
    for c in a:
        assert 1 <= c.vcpus <= 8 and 0.5 <= c.duration <= 2.5 and 0.1 <= c.stop_s <= 3.0
        assert c.design in chaos.DESIGNS and c.sig in chaos.SIGNALS and c.target in chaos.TARGETS
        # fault times are drawn inside the run: after start-up, clear of its planned end (retries too)
        for attempt in range(chaos.ATTEMPTS):
            r = chaos.retry_case(c, attempt)
            assert chaos.FAULT_MARGIN_S <= r.fault_at <= c.duration - chaos.FAULT_MARGIN_S, (attempt, r)
            assert (r == c) == (attempt == 0) or r.fault_at == c.fault_at  # only the fault time changes
            assert msgspec.structs.replace(r, fault_at=c.fault_at) == c
    assert {c.target for c in a} == set(chaos.TARGETS) and {c.sig for c in a} == set(chaos.SIGNALS)


def _rec(sig, target, rc, hang=False):
    case = chaos.make_cases(1, 1)[0]
    d = {f: getattr(case, f) for f in case.__struct_fields__}
    d.update(sig=sig, target=target)
    return {"case": d, "rc": rc, "hang": hang, "fault": f"{sig} {target} pid 1"}


def test_judge_requires_a_named_diagnosis_for_a_dead_vcpu():
    needed, named, _ = chaos.judge(_rec("SIGKILL", "vcpu", 1), "FAILURE: vCPU 3 died holding mmu_lock (signal 9)")
    assert needed and named
    needed, named, why = chaos.judge(_rec("SIGKILL", "vcpu", 1), "FAILURE: 2 WARN(s)")
    assert needed and not named and "no named diagnosis" in why
    assert not chaos.judge(_rec("SIGKILL", "vcpu", 0), "SUCCESS")[1]  # a dead vCPU cannot be a SUCCESS


def test_judge_coordinator_and_pauses():
    assert chaos.judge(_rec("SIGKILL", "coordinator", -9), "")[:2] == (True, True)
    assert chaos.judge(_rec("SIGTERM", "coordinator", 143), "terminated by SIGTERM")[:2] == (True, True)
    assert chaos.judge(_rec("SIGTERM", "coordinator", 1), "Traceback")[:2] == (True, False)
    assert chaos.judge(_rec("SIGSTOP", "vcpu", 0), "SUCCESS")[:2] == (False, True)
    assert chaos.judge(_rec("SIGSTOP", "vcpu", 1), "FAILURE: RCU stall ...")[:2] == (False, True)
    assert chaos.judge(_rec("SIGSTOP", "vcpu", 1), "Traceback (most recent call last)")[:2] == (False, False)
    assert chaos.judge(_rec("SIGKILL", "vcpu", None, hang=True), "")[:2] == (True, False)


def test_figures_count_what_went_wrong():
    good = {"fault": "SIGKILL vcpu pid 5", "end_after_fault_s": 0.4, "ended_in_bound": True, "hang": False,
            "named_needed": True, "diagnosis_named": True, "leaked_segments": [], "orphans": [], "json": "ok",
            "ok": True, "delivered": True}
    bad = dict(good, fault="SIGSTOP coordinator pid 9", end_after_fault_s=12.0, ended_in_bound=False, hang=True,
               diagnosis_named=False, leaked_segments=["pts_x_vm"], orphans=["vcpu 12"], json="bad: x", ok=False,
               case={"index": 1}, command=[], why="hang", tail="")
    f = chaos.figures([good, bad])
    assert (f["runs"], f["ended_in_bound"], f["hangs"], f["leaked_segments"], f["orphans"], f["bad_json"]) == \
        (2, 1, 1, 1, 1, 1)
    assert f["named_needed"] == 2 and f["diagnosis_named"] == 1 and f["slowest_end_s"] == 12.0
    assert f["faults"] == {"SIGKILL vcpu": 1, "SIGSTOP coordinator": 1} and len(f["failing"]) == 1
    assert (f["tested"], f["not_tested"]) == (2, 0)


def test_bad_input_is_one_line_exit_2(tmp_path):
    p = launch_in_process("chaos", "--runs", "0", "--out", tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--runs" in p.stderr


def test_ten_chaos_runs_end_well(tmp_path):
    fig_path = tmp_path / "fig.json"
    p = subprocess.run([sys.executable, "launch.py", "chaos", "--runs", "10", "--seed", "5", "--out",
                        str(tmp_path / "out"), "--json", str(fig_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=280)
    assert p.returncode == 0 and fig_path.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    fig = json.loads(fig_path.read_text())
    assert fig["runs"] == 10 and fig["hangs"] == 0 and fig["leaked_segments"] == 0 and fig["orphans"] == 0
    assert fig["bad_json"] == 0 and fig["diagnosis_named"] == fig["named_needed"] > 0
    assert fig["tested"] + fig["not_tested"] == 10 and fig["tested"] >= 8, fig  # faults really fired
    assert sum(n for k, n in fig["faults"].items() if k != "not delivered") == fig["tested"]
    assert f"{fig['tested']} of 10 cases tested something; {fig['not_tested']} not tested (fault never delivered)" \
        in p.stdout, p.stdout
    doc = json.loads((tmp_path / "out" / "chaos.json").read_text())
    assert len(doc["cases"]) == 10 and all("command" in c for c in doc["cases"])
    for c in doc["cases"]:
        assert isinstance(c["delivered"], bool) and 1 <= c["attempts"] <= chaos.ATTEMPTS
        if c["delivered"]:  # sent inside the run: after start-up, before its planned end
            assert 0 < c["fault_after_startup_s"] < c["case"]["duration"], c


def _undelivered_case(**kw) -> chaos.Case:
    d = dict(index=0, seed=1, design="mirror", registration="refcount", vcpus=1, duration=0.3, fault_at=30.0,
             sig="SIGKILL", target="vcpu", stop_s=0.1, pick=0.0)
    d.update(kw)
    return chaos.Case(**d)


def test_a_fault_after_the_run_is_not_tested(tmp_path):
    from lab.sweep import launch_py

    # the fault time is far after the run's end: the signal is never sent, the case tested nothing
    rec = chaos.run_tested(_undelivered_case(), str(tmp_path), str(launch_py()), attempts=1)
    assert rec["delivered"] is False and rec["tested"] is False and rec["attempts"] == 1, rec
    assert rec["fault"].startswith("missed: the run ended before 30s after start-up"), rec["fault"]
    assert rec["ok"] and rec["rc"] == 0 and rec["startup_s"] is not None, rec  # the run itself ended well
    fig = chaos.figures([rec])
    assert (fig["tested"], fig["not_tested"], fig["failing"], fig["faults"]) == (0, 1, [], {"not delivered": 1})
    assert chaos.summary_line(fig) == "0 of 1 cases tested something; 1 not tested (fault never delivered)"


def _fake(delivered_on: int | None):
    calls = []

    def run(case, out_dir, launch):
        calls.append(case)
        hit = len(calls) - 1 == delivered_on
        return {"case": {}, "delivered": hit, "ok": True, "rc": 0,
                "fault": "SIGKILL vcpu pid 7" if hit else "missed: no live vcpu at 0.4s after start-up"}
    return run, calls


def test_an_undelivered_fault_is_retried_at_other_times_then_not_tested():
    case = chaos.make_cases(1, 3)[0]
    run, calls = _fake(None)
    rec = chaos.run_tested(case, "-", "-", run=run)
    assert rec["attempts"] == chaos.ATTEMPTS == len(calls) == len(rec["earlier_attempts"]) + 1
    assert rec["tested"] is False and calls[0] == case
    assert len({c.fault_at for c in calls}) == len(calls)  # another fault time each attempt
    assert all(chaos.FAULT_MARGIN_S <= c.fault_at <= case.duration - chaos.FAULT_MARGIN_S for c in calls)
    run, calls = _fake(1)
    rec = chaos.run_tested(case, "-", "-", run=run)
    assert rec["attempts"] == 2 and rec["tested"] is True and rec["earlier_attempts"][0]["fault_at"] == case.fault_at


def test_nothing_tested_is_not_success(tmp_path, monkeypatch, capsys):
    import argparse

    recs = [{"case": {"index": i}, "command": [], "fault": "missed: the run ended before start-up completed",
             "delivered": False, "tested": False, "attempts": 3, "ended_in_bound": True, "hang": False,
             "named_needed": False, "diagnosis_named": True, "leaked_segments": [], "orphans": [], "json": "ok",
             "ok": True, "why": "", "tail": ""} for i in range(2)]
    monkeypatch.setattr(chaos, "run_cases", lambda cases, out, scheduler, progress: recs)
    args = argparse.Namespace(runs=2, seed=1, out=str(tmp_path / "o"), json=str(tmp_path / "f.json"), scheduler=None)
    assert chaos.main(args) == 1
    out = capsys.readouterr().out
    assert "0 of 2 cases tested something; 2 not tested (fault never delivered)" in out
    assert "FAILURE" in out and "nothing was tested" in out and "SUCCESS" not in out, out
    fig = json.loads((tmp_path / "f.json").read_text())
    assert (fig["tested"], fig["not_tested"]) == (0, 2)
    recs[0].update(delivered=True, tested=True, attempts=1, fault="SIGSTOP vcpu pid 9")
    assert chaos.main(args) == 0
    out = capsys.readouterr().out
    assert "1 of 2 cases tested something; 1 not tested (fault never delivered)" in out and "SUCCESS" in out


class _P:
    def __init__(self, pid, ppid, cmd):
        self.pid, self._ppid, self._cmd = pid, ppid, cmd

    def ppid(self):
        return self._ppid

    def cmdline(self):
        return self._cmd.split()


def test_roles_in_the_process_tree():
    fs_cmd = "python -c from multiprocessing.forkserver import main; main(...)"
    assert chaos._role(_P(10, 1, "python launch.py run"), 10, set()) == "coordinator"
    assert chaos._role(_P(11, 10, fs_cmd), 10, set()) == "forkserver"
    # a vCPU is forked by the fork server and so has the server's command line
    assert chaos._role(_P(12, 11, fs_cmd), 10, {11}) == "vcpu"
    assert chaos._role(_P(13, 10, "python -c from multiprocessing.resource_tracker import main"), 10, {11}) \
        == "resource_tracker"


def test_judge_fork_server_and_late_sigterm():
    # the fork server died after the vCPUs were done: nothing to report, SUCCESS is fine
    assert chaos.judge(_rec("SIGKILL", "forkserver", 0), "SUCCESS: oracle clean")[:2] == (False, True)
    # ... but a lost vCPU must be named
    assert chaos.judge(_rec("SIGKILL", "forkserver", 1), "FAILURE: no result from vCPU(s) [2]")[1]
    assert chaos.judge(_rec("SIGTERM", "forkserver", 1),
                       "FAILURE: vCPU 0 died (exit code 255) (exit status lost: the fork server died)")[1]
    # a SIGTERM that lands after the verdict was printed changes nothing
    assert chaos.judge(_rec("SIGTERM", "coordinator", 1), "FAILURE: oracle: 1 violation(s)")[:2] == (True, True)
