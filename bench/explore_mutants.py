"""``python -m bench.explore --mutants``: how many schedules ``explore`` needs to find each mutant of
the hand-written catalogue (bench/mutants_catalogue.py) that sits on a vCPU / AVIC / page-track path
(a file under vm/; the grace-period mutants of ipc/rcu.py are torture's).

Each mutant is applied to a copy of the package with bench/mutants.py's machinery (``make_copy``,
``clone``, ``apply_mutant``), and explore runs *in the copy* (a child process per mutant): PCT depth 3 (``--depth``),
per-access scheduling points, seeds 1, 2, 3, ``budget`` schedules per seed.

The targets, chosen mechanically, the way a user who knows which file they changed would choose:
the built-in scenarios (lab/scenarios.py, ``free`` left out) in each nested AVIC design the mutant's
own commands name (``run --design D``; all three when none does), *that run the function the patch
changes*. The changed functions are read from the patch (the innermost function around each
edit's changed lines in the original file: ``changed_functions``); a target runs one of them when
``COVER_SCHEDULES`` schedules of the correct code (seed 1) reach it (``explore --coverage``'s
function coverage, lab/pathcov.py: measured once per target and bench run). A scenario that never
executes the changed code cannot find the bug; when no target runs it, every target is kept. Per
seed the targets are taken in turn, one schedule of each (a round robin, the way one would spread a
budget), so the schedules needed are ``(s - 1) * T + j + 1`` for the first target j (of T) that
fails at its s-th schedule. A target that does not fail runs ``budget / T`` schedules (a failing one
stops the others at its count).

JSON keys: ``mutants``, ``found_every_seed`` (mutants found on seeds 1, 2 and 3), ``median_schedules``
(over the finds), ``duplicate_fraction`` (schedules run that repeated an earlier one),
``skipped_draw_fraction`` (draws recognised as repeats before running), ``steps_per_s``, and per
mutant ``changed_functions``, ``targets`` (those kept, of ``candidates``) and ``seeds``: {seed:
schedules needed or null, the target, the first reason}.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench import mutants as M
from bench.mutants_catalogue import CATALOGUE

SEEDS = (1, 2, 3)
SCENARIOS = ("kaboom", "flood-drop", "tlb-flush", "invalidate", "memslot", "gp-share", "notifier", "share", "running", "reader")
AVIC_DESIGNS = ("mutex-hash", "rcu-list", "per-table-notifier")
CHILD_TIMEOUT_S = 3600
DEPTH = 3  # PCT's depth (``--depth``)
COVER_SCHEDULES = 20  # schedules of the correct code per target whose function coverage picks the targets

# run in the mutated copy: explore every target of one seed, round robin (see the module doc)
CHILD = r"""
import json, sys
from lab.explore import explore
from lab.scenarios import builtin
targets, seed, budget, depth = json.loads(sys.argv[1])
per = max(1, budget // len(targets))
best, out = None, {"runs": []}
for j, (name, design, reg) in enumerate(targets):
    n = per if best is None else min(per, best[0])
    try:
        r = explore(builtin(name, reg, design, ()), "pct", depth, n, seed, None, shrink=False)
    except Exception as e:  # a mutant that breaks a scenario's set-up: that target's crash
        out["runs"].append({"target": [name, design, reg], "error": f"{type(e).__name__}: {e}"[:300]})
        continue
    out["runs"].append({"target": [name, design, reg], "verdict": r["verdict"], "schedules": r["schedules"],
                        "steps": r["steps"], "seconds": r["seconds"], "drawn": r["drawn"], "duplicates": r["duplicates"],
                        "distinct": r["distinct_schedules"], "reason": (r["reasons"] or [""])[0][:200]})
    if r["verdict"] == "FAILURE":
        need = (r["schedules_to_failure"] - 1) * len(targets) + j + 1
        if best is None or need < best[1]:
            best = (r["schedules_to_failure"], need, [name, design, reg], (r["reasons"] or [""])[0][:200])
out["found"] = None if best is None else {"schedules": best[1], "target": best[2], "reason": best[3]}
print("RESULT " + json.dumps(out))
"""


def selected(only: list[str] | None = None) -> list:
    ms = [m for m in CATALOGUE if m.file.startswith("vm/")]
    if only:
        unknown = set(only) - {m.name for m in ms}
        if unknown:
            raise SystemExit(f"bench.explore --mutants: not a vm/ mutant of the catalogue: {', '.join(sorted(unknown))}")
        ms = [m for m in ms if m.name in only]
    return ms


def candidates(m) -> list[tuple[str, str, str | None]]:
    """(scenario, design, registration): the designs and registration variant the mutant's own
    commands name (every AVIC design, the default registration, when they name none)."""
    designs, reg = [], None
    for cmd in m.commands:
        if "--design" in cmd:
            d = cmd[cmd.index("--design") + 1]
            if d in AVIC_DESIGNS and d not in designs:
                designs.append(d)
        if "--registration" in cmd:
            reg = cmd[cmd.index("--registration") + 1]
    return [(s, d, reg) for d in (designs or list(AVIC_DESIGNS)) for s in SCENARIOS]


def changed_functions(m, root=M.ROOT) -> list[str]:
    """``path:qualname`` (lab/pathcov.py's names) of the innermost function around each edit's
    changed lines in the original source (an insertion: the line it goes before)."""
    text = (root / m.file).read_text()
    spans: list[tuple[int, int, str]] = []

    def walk(node, prefix: str) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.FunctionDef | ast.AsyncFunctionDef):
                spans.append((ch.lineno, ch.end_lineno or ch.lineno, prefix + ch.name))
                walk(ch, f"{prefix}{ch.name}.<locals>.")
            else:
                walk(ch, f"{prefix}{ch.name}." if isinstance(ch, ast.ClassDef) else prefix)

    walk(ast.parse(text), "")
    out = set()
    for e in m.edits:
        old, new = e.old.splitlines(), e.new.splitlines()
        head = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        tail = 0
        while tail < min(len(old), len(new)) - head and old[-1 - tail] == new[-1 - tail]:
            tail += 1
        first = text.count("\n", 0, text.index(e.old)) + 1 + head
        last = max(first, first + len(old) - head - tail - 1)
        around = [sp for sp in spans if sp[0] <= first and last <= sp[1]]
        out.add(f"{m.file}:{min(around, key=lambda sp: sp[1] - sp[0])[2]}" if around else f"{m.file}:<module>")
    return sorted(out)


_COVERED: dict[tuple, frozenset[str]] = {}


def covered(target: tuple[str, str, str | None]) -> frozenset[str]:
    """The functions of vm/ the correct code of ``target`` runs in ``COVER_SCHEDULES`` schedules."""
    got = _COVERED.get(target)
    if got is None:
        from lab.explore import builtin, explore

        name, design, reg = target
        r = explore(builtin(name, reg, design, ()), "pct", 3, COVER_SCHEDULES, 1, None, quiet=True, shrink=False,
                    coverage=True)
        got = _COVERED[target] = frozenset(r["coverage"]["functions"])
    return got


def targets(m) -> list[tuple[str, str, str | None]]:
    """The candidates that run a function the patch changes (every candidate when none does)."""
    fns = changed_functions(m)
    cands = candidates(m)
    return [t for t in cands if covered(t).intersection(fns)] or cands


def run_one(copy, tgts: list, seed: int, budget: int, depth: int = DEPTH) -> dict:
    """Explore the targets ``tgts`` in the mutated ``copy`` for one seed, round robin."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([tgts, seed, budget, depth])], cwd=copy, env=env,
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (p.stderr or p.stdout)[-400:], "seconds": round(time.monotonic() - t0, 1)}
    res = json.loads(line[7:])
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def summarize(results: dict) -> dict:
    runs = [r for per in results.values() for s in per["seeds"].values() for r in s.get("runs", [])]
    found = [s["found"]["schedules"] for per in results.values() for s in per["seeds"].values() if s.get("found")]
    every = [n for n, per in results.items() if all(per["seeds"].get(str(sd), {}).get("found") for sd in SEEDS)]
    ran = sum(r.get("schedules", 0) for r in runs)
    distinct = sum(r.get("distinct") or 0 for r in runs)
    drawn = sum(r.get("drawn", 0) for r in runs)
    steps, secs = sum(r.get("steps", 0) for r in runs), sum(r.get("seconds", 0) for r in runs)
    return {"mutants": len(results), "found_every_seed": len(every),
            "median_schedules": statistics.median(found) if found else None,
            "duplicate_fraction": round((ran - distinct) / ran, 4) if ran else None,
            "skipped_draw_fraction": round(sum(r.get("duplicates", 0) for r in runs) / drawn, 4) if drawn else None,
            "schedules_run": ran, "steps_per_s": round(steps / secs, 1) if secs else None,
            "missed": sorted(set(results) - set(every))}


def main(json_path: str | None, only: list[str] | None, budget: int, depth: int = DEPTH) -> int:
    ms = selected(only)
    M.check_all(ms)
    base = M.make_copy()
    results: dict = {m.name: {"file": m.file, "mechanism": m.mechanism, "changed_functions": changed_functions(m),
                              "candidates": len(candidates(m)), "targets": [list(t) for t in targets(m)], "seeds": {}}
                     for m in ms}
    for name, r in results.items():
        print(f"{name:<42} {len(r['targets'])} of {r['candidates']} targets run {', '.join(r['changed_functions'])}",
              flush=True)
    try:
        for seed in SEEDS:  # seed after seed over every mutant: a cut run still covers each mutant
            for m in ms:
                copy = M.clone(base)
                try:
                    M.apply_mutant(copy, m)
                    results[m.name]["seeds"][str(seed)] = r = run_one(copy, results[m.name]["targets"], seed, budget, depth)
                finally:
                    shutil.rmtree(copy, ignore_errors=True)
                f = r.get("found")
                print(f"{m.name:<42} seed {seed}: " + (f"found after {f['schedules']:>4} schedules ({f['target'][0]}, "
                      f"{f['target'][1]})" if f else f"not found in {budget}" + (f" ({r['error'][-120:]!r})"
                                                                                   if "error" in r else "")),
                      flush=True)
                if json_path:  # after every run: a long bench leaves what it has
                    with open(json_path, "w") as fh:
                        json.dump({**summarize(results), "budget": budget, "depth": depth, "seeds": list(SEEDS), "results": results},
                                  fh, indent=1)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summ = summarize(results)
    print(f"{summ['found_every_seed']} of {summ['mutants']} mutants found on every seed; median "
          f"{summ['median_schedules']} schedules; duplicate fraction {summ['duplicate_fraction']} (skipped draws "
          f"{summ['skipped_draw_fraction']}); {summ['steps_per_s']} steps/s")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({**summ, "budget": budget, "depth": depth, "seeds": list(SEEDS), "results": results}, fh, indent=1)
    return 0 if summ["found_every_seed"] == summ["mutants"] else 1
