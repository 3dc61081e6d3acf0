"""``python -m bench.explore_decisions [N] [--json PATH]``: decisions per PCT schedule of correct code
(ipc/sched/strategies.py's partial-order reduction), per built-in scenario: the loop of ``explore``
(2 calibrating random walks, then PCT depth 3 over the most decisions seen, repeats skipped, the
footprint learnt after each schedule), seed 1, ``N`` schedules (default 100). Per scenario: the mean
decisions of the PCT schedules, their min and max, k, the turns handed out and the steps."""

from __future__ import annotations

import argparse
import json
import statistics

from ipc import sched
from ipc.sched import strategies
from lab.explore import CALIBRATE, DRAW_FACTOR, MAX_STEPS
from lab.scenarios import BUILTINS, builtin
from lab.schedrun import Runner, op_locations

EXTRA = (("running", "rcu-list"), ("memslot", "per-table-notifier"))


def measure(name: str, design: str | None, n: int, seed: int = 1) -> dict:
    sc = builtin(name, None, design, ())
    fp, hist = strategies.Footprint(ops=op_locations(sc)), strategies.History()
    decs, turns, steps, k, ran, drawn = [], [], [], 0, 0, 0
    old = sched.set_points("access")
    try:
        with Runner(sc) as r:
            while ran < n and drawn < n * DRAW_FACTOR:
                sseed = seed * 1_000_003 + drawn
                drawn += 1
                cal = ran < CALIBRATE
                st = strategies.RandomWalk(sseed, fp) if cal else strategies.Pct(sseed, sc.n, 3, k, fp)
                if hist.seen(st):
                    continue
                o = r.run(st, MAX_STEPS)
                ran += 1
                hist.add(st)
                fp.learn(st.trail, st.choices)
                if o.verdict != "SUCCESS":
                    raise SystemExit(f"{name}: correct code failed: {o.reasons[:1]}")
                k = max(k, st.decisions)
                if not cal:
                    decs.append(st.decisions)
                    turns.append(st.turns)
                    steps.append(len(o.log))
    finally:
        sched.set_points(old)
    return {"decisions": round(statistics.mean(decs), 1), "min": min(decs), "max": max(decs), "k": k,
            "turns": round(statistics.mean(turns), 1), "steps": round(statistics.mean(steps), 1)}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.explore_decisions", description=__doc__.split("\n\n")[0])
    p.add_argument("n", nargs="?", type=int, default=100)
    p.add_argument("--json", metavar="PATH", default=None)
    a = p.parse_args()
    out = {}
    for name, design in [(s, None) for s in BUILTINS] + list(EXTRA):
        key = name + (f" ({design})" if design else "")
        out[key] = measure(name, design, a.n)
        print(f"{key:<32} {out[key]}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
