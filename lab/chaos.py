"""``launch.py chaos --runs N [--seed S] [--out DIR] [--json PATH] [--scheduler tls://H:P --security F]``: break
real runs on purpose and check that every one of them ends well.

Each case is one ``launch.py run`` with a seeded random design, registration, vCPU count (1-8) and
duration, and one fault at a random time inside the run (after start-up -- every vCPU process is up
-- and ``FAULT_MARGIN_S`` before the run's planned end): SIGKILL, SIGTERM, or SIGSTOP for 0.1-3 s
then SIGCONT, sent to a random vCPU process, the coordinator, the fork server or the resource
tracker (found by walking the run's process tree with psutil).

A fault is **delivered** when the signal was sent to a live target while the run was still running
(its vCPU processes up). A case whose fault was not delivered (the run ended or failed before
start-up, the target was gone, the vCPUs had stopped) tested nothing: it is run again with another
fault time, up to ``ATTEMPTS`` times, then counted as ``not_tested`` -- never as a pass.

For each case it checks:
- **bounded end**: the run ended within the fault's end + ``END_BOUND_S`` (else it is a hang: the
  whole process group is killed);
- **diagnosis**: the exit code and the words fit the fault: a dead vCPU or fork server must be named
  (``vCPU K died`` / ``exited`` / ``dead reader slot`` / ``fork server``), a killed coordinator exits by
  that signal, a SIGTERMed coordinator says so; a SIGSTOP (or a fault on the resource tracker) may
  end in SUCCESS, and a FAILURE must still give a reason;
- **no leak**: after ``clean`` (``lab.cleanup.clean`` for that run), no ``/dev/shm`` segment and no
  process of the run remains (orphans are killed after being counted);
- **JSON**: the results document, when written, parses.

Figures (printed as a table, written to ``--json``): ``{"runs", "tested", "not_tested", "attempts",
"faults": {kind: n}, "ended_in_bound", "diagnosis_named", "named_needed", "hangs", "leaked_segments",
"orphans", "bad_json", "slowest_end_s", "failing": [case ...]}``. Every case's config, seed and outcome go to ``DIR/chaos.json`` (default DIR:
``chaos-out``), with the stdout/stderr of each run in ``DIR/cases/``; a failing case can be rerun by
hand from its ``command``. Cases run one after another here, or on Dask workers with ``--scheduler``.
Each case's record has ``delivered`` and ``attempts``. Exit code: 0 when every case passed its checks
and at least one case tested something (a run in which no fault was delivered checked nothing: 1),
1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from ipc.errors import UsageError
from ipc.outputs import write_atomic

DESIGNS = ("mirror", "mutex-hash", "rcu-list", "per-table-notifier")
REGISTRATIONS = ("refcount", "bool", "naive", "split")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGSTOP")
TARGETS = ("vcpu", "coordinator", "forkserver", "resource_tracker")
END_BOUND_S = 10.0
FAULT_MARGIN_S = 0.1  # a fault lands at least this long after start-up and before the planned end
ATTEMPTS = 3  # runs of a case until its fault is delivered; then it is not_tested
STARTUP_S = 30.0  # a run whose vCPUs are not all up by then gets no fault
FAMILY_EXIT_S = 5.0  # processes of a finished run get this long to go away by themselves
POLL_S = 0.05
# a dead vCPU (or its lost exit status, after the fork server died) named by the diagnosis
_VCPU_NAMED = re.compile(r"vCPU \d+ (died|exited|is alive but)|dead reader slot of vCPU \d+|no result from vCPU|"
                         r"died holding|fork server|dead vCPUs: \[\d")
# what a run says when it lost a vCPU (dead, unjoinable, or no result)
_VCPU_LOST = re.compile(r"no result from vCPU|vCPU \d+ (died|exited|is alive but)|dead vCPUs|fork server")
_SHM_MAP = re.compile(r"/dev/shm/pts_([A-Za-z0-9]+)_")
_RUN_LINE = re.compile(r"^run (\S+): ", re.M)


class Case(msgspec.Struct, frozen=True):
    index: int
    seed: int
    design: str
    registration: str
    vcpus: int
    duration: float
    fault_at: float      # seconds after start-up (every vCPU process up): inside the run's duration
    sig: str
    target: str
    stop_s: float        # SIGSTOP only: how long before SIGCONT
    pick: float          # which vCPU, as a fraction of the live ones


def make_cases(runs: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for i in range(runs):
        duration = round(rng.uniform(0.5, 2.5), 2)
        design = rng.choice(DESIGNS)
        out.append(Case(
            index=i, seed=rng.randrange(1, 2**31), design=design,
            registration=rng.choice(REGISTRATIONS) if design != "mirror" else "refcount",
            vcpus=rng.randint(1, 8), duration=duration,
            fault_at=_draw_fault_at(rng, duration), sig=rng.choice(SIGNALS),
            target=rng.choice(TARGETS), stop_s=round(rng.uniform(0.1, 3.0), 2), pick=rng.random()))
    return out


def _draw_fault_at(rng: random.Random, duration: float) -> float:
    """A fault time inside the run: after start-up, FAULT_MARGIN_S clear of both ends."""
    return round(rng.uniform(FAULT_MARGIN_S, duration - FAULT_MARGIN_S), 2)


def retry_case(case: Case, attempt: int) -> Case:
    """The case with attempt ``attempt``'s fault time (attempt 0: the case itself), drawn inside the run."""
    if attempt == 0:
        return case
    return msgspec.structs.replace(case, fault_at=_draw_fault_at(random.Random(f"chaos {case.seed} {attempt}"),
                                                                 case.duration))


def command(case: Case, json_path: str, launch: str) -> list[str]:
    return [sys.executable, launch, "run", "--design", case.design, "--registration", case.registration,
            "--vcpus", str(case.vcpus), "--duration", str(case.duration), "--seed", str(case.seed),
            "--json", json_path]


# -- the run's process tree ---------------------------------------------------------------------------

def _role(p, coordinator_pid: int, forkservers: set[int]) -> str | None:
    try:
        if p.pid == coordinator_pid:
            return "coordinator"
        ppid = p.ppid()
        if ppid in forkservers:  # forked by the fork server: a vCPU (its cmdline is the server's)
            return "vcpu"
        cmd = " ".join(p.cmdline())
        if "multiprocessing.forkserver" in cmd and ppid == coordinator_pid:
            return "forkserver"
        if "multiprocessing.resource_tracker" in cmd:
            return "resource_tracker"
    except Exception:  # psutil.Error: gone meanwhile
        return None
    return "other"


def _family(coordinator, known: dict[int, tuple[float, str]]) -> None:
    """Add the coordinator's live descendants to ``known`` {pid: (create_time, role)}."""
    import psutil

    try:
        kids = coordinator.children(recursive=True)
    except psutil.Error:
        return
    forkservers = {pid for pid, (_, role) in known.items() if role == "forkserver"}
    for p in sorted(kids, key=lambda p: p.pid):
        if p.pid in known:
            continue
        role = _role(p, coordinator.pid, forkservers)
        if role == "forkserver":
            forkservers.add(p.pid)
        if role is not None:
            try:
                known[p.pid] = (p.create_time(), role)
            except psutil.Error:
                pass
    for p in kids:  # vCPUs of a fork server found in this pass
        if p.pid in known and known[p.pid][1] == "other" and _safe_ppid(p) in forkservers:
            known[p.pid] = (known[p.pid][0], "vcpu")


def _safe_ppid(p) -> int:
    try:
        return p.ppid()
    except Exception:
        return -1


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _mapped_run_id(pid: int) -> str | None:
    """The run id of the segments process ``pid`` maps (a coordinator maps its run's segments)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            m = _SHM_MAP.search(f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def _run_id(coordinator_pid: int, err_path: Path) -> str | None:
    """The run id: from the coordinator's first stderr line, or its run directory's owner.pid."""
    try:
        m = _RUN_LINE.search(err_path.read_text(errors="replace"))
        if m:
            return m.group(1)
    except OSError:
        pass
    from ipc import rundir

    for rd in rundir.list_run_dirs():
        if rd.pid == coordinator_pid:
            return rd.path.name[len(rundir.RUN_PREFIX):]
    return None


def _segments(run_id: str | None = None) -> set[str]:
    from ipc import shm

    try:
        names = os.listdir(shm.SHM_DIR)
    except OSError:
        return set()
    pre = f"{shm.PREFIX}{run_id}_" if run_id else shm.PREFIX
    return {n for n in names if n.startswith(pre)}


# -- one case --------------------------------------------------------------------------------------------

def run_case(case: Case, out_dir: str, launch: str) -> dict[str, Any]:
    """Run one case and judge it. Only what belongs to the case's own run (its run id, its process
    tree) is judged, cleaned or killed: other runs may share the machine."""
    import psutil

    cases = Path(out_dir) / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    json_path = cases / f"case-{case.index:04d}.json"
    out_path, err_path = cases / f"case-{case.index:04d}.out", cases / f"case-{case.index:04d}.err"
    for p in (json_path, out_path, err_path):
        p.unlink(missing_ok=True)
    cmd = command(case, str(json_path), launch)
    known: dict[int, tuple[float, str]] = {}
    rec: dict[str, Any] = {"case": msgspec.to_builtins(case), "command": cmd, "fault": "none", "delivered": False}
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True)
        coordinator = psutil.Process(proc.pid)
        known[proc.pid] = (coordinator.create_time(), "coordinator")
        fault_end = startup = None
        mapped = None  # learned from the coordinator's mappings, in case it dies before saying it
        # start-up: until every vCPU process is up (the fault time counts from there)
        while proc.poll() is None and time.monotonic() - t0 < STARTUP_S:
            _family(coordinator, known)
            mapped = mapped or _mapped_run_id(proc.pid)
            if len(_live(known, "vcpu")) >= case.vcpus:
                startup = time.monotonic()
                break
            time.sleep(POLL_S)
        rec["startup_s"] = round(startup - t0, 3) if startup is not None else None
        if startup is None:
            rec["fault"] = ("missed: the run ended before start-up completed" if proc.poll() is not None else
                            f"missed: start-up not complete after {STARTUP_S:g}s")
        else:
            while proc.poll() is None and time.monotonic() - startup < case.fault_at:
                _family(coordinator, known)
                mapped = mapped or _mapped_run_id(proc.pid)
                time.sleep(POLL_S)
            if proc.poll() is None:
                # when the fault is due (before the last look for new processes, which takes its own
                # time on a loaded host and is not part of the drawn fault time)
                rec["fault_after_startup_s"] = round(time.monotonic() - startup, 3)
                _family(coordinator, known)
                fault_end = _fire(case, known, rec)
            else:
                rec["fault"] = f"missed: the run ended before {case.fault_at:g}s after start-up"
        bound = (fault_end if fault_end is not None else t0 + case.duration + 30.0) + END_BOUND_S
        while proc.poll() is None and time.monotonic() < bound:
            _family(coordinator, known)
            time.sleep(POLL_S)
        hung = proc.poll() is None
        if hung:  # the run has its own session: kill the group, then whatever left it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            for pid, (created, _) in known.items():
                if _alive(pid, created):
                    _kill(pid, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        ended = time.monotonic()
    rec["rc"] = proc.returncode
    rec["hang"] = hung
    rec["end_after_fault_s"] = round(ended - fault_end, 3) if fault_end is not None else None
    rec["ended_in_bound"] = not hung
    # the run's processes go away by themselves (vCPUs watch the coordinator)
    deadline = time.monotonic() + FAMILY_EXIT_S
    while time.monotonic() < deadline and any(_alive(p, c) for p, (c, _) in known.items()):
        time.sleep(POLL_S)
    rid = _run_id(proc.pid, err_path) or mapped
    rec["run_id"] = rid
    # clean, then look for what is left of this run (never anything not tied to this run)
    from lab import cleanup

    rids = {rid} if rid else set()  # a run that never mapped a segment has none to leave behind
    rec["needed_clean"] = sorted(set().union(*(_segments(r) for r in rids))) if rids else []
    if rids:
        cleanup.clean(run_ids=rids, grace_s=0.0)
    left = set().union(*(_segments(r) for r in rids)) if rids else set()
    rec["leaked_segments"] = sorted(left)
    orphans = [(pid, role) for pid, (c, role) in known.items() if _alive(pid, c)]
    rec["orphans"] = [f"{role} {pid}" for pid, role in orphans]
    for pid, _ in orphans:
        _kill(pid, signal.SIGKILL)
    for seg in left:  # do not let one case's leak count against the next
        try:
            os.unlink(os.path.join("/dev/shm", seg))
        except OSError:
            pass
    rec["json"] = "none"
    if json_path.exists():
        try:
            doc = json.loads(json_path.read_text())
            rec["json"] = "ok"
            rec["verdict"] = doc.get("verdict")
            rec["reasons"] = doc.get("reasons", [])[:5]
        except (OSError, ValueError) as e:
            rec["json"] = f"bad: {e}"
    text = _read(out_path) + _read(err_path)
    rec["tail"] = text[-600:]
    rec["named_needed"], rec["diagnosis_named"], rec["why"] = judge(rec, text)
    rec["ok"] = (rec["ended_in_bound"] and not rec["leaked_segments"] and not rec["orphans"]
                 and not rec["json"].startswith("bad") and (rec["diagnosis_named"] or not rec["named_needed"]))
    return rec


def run_tested(case: Case, out_dir: str, launch: str, attempts: int = ATTEMPTS, run=None) -> dict[str, Any]:
    """Run a case until its fault is delivered, at most ``attempts`` times (each with another fault
    time inside the run); an attempt that failed its checks is kept as it is (that is a finding).
    The record says ``delivered``, ``attempts`` and ``tested`` (= delivered: a case whose fault never
    arrived tested nothing)."""
    run = run or run_case
    earlier = []
    for a in range(attempts):
        c = retry_case(case, a)
        rec = run(c, out_dir, launch)
        if rec["delivered"] or not rec["ok"] or a == attempts - 1:
            break
        earlier.append({"fault_at": c.fault_at, "fault": rec["fault"], "rc": rec["rc"],
                        **({"late": rec["late"]} if rec.get("late") else {})})
    rec["attempts"] = a + 1
    rec["earlier_attempts"] = earlier
    rec["tested"] = bool(rec["delivered"])
    return rec


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _live(known: dict, role: str) -> list[int]:
    return [pid for pid, (created, r) in sorted(known.items()) if r == role and _alive(pid, created)]


def _fire(case: Case, known: dict, rec: dict) -> float | None:
    """Send the case's fault; returns when the fault ended (monotonic), or None if it missed.
    ``rec["delivered"]``: the signal reached a live target while the run's vCPUs were still up."""
    live = _live(known, case.target)
    if not live:
        rec["fault"] = f"missed: no live {case.target} at {case.fault_at:g}s after start-up"
        return None
    running = case.target == "vcpu" or bool(_live(known, "vcpu"))  # the run had not stopped its vCPUs
    pid = live[min(len(live) - 1, int(case.pick * len(live)))]
    sig = getattr(signal, case.sig)
    try:
        os.kill(pid, sig)
    except OSError as e:  # gone since it was seen alive
        rec["fault"] = f"missed: {case.target} pid {pid} gone ({e.strerror})"
        return None
    rec["fault"] = f"{case.sig} {case.target} pid {pid}"
    rec["target_pid"] = pid
    rec["delivered"] = running
    if not running:
        rec["late"] = "sent after the run's vCPUs had stopped"
    if sig == signal.SIGSTOP:
        time.sleep(case.stop_s)
        _kill(pid, signal.SIGCONT)
    return time.monotonic()


def judge(rec: dict, text: str) -> tuple[bool, bool, str]:
    """(a named diagnosis is required, it was given, why) for the fault the case delivered."""
    case, rc, fault = rec["case"], rec["rc"], rec["fault"]
    if rec["hang"]:
        return True, False, "hang: killed after the bound"
    if not fault.startswith(("SIGKILL", "SIGTERM", "SIGSTOP")):  # missed: the run must just be good
        return False, rc in (0, 1), f"no fault delivered ({fault}); exit {rc}"
    sig, target = case["sig"], case["target"]
    failed_with_reason = rc == 1 and bool(re.search(r"FAILURE\S*:? \S", text))
    if target == "forkserver" and not _VCPU_LOST.search(text):
        # the vCPUs had finished (or were not yet forked and the run failed to start, saying so):
        # the fork server's death changed nothing the run had to report
        return False, rc == 0 or failed_with_reason, f"exit {rc} (no vCPU lost)"
    if sig == "SIGSTOP" or target == "resource_tracker":
        # a pause or a lost tracker may end in SUCCESS; a FAILURE must still say why
        ok = rc == 0 or failed_with_reason or (target == "coordinator" and rc is not None and rc < 0)
        return False, ok, f"exit {rc}"
    if target == "coordinator":
        if sig == "SIGKILL":
            return True, rc == -signal.SIGKILL, f"exit {rc} (killed coordinator)"
        done = rc in (0, 1) and bool(re.search(r"^(SUCCESS|FAILURE)\b", text, re.M))  # signal came after
        return True, (rc == 128 + signal.SIGTERM and "terminated" in text) or done, f"exit {rc}"
    # a vCPU or the fork server died: the run must fail naming it
    named = rc == 1 and bool(_VCPU_NAMED.search(text))
    return True, named, f"exit {rc}" + ("" if named else ": no named diagnosis")


# -- many cases ------------------------------------------------------------------------------------------

def figures(recs: list[dict]) -> dict[str, Any]:
    faults: dict[str, int] = {}
    for r in recs:  # the faults delivered, by kind; "not delivered" (missed, or sent after the run)
        k = r["fault"].split(" pid")[0] if r["delivered"] else "not delivered"
        faults[k] = faults.get(k, 0) + 1
    tested = sum(bool(r["delivered"]) for r in recs)
    ends = [r["end_after_fault_s"] for r in recs if r.get("end_after_fault_s") is not None]
    return {
        "runs": len(recs),
        # cases whose fault was delivered (the others were retried, then tested nothing)
        "tested": tested,
        "not_tested": len(recs) - tested,
        "attempts": sum(r.get("attempts", 1) for r in recs),
        "faults": dict(sorted(faults.items())),
        "ended_in_bound": sum(r["ended_in_bound"] for r in recs),
        "named_needed": sum(r["named_needed"] for r in recs),
        "diagnosis_named": sum(r["named_needed"] and r["diagnosis_named"] for r in recs),
        "hangs": sum(r["hang"] for r in recs),
        "leaked_segments": sum(len(r["leaked_segments"]) for r in recs),
        # runs whose segments were still there for clean although their coordinator was not killed
        # (informational: clean is part of the procedure, but such a run did not clean up itself)
        "left_for_clean": sum(bool(r.get("needed_clean")) and not r["fault"].startswith("SIGKILL coordinator")
                              for r in recs),
        "orphans": sum(len(r["orphans"]) for r in recs),
        "bad_json": sum(r["json"].startswith("bad") for r in recs),
        "slowest_end_s": max(ends) if ends else 0.0,
        "failing": [{"case": r["case"], "command": r["command"], "fault": r["fault"], "why": r["why"],
                     "leaked_segments": r["leaked_segments"], "orphans": r["orphans"], "tail": r["tail"]}
                    for r in recs if not r["ok"]],
    }


def run_cases(cases: list[Case], out: Path, scheduler: str | None, progress, *, security=None,
              connect_timeout: float | None = None) -> list[dict]:
    """Every case, here one after another, or on ``scheduler``'s workers (``security``: its TLS
    credentials, ``lab.scheduler.resolve``)."""
    from lab.sweep import launch_py

    launch = str(launch_py())
    if scheduler is None:
        recs = []
        for c in cases:
            recs.append(run_tested(c, str(out), launch))
            progress(recs[-1])
        return recs
    import dask

    from ipc import safe_delete
    from lab.scheduler import CONNECT_TIMEOUT_S
    from lab.sweep import _client

    scratch = safe_delete.make_owned_dir("pagetrack-chaos-dask-")  # its marker: clean knows a killed run's
    with dask.config.set({"temporary-directory": scratch}):
        client, cluster, _ = _client(scheduler, 1, scratch, by_value=sys.modules[__name__], security=security,
                                     connect_timeout=connect_timeout or CONNECT_TIMEOUT_S)
        try:
            futs = [client.submit(run_tested, c, str(out), launch, key=f"chaos-{c.index}", pure=False)
                    for c in cases]
            recs = []
            for f in futs:
                recs.append(f.result())
                progress(recs[-1])
            return recs
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
            safe_delete.remove_quietly(scratch, marker=True, shared_root=True)  # never through a link


def main(args) -> int:
    from lab.scheduler import resolve

    if args.runs < 1:
        raise UsageError("--runs must be >= 1")
    scheduler, security = resolve(args)  # tcp:// only with --insecure; the --security files checked
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is not a directory")
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(d):
            raise UsageError(f"--json: directory {d} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    cases = make_cases(args.runs, args.seed)

    def progress(r: dict) -> None:
        mark = "FAIL" if not r["ok"] else "ok  " if r["delivered"] else "n/t "
        end = f"{r['end_after_fault_s']:.2f}s" if r.get("end_after_fault_s") is not None else "-"
        c = r["case"]
        note = (r["why"] if not r["ok"] else "" if r["delivered"] else
                f"not tested: fault never delivered in {r['attempts']} attempt(s)")
        tries = f" (attempt {r['attempts']})" if r["attempts"] > 1 and (r["delivered"] or not r["ok"]) else ""
        print(f"  {mark} case {c['index']:>3}  {c['design']:<18} {c['vcpus']} vCPU  {r['fault']:<36} "
              f"exit {r['rc']!s:>4}  end {end:>6}  {note}{tries}", file=sys.stderr, flush=True)

    remote = {"security": security, "connect_timeout": getattr(args, "connect_timeout", None)} if scheduler else {}
    recs = run_cases(cases, out, scheduler, progress, **remote)  # (no Dask without --scheduler)
    fig = figures(recs)
    write_atomic(out / "chaos.json", json.dumps({"seed": args.seed, "figures": fig, "cases": recs}, indent=1),
                 what="every chaos case and its command")
    if args.json:
        write_atomic(args.json, json.dumps(fig, indent=1) + "\n", what="the chaos figures", flag="--json")
    print_figures(fig)
    return 0 if not fig["failing"] and fig["tested"] > 0 else 1


def print_figures(fig: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 100)
    t = Table(title="chaos", show_edge=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in ("runs", "tested", "not_tested", "attempts", "ended_in_bound", "named_needed", "diagnosis_named",
              "hangs", "leaked_segments", "left_for_clean", "orphans", "bad_json", "slowest_end_s"):
        t.add_row(k, str(fig[k]))
    t.add_row("faults", ", ".join(f"{k}: {n}" for k, n in fig["faults"].items()))
    con.print(t)
    con.print(summary_line(fig), highlight=False)
    if fig["failing"]:
        con.print(f"[bold red]FAILURE[/]: {len(fig['failing'])} case(s) did not end well: "
                  + "; ".join(f"case {f['case']['index']} ({f['fault']}): {f['why']}" for f in fig["failing"][:5]),
                  highlight=False)
    elif not fig["tested"]:
        con.print(f"[bold red]FAILURE[/]: nothing was tested: no case's fault was delivered in {ATTEMPTS} "
                  "attempts (exit 1: a run that checked nothing is not a pass)", highlight=False)
    else:
        nt = fig["not_tested"]
        con.print("[bold green]SUCCESS[/]: every tested case ended in bound, named its fault, left nothing behind"
                  + (f" (the {nt} not tested ended well without a fault; they checked no fault handling)"
                     if nt else ""), highlight=False)


def summary_line(fig: dict) -> str:
    return (f"{fig['tested']} of {fig['runs']} cases tested something; {fig['not_tested']} not tested "
            "(fault never delivered)")
