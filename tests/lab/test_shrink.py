"""Shrinking a failing schedule (issue 22 item 5): the saved schedule has no more context switches
and no more steps than the one found, fails with the same diagnosis (numbers aside), keeps the
original length beside its own, and replays to the same FAILURE."""

from __future__ import annotations

from lab.explore import builtin, explore
from lab.schedrun import Outcome
from lab.schedule_file import load, replay, switches
from lab.shrink import diagnosis_key, shrink


class FakeRunner:
    """Two processes of named steps; the run FAILs ("lost write") when process 1 checks before
    process 0 protects and stores after process 0 syncs (the tlb-flush race), with the step numbers
    in the message (a shrunk run fails at another step: same diagnosis)."""

    P = [["load", "lock", "protect", "unlock", "flush", "sync", "publish", "put"],
         ["load", "a", "check", "b", "c", "d", "e", "f", "store", "put"]]

    def __init__(self):
        self.runs = 0

    def run(self, strategy, max_steps):
        self.runs += 1
        pc, log, last, at = [0, 0], [], -1, {}
        while any(pc[i] < len(self.P[i]) for i in (0, 1)):
            enabled = [i for i in (0, 1) if pc[i] < len(self.P[i])]
            i = strategy.pick(enabled, len(log), last)
            name = self.P[i][pc[i]]
            at[(i, name)] = len(log)
            log.append((i, name, False))
            pc[i] += 1
            last = i
        bad = at[(1, "check")] < at[(0, "protect")] and at[(1, "store")] > at[(0, "sync")]
        reasons = [f"oracle: lost write at step {at[(1, 'store')]} (gpa 0x{at[(1, 'store')] * 8:x})"] if bad else []
        return Outcome("FAILURE" if bad else "SUCCESS", reasons, log, "done", 0.0)


class Choices:
    name = "choices"

    def __init__(self, c):
        self.c = c

    def pick(self, enabled, step, last, locs=None):
        return self.c[step] if step < len(self.c) and self.c[step] in enabled else enabled[0]


def test_diagnosis_key_ignores_numbers_and_repeat_counts():
    a = diagnosis_key("done", ["oracle: lost write at step 7 (gpa 0x38) (x3)"])
    assert a == diagnosis_key("done", ["oracle: lost write at step 12 (gpa 0x60)"])
    assert a != diagnosis_key("deadlock", ["oracle: lost write at step 12 (gpa 0x60)"])
    assert a != diagnosis_key("done", ["WARN: stale shadow physid entry"])


def test_shrink_removes_switches_and_keeps_the_diagnosis():
    r = FakeRunner()
    noisy = [1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0]  # 9 switches around the race
    o = r.run(Choices(noisy), 100)
    assert o.verdict == "FAILURE" and switches(o.log) == 9
    best, tried = shrink(r, o, 100)
    assert best.verdict == "FAILURE" and diagnosis_key("done", best.reasons) == diagnosis_key("done", o.reasons)
    assert switches(best.log) < switches(o.log) and len(best.log) <= len(o.log)
    # the least a failure needs: 1 checks, 0 protects and syncs, 1 stores: 2 switches (+ the ends)
    assert switches(best.log) <= 3, best.log
    assert 0 < tried <= 200


def test_shrink_keeps_a_schedule_nothing_smaller_reproduces():
    r = FakeRunner()
    c = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]  # 2 switches: minimal already
    o = r.run(Choices(c), 100)
    assert o.verdict == "FAILURE"
    best, _ = shrink(r, o, 100)
    assert best is o


def test_explore_saves_the_shrunk_schedule_with_its_original_length(tmp_path):
    # a random walk finds the kaboom with many switches; the saved schedule is the shrunk one
    res = explore(builtin("kaboom", "bool", None, ()), "random", 3, 30, 2, str(tmp_path))
    assert res["verdict"] == "FAILURE", res.get("reasons")
    sc, steps, doc = load(str(tmp_path / "failing-schedule.toml"))
    ex = doc["explore"]
    assert {"original_steps", "steps", "original_switches", "switches"} <= set(ex)
    assert ex["steps"] == len(steps) <= ex["original_steps"] and ex["switches"] <= ex["original_switches"]
    assert ex["original_switches"] > ex["switches"], ex  # a random walk's switches did not all matter
    assert res["failing_steps"] == len(steps) and res["original_steps"] == ex["original_steps"]
    r = replay(str(tmp_path / "failing-schedule.toml"))
    assert r["verdict"] == "FAILURE" and r["reasons"][:20] == r["expected"], r["reasons"][:3]
    assert diagnosis_key(res["sched_outcome"], r["reasons"]) == diagnosis_key(res["sched_outcome"], res["reasons"])


def test_no_shrink_saves_the_schedule_as_found(tmp_path):
    res = explore(builtin("kaboom", "bool", None, ()), "random", 3, 30, 2, str(tmp_path), shrink=False)
    assert res["verdict"] == "FAILURE" and "original_steps" not in res
    assert "original_steps" not in load(str(tmp_path / "failing-schedule.toml"))[2]["explore"]


def test_a_failure_that_does_not_repeat_step_by_step_is_saved_unconfirmed():
    """explore runs a failing schedule once more as replay does; if that run takes the same steps
    and fails, its outcome is saved (confirmed); if it does not fail, explore's own is kept and
    ``replay_confirmed`` is False (review of fe2c567: it used to be kept silently)."""
    from types import SimpleNamespace as NS

    from lab.explore import _as_replayed

    log = [(0, 1, None), (1, 2, None)]
    o = NS(verdict="FAILURE", sched_outcome="failure", reasons=["explore's diagnosis"], log=log)

    class Fake:
        def __init__(self, out):
            self.out = out

        def run(self, strategy, max_steps):
            return self.out

    again = NS(verdict="FAILURE", sched_outcome="failure", reasons=["replay's diagnosis"], log=list(log))
    assert _as_replayed(Fake(again), o, 100) == (again, True)  # same steps, FAILURE: replay's diagnosis
    passed = NS(verdict="SUCCESS", sched_outcome="ok", reasons=[], log=list(log))
    assert _as_replayed(Fake(passed), o, 100) == (o, False)
    other = NS(verdict="FAILURE", sched_outcome="failure", reasons=["x"], log=[(1, 1, None)])
    assert _as_replayed(Fake(other), o, 100) == (o, False)
    hang = NS(verdict="FAILURE", sched_outcome="hang", reasons=["hang"], log=log)
    assert _as_replayed(Fake(again), hang, 100) == (hang, False)
