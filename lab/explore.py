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
import tomllib

from ipc import sched
from ipc.errors import UsageError
from ipc.sched import strategies
from lab import schedtrace
from lab.outputs import write_atomic
from lab.schedrun import Runner, Scenario, describe, name_points, run_schedule
from vm.results import versions

DEFAULT_DEPTH = 3
DEFAULT_SCHEDULES = 1000
MAX_STEPS = 5000
SHOW_STEPS = 40
FILE = "failing-schedule.toml"
TRACE_JSON, TRACE_TEXT = "failing-schedule.trace.json", "failing-schedule.trace.txt"
BUILTINS = ("kaboom", "flood-drop", "tlb-flush", "free")
FREE = {"vcpus": 2, "l2s": 2, "switch_rate": 0.5, "writes_per_exit": 2, "tracked_fraction": 0.5}
FREE_ITERATIONS = 3
PROGRESS_S = 5.0  # the plain progress line's interval on stderr when it is not a terminal
PROGRESS_ENV = "PAGETRACK_PROGRESS_S"  # overrides PROGRESS_S (seconds)
DISTINCT_CAP = 1_000_000  # distinct interleavings counted up to this many (a hash each)


# -- scenarios ---------------------------------------------------------------------------------
def builtin(name: str, registration: str | None, design: str | None, hooks: tuple[str, ...]) -> Scenario:
    from vm.avic.kaboom import kaboom_steps

    hooks = tuple(sorted(set(hooks)))
    if name == "free":
        return free(registration, design, hooks)
    if name == "kaboom":
        reg, des = registration or "refcount", design or "mutex-hash"
        progs: list[list[tuple[str, dict]]] = [[], []]
        for v, op, args in kaboom_steps(reg, des):
            progs[v].append((op, args))
        return Scenario(name, {"vcpus": 2, "l2s": 2, "design": des, "registration": reg}, hooks, progs)
    # flood-drop: the lock-free design (mutex-hash serializes track_write and VMRUN by tables_lock)
    des = design or ("rcu-list" if name == "flood-drop" else "mutex-hash")
    cfg = {"vcpus": 2, "l2s": 2, "design": des, "registration": registration or "refcount"}
    if name == "flood-drop":
        # vCPU 1 runs L2 0 once and keeps its table; back in L1 it rewrites its own entry while
        # the table is unused: the third such write floods it (avic-flood-often: a drop after 2
        # unused writes) -- maybe while vCPU 0 enters L2 0 for good (the sampling checker, run
        # between every two steps, then sees vCPU 0 in L2 on an unshadowed table unless kicked)
        owner = [("vmrun", {"l2": 0})]
        writer = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0})] + [
            ("write_entry", {"l2": 0, "entry": 1, "apic": 1, "running": r}) for r in (False, True, False)]
        return Scenario(name, cfg, tuple(sorted({*hooks, "avic-flood-often"})), [owner, writer])
    if name == "tlb-flush":
        # vCPU 1 (L1) stores into L2 0's table while vCPU 0 creates and write-protects it
        owner = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0}), ("vmrun", {"l2": 0}), ("vmexit", {"l2": 0})]
        writer = [("write_entry", {"l2": 0, "entry": 1, "apic": 1, "running": True})]
        return Scenario(name, cfg, hooks, [owner, writer])
    raise UsageError(f"explore: unknown scenario {name!r} (built-ins: {', '.join(BUILTINS)}, or a .toml file)")


def free(registration: str | None, design: str | None, hooks: tuple[str, ...], seed: int = 1,
         iterations: int = FREE_ITERATIONS) -> Scenario:
    """The small free-running configuration: each vCPU runs a short seeded op stream of the normal
    workload generator (vcpu.vcpu.op_stream: tracked L1 writes, nested VMRUN / VMEXIT, L2
    switches) instead of a hand-written program."""
    from vcpu.vcpu import op_stream
    from vm import config

    cfg = {**FREE, "seed": seed, "design": design or "mutex-hash", "registration": registration or "refcount"}
    c = config.from_dict({**cfg, "fuzz": "off"})
    return Scenario("free", cfg, hooks, [op_stream(c, v, iterations) for v in range(c.vcpus)])


def from_toml(path: str, registration: str | None, design: str | None, hooks: tuple[str, ...]) -> Scenario:
    from vm import config

    file_cfg, steps = config.load_toml(path)
    cli = {"registration": registration, "design": design}
    cfg = config.build(file_cfg, cli)
    if not steps:
        raise UsageError(f"scenario file {path}: explore needs [[step]] tables (per-vCPU programs)")
    progs: list[list[tuple[str, dict]]] = [[] for _ in range(cfg.vcpus)]
    for v, op, args in config.parse_steps(steps, cfg):
        progs[v].append((op, args))
    merged = {**file_cfg, **{k: v for k, v in cli.items() if v is not None}}
    return Scenario(os.path.basename(path), merged, tuple(sorted(set(hooks))), progs, executor="vcpu")


# -- printing ----------------------------------------------------------------------------------
def format_log(log: list[tuple[int, str, bool]], last: int = SHOW_STEPS) -> list[str]:
    """The interleaving, readably: step number, which vCPU, at which point, inside which op."""
    cur: dict[int, str] = {}
    lines = []
    start = max(0, len(log) - last)
    for k, (v, name, blocked) in enumerate(log):
        if name.startswith("op "):
            cur[v] = name[3:]
        if k >= start:
            what = f"{name} (retry after blocking)" if blocked else name
            lines.append(f"  {k:5d}  vCPU {v}  {what:<52}  [{cur.get(v, 'setup')}]")
    return lines


# -- saving / loading a schedule ---------------------------------------------------------------
def _toml_value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int | float):
        return repr(x)
    if isinstance(x, str):
        return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in x.items()) + "}"
    raise TypeError(f"cannot write {type(x).__name__} to TOML")


def save(path: str, sc: Scenario, meta: dict, log: list[tuple[int, str, bool]], reasons: list[str]) -> None:
    lines = ["# failing schedule of `launch.py explore`; re-run it with `launch.py replay` this file",
             "[scenario]", f"name = {_toml_value(sc.name)}", f"executor = {_toml_value(sc.executor)}",
             f"hooks = {_toml_value(list(sc.hooks))}", f"config = {_toml_value(sc.cfg)}",
             "programs = [", *[f"  {_toml_value([[op, a] for op, a in p])}," for p in sc.programs], "]",
             "", "[explore]", *[f"{k} = {_toml_value(v)}" for k, v in meta.items()],
             "", "[versions]", *[f"{k} = {_toml_value(v)}" for k, v in versions().items()],
             "", "[result]", f"diagnosis = {_toml_value(reasons[:20])}",
             "", "[schedule]  # one [vCPU, point] per scheduling step, in order",
             "steps = [", *[f"  [{v}, {_toml_value(n)}]," for v, n, _ in log], "]", ""]
    write_atomic(path, "\n".join(lines), what="the failing schedule")


def load(path: str) -> tuple[Scenario, list[tuple[int, str]], dict]:
    def bad(why: str):
        return UsageError(f"replay: {path}: {why}")

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise bad("not found") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise bad(f"unreadable: {e}") from None
    try:
        s = doc["scenario"]
        progs = [[(str(op), dict(a)) for op, a in p] for p in s["programs"]]
        sc = Scenario(str(s["name"]), dict(s["config"]), tuple(s["hooks"]), progs, str(s["executor"]))
        schedule = [(int(v), str(n)) for v, n in doc["schedule"]["steps"]]
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"not a failing-schedule file ({type(e).__name__}: {e})") from None
    if sc.executor not in ("avic", "vcpu") or not all(0 <= v < sc.n for v, _ in schedule):
        raise bad("not a failing-schedule file (executor or vCPU out of range)")
    return sc, schedule, doc


# -- the commands ------------------------------------------------------------------------------
def _strategy(name: str, seed: int, n: int, depth: int, k: int):
    return strategies.Pct(seed, n, depth, k) if name == "pct" else strategies.RandomWalk(seed)


def _check_cfg(sc: Scenario) -> None:
    from vm import config

    try:
        config.from_dict({**sc.cfg, "fuzz": "off"})
    except (UsageError, ValueError) as e:
        raise UsageError(f"explore: {e}") from None


def explore(sc: Scenario, strategy: str = "pct", depth: int = DEFAULT_DEPTH, schedules: int = DEFAULT_SCHEDULES,
            seed: int = 1, out: str | None = None, max_steps: int = MAX_STEPS, quiet: bool = False,
            trace: str | None = None, progress=None) -> dict:
    """Run up to ``schedules`` schedules; stop at the first FAILURE. Returns a summary dict. The
    failing schedule's trace goes beside ``failing-schedule.toml`` (JSON + text) and to ``trace``.
    ``progress(done, total, steps, elapsed_s)`` is called after every schedule."""
    _check_cfg(sc)
    t0 = time.monotonic()
    steps = k_max = k_used = covered = 0
    k_est = 50  # PCT places its change points among this many steps: the longest schedule so far
    seen: set[int] | None = set()  # hashes of the interleavings (None: past DISTINCT_CAP)
    res = {"scenario": sc.name, "strategy": strategy, "depth": depth, "seed": seed, "hooks": list(sc.hooks)}
    with Runner(sc) as runner:
        for i in range(schedules):
            sseed = seed * 1_000_003 + i
            k_used = max(k_used, k_est)  # the guarantee is stated with the k the change points were drawn over
            o = runner.run(_strategy(strategy, sseed, sc.n, depth, k_est), max_steps)
            steps += len(o.log)
            k_max = max(k_max, len(o.log))
            # PCT's bound holds for a schedule whose change points could land on any of its steps
            covered += len(o.log) <= max(k_est, depth)
            k_est = max(k_est, k_max)
            if seen is not None:
                seen.add(hash(tuple((v, n) for v, n, _ in o.log)))
                if len(seen) >= DISTINCT_CAP:
                    seen = None
            if progress is not None:
                progress(i + 1, schedules, steps, time.monotonic() - t0)
            if o.verdict != "SUCCESS":
                res.update(verdict="FAILURE", schedules=i + 1, schedules_to_failure=i + 1, reasons=o.reasons,
                           log=o.log, schedule_seed=sseed, failing_steps=len(o.log), sched_outcome=o.sched_outcome)
                if out is not None:
                    os.makedirs(out, exist_ok=True)
                    res["file"] = os.path.join(out, FILE)
                    save(res["file"], sc, {"strategy": strategy, "depth": depth, "seed": seed, "schedule": i,
                                           "schedule_seed": sseed, "steps": len(o.log), "max_steps": max_steps,
                                           # a hang / crash depends on timing: its steps do not repeat it
                                           "replayable": o.sched_outcome not in ("hang", "crash")},
                         o.log, o.reasons)
                    res["trace_files"] = schedtrace.write(o.trace(sc.n), os.path.join(out, TRACE_JSON),
                                                          _title(sc), os.path.join(out, TRACE_TEXT))
                if trace is not None:
                    res.setdefault("trace_files", []).extend(schedtrace.write(o.trace(sc.n), trace, _title(sc)))
                break
        else:
            res.update(verdict="SUCCESS", schedules=schedules, reasons=[])
    el = time.monotonic() - t0
    # k for the bound: the most steps any change points were drawn over or any schedule took (the
    # smaller of the per-schedule bounds; a schedule longer than its draw is not counted in p_miss_all)
    k = max(k_used, k_max)
    bound = pct_bound(sc.n, k, depth, covered) if strategy == "pct" else None
    res.update(steps=steps, seconds=round(el, 3), steps_per_s=round(steps / max(el, 1e-9), 1),
               distinct_schedules=len(seen) if seen is not None else None,
               n=sc.n, k=k, k_longest=k_max, pct_bound=bound,
               guarantee=bound["p_per_schedule"] if bound else None)
    return res


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


def _title(sc: Scenario) -> str:
    hooks = f" hooks={','.join(sc.hooks)}" if sc.hooks else ""
    return f"pagetrack-sim schedule of {sc.name} ({sc.cfg.get('design')}, {sc.cfg.get('registration')}{hooks})"


def replay(path: str, trace: str | None = None) -> dict:
    sc, schedule, doc = load(path)
    _check_cfg(sc)
    ex = doc.get("explore", {})
    if ex.get("replayable", True) is not True:
        raise UsageError(f"replay: {path}: not replayable (the saved failure was a hang or crash, "
                         "which depends on timing, not on the schedule)")
    bound = ex.get("max_steps", len(schedule) + 1)  # the explore's step bound: a step-bound failure stops there
    if type(bound) is not int or bound < 1:
        raise UsageError(f"replay: {path}: [explore] max_steps must be a positive integer")
    o = run_schedule(sc, strategies.Replay([(v, sched.point_id(n)) for v, n in schedule]), bound)
    if trace is not None and o.verdict != "MISMATCH":
        schedtrace.write(o.trace(sc.n), trace, _title(sc))
    expected = {sched.point_id(n): n for _, n in schedule}
    return {"verdict": o.verdict, "reasons": [name_points(r, expected) for r in o.reasons], "log": o.log, "steps": len(o.log),
            "expected": doc.get("result", {}).get("diagnosis", []), "seconds": round(o.seconds, 3)}


def _print_summary(res: dict) -> None:
    b = res.get("pct_bound")
    g = ""
    if b is not None:
        over = (f"all N = {b['schedules']:,} schedules" if b["schedules"] == res["schedules"] else
                f"the N = {b['schedules']:,} of {res['schedules']:,} schedules whose change points were drawn over "
                "their whole length (the others were longer than every schedule before them)")
        g = (f"; PCT bound per schedule p ≥ 1/(n·k^(d-1)) = {b['p_per_schedule']:.3g} (n={b['n']} vCPUs, "
             f"d={b['depth']}, k={b['k_max']}: the most steps a schedule took or its change points were drawn "
             "over)")
        if res["verdict"] == "SUCCESS":
            g += (f"; {over} miss a depth-{b['depth']} bug with probability ≤ (1-p)^N = "
                  f"{_fmt_p(b['p_miss_all'], b['p_find_any'])}")
    print(f"{res['scenario']}: {res['schedules']:,} schedule(s) tried, {res['steps']:,} scheduling steps in "
          f"{res['seconds']:.1f} s ({res['steps_per_s']:,.0f} steps/s){g}")


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
        what = (f"PCT depth {dd}: each schedule finds a depth-{dd} bug with probability ≥ "
                f"{b['p_per_schedule']:.3g}; {over} miss it with probability ≤ "
                f"{_fmt_p(b['p_miss_all'], b['p_find_any'])}")
    return f"SUCCESS: no failure in {n:,} schedule{'s' if n != 1 else ''}{distinct} ({what})"


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
                      trace=args.trace, progress=progress)
    if args.json:
        write_atomic(args.json, json.dumps({k: v for k, v in res.items() if k != "log"}, indent=1),
                     what="explore's results", flag="--json")
    if res["verdict"] == "FAILURE":
        print(f"FAILURE after {res['schedules_to_failure']} schedule(s) ({res['strategy']}, depth {res['depth']},"
              f" seed {res['seed']}): {res['reasons'][0] if res['reasons'] else '?'}")
        print(f"the failing interleaving (last {min(SHOW_STEPS, len(res['log']))} of {len(res['log'])} steps; "
              "vCPU about to pass the point, [its op]):")
        print("\n".join(format_log(res["log"])))
        for r in res["reasons"][1:8]:
            print(f"  also: {r}")
        if "file" in res:
            print(f"saved {res['file']}: `python launch.py replay {res['file']}` re-runs it")
        if res.get("trace_files"):
            print(f"trace of the failing schedule (1 us = 1 step): {', '.join(res['trace_files'])}")
    else:
        print(success_line(res) + (" (no failing schedule: no trace written)" if args.trace else ""))
    _print_summary(res)
    return 0 if res["verdict"] == "SUCCESS" else 1


def main_replay(args) -> int:
    res = replay(args.file, args.trace)
    if res["verdict"] == "MISMATCH":
        print(f"error: {args.file} no longer matches the code: {res['reasons'][0]}", file=sys.stderr)
        return 2
    print("\n".join(format_log(res["log"])))
    if res["verdict"] == "FAILURE":
        same = res["reasons"][:20] == res["expected"]
        print(f"FAILURE (replayed {res['steps']} steps{', same diagnosis as saved' if same else ''}): "
              f"{res['reasons'][0]}")
        for r in res["reasons"][1:8]:
            print(f"  also: {r}")
        return 1
    print(f"SUCCESS: the replayed schedule ({res['steps']} steps) no longer fails")
    if args.trace:
        print(f"trace (1 us = 1 step): {args.trace}")
    return 0


__all__ = ["builtin", "free", "from_toml", "explore", "replay", "format_log", "describe", "main", "main_replay",
           "pct_bound", "success_line", "Progress"]
