"""``launch.py explore`` and ``launch.py replay``: search the interleavings of a small scenario under
the controlled scheduler (ipc/sched), stop at the first FAILURE, print the failing interleaving,
save it as ``failing-schedule.toml``; re-execute such a file exactly.

A scenario is one program per vCPU (no global order): the built-ins ``kaboom`` (the seed's
registration race; ``--registration``), ``flood-drop`` (an L1 writer floods a table while its
owner enters L2; ``--hook flood-drop-race`` removes the kick) and ``tlb-flush`` (an L1 store
through a writable mapping while the table page is write-protected; ``--hook no-tlb-flush``), or a
TOML file whose ``[[step]]`` tables are read per vCPU (each vCPU's steps keep their file order,
the order between vCPUs is the scheduler's), or ``free``: a small free-running configuration whose
vCPUs run short seeded op streams of the workload generator (``--seed`` seeds them too).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from ipc import sched
from ipc.errors import UsageError
from ipc.sched import strategies, tso
from lab import schedtrace
from lab.outputs import write_atomic
from lab.pathcov import Coverage, format_summary
from lab.scenarios import BUILTINS, builtin, check, free, from_toml, title  # noqa: F401  (re-exported)
from lab.schedrun import Runner, Scenario, describe, op_locations
from lab.schedule_file import format_log, load, main_replay, replay, save, switches  # noqa: F401  (re-exported)
from lab.shrink import Guided, shrink_failure

DEFAULT_DEPTH = 3
DEFAULT_SCHEDULES = 1000
MAX_STEPS = 5000
SHOW_STEPS = 40  # (lab/schedule_file.py format_log shows as many)
FILE = "failing-schedule.toml"
TRACE_JSON, TRACE_TEXT = "failing-schedule.trace.json", "failing-schedule.trace.txt"
PROGRESS_S = 5.0  # the plain progress line's interval on stderr when it is not a terminal
PROGRESS_ENV = "PAGETRACK_PROGRESS_S"  # overrides PROGRESS_S (seconds)
DISTINCT_CAP = 1_000_000  # distinct interleavings counted up to this many (a hash each)
CALIBRATE = 2  # random-walk schedules first: the footprint (shared locations) and k (decisions)
DRAW_FACTOR = 20  # at most this many draws per schedule: past it the schedules kept repeating


# -- the commands ------------------------------------------------------------------------------
def _strategy(name: str, seed: int, n: int, depth: int, k: int, footprint=None):
    if name == "pct":
        return strategies.Pct(seed, n, depth, k, footprint)
    return strategies.RandomWalk(seed, footprint)


def explore(sc: Scenario, strategy: str = "pct", depth: int = DEFAULT_DEPTH, schedules: int = DEFAULT_SCHEDULES,
            seed: int = 1, out: str | None = None, max_steps: int = MAX_STEPS, quiet: bool = False,
            trace: str | None = None, progress=None, points: str = "access", calibrate: int = CALIBRATE,
            dedup: bool = True, shrink: bool = True, coverage: bool = False, memory_model: str = "sc") -> dict:
    """Run up to ``schedules`` distinct schedules; stop at the first FAILURE. Returns a summary dict.
    The failing schedule's trace goes beside ``failing-schedule.toml`` (JSON + text) and to ``trace``.
    ``progress(done, total, steps, elapsed_s)`` is called after every schedule. A FAILURE is shrunk
    before it is saved (``shrink``, lab/shrink.py); ``coverage``: the paths reached (lab/pathcov.py).

    ``points``: which shared accesses are scheduling points (ipc/sched/points.py: ``access`` = every
    load / store / RMW of the VM's and the AVIC region's state, ``atomic`` = the RMWs). The first
    ``calibrate`` schedules are random walks that learn which locations the vCPUs share (the
    footprint) and how many decisions a schedule has (``k``, ipc/sched/strategies.py); PCT then
    draws its change points over that many decisions. A drawn schedule that would repeat one
    already run is skipped before it runs (``dedup``) and counted (``duplicates``,
    ``skipped_draw_fraction`` of the draws); ``duplicate_fraction``: the schedules run that repeated
    one run before (by the hash of the choice sequence); at most ``DRAW_FACTOR`` draws per schedule.

    ``memory_model``: ``sc`` (every access reaches memory when it happens) or ``tso`` (a store buffer
    per vCPU process, x86-TSO: ipc/sched/tso.py; its flushes are seeded by the schedule's seed, which
    the failing-schedule file keeps as ``memory_seed``)."""
    check(sc)
    # under tso a schedule is its choices and its memory seed: the same choices with another seed
    # flush other stores at other points (no repeat), so no draw is skipped as one
    dedup = dedup and memory_model == "sc"
    if memory_model not in tso.MODELS:
        raise UsageError(f"explore: unknown memory model {memory_model!r} ({', '.join(tso.MODELS)})")
    if memory_model == "tso" and points != "access":
        raise UsageError("explore: the memory model tso needs a scheduling point at every access (points access)")
    t0 = time.monotonic()
    steps = k_max = k_used = covered = retries = ran = drawn = dups = turns = 0
    k_est = 0  # PCT draws its change points over this many decisions: the most a schedule had so far
    fp = strategies.Footprint(ops=op_locations(sc), phased=memory_model != "tso")  # (strategies' doc)
    history = strategies.History()
    seen: set[int] | None = set()  # hashes of the interleavings run (None: past DISTINCT_CAP)
    res = {"scenario": sc.name, "strategy": strategy, "depth": depth, "seed": seed, "hooks": list(sc.hooks),
           "points": points, "memory_model": memory_model}
    old_points = sched.set_points(points)  # the vCPU processes are forked with it
    old_model = tso.set_model(memory_model)  # and with their store buffers (tso)
    try:
        cov = Coverage(functions=True) if coverage else None
        with Runner(sc, coverage=cov) as runner:
            while ran < schedules and drawn < schedules * DRAW_FACTOR:
                sseed = seed * 1_000_003 + drawn
                drawn += 1
                cal = ran < calibrate
                strat = (strategies.RandomWalk(sseed, fp) if cal
                         else _strategy(strategy, sseed, sc.n, depth, k_est, fp))
                if dedup and history.seen(strat):
                    dups += 1
                    continue
                runner.memory_seed = sseed  # (tso: the flushes of this schedule, its shrinking and replay)
                o = runner.run(strat, max_steps)
                ran += 1
                history.add(strat)
                fp.learn(strat.trail, strat.choices)  # what each vCPU touched after each of its points
                steps += len(o.log)
                retries += sum(1 for _, _, b in o.log if b)
                turns += strat.turns
                k_max = max(k_max, strat.decisions)
                if isinstance(strat, strategies.Pct):
                    # PCT's bound holds for a schedule whose change points could land on any of its decisions
                    k_used = max(k_used, strat.k)
                    covered += strat.decisions <= strat.k
                k_est = max(k_est, k_max)
                if seen is not None:
                    seen.add(hash(tuple((v, n) for v, n, _ in o.log)))
                    if len(seen) >= DISTINCT_CAP:
                        seen = None
                if progress is not None:
                    progress(ran, schedules, steps, time.monotonic() - t0)
                if o.verdict != "SUCCESS":
                    o, shrunk = shrink_failure(runner, o, max_steps) if shrink else (o, {})
                    o, confirmed = _as_replayed(runner, o, max_steps)
                    res.update(replay_confirmed=confirmed)
                    res.update(verdict="FAILURE", schedules=ran, schedules_to_failure=ran, draws_to_failure=drawn,
                               reasons=o.reasons, log=o.log, schedule_seed=sseed, failing_steps=len(o.log),
                               sched_outcome=o.sched_outcome, **shrunk, calibration=cal)
                    if out is not None:
                        os.makedirs(out, exist_ok=True)
                        res["file"] = os.path.join(out, FILE)
                        save(res["file"], sc, {"strategy": "random" if cal else strategy, "depth": depth, "seed": seed,
                                               "schedule": drawn - 1, "schedule_seed": sseed, "steps": len(o.log),
                                               "max_steps": max_steps, "points": points,
                                               "memory_model": memory_model, "memory_seed": sseed,
                                               # a hang / crash depends on timing: its steps do not repeat it
                                               "replayable": o.sched_outcome not in ("hang", "crash"), **shrunk},
                             o.log, o.reasons)
                        res["trace_files"] = schedtrace.write(o.trace(sc.n), os.path.join(out, TRACE_JSON),
                                                              title(sc), os.path.join(out, TRACE_TEXT))
                    if trace is not None:
                        res.setdefault("trace_files", []).extend(schedtrace.write(o.trace(sc.n), trace, title(sc)))
                    break
            else:
                res.update(verdict="SUCCESS", schedules=ran, reasons=[])
    finally:
        sched.set_points(old_points)
        tso.set_model(old_model)
    if cov is not None:
        res["coverage"] = cov.summary()
    el = time.monotonic() - t0
    # k for the bound: the most decisions any change points were drawn over or any schedule had (the
    # smaller of the per-schedule bounds; a schedule with more decisions than its draw is not counted
    # in p_miss_all, and neither are the calibrating random walks)
    k = max(k_used, k_max)
    bound = pct_bound(sc.n, k, depth, covered) if strategy == "pct" else None
    res.update(steps=steps, turns=turns, blocked_retries=retries, seconds=round(el, 3), steps_per_s=round(steps / max(el, 1e-9), 1),
               distinct_schedules=len(seen) if seen is not None else None, drawn=drawn, duplicates=dups,
               # of the schedules run, the share that repeated one run before (the waste the hash of the
               # choice sequence recognises; 0 with dedup: a repeat is skipped before it runs)
               duplicate_fraction=round((ran - len(seen)) / max(ran, 1), 4) if seen is not None else None,
               skipped_draw_fraction=round(dups / max(drawn, 1), 4),
               exhausted=ran < schedules and res["verdict"] == "SUCCESS", footprint_locations=len(fp),
               n=sc.n, k=k, k_longest=k_max, pct_bound=bound, guarantee=bound["p_per_schedule"] if bound else None,
               bound_scope=BOUND_SCOPE if bound else None)
    return res


def _as_replayed(runner, o, max_steps: int):
    """The failing schedule run once more the way ``replay`` runs it (every step handed out, the
    sampling checker between every two; explore's run-ahead checks less often, so its repeat
    counts can differ): (outcome, confirmed). Confirmed: the same steps ended in FAILURE again, and
    that run's outcome (its diagnosis, which replay repeats) is the one saved. Not confirmed: a hang
    or crash (timing, not the schedule: not re-run), or a run that took other steps or did not fail
    (nondeterminism): explore's own outcome is kept and ``replay_confirmed`` says so."""
    if o.sched_outcome in ("hang", "crash"):
        return o, False
    choices = [v for v, _, _ in o.log]
    g = runner.run(Guided(choices), max_steps)
    same = [(v, n) for v, n, _ in g.log] == [(v, n) for v, n, _ in o.log]
    return (g, True) if same and g.verdict == "FAILURE" else (o, False)


# what PCT's bound covers (ipc/sched/strategies.py's doc): bugs whose conflicting accesses go
# through SharedPoints, not guest memory / gfn_track / the checker's samples
BOUND_SCOPE = "for races on wrapped shared words"


def pct_bound(n: int, k: int, depth: int, schedules: int) -> dict:
    """PCT's guarantee: one schedule finds a given bug of depth ``depth`` with probability
    p >= 1/(n*k^(d-1)) (n threads, k steps); ``schedules`` independent schedules all miss it with
    probability <= (1-p)^N."""
    p = strategies.guarantee(n, k, depth)
    log_miss = schedules * math.log1p(-p) if p < 1 else -math.inf
    return {"depth": depth, "k_max": k, "n": n, "p_per_schedule": p, "schedules": schedules,
            "p_miss_all": math.exp(log_miss), "p_find_any": -math.expm1(log_miss)}


def _fmt_p(x: float, one_minus: float | None = None) -> str:
    """A probability, never rounded to 0 or 1 (``one_minus`` = 1 - x, computed without cancellation)."""
    if x < 0.9995:
        return f"{x:.3g}"
    return f"1 - {one_minus if one_minus is not None else 1 - x:.2g}"


def _hms(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_interval() -> float:
    """Seconds between two plain progress lines: $PAGETRACK_PROGRESS_S, else PROGRESS_S."""
    try:
        v = float(os.environ.get(PROGRESS_ENV, ""))
        return v if math.isfinite(v) and v >= 0 else PROGRESS_S
    except ValueError:
        return PROGRESS_S


class Progress:
    """Explore's progress on stderr (stdout stays the result): a rich bar on a terminal (schedules
    done / total, steps/s, elapsed, ETA), else a plain line every ``interval`` seconds."""

    def __init__(self, label: str, total: int, interval: float | None = None, stream=None,
                 tty: bool | None = None):
        self.label, self.total = label, total
        self.interval = progress_interval() if interval is None else interval
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.next = self.interval
        self.bar = None

    def __enter__(self) -> Progress:
        if self.tty:
            import rich.progress as rp
            from rich.console import Console

            # "kaboom ━━━━━━━━━━ 15/200 schedules 2,694 steps/s 0:00:03 elapsed, ETA 0:00:05": the bar
            # gets what the text leaves of the terminal's width (none if under 5 columns)
            con = Console(file=self.stream)
            text = len(self.label) + 2 * len(str(self.total)) + 1 + len(" schedules 99,999 steps/s") + \
                len(" 0:00:00 elapsed, ETA 0:00:00") + 2
            width = min(20, con.width - 1 - text - 1)
            self.bar = rp.Progress(rp.TextColumn("[bold]{task.description}"),
                                   *([rp.BarColumn(bar_width=width)] if width >= 5 else []),
                                   rp.MofNCompleteColumn(), rp.TextColumn("schedules {task.fields[rate]}"),
                                   rp.TimeElapsedColumn(), rp.TextColumn("elapsed, ETA"), rp.TimeRemainingColumn(),
                                   console=con, transient=True)
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: int, steps: int, elapsed: float) -> None:
        rate = f"{steps / max(elapsed, 1e-9):,.0f} steps/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, rate=rate)
            return
        if elapsed < self.next or done >= total:
            return
        self.next = elapsed + self.interval
        eta = _hms(elapsed / done * (total - done)) if done else "?"
        print(f"explore {self.label}: {done:,}/{total:,} schedules, {rate}, elapsed {_hms(elapsed)}, ETA {eta}",
              file=self.stream, flush=True)


def _print_summary(res: dict) -> None:
    b = res.get("pct_bound")
    g = ""
    if b is not None:
        over = (f"all N = {b['schedules']:,} schedules" if b["schedules"] == res["schedules"] else
                f"the N = {b['schedules']:,} of {res['schedules']:,} schedules whose change points were drawn over "
                "all their decisions (the calibrating random walks, and schedules with more decisions than every "
                "one before them, are not counted)")
        g = (f"; PCT bound per schedule p ≥ 1/(n·k^(d-1)) = {b['p_per_schedule']:.3g} (n={b['n']} vCPUs, "
             f"d={b['depth']}, k={b['k_max']}: the most decisions -- racing steps at which another vCPU could "
             "run; blocked retries and steps nobody else races with are none -- a schedule had or its change "
             "points were drawn over)")
        if res["verdict"] == "SUCCESS":
            g += (f"; {over} miss a depth-{b['depth']} bug with probability ≤ (1-p)^N = "
                  f"{_fmt_p(b['p_miss_all'], b['p_find_any'])}")
    skipped = (f", {res['duplicates']:,} drawn schedule(s) skipped as repeats of one already run"
               if res.get("duplicates") else "")
    print(f"{res['scenario']}: {res['schedules']:,} schedule(s) tried{skipped}, {res['steps']:,} scheduling steps "
          f"({res.get('turns', res['steps']):,} of them turns handed out) in {res['seconds']:.1f} s "
          f"({res['steps_per_s']:,.0f} steps/s){g}")


def success_line(res: dict) -> str:
    """What a SUCCESS covered: the schedules, how many distinct, and PCT's probability bound."""
    n = res["schedules"]
    d = res.get("distinct_schedules")
    distinct = f", {d:,} distinct" if d is not None else ""
    b = res.get("pct_bound")
    if b is None:
        what = f"{res['strategy']} walk: no probability bound"
    else:
        dd = b["depth"]
        over = (f"all {n:,}" if b["schedules"] == n else
                f"the {b['schedules']:,} whose change points spanned their whole length all")
        what = (f"PCT depth {dd}, {BOUND_SCOPE}: each schedule finds a depth-{dd} bug with probability ≥ "
                f"{b['p_per_schedule']:.3g}; {over} miss it with probability ≤ "
                f"{_fmt_p(b['p_miss_all'], b['p_find_any'])}")
    mm = ", memory model tso" if res.get("memory_model") == "tso" else ""
    return f"SUCCESS: no failure in {n:,} schedule{'s' if n != 1 else ''}{distinct}{mm} ({what})"


def main(args) -> int:
    hooks = tuple(args.hook)
    if args.scenario.endswith(".toml"):
        sc = from_toml(args.scenario, args.registration, args.design, hooks)
    elif args.scenario == "free":  # --seed also seeds its op streams
        sc = free(args.registration, args.design, hooks, args.seed)
    else:
        sc = builtin(args.scenario, args.registration, args.design, hooks)
    with Progress(sc.name, args.schedules) as progress:
        res = explore(sc, args.strategy, args.depth, args.schedules, args.seed, args.out, args.max_steps,
                      trace=args.trace, progress=progress, shrink=getattr(args, "shrink", True),
                      coverage=getattr(args, "coverage", False), memory_model=getattr(args, "memory_model", "sc"))
    if args.json:
        write_atomic(args.json, json.dumps({k: v for k, v in res.items() if k != "log"}, indent=1),
                     what="explore's results", flag="--json")
    if res["verdict"] == "FAILURE":
        print(f"FAILURE after {res['schedules_to_failure']} schedule(s) ({res['strategy']}, depth {res['depth']},"
              f" seed {res['seed']}{', memory model tso' if res['memory_model'] == 'tso' else ''}): "
              f"{res['reasons'][0] if res['reasons'] else '?'}")
        print(f"the failing interleaving (last {min(SHOW_STEPS, len(res['log']))} of {len(res['log'])} steps; "
              "vCPU about to pass the point, [its op]):")
        print("\n".join(format_log(res["log"])))
        for r in res["reasons"][1:8]:
            print(f"  also: {r}")
        if "original_steps" in res:
            print(f"shrunk from {res['original_steps']} steps / {res['original_switches']} switches to "
                  f"{len(res['log'])} / {switches(res['log'])} (same diagnosis; {res['shrink_runs']} candidates run)")
        if "file" in res:
            print(f"saved {res['file']}: `python launch.py replay {res['file']}` re-runs it")
            if not res.get("replay_confirmed", True):
                print("note: run once more step by step, as replay runs it, this schedule did not fail the same "
                      "way (a hang or crash, or nondeterminism): replay may not repeat the diagnosis above")
        if res.get("trace_files"):
            print(f"trace of the failing schedule (1 us = 1 step): {', '.join(res['trace_files'])}")
    else:
        print(success_line(res) + (" (no failing schedule: no trace written)" if args.trace else ""))
    _print_summary(res)
    if "coverage" in res:
        print("\n".join(format_summary(sc.name, res["coverage"])))
    return 0 if res["verdict"] == "SUCCESS" else 1


__all__ = ["builtin", "free", "from_toml", "explore", "replay", "format_log", "describe", "main", "main_replay",
           "pct_bound", "success_line", "Progress"]
