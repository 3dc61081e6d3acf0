"""Shrinking a failing schedule before it is saved, the way shuttle and Hypothesis shrink: try
smaller schedules, keep one that still fails with the same diagnosis, repeat until nothing smaller
fails or the budget is spent.

A candidate is a list of vCPU choices run under :class:`Guided`: step ``k`` runs ``choices[k]``
when that vCPU can run there, else the vCPU of the step before (no context switch), else the
lowest runnable one; past the list's end, likewise. What the candidate really ran (its log) is the
next schedule, so the result replays exactly (``strategies.Replay``). Smaller = fewer context
switches, then fewer steps. Passes, each until it no longer helps: cut the tail (keep a prefix of
the runs of one vCPU, let the rest run without switches), drop one run, move one run's steps onto
the neighbour before it.

Same diagnosis: the scheduler's outcome (done, deadlock, ...) and the first reason, compared with
numbers, addresses and repeat counts taken out (``diagnosis_key``): which failure, not its
timestamps, gpas or vCPU numbers.
"""

from __future__ import annotations

import re
import time

from lab.schedule_file import switches

BUDGET_RUNS = 200
BUDGET_S = 60.0
_NUM = re.compile(r"0x[0-9a-fA-F]+|\d+")


def diagnosis_key(sched_outcome: str, reasons: list[str]) -> tuple[str, str]:
    first = reasons[0] if reasons else ""
    first = first.rsplit(" (x", 1)[0]
    return sched_outcome, _NUM.sub("#", first)


class Guided:
    """Follow ``choices`` where it can, else no switch (module doc)."""

    name = "guided"

    def __init__(self, choices: list[int]):
        self.choices = choices

    def pick(self, enabled: list[int], step: int, last: int, locs=None) -> int:
        if step < len(self.choices) and self.choices[step] in enabled:
            return self.choices[step]
        return last if last in enabled else min(enabled)


def _runs(choices: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for v in choices:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return [(v, n) for v, n in out]


def _flat(runs: list[tuple[int, int]]) -> list[int]:
    return [v for v, n in runs for _ in range(n)]


def _size(log) -> tuple[int, int]:
    return switches(log), len(log)


def shrink(runner, outcome, max_steps: int, budget_runs: int = BUDGET_RUNS, budget_s: float = BUDGET_S):
    """The smallest failing outcome found from ``outcome`` (a FAILURE of ``runner``'s scenario),
    and how many candidates were run. Returns ``outcome`` itself if nothing smaller fails alike."""
    key = diagnosis_key(outcome.sched_outcome, outcome.reasons)
    best = outcome
    tried = 0
    t0 = time.monotonic()
    seen: set[tuple[int, ...]] = set()

    def attempt(choices: list[int]) -> bool:
        nonlocal best, tried
        t = tuple(choices)
        if t in seen or tried >= budget_runs or time.monotonic() - t0 > budget_s:
            return False
        seen.add(t)
        tried += 1
        o = runner.run(Guided(choices), max_steps)
        if o.verdict == "FAILURE" and diagnosis_key(o.sched_outcome, o.reasons) == key \
                and _size(o.log) < _size(best.log):
            best = o
            return True
        return False

    improved = True
    while improved and tried < budget_runs and time.monotonic() - t0 <= budget_s:
        improved = False
        runs = _runs([v for v, _, _ in best.log])
        # 1. cut the tail: the shortest prefix of runs after which running without switches still fails
        for k in range(1, len(runs)):
            if attempt(_flat(runs[:k])):
                improved = True
                break
        # 2. drop one run (its steps go to whoever runs on without a switch)
        i = len(runs) - 1
        while i >= 0:
            runs = _runs([v for v, _, _ in best.log])
            if i < len(runs) and attempt(_flat(runs[:i] + runs[i + 1:])):
                improved = True
            i -= 1
        # 3. give one run's steps to the run before it (a later switch)
        runs = _runs([v for v, _, _ in best.log])
        for i in range(1, len(runs)):
            runs = _runs([v for v, _, _ in best.log])
            if i >= len(runs):
                break
            merged = runs[:i - 1] + [(runs[i - 1][0], runs[i - 1][1] + runs[i][1])] + runs[i + 1:]
            if attempt(_flat(merged)):
                improved = True
    return best, tried


def shrink_failure(runner, outcome, max_steps: int) -> tuple:
    """``explore``'s FAILURE, shrunk when it can be (not a hang or crash, which depend on timing,
    nor a step-bound failure, whose length is the bound): (outcome to save, the [explore] keys
    ``original_steps`` / ``original_switches`` / ``shrink_runs``; {} when not shrunk)."""
    if outcome.sched_outcome in ("hang", "crash", "step-bound"):
        return outcome, {}
    best, tried = shrink(runner, outcome, max_steps)
    return best, {"original_steps": len(outcome.log), "original_switches": switches(outcome.log),
                  "shrink_runs": tried}
