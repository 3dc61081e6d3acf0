"""``failing-schedule.toml``: saving a failing schedule of ``launch.py explore``, reading it back,
checking it, and ``launch.py replay``.

The file's ``[schedule] hash`` is a SHA-256 of its body (the scenario, the steps, the step bound):
a file whose body does not match it was edited, which replay tells apart from a schedule the code
no longer follows (the code changed). Before anything runs, replay also refuses an unknown hook, a
``vcpus`` that disagrees with the programs, a program step ``run --scenario`` would refuse, steps
after the failing one and a ``max_steps`` below the failing step: each one line, exit 2.

Replay's outcomes and exit codes (``launch.py replay -h``):
0 SUCCESS (the schedule no longer fails), 1 FAILURE (the code's failure: same diagnosis or not),
2 bad input (unreadable, edited, invalid, or a schedule the code no longer follows),
3 STEP-BOUND (the schedule reached its step bound: no verdict on the code),
4 STOPPED (a vCPU process was stopped from outside -- SIGSTOP -- or died, or ran past the hang
timeout without reaching a scheduling point: timing, not the schedule).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import tomllib

from ipc import sched
from ipc.errors import UsageError
from ipc.sched import strategies, tso
from lab import schedtrace
from lab.outputs import write_atomic
from lab.scenarios import EXECUTOR, check, title
from lab.schedrun import Runner, Scenario, name_points
from vm.results import versions

SHOW_STEPS = 40
EXIT = {"SUCCESS": 0, "FAILURE": 1, "MISMATCH": 2, "STEP-BOUND": 3, "STOPPED": 4}
HANG_S = 10.0  # a process that reaches no scheduling point for this long: hang (or stopped)


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


def switches(log) -> int:
    """Context switches of a schedule: steps whose vCPU is not the previous step's."""
    return sum(1 for a, b in zip(log, log[1:], strict=False) if a[0] != b[0])


# -- writing ---------------------------------------------------------------------------------------
def _toml_value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int | float):
        return repr(x)
    if isinstance(x, str):
        return json.dumps(x, ensure_ascii=False)  # a TOML basic string is a JSON string
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in x.items()) + "}"
    raise TypeError(f"cannot write {type(x).__name__} to TOML")


def body_hash(scenario: dict, steps: list, max_steps, memory: dict | None = None) -> str:
    """SHA-256 of what decides the replay: the scenario, the steps and the step bound; and under the
    memory model tso, the model and its seed (``memory``: the [explore] table; a file without them,
    or with ``memory_model = "sc"``, is hashed as before there were memory models)."""
    doc = {"scenario": scenario, "steps": [[int(v), str(n)] for v, n in steps], "max_steps": max_steps}
    if memory is not None and memory.get("memory_model", "sc") != "sc":
        doc.update(memory_model=memory["memory_model"], memory_seed=memory.get("memory_seed"))
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _scenario_doc(sc: Scenario) -> dict:
    return {"name": sc.name, "executor": sc.executor, "hooks": list(sc.hooks), "config": dict(sc.cfg),
            "programs": [[[op, dict(a)] for op, a in p] for p in sc.programs]}


def save(path: str, sc: Scenario, meta: dict, log: list[tuple[int, str, bool]], reasons: list[str]) -> None:
    """``meta`` is the [explore] table (``max_steps``, ``steps`` and, when shrunk,
    ``original_steps`` / ``original_switches`` / ``switches``)."""
    steps = [(v, n) for v, n, _ in log]
    meta = {**meta, "steps": len(steps), "switches": switches(log)}
    digest = body_hash(json.loads(json.dumps(_scenario_doc(sc))), steps, meta.get("max_steps"), meta)
    lines = ["# failing schedule of `launch.py explore`; re-run it with `launch.py replay` this file",
             "# (an edit of [scenario], [schedule] or max_steps no longer matches [schedule] hash: refused)",
             "[scenario]", f"name = {_toml_value(sc.name)}", f"executor = {_toml_value(sc.executor)}",
             f"hooks = {_toml_value(list(sc.hooks))}", f"config = {_toml_value(sc.cfg)}",
             "programs = [", *[f"  {_toml_value([[op, a] for op, a in p])}," for p in sc.programs], "]",
             "", "[explore]", *[f"{k} = {_toml_value(v)}" for k, v in meta.items()],
             "", "[versions]", *[f"{k} = {_toml_value(v)}" for k, v in versions().items()],
             "", "[result]", f"diagnosis = {_toml_value(reasons[:20])}",
             "", "[schedule]  # one [vCPU, point] per scheduling step, in order",
             f"hash = {_toml_value(digest)}",
             "steps = [", *[f"  [{v}, {_toml_value(n)}]," for v, n in steps], "]", ""]
    write_atomic(path, "\n".join(lines), what="the failing schedule")


def rehash(path: str) -> None:
    """Re-seal a file after a deliberate edit (tests: a schedule the code no longer follows)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    ex = doc.get("explore", {})
    digest = body_hash(doc["scenario"], doc["schedule"]["steps"], ex.get("max_steps"), ex)
    text = open(path, encoding="utf-8").read()
    old = doc["schedule"]["hash"]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(_toml_value(old), _toml_value(digest)))


# -- reading and checking ----------------------------------------------------------------------------
def load(path: str) -> tuple[Scenario, list[tuple[int, str]], dict]:
    """The file's scenario, steps and whole document; every check of the module doc (UsageError,
    one line, naming the file)."""
    from vm.hooks import HOOKS

    def bad(why: str):
        return UsageError(f"replay: {path}: {why}")

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise bad("not found") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise bad(f"unreadable: {e}") from None
    try:
        s = doc["scenario"]
        progs = [[(str(op), dict(a)) for op, a in p] for p in s["programs"]]
        sc = Scenario(str(s["name"]), dict(s["config"]), tuple(str(h) for h in s["hooks"]), progs, str(s["executor"]))
        schedule = [(int(v), str(n)) for v, n in doc["schedule"]["steps"]]
        digest = doc["schedule"].get("hash")
        ex = doc.get("explore", {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"not a failing-schedule file ({type(e).__name__}: {e})") from None
    if digest is None:
        raise bad("no [schedule] hash (written by an older explore: run the explore again)")
    if digest != body_hash(s, doc["schedule"]["steps"], ex.get("max_steps"), ex):
        raise bad("edited: its [scenario], [schedule] steps or max_steps do not match its [schedule] hash "
                  "(a schedule is replayed as explore saved it; run the explore again)")
    if sc.executor != EXECUTOR:
        raise bad(f"executor {sc.executor!r}: this version runs every scenario as scripted vCPU commands "
                  f"({EXECUTOR!r}); run the explore again")
    unknown = sorted(set(sc.hooks) - set(HOOKS))
    if unknown:
        raise bad(f"unknown hook {unknown[0]!r} (hooks: {', '.join(sorted(HOOKS))})")
    vcpus = sc.cfg.get("vcpus", 1)
    if vcpus != sc.n:
        raise bad(f"config vcpus = {vcpus!r} disagrees with its {sc.n} vCPU programs")
    try:
        check(sc, "scenario")
    except UsageError as e:
        raise bad(str(e)) from None
    out = [(v, n) for v, n in schedule if not 0 <= v < sc.n]
    if out:
        raise bad(f"step [{out[0][0]}, {out[0][1]!r}]: no vCPU {out[0][0]} (vcpus = {sc.n})")
    saved = ex.get("steps", len(schedule))
    if type(saved) is not int or saved < 1:
        raise bad("[explore] steps must be a positive integer (the failing step's number)")
    if len(schedule) > saved:
        raise bad(f"{len(schedule) - saved} extra trailing step(s) after the failing step {saved}")
    if len(schedule) < saved:
        raise bad(f"{saved - len(schedule)} step(s) missing before the failing step {saved}")
    bound = ex.get("max_steps", len(schedule) + 1)
    if type(bound) is not int or bound < 1:
        raise bad("[explore] max_steps must be a positive integer")
    model = ex.get("memory_model", "sc")  # a file from before memory models: sequentially consistent
    if model not in tso.MODELS:
        raise bad(f"[explore] memory_model {model!r} is not one of {', '.join(tso.MODELS)}")
    if model == "tso" and type(ex.get("memory_seed")) is not int:
        raise bad("[explore] memory_seed must be an integer (memory model tso: it seeds the store buffers' flushes)")
    if bound < saved:
        raise bad(f"max_steps = {bound} is below the failing step {saved}")
    return sc, schedule, doc


# -- replay ----------------------------------------------------------------------------------------
def _stopped(pids: list[int]) -> list[int]:
    """The client processes in state T / t (stopped: SIGSTOP, a debugger)."""
    out = []
    for i, pid in enumerate(pids):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    out.append(i)
        except (OSError, IndexError):
            pass
    return out


def replay(path: str, trace: str | None = None, hang_s: float = HANG_S) -> dict:
    sc, schedule, doc = load(path)
    ex = doc.get("explore", {})
    if ex.get("replayable", True) is not True:
        raise UsageError(f"replay: {path}: not replayable (the saved failure was a hang or crash, "
                         "which depends on timing, not on the schedule)")
    bound = ex.get("max_steps", len(schedule) + 1)  # the explore's step bound: a step-bound failure stops there
    seen_stopped: set[int] = set()  # vCPU processes seen stopped (state T) while the schedule ran
    done = threading.Event()
    with Runner(sc, hang_s=hang_s) as runner:
        runner.memory_seed = ex.get("memory_seed", 0)  # (memory model tso: the store buffers' flushes)

        def watch() -> None:  # the pool kills a hung schedule's processes: look while it runs
            while not done.wait(0.05):
                p = runner.pool
                if p is not None:
                    seen_stopped.update(_stopped(list(p.pids)))

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        old_model = tso.set_model(ex.get("memory_model", "sc"))  # the vCPU processes are forked with it
        try:
            o = runner.run(strategies.Replay([(v, sched.point_id(n)) for v, n in schedule]), bound)
        finally:
            done.set()
            w.join()
            tso.set_model(old_model)
    stopped = sorted(seen_stopped)
    expected = {sched.point_id(n): n for _, n in schedule}
    reasons = [name_points(r, expected) for r in o.reasons]
    verdict = o.verdict
    if verdict != "MISMATCH" and o.sched_outcome == "done" and len(o.log) < len(schedule):
        verdict = "MISMATCH"
        reasons = [f"mismatch: the run ended at step {len(o.log)}, the schedule has {len(schedule)} steps"] + reasons
    elif o.sched_outcome == "step-bound":
        verdict = "STEP-BOUND"
    elif o.sched_outcome in ("hang", "crash"):
        verdict = "STOPPED"
        if stopped:
            reasons = [f"stopped from outside: vCPU process {', '.join(map(str, stopped))} in state T (SIGSTOP?)"
                       ] + reasons
    if trace is not None and verdict != "MISMATCH":
        schedtrace.write(o.trace(sc.n), trace, title(sc))
    return {"verdict": verdict, "reasons": reasons, "log": o.log, "steps": len(o.log),
            "expected": doc.get("result", {}).get("diagnosis", []), "seconds": round(o.seconds, 3),
            "sched_outcome": o.sched_outcome, "original_steps": ex.get("original_steps"),
            "memory_model": ex.get("memory_model", "sc"),
            "exit": EXIT[verdict]}


def main_replay(args) -> int:
    res = replay(args.file, args.trace)
    v = res["verdict"]
    if v == "MISMATCH":
        print(f"error: {args.file} no longer matches the code: {res['reasons'][0]}", file=sys.stderr)
        return res["exit"]
    print("\n".join(format_log(res["log"])))
    same = res["reasons"][:20] == res["expected"]
    if v == "FAILURE":
        print(f"FAILURE (replayed {res['steps']} steps{', same diagnosis as saved' if same else ''}): "
              f"{res['reasons'][0]}")
        for r in res["reasons"][1:8]:
            print(f"  also: {r}")
    elif v == "STEP-BOUND":
        print(f"STEP-BOUND: the replay reached its step bound ({res['steps']} steps) without the end"
              f"{' (as saved)' if same else ''}: no verdict on the code (exit 3)")
    elif v == "STOPPED":
        print(f"STOPPED: not the code's failure (exit 4): {res['reasons'][0]}")
    else:
        print(f"SUCCESS: the replayed schedule ({res['steps']} steps) no longer fails")
    if args.trace and v != "MISMATCH":
        print(f"trace (1 us = 1 step): {args.trace}")
    return res["exit"]


def sealed_meta(path: str) -> dict:
    """The [explore] table of a saved file (tests, bench)."""
    with open(path, "rb") as f:
        return tomllib.load(f).get("explore", {})


__all__ = ["save", "load", "replay", "main_replay", "format_log", "switches", "body_hash", "rehash", "EXIT"]
