"""Mutation catalogue with a score: do the detectors catch one-line synchronization bugs?

    python -m bench.mutants [--json PATH] [--only NAME,...] [--fast] [--list] [--check] [--rev REV]
                            [--limit S]

Each mutant of ``bench/mutants_catalogue.py`` is applied as a source patch to a temporary copy of the
package (the files of the checkout — tracked, plus untracked ones not ignored; ``--rev REV``: the
tree of a git revision — and the built ``ipc/_prims*.so``), then the commands a user would run for
its mechanism (``launch.py run`` / ``scenario`` / ``torture`` at default parameters) run in the copy
one after another, cycling through the commands with seeds 1, 2, 3, …, until the first FAILURE or
``--limit`` (30 s) of wall time; a command still running at the limit is ended (SIGTERM, then
SIGKILL of its process group) and its run's segments are removed. Outcomes per mutant: **killed**
(exit 1 with FAILURE: the detectors found it; time to failure and the command and seed that found
it), **crashed** (exit 2, a traceback, or a vCPU that died of a programming error: the mutant broke
something else, not counted as killed), **survived** (SUCCESS until the limit; **hung** if the last
command was cut after running far longer than it does on the unmutated copy).

Before the mutants: every patch must apply (its original text exactly once in its file, the declared
number of lines changed) or nothing runs and the exit code is 2 ("mutant X: patch does not apply to
FILE"); a **canary** copy (``__init__`` files that log which file each process imported) must show
that the launcher and its fork server import the copy's modules, not an installed package; and the
unmutated copy (**control**) must end in SUCCESS on every command the selected mutants use (seed 1).

Output: a table (mutant, mechanism, outcome, ttf, killer command, reason) and a summary; ``--json``:
``{"mutants", "killed", "crashed", "median_ttf_s", "max_ttf_s", "survivors", "hung", "results": [...],
...}``. Exit 0 when every selected mutant is killed, 1 otherwise, 2 when a patch does not apply or the
copy / control is not sound. ``--fast``: the CI subset (one mutant per mechanism that dies in its
first command); ``--list``: the catalogue; ``--check``: only apply every patch (no runs).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import mutants_opsrun
from bench.mutants_catalogue import (
    CANARY_CODE,
    CANARY_COMMAND,
    CANARY_FILES,
    CATALOGUE,
    Mutant,
    PatchError,
    changed_lines,
    patch_text,
)

__all__ = ["PatchError", "CopyError", "changed_lines", "patch_text", "apply_mutant", "check_all", "make_copy",
           "clone", "run_command", "classify", "crash_reason", "run_mutant", "schedule", "canary", "control", "main"]

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 30.0
TERM_GRACE_S = 5.0  # SIGTERM -> SIGKILL of a command cut at the limit
HANG_FACTOR = 3.0  # a cut command that ran this many times its control time (and >= 10 s) hung
EXIT_OK, EXIT_SURVIVORS, EXIT_BAD = 0, 1, 2
# a vCPU that died of one of these is a broken mutant, not a detector's verdict
PROGRAMMING_ERRORS = ("NameError", "AttributeError", "TypeError", "SyntaxError", "ImportError",
                      "ModuleNotFoundError", "UnboundLocalError", "IndentationError", "ZeroDivisionError",
                      "KeyError", "IndexError", "RecursionError")
_CRASH_RE = re.compile(r"Traceback \(most recent call last\)|(?:crashed|failed): (?:"
                       + "|".join(PROGRAMMING_ERRORS) + r")\b")
# the run lost its shared memory to something outside it (e.g. a concurrent `launch.py clean`): no verdict
_ENV_RE = re.compile(r"does not exist \(run gone\?\)")
_RUN_ID_RE = re.compile(r"\brun (r[0-9a-f]{6,})\b|\brun_id=([A-Za-z0-9]+)")


class CopyError(Exception):
    """The temporary copy or the control run is not sound: no mutant result would mean anything."""


# -- patches -----------------------------------------------------------------------------------------
def apply_mutant(copy: Path, m: Mutant) -> None:
    path = copy / m.file
    if not path.is_file():
        raise PatchError(f"mutant {m.name}: patch does not apply to {m.file}: no such file")
    path.write_text(patch_text(m, path.read_text()))


def check_all(mutants, root: Path = ROOT, rev: str | None = None) -> None:
    """Every patch applies to the source (working tree, or ``rev``); raises PatchError on the first
    that does not."""
    names = [m.name for m in mutants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PatchError(f"duplicate mutant names: {sorted(dup)}")
    for m in mutants:
        patch_text(m, read_source(root, m.file, rev))


# -- the copy -------------------------------------------------------------------------------------------
def _git(root: Path, *args: str, binary: bool = False):
    r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=False)
    if r.returncode:
        raise CopyError(f"git {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout if binary else r.stdout.decode()


def read_source(root: Path, rel: str, rev: str | None) -> str:
    if rev is None:
        p = root / rel
        if not p.is_file():
            raise PatchError(f"patch does not apply to {rel}: no such file")
        return p.read_text()
    try:
        return _git(root, "show", f"{rev}:{rel}")
    except CopyError:
        raise PatchError(f"patch does not apply to {rel}: not in {rev}") from None


def source_files(root: Path) -> list[str]:
    """Files of the checkout: tracked, plus untracked ones that are not ignored (work in progress
    that tracked files may already import); deleted ones left out."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def make_copy(root: Path = ROOT, rev: str | None = None, dest: Path | None = None) -> Path:
    """A runnable copy of the package in a new temporary directory (or ``dest``)."""
    dest = Path(dest or tempfile.mkdtemp(prefix="pts-mutants-"))
    dest.mkdir(parents=True, exist_ok=True)
    if rev is None:
        for rel in source_files(root):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    else:
        tar = _git(root, "archive", "--format=tar", rev, binary=True)
        r = subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, capture_output=True, check=False)
        if r.returncode:
            raise CopyError(f"tar -x of {rev}: {r.stderr.decode(errors='replace').strip()}")
    libs = glob.glob(str(root / "ipc" / "_prims*.so"))
    if not libs:
        raise CopyError(f"no built ipc/_prims*.so in {root}: run `python -m pip install -q '.[test]'` first")
    for lib in libs:
        shutil.copy2(lib, dest / "ipc" / os.path.basename(lib))
    if not (dest / "launch.py").is_file():
        raise CopyError(f"copy {dest} has no launch.py")
    return dest


def clone(base: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="pts-mutant-"))
    shutil.copytree(base, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return d


# -- one command ------------------------------------------------------------------------------------------
@dataclass
class Run:
    command: str
    seed: int
    outcome: str  # SUCCESS | FAILURE | crashed | env-error | cut
    rc: int | None
    elapsed_s: float
    reason: str = ""


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(COLUMNS="400", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(b")") + 2:].split()
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


def _end_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait for the command's whole process group (fork server, vCPUs) to end; SIGKILL after
    ``grace_s``."""
    pgid = proc.pid  # start_new_session: the command leads its own group
    end = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.05)
    if _group_alive(pgid):
        _end_group(pgid, signal.SIGKILL)
        end = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.05)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _clean_runs(output: str, pid: int) -> None:
    """Remove what this command's runs left in /dev/shm and the run directories (only its own runs:
    the run ids it printed, and torture's ``tt<pid>n*``), if dead."""
    ids = {a or b for a, b in _RUN_ID_RE.findall(output)}
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        names = []
    ids |= {n[4:].partition("_")[0] for n in names if n.startswith(f"pts_tt{pid}n")}
    ids.discard("")
    if not ids:
        return
    from lab import cleanup

    cleanup.clean(run_ids=ids, grace_s=0.0)


def failure_reason(output: str) -> str:
    """The verdict of a FAILURE (run / scenario: ``FAILURE: ...``, wrapped by the console over the
    lines up to the next blank one; torture: ``End of test: FAILURE (...)``), shortened."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if "End of test: FAILURE" in s:
            return s[:400]
        if s.startswith("FAILURE"):
            for cont in lines[i + 1:]:
                if not cont.strip() or len(s) > 400:
                    break
                s += cont if s.endswith(" ") else " " + cont.strip()
            return s[:400]
    return ""


def crash_reason(output: str) -> str:
    """What a crash was: a traceback's innermost frame and exception, or the vCPU error, or the
    output's end."""
    i = output.find("Traceback (most recent call last)")
    if i >= 0:
        tb = output[i:].splitlines()[1:]
        end = next((k for k, ln in enumerate(tb) if ln and not ln[0].isspace()), len(tb) - 1)
        frame = next((ln.strip() for ln in reversed(tb[:end]) if ln.strip().startswith("File ")), "")
        return f"{tb[end].strip() if tb else ''} at {frame}"[:400]
    m = _CRASH_RE.search(output)
    if m:
        return output[m.start():].splitlines()[0][:400]
    return " | ".join(output.strip().splitlines()[-3:])[:400]


def classify(rc: int | None, output: str) -> str:
    """SUCCESS (exit 0); FAILURE (exit 1, a detector's verdict); env-error (the run lost its shared
    memory to something outside it); crashed (exit 2 or other, a traceback of the launcher, or a
    vCPU that died of a programming error before any detector had fired -- a crash that follows a
    detector's WARN is the bug's consequence, the verdict stands)."""
    if rc == 0:
        return "SUCCESS"
    if _ENV_RE.search(output):
        return "env-error"
    if rc != 1 or "FAILURE" not in output or "Traceback (most recent call last)" in output:
        return "crashed"
    m = _CRASH_RE.search(output)
    if m is None or re.search(r"^\s*WARN ", output[:m.start()], re.M):
        return "FAILURE"
    return "crashed"


def run_command(copy: Path, argv: tuple[str, ...], seed: int, budget_s: float,
                env: dict | None = None, logs: Path | None = None, tag: str = "") -> tuple[Run, str]:
    """``python launch.py ARGV --seed SEED`` in ``copy`` (the copy's directory is sys.path[0], so
    its modules win over any installed package), within ``budget_s``."""
    cmd = " ".join(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryFile(mode="w+b") as out:
        proc = subprocess.Popen([sys.executable, "launch.py", *argv, "--seed", str(seed)], cwd=copy,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=_env(env), start_new_session=True)
        cut = False
        try:
            rc = proc.wait(timeout=max(0.0, budget_s))
            elapsed = time.monotonic() - t0
            _reap_group(proc, 2.0)
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - t0
            cut = True
            _end_group(proc.pid, signal.SIGTERM)
            _reap_group(proc, TERM_GRACE_S)
            rc = None
        except BaseException:  # ^C: the command's own session did not get it; end it too
            _end_group(proc.pid, signal.SIGTERM)
            _reap_group(proc, TERM_GRACE_S)
            _clean_runs("", proc.pid)
            raise
        out.seek(0)
        text = out.read().decode(errors="replace")
    _clean_runs(text, proc.pid)
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        name = f"{tag or 'run'}--{'_'.join(argv)}--seed{seed}".replace("/", "%")  # operator ids hold paths
        if len(name) > 200:  # a file name is at most 255 bytes
            name = f"{name[:160]}-{zlib.crc32(name.encode()):08x}--seed{seed}"
        (logs / f"{name}.log").write_text(text)
    outcome = "cut" if cut else classify(rc, text)
    reason = failure_reason(text) if outcome == "FAILURE" else ""
    crash = _CRASH_RE.search(text) if outcome == "FAILURE" else None
    if crash:  # a detector fired before the crash: name the first WARN
        warn = re.search(r"^\s*(WARN .*)$", text[:crash.start()], re.M)
        reason = f"{warn.group(1).strip()[:200]} | {reason}" if warn else reason
    if outcome == "env-error":
        reason = _ENV_RE.search(text).group(0)
    if outcome == "crashed":
        reason = crash_reason(text)
    return Run(cmd, seed, outcome, rc, round(elapsed, 2), reason), text


# -- one mutant ------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    mechanism: str
    file: str
    lines_changed: int
    bug: str
    killed: bool = False
    crashed: bool = False
    hung: bool = False
    ttf_s: float | None = None
    killer: str = ""
    seed: int | None = None
    reason: str = ""
    runs: list[Run] = field(default_factory=list)


def schedule(m: Mutant, seed: int | None = None):
    """(command, seed) pairs: seeds 1, 2, 3, … cycling through the mutant's commands; with ``seed``:
    each command once, on that seed."""
    if seed is not None:
        yield from ((c, seed) for c in m.commands)
        return
    i = 0
    while True:
        yield m.commands[i % len(m.commands)], i // len(m.commands) + 1
        i += 1


def run_mutant(m: Mutant, base: Path, limit_s: float = LIMIT_S, control_s: dict | None = None,
               log=None, logs: Path | None = None, on_seed: int | None = None) -> Result:
    """Apply ``m`` to a clone of ``base`` and run its schedule until the first FAILURE, a crash or
    ``limit_s``; a command is not started when less than half its control time is left."""
    res = Result(m.name, m.mechanism, m.file, m.lines, m.bug)
    d = clone(base)
    try:
        apply_mutant(d, m)
        t0 = time.monotonic()
        for argv, seed in schedule(m, on_seed):
            left = limit_s - (time.monotonic() - t0)
            if left <= 0.5 * (control_s or {}).get(" ".join(argv), 0.0) or left <= 0:
                break
            r, _ = run_command(d, argv, seed, left, logs=logs, tag=m.name)
            res.runs.append(r)
            if log:
                log(f"  {m.name}: {r.command} --seed {r.seed}: {r.outcome} ({r.elapsed_s:.1f}s)"
                    + (f" {r.reason[:160]}" if r.reason else ""))
            if r.outcome == "FAILURE":
                res.killed, res.ttf_s = True, round(time.monotonic() - t0, 2)
                res.killer, res.seed, res.reason = r.command, seed, r.reason
                break
            if r.outcome == "crashed":
                res.crashed, res.killer, res.seed, res.reason = True, r.command, seed, r.reason
                break
            if r.outcome == "cut":
                ref = (control_s or {}).get(r.command, 0.0)
                res.hung = r.elapsed_s >= max(10.0, HANG_FACTOR * ref)
                if res.hung:
                    res.killer, res.seed = r.command, seed
                    res.reason = (f"hung: still running after {r.elapsed_s:.0f} s ({ref:.1f} s on the unmutated "
                                  f"copy); its process group was ended")
                break
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


# -- canary and control -------------------------------------------------------------------------------------
def canary(base: Path) -> dict:
    """Run ``CANARY_COMMAND`` in a copy whose package ``__init__`` files log their own path: every
    process that imported the package must have imported the copy's files, and both the launcher
    and at least one other process (the fork server the vCPUs are forked from) must have logged."""
    d = clone(base)
    log = d / "canary.log"
    try:
        for rel in CANARY_FILES:
            p = d / rel
            p.write_text(p.read_text() + CANARY_CODE)
        r, text = run_command(d, CANARY_COMMAND, 1, 120.0, env={"PTS_MUTANT_CANARY": str(log)})
        lines = [ln.split(" ", 1) for ln in log.read_text().splitlines()] if log.exists() else []
        files = sorted({f for _, f in lines})
        pids = {int(p) for p, _ in lines}
        foreign = [f for f in files if not Path(f).resolve().is_relative_to(d.resolve())]
        info = {"command": r.command, "outcome": r.outcome, "files": [str(Path(f).relative_to(d.resolve()))
                for f in files if f not in foreign], "foreign": foreign, "processes": len(pids)}
        if r.outcome != "SUCCESS":
            raise CopyError(f"canary: `{r.command}` on the unmutated copy ended {r.outcome}: "
                            f"{r.reason or text.strip()[-300:]}")
        if foreign:
            raise CopyError(f"canary: modules imported from outside the copy: {foreign}")
        if len(pids) < 2 or len(files) < len(CANARY_FILES):
            raise CopyError(f"canary: the copy's package was imported by {len(pids)} process(es), files "
                            f"{files}: expected the launcher and its fork server, {list(CANARY_FILES)}")
        return info
    finally:
        shutil.rmtree(d, ignore_errors=True)


def control(base: Path, mutants, log=None, logs: Path | None = None) -> list[Run]:
    """Every command the mutants use, seed 1, on the unmutated copy: each must end in SUCCESS."""
    cmds: list[tuple[str, ...]] = []
    for m in mutants:
        cmds += [c for c in m.commands if c not in cmds]
    runs = []
    for argv in cmds:
        r, text = run_command(base, argv, 1, 120.0, logs=logs, tag="control")
        runs.append(r)
        if log:
            log(f"  control: {r.command} --seed 1: {r.outcome} ({r.elapsed_s:.1f}s)")
        if r.outcome != "SUCCESS":
            raise CopyError(f"control: `{r.command} --seed 1` on the unmutated copy ended {r.outcome}, not "
                            f"SUCCESS: {r.reason or text.strip()[-400:]}")
    return runs


# -- report ---------------------------------------------------------------------------------------------------
def summary(results: list[Result]) -> dict:
    ttfs = [r.ttf_s for r in results if r.killed]
    return {
        "mutants": len(results),
        "killed": sum(r.killed for r in results),
        "crashed": sum(r.crashed for r in results),
        "median_ttf_s": round(statistics.median(ttfs), 2) if ttfs else None,
        "max_ttf_s": max(ttfs) if ttfs else None,
        "survivors": [r.name for r in results if not r.killed and not r.crashed],
        "crashed_mutants": [r.name for r in results if r.crashed],
        "hung": [r.name for r in results if r.hung],
    }


def outcome_word(r: Result) -> str:
    if r.killed:
        return "killed"
    if r.crashed:
        return "CRASHED"
    return "HUNG" if r.hung else "SURVIVED"


def print_table(results: list[Result], file=None) -> None:
    out = file or sys.stdout
    rows = [("mutant", "mechanism", "outcome", "ttf s", "by", "reason")]
    for r in results:
        by = f"{r.killer} --seed {r.seed}" if r.killer else f"{len(r.runs)} runs"
        rows.append((r.name, r.mechanism, outcome_word(r), f"{r.ttf_s:.1f}" if r.ttf_s is not None else "-",
                     by, r.reason[:90]))
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(row[:5])) + "  " + row[5], file=out)


def _select(args) -> list[Mutant]:
    by_name = {m.name: m for m in CATALOGUE}
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise PatchError(f"--only: unknown mutant(s) {unknown}; --list shows the catalogue")
        return [by_name[n] for n in names]
    return [m for m in CATALOGUE if m.fast] if args.fast else list(CATALOGUE)


VIRTUAL_DURATION = 0.2  # virtual seconds of a `run` under --clock virtual (~1-5 s of wall time at 2 vCPUs)


def on_clock(mutants, clock: str, duration: float = VIRTUAL_DURATION) -> tuple[list[Mutant], list[str]]:
    """``--clock virtual``: the mutants whose commands include a ``run``, with only those commands,
    each on the virtual clock; the names of the others (torture, scenario: no virtual clock)."""
    if clock == "real":
        return list(mutants), []
    out, skipped = [], []
    for m in mutants:
        runs = tuple((*c, "--clock", "virtual", "--duration", f"{duration:g}") for c in m.commands if c[0] == "run")
        if runs:
            out.append(replace(m, commands=runs))
        else:
            skipped.append(m.name)
    return out, skipped


def _list(mutants) -> None:
    for m in mutants:
        cmds = "; ".join(" ".join(c) for c in m.commands)
        print(f"{m.name:40s} {m.mechanism:16s} {m.file:26s} lines={m.lines}{' fast' if m.fast else '':5s} {cmds}")
        print(f"{'':40s} {m.bug}" + (f" [{m.multi}]" if m.multi else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--only", metavar="NAME,...", help="these mutants only")
    p.add_argument("--fast", action="store_true", help="the CI subset (one per mechanism, fast killers)")
    p.add_argument("--list", action="store_true", help="print the catalogue and exit")
    p.add_argument("--check", action="store_true", help="only check that every patch applies")
    p.add_argument("--rev", metavar="REV", help="copy this git revision instead of the working tree")
    p.add_argument("--logs", metavar="DIR", help="keep every command's output here")
    p.add_argument("--limit", type=float, default=LIMIT_S, help=f"seconds per mutant (default {LIMIT_S:g})")
    p.add_argument("--clock", choices=["real", "virtual"], default="real",
                   help="virtual: each mutant's `run` commands on the virtual clock (--duration "
                        f"{VIRTUAL_DURATION:g} virtual s); mutants without a `run` command are skipped")
    mutants_opsrun.add_arguments(p)
    args = p.parse_args(argv)
    if args.operators:
        return mutants_opsrun.main(args, sys.modules[__name__])
    logs = Path(args.logs) if args.logs else None

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        if not args.limit > 0:
            raise PatchError(f"--limit must be > 0, got {args.limit:g}")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise PatchError(f"--json: directory of {args.json} does not exist")
        mutants = _select(args)
        if args.list:
            _list(mutants)
            return EXIT_OK
        check_all(CATALOGUE if args.check else mutants, ROOT, args.rev)
        if args.check:
            print(f"every patch applies ({len(CATALOGUE)} mutants, {args.rev or 'working tree'})")
            return EXIT_OK
        mutants, skipped = on_clock(mutants, args.clock)
        if skipped:
            say(f"--clock virtual: skipped (no `run` command): {', '.join(skipped)}")
    except (PatchError, CopyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD
    t_start = time.monotonic()
    results: list[Result] = []
    base = None
    try:
        base = make_copy(ROOT, args.rev)
        say(f"copy of {args.rev or 'the working tree'} in {base}; canary ...")
        can = canary(base)
        say(f"  canary: {can['processes']} processes imported {', '.join(can['files'])} from the copy")
        ctl = control(base, mutants, log=say, logs=logs)
        ctl_s = {r.command: r.elapsed_s for r in ctl}
        for m in mutants:
            say(f"mutant {m.name} ({m.mechanism}, {m.file})")
            results.append(run_mutant(m, base, args.limit, ctl_s, log=say, logs=logs))
    except (PatchError, CopyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    s = summary(results)
    print()
    print_table(results)
    elapsed = round(time.monotonic() - t_start, 1)
    print(f"\nkilled {s['killed']}/{s['mutants']}, crashed {s['crashed']}, median ttf {s['median_ttf_s']} s, "
          f"max ttf {s['max_ttf_s']} s, survivors {s['survivors'] or 'none'}; {elapsed} s in all")
    if args.json:
        doc = {**s, "limit_s": args.limit, "source": args.rev or "working tree", "fast": args.fast,
               "clock": args.clock, "skipped": skipped,
               "elapsed_s": elapsed, "canary": can, "control": [asdict(r) for r in ctl],
               "results": [{**asdict(r), "commands": [" ".join(c) for c in m.commands]}
                           for r, m in zip(results, mutants, strict=True)]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return EXIT_OK if s["killed"] == s["mutants"] else EXIT_SURVIVORS


if __name__ == "__main__":
    sys.exit(main())
