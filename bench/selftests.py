"""Self-test power (issue 23 item 3): does every injected bug FAIL, and every correct run SUCCEED,
on every seed of a 1-second run at default parameters?

    python -m bench.selftests [--seeds N] [--first S] [--group G ...] [--only TEXT ...] [--duration D]
                              [--json PATH]

Runs, one after the other (the runs must not share the CPUs with each other), each case of
``CASES`` on seeds ``S .. S+N-1`` exactly as a user would (``python launch.py ... --duration 1
--seed S``, everything else default) and reads the verdict from the exit code (0 SUCCESS,
1 FAILURE, anything else an error). A case expects FAILURE (a torture ``--inject``, a bug
``--hook``) or SUCCESS (the correct code, a widening hook). Prints one line per case: the
FAILURE count out of N, the misses (seeds that ended the other way), the mean / max wall time of
one run. ``--group`` keeps the cases of the named groups (``injects``, ``torture`` = the correct
torture kinds, ``hooks``, ``widenings``, ``designs``), ``--only`` those whose name contains one of
the texts. Exit 0 when every case
met its expectation on every seed, 1 otherwise.

JSON: ``cases`` (name, group, command, expect, seeds, failures, successes, errors, misses, wall_s_mean,
wall_s_max), ``all_met``, ``date``, ``cpus``, ``loadavg`` at the start, ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 120.0

TORTURE_INJECTS = [(k, i) for k in ("rcu", "srcu")
                   for i in ("broken-gp", "gp-single-flip", "gp-skip-alternate", "gp-share-early", "gp-no-wait-before-flip")]
TORTURE_INJECTS += [(k, "busted-lock") for k in ("spinlock", "mutex")]
# the "must FAIL" hooks of docs/success.md, each on the design(s) it breaks
BUG_HOOKS = [
    ("no-synchronize-srcu", "per-table-notifier"),
    ("no-synchronize-rcu", "rcu-list"),
    ("busted-lock", "mutex-hash"),
    ("flood-drop-race", "mutex-hash"),
    ("flood-drop-race", "rcu-list"),
    ("flood-drop-race", "per-table-notifier"),
    ("no-tlb-flush", "mutex-hash"),
]
WIDENINGS = [("avic-reader-delay", "rcu-list"), ("avic-flood-often", "rcu-list")]
DESIGNS = ("mirror", "mutex-hash", "rcu-list", "per-table-notifier")
GROUPS = ("injects", "torture", "hooks", "widenings", "designs")


def cases() -> list[dict]:
    """name, argv (without --duration / --seed), expect."""
    out = [{"name": f"torture {k} --inject {i}", "argv": ["torture", k, "--inject", i], "expect": "FAILURE",
            "group": "injects"} for k, i in TORTURE_INJECTS]
    out += [{"name": f"torture {k}", "argv": ["torture", k], "expect": "SUCCESS", "group": "torture"}
            for k in ("rcu", "srcu", "spinlock", "mutex")]
    out += [{"name": f"run {d} --hook {h}", "argv": ["run", "--design", d, "--hook", h], "expect": "FAILURE",
             "group": "hooks"} for h, d in BUG_HOOKS]
    out += [{"name": f"run {d} --hook {h}", "argv": ["run", "--design", d, "--hook", h], "expect": "SUCCESS",
             "group": "widenings"} for h, d in WIDENINGS]
    out += [{"name": f"run {d}", "argv": ["run", "--design", d], "expect": "SUCCESS", "group": "designs"}
            for d in DESIGNS]
    return out


def run_one(argv: list[str], duration: float, seed: int) -> tuple[str, float]:
    """One run as a user makes it: its verdict (SUCCESS / FAILURE / error rc=N) and wall time."""
    cmd = [sys.executable, "launch.py", *argv, "--duration", f"{duration:g}", "--seed", str(seed)]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S, check=False)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.monotonic() - t0
    verdict = {0: "SUCCESS", 1: "FAILURE"}.get(rc, f"error rc={rc}")
    return verdict, wall


def measure(selected: list[dict], seeds: list[int], duration: float, emit=print) -> list[dict]:
    res = []
    for c in selected:
        verdicts, walls = [], []
        for s in seeds:
            v, w = run_one(c["argv"], duration, s)
            verdicts.append(v)
            walls.append(w)
        fails = verdicts.count("FAILURE")
        succ = verdicts.count("SUCCESS")
        misses = [s for s, v in zip(seeds, verdicts, strict=True) if v != c["expect"]]
        r = {"name": c["name"], "group": c["group"], "command": "python launch.py " + " ".join(c["argv"]) + f" --duration {duration:g}",
             "expect": c["expect"], "seeds": len(seeds), "failures": fails, "successes": succ,
             "errors": len(seeds) - fails - succ, "misses": misses,
             "wall_s_mean": round(sum(walls) / len(walls), 2), "wall_s_max": round(max(walls), 2)}
        res.append(r)
        met = "ok" if not misses else f"MISSED on seeds {','.join(map(str, misses))}"
        emit(f"{c['name']:<48} expect {c['expect']:<7} FAILURE {fails:>2}/{len(seeds)}  "
             f"wall {r['wall_s_mean']:.1f}/{r['wall_s_max']:.1f} s  {met}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.selftests", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="seeds per case (default 20)")
    p.add_argument("--first", type=int, default=1, help="first seed (default 1)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per run (default 1)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="keep the cases whose name contains TEXT (repeatable)")
    p.add_argument("--group", action="append", default=[], choices=GROUPS,
                   help="keep the cases of this group (repeatable): torture injects, correct torture kinds, "
                        "bug hooks, widening hooks, designs without a hook")
    p.add_argument("--json", metavar="PATH", default=None)
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    selected = [c for c in cases() if (not a.only or any(t in c["name"] for t in a.only))
                and (not a.group or c["group"] in a.group)]
    if not selected:
        p.error("--only matched no case")
    seeds = list(range(a.first, a.first + a.seeds))
    t0 = time.monotonic()
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
           "loadavg": os.getloadavg()[0], "duration": a.duration, "seeds": seeds}
    doc["cases"] = measure(selected, seeds, a.duration, emit=lambda s: print(s, flush=True))
    doc["seconds"] = round(time.monotonic() - t0, 1)
    doc["all_met"] = all(not c["misses"] for c in doc["cases"])
    print(f"{'all met' if doc['all_met'] else 'NOT all met'} ({doc['seconds']:.0f} s)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
    return 0 if doc["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
