"""The operator mode of ``python -m bench.mutants``: run the generated mutants (bench/mutants_operators.py).

    python -m bench.mutants --operators [--list] [--check] [--only ID,...] [--sample N] [--shard K/N]
                            [--seeds 1,2,3] [--limit S] [--json PATH] [--logs DIR] [--rev REV]

Each mutant runs on each seed (default 1, 2, 3): the commands for the file it touches
(``mutants_operators.commands_for``), each once with that seed, until the first FAILURE, a crash or
``--limit`` seconds (per mutant and seed; at least 1.5 x the commands' control time), with the catalogue's harness (``bench.mutants``: the copy,
the canary, the control runs, ``run_mutant``, ``classify``); passed in as ``harness`` so this module
imports nothing of it. Mutants listed in ``bench/equivalent.toml`` are not run (outcome
*equivalent*); an entry that names no generated mutant is stale: an error for ``--check``, a warning
otherwise. A mutant is *killed* when every seed killed it, *survived* when a seed ended in SUCCESS,
*crashed* / *hung* otherwise. Output: a table per operator and per file (generated / killed /
survived / equivalent / crashed, median time to failure), the kill rate per seed, every survivor;
``--json``: ``mutants``, ``killed``, ``equivalent``, ``median_ttf_s``, ``operators``, ``files``,
``seeds`` (per seed: killed / non-equivalent), ``survivors``, ``results``.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import statistics
import sys
import time
import tomllib
from dataclasses import asdict
from pathlib import Path

from bench import mutants_operators as ops

EQUIVALENT_TOML = Path(__file__).resolve().parent / "equivalent.toml"
SEEDS = (1, 2, 3)


def add_arguments(p) -> None:
    p.add_argument("--operators", action="store_true",
                   help="the generated operator mutants (bench/mutants_operators.py) instead of the catalogue")
    p.add_argument("--sample", type=int, metavar="N", help="--operators: a fixed random sample of N mutants")
    p.add_argument("--shard", metavar="K/N", help="--operators: every N-th mutant from the K-th (1-based)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="--operators: seeds (default 1,2,3)")
    p.add_argument("--report", metavar="JSON", help="--operators: re-render an earlier --json with today's "
                                                    "equivalent.toml and generator (no runs)")


def load_equivalents(path: Path | None = None) -> dict[str, str]:
    """{mutant id: why it cannot change behaviour} (``bench/equivalent.toml``)."""
    path = path or EQUIVALENT_TOML
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    out: dict[str, str] = {}
    for e in doc.get("equivalent", []):
        if not e.get("id") or not str(e.get("why", "")).strip():
            raise ops.PatchError(f"{path.name}: an entry without id or why: {e}")
        if e["id"] in out:
            raise ops.PatchError(f"{path.name}: {e['id']} listed twice")
        out[e["id"]] = e["why"]
    return out


def stale_equivalents(mutants, equivalents: dict[str, str]) -> list[str]:
    ids = {m.name for m in mutants}
    return sorted(i for i in equivalents if i not in ids)


def select(mutants: list, args) -> list:
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        by = {m.name: m for m in mutants}
        unknown = [n for n in names if n not in by]
        if unknown:
            raise ops.PatchError(f"--only: unknown mutant(s) {unknown}; --operators --list shows them")
        return [by[n] for n in names]
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        if not 1 <= k <= n:
            raise ops.PatchError(f"--shard {args.shard}: want K/N with 1 <= K <= N")
        mutants = mutants[k - 1::n]
    if args.sample is not None and args.sample < len(mutants):
        mutants = sorted(random.Random(0).sample(mutants, args.sample), key=lambda m: m.name)
    return mutants


def print_rules(file=None) -> None:
    out = file or sys.stdout
    print("out of scope (bench/mutants_operators.py):", file=out)
    print(f"  modules:       {', '.join(ops.EXCLUDED_MODULES)}", file=out)
    print(f"  calls:         {', '.join(sorted(ops.INSTRUMENTATION_CALLS))}", file=out)
    print(f"  receivers:     {', '.join(ops.INSTRUMENTATION_RECEIVERS)}", file=out)
    print(f"  guarded by:    {ops.INSTRUMENTATION_GUARDS.pattern}", file=out)
    print(f"  functions:     {ops.EXCLUDED_FUNCTIONS.pattern}", file=out)
    print(f"  classes:       {', '.join(sorted(ops.EXCLUDED_CLASSES))}", file=out)
    print(f"  stats words:   {', '.join(sorted(ops.STATS_WORDS))}", file=out)
    print("operators:", file=out)
    for k, v in ops.OPERATORS.items():
        print(f"  {k:20s} {v}", file=out)


def _list(mutants, equivalents) -> None:
    print_rules()
    print(f"{len(mutants)} mutants ({sum(m.name in equivalents for m in mutants)} listed equivalent):")
    for m in mutants:
        eq = " [equivalent]" if m.name in equivalents else ""
        print(f"{m.name}  lines={m.lines}{eq}\n    {m.bug[:150]}\n    {'; '.join(' '.join(c) for c in m.commands)}")


# -- outcomes ---------------------------------------------------------------------------------------------
def budget(m, limit_s: float, control_s: dict) -> float:
    """Wall seconds for one mutant on one seed: ``--limit``, but never less than 1.5 x what its
    commands took on the unmutated copy (a loaded machine must not leave a command unstarted)."""
    return max(limit_s, 1.5 * sum(control_s.get(" ".join(c), 0.0) for c in m.commands))


def outcome(per_seed: list) -> str:
    """One word for a mutant from its per-seed results (bench.mutants.Result)."""
    if all(r.killed for r in per_seed):
        return "killed"
    if any(not (r.killed or r.crashed or r.hung) for r in per_seed):
        return "survived"
    return "crashed" if any(r.crashed for r in per_seed) else "hung"


def ttf(per_seed: list) -> float | None:
    t = [r.ttf_s for r in per_seed if r.killed]
    return round(statistics.median(t), 2) if t else None


def table(rows: list[dict], by: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(r[by], {"generated": 0, "killed": 0, "survived": 0, "equivalent": 0, "crashed": 0,
                                   "hung": 0, "_ttf": []})
        d["generated"] += 1
        d[r["outcome"]] += 1
        if r["ttf_s"] is not None:
            d["_ttf"].append(r["ttf_s"])
    for d in out.values():
        t = d.pop("_ttf")
        d["median_ttf_s"] = round(statistics.median(t), 2) if t else None
    return out


def seed_rates(rows: list[dict], seeds) -> dict[str, dict]:
    out = {}
    for s in seeds:
        ran = [r for r in rows if r["outcome"] != "equivalent"]
        k = sum(1 for r in ran if r["seeds"].get(str(s)) == "killed")
        out[str(s)] = {"killed": k, "non_equivalent": len(ran), "rate": round(k / len(ran), 4) if ran else None}
    return out


def print_tables(doc: dict, file=None) -> None:
    out = file or sys.stdout
    for title, tab in (("operator", doc["operators"]), ("file", doc["files"])):
        rows = [(title, "generated", "killed", "survived", "equivalent", "crashed", "hung", "median ttf s")]
        for k, d in sorted(tab.items()):
            rows.append((k, *(str(d[c]) for c in ("generated", "killed", "survived", "equivalent", "crashed", "hung")),
                         "-" if d["median_ttf_s"] is None else f"{d['median_ttf_s']:.1f}"))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(file=out)
        for r in rows:
            print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)), file=out)
    print("\nper seed: " + ", ".join(f"seed {s}: {d['killed']}/{d['non_equivalent']} killed ({100 * (d['rate'] or 0):.1f} %)"
                                     for s, d in doc["seeds"].items()), file=out)
    for r in doc["results"]:
        if r["outcome"] not in ("killed", "equivalent"):
            print(f"  {r['outcome'].upper()}: {r['id']}  seeds {r['seeds']}  {r['reason'][:160]}", file=out)


# -- main ---------------------------------------------------------------------------------------------------
def main(args, harness) -> int:
    """The operator mode; ``harness`` is bench.mutants (copy, canary, control, run_mutant)."""
    seeds = tuple(int(s) for s in args.seeds.split(","))
    try:
        if not args.limit > 0:
            raise ops.PatchError(f"--limit must be > 0, got {args.limit:g}")
        every = ops.generate(harness.ROOT, args.rev, read=harness.read_source)
        equivalents = load_equivalents()
        stale = stale_equivalents(every, equivalents)
        if args.check:
            ops.check_patches(every, harness.ROOT, args.rev, read=harness.read_source)
            if stale:
                raise ops.PatchError(f"{EQUIVALENT_TOML.name}: stale entries (no such mutant generated): {stale}")
            print(f"every operator patch applies ({len(every)} mutants, {len(equivalents)} equivalent, "
                  f"{args.rev or 'working tree'})")
            return harness.EXIT_OK
        mutants = select(every, args)
        if args.report:
            return rereport(args.report, every, equivalents, args.json)
        if args.list:
            _list(mutants, equivalents)
            return harness.EXIT_OK
        ops.check_patches(mutants, harness.ROOT, args.rev, read=harness.read_source)
    except ops.PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return harness.EXIT_BAD
    if stale:
        print(f"warning: {EQUIVALENT_TOML.name}: stale entries: {stale}", file=sys.stderr)
    logs = Path(args.logs) if args.logs else None
    say = functools.partial(print, flush=True)
    run = [m for m in mutants if m.name not in equivalents]
    t0 = time.monotonic()
    base, rows, ctl, can = None, [], [], {}
    try:
        base = harness.make_copy(harness.ROOT, args.rev)
        say(f"copy of {args.rev or 'the working tree'} in {base}; canary ...")
        can = harness.canary(base)
        ctl = harness.control(base, run, log=say, logs=logs) if run else []
        ctl_s = {r.command: r.elapsed_s for r in ctl}
        for i, m in enumerate(mutants):
            if m.name in equivalents:
                rows.append(_row(m, [], "equivalent", equivalents[m.name]))
                continue
            say(f"[{i + 1}/{len(mutants)}] {m.name}")
            per = [harness.run_mutant(m, base, budget(m, args.limit, ctl_s), ctl_s, log=say, logs=logs, on_seed=s)
                   for s in seeds]
            rows.append(_row(m, per, outcome(per), seeds=seeds))
            say(f"  -> {rows[-1]['outcome']} {rows[-1]['seeds']} ttf {rows[-1]['ttf_s']}")
    except (ops.PatchError, harness.CopyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return harness.EXIT_BAD
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    doc = report(rows, seeds)
    doc.update(limit_s=args.limit, source=args.rev or "working tree", elapsed_s=round(time.monotonic() - t0, 1),
               canary=can, control=[asdict(r) for r in ctl], generated=len(every))
    print_tables(doc)
    print(f"\n{doc['killed']}/{doc['mutants'] - doc['equivalent']} non-equivalent killed on every seed "
          f"({doc['equivalent']} equivalent), median ttf {doc['median_ttf_s']} s; {doc['elapsed_s']} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return harness.EXIT_OK if doc["killed"] + doc["equivalent"] == doc["mutants"] else harness.EXIT_SURVIVORS


def rereport(path: str, every, equivalents: dict[str, str], out: str | None) -> int:
    """An earlier run's results, classified again: ids listed in equivalent.toml since are equivalent,
    ids no longer generated (out of scope since) are left out and named."""
    with open(path) as f:
        old = json.load(f)
    ids = {m.name for m in every}
    rows, gone = [], []
    for r in old["results"]:
        if r["id"] not in ids:
            gone.append(r["id"])
            continue
        if r["id"] in equivalents and r["outcome"] != "equivalent":
            r = {**r, "ran_as": r["outcome"], "outcome": "equivalent", "reason": equivalents[r["id"]]}
        rows.append(r)
    seeds = tuple(int(s) for s in next((r["seeds"] for r in rows if r["seeds"]), {"1": 0}))
    doc = {**old, **report(rows, seeds), "no_longer_generated": gone, "generated": len(every)}
    print_tables(doc)
    print(f"\n{doc['killed']}/{doc['mutants'] - doc['equivalent']} non-equivalent killed on every seed "
          f"({doc['equivalent']} equivalent), median ttf {doc['median_ttf_s']} s; left out (no longer generated): "
          f"{gone or 'none'}")
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if doc["killed"] + doc["equivalent"] == doc["mutants"] else 1


def _row(m, per: list, word: str, why: str = "", seeds=()) -> dict:
    bad = next((r for r in per if not r.killed), None)
    return {"id": m.name, "operator": m.mechanism, "file": m.file, "outcome": word, "ttf_s": ttf(per),
            "seeds": {str(s): ("killed" if r.killed else "crashed" if r.crashed else "hung" if r.hung else "survived")
                      for s, r in zip(seeds, per, strict=True)},
            "killers": sorted({f"{r.killer} --seed {r.seed}" for r in per if r.killed}),
            "reason": why or (bad.reason if bad else per[0].reason if per else ""), "bug": m.bug,
            "commands": [" ".join(c) for c in m.commands], "lines": m.lines}


def report(rows: list[dict], seeds) -> dict:
    t = [r["ttf_s"] for r in rows if r["outcome"] == "killed"]
    return {"mutants": len(rows), "killed": sum(r["outcome"] == "killed" for r in rows),
            "equivalent": sum(r["outcome"] == "equivalent" for r in rows),
            "crashed": sum(r["outcome"] == "crashed" for r in rows),
            "median_ttf_s": round(statistics.median(t), 2) if t else None,
            "survivors": [r["id"] for r in rows if r["outcome"] == "survived"],
            "operators": table(rows, "operator"), "files": table(rows, "file"), "seeds": seed_rates(rows, seeds),
            "results": rows}
