"""Controlled-scheduling benchmark (issue 13): how fast ``launch.py explore`` runs and how soon it
finds each built-in race.

    python -m bench.explore [--schedules N] [--seed S] [--json PATH]
    python -m bench.explore --mutants [--only NAME,...] [--budget N] [--json PATH]

``--mutants`` (issue 22): every mutant of the hand-written catalogue (bench/mutants_catalogue.py) on
a vCPU / AVIC / page-track path (vm/), applied to a copy of the package (bench/mutants.py), and
explore run on it (PCT depth 3, per-access points) with seeds 1, 2, 3 and a budget of N (1,000)
schedules each, round robin over its targets: the built-in scenarios, in the designs its commands
name, whose correct code runs a function the patch changes (bench/explore_mutants.py says how).

- ``find_<scenario>``: PCT at depth 3, seed S, the hook on (kaboom: --registration bool):
  schedules to the first FAILURE (goal <= 1000) and the seconds it took
- ``success_<scenario>``: the correct code (refcount, no hook) over N schedules (default 1000):
  verdict (goal SUCCESS), seconds, scheduling steps per second (goal >= 2000: every step is two
  futex hand-offs between real processes plus the sampling checker; the count includes VM
  creation and teardown per schedule)
- ``pct_guarantee_<scenario>``: PCT's per-schedule bound 1/(n*k^(d-1)) for the n and the largest k seen (steps taken or drawn over)
"""

from __future__ import annotations

import argparse
import json
import sys

from lab.explore import builtin, explore

FIND = [("kaboom", "bool", ()), ("flood-drop", None, ("flood-drop-race",)), ("tlb-flush", None, ("no-tlb-flush",))]
GOALS = {"schedules_to_failure": ("<=", 1000), "steps_per_s": (">=", 2000)}


def measure(schedules: int, seed: int) -> dict:
    out: dict = {"schedules": schedules, "seed": seed, "depth": 3, "strategy": "pct"}
    for name, reg, hooks in FIND:
        r = explore(builtin(name, reg, None, hooks), "pct", 3, 1000, seed, None)
        out[f"find_{name}"] = {"verdict": r["verdict"], "schedules_to_failure": r.get("schedules_to_failure"),
                               "seconds": r["seconds"], "first_reason": (r["reasons"] or [""])[0][:160]}
    for name, _, _ in FIND:
        r = explore(builtin(name, "refcount", None, ()), "pct", 3, schedules, seed, None)
        out[f"success_{name}"] = {"verdict": r["verdict"], "schedules": r["schedules"], "seconds": r["seconds"],
                                  "steps": r["steps"], "steps_per_s": r["steps_per_s"]}
        out[f"pct_guarantee_{name}"] = r["guarantee"]
    return out


def judge(res: dict) -> list[str]:
    bad = []
    for name, _, _ in FIND:
        f, s = res[f"find_{name}"], res[f"success_{name}"]
        if f["verdict"] != "FAILURE" or f["schedules_to_failure"] > GOALS["schedules_to_failure"][1]:
            bad.append(f"{name}: the race was not found within 1000 schedules")
        if s["verdict"] != "SUCCESS":
            bad.append(f"{name}: the correct code failed")
        if s["steps_per_s"] < GOALS["steps_per_s"][1]:
            bad.append(f"{name}: {s['steps_per_s']:.0f} steps/s < {GOALS['steps_per_s'][1]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.explore", description=__doc__.split("\n\n")[0])
    p.add_argument("--schedules", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", default=None)
    p.add_argument("--mutants", action="store_true", help="schedules explore needs per catalogue mutant and seed")
    p.add_argument("--only", default=None, help="--mutants: these mutants (comma-separated names)")
    p.add_argument("--budget", type=int, default=1000, help="--mutants: schedules per mutant and seed")
    p.add_argument("--depth", type=int, default=None, help="--mutants: PCT depth (default: bench/explore_mutants.py DEPTH)")
    a = p.parse_args(argv)
    if a.mutants:
        from bench import explore_mutants

        return explore_mutants.main(a.json, a.only.split(",") if a.only else None, a.budget,
                                    a.depth or explore_mutants.DEPTH)
    res = measure(a.schedules, a.seed)
    for name, _, _ in FIND:
        f, s = res[f"find_{name}"], res[f"success_{name}"]
        print(f"{name:<11} race found after {f['schedules_to_failure']!s:>4} schedule(s) ({f['seconds']:.1f} s); "
              f"correct code {s['verdict']} over {s['schedules']} schedules in {s['seconds']:.1f} s, "
              f"{s['steps_per_s']:,.0f} steps/s; PCT bound {res[f'pct_guarantee_{name}']:.2g}")
    res["goals_missed"] = judge(res)
    for b in res["goals_missed"]:
        print(f"GOAL MISSED: {b}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 1 if res["goals_missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
