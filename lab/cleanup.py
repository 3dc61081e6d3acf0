"""``launch.py clean [--dry-run] [--dumps]``: remove the shared-memory segments and run directories of dead
runs; report the FAILURE trace dumps of runs without ``--json`` (``--dumps``: remove them too).

What is ours: segments ``/dev/shm/pts_<run_id>_<region>`` owned by this user, and run directories
``pagetrack-sim-<run_id>`` (:func:`ipc.rundir.list_run_dirs`). Nothing of a live run is ever removed:

* a **run directory** is live while its ``owner.pid`` names a live process with the same start time
  (a reused pid does not count), or, without a readable ``owner.pid``, while it is younger than
  ``ipc.rundir.OWNER_GRACE_S`` (it may be being created);
* a **segment** is live if any live process maps it or holds it open (``/proc/*/maps`` and
  ``/proc/*/fd`` — the reliable test: attached vCPUs map it, its creator keeps it open), or if its run
  id has a live run directory; a segment with no run directory at all and no user is also kept while
  it is younger than ``ORPHAN_GRACE_S`` (a coordinator creates its segments before its run directory);
* a dead run directory is kept too while one of its run's segments is still in use (workers of the
  run are still alive).

Everything else is removed (``--dry-run``: only listed). Each item is printed with the reason, then
one summary line. Exit 0; 1 if something could not be removed (e.g. permission denied).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ipc import rundir
from ipc import shm as shm_mod
from ipc.proc import pid_alive

EXIT_OK, EXIT_ERRORS = 0, 1
#: A segment without any run directory and not in use is left alone while younger than this (s).
ORPHAN_GRACE_S = 5.0
_SEG_RE = re.compile(r"^[A-Za-z0-9]{1,24}$")


@dataclass
class Item:
    kind: str  # "segment" | "run dir"
    name: str  # segment name or run dir path
    run_id: str | None
    remove: bool
    why: str
    size: int = 0
    path: str = ""
    removed: bool = False
    error: str | None = None


@dataclass
class Report:
    items: list[Item] = field(default_factory=list)
    dry_run: bool = False

    def of(self, kind: str, remove: bool) -> list[Item]:
        return [i for i in self.items if i.kind == kind and i.remove == remove]

    @property
    def errors(self) -> list[Item]:
        return [i for i in self.items if i.error]


def segment_run_id(name: str) -> str | None:
    """``pts_<run_id>_<region>`` -> run_id (None if the name does not have that shape)."""
    if not name.startswith(shm_mod.PREFIX):
        return None
    rid, sep, region = name[len(shm_mod.PREFIX):].partition("_")
    return rid if sep and region and _SEG_RE.match(rid) else None


def _proc_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def _strip_deleted(p: str) -> str:
    return p[: -len(" (deleted)")] if p.endswith(" (deleted)") else p


def shm_users(shm_dir: str = shm_mod.SHM_DIR, prefix: str = shm_mod.PREFIX) -> dict[str, set[int]]:
    """``{/dev/shm path: {pids}}`` of every live process (that we may inspect) which maps or holds
    open one of our segments. Processes of other users are not readable and not counted (our
    segments are mode 0600, they cannot use them)."""
    base = os.path.join(shm_dir, prefix)
    users: dict[str, set[int]] = {}
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                maps = f.read().decode("utf-8", "replace")
        except OSError:
            maps = ""
        if base in maps:
            for line in maps.splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(base):
                    users.setdefault(_strip_deleted(parts[5].strip()), set()).add(pid)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(base):
                users.setdefault(_strip_deleted(target), set()).add(pid)
    # a pid listed above may have exited meanwhile: only live ones count
    live = {p: {x for x in pids if pid_alive(x)} for p, pids in users.items()}
    return {p: pids for p, pids in live.items() if pids}


def _pids(pids: set[int]) -> str:
    s = sorted(pids)
    return ", ".join(map(str, s[:4])) + (f" (+{len(s) - 4})" if len(s) > 4 else "")


def scan(*, run_base: str | os.PathLike | None = None, shm_dir: str = shm_mod.SHM_DIR,
         run_ids: set[str] | None = None, grace_s: float = ORPHAN_GRACE_S) -> Report:
    """Decide, without changing anything, what ``clean`` removes. ``run_base``: where run
    directories are looked for (default: ``list_run_dirs``' default places); ``run_ids``: only
    consider these runs (tests use it not to touch other runs on a shared machine)."""
    rep = Report()
    now = time.time()
    uid = os.getuid()
    dirs: dict[str, list[rundir.RunDir]] = {}
    for rd in rundir.list_run_dirs(run_base):
        rid = rd.path.name[len(rundir.RUN_PREFIX):]
        if run_ids is None or rid in run_ids:
            dirs.setdefault(rid, []).append(rd)

    try:
        names = sorted(n for n in os.listdir(shm_dir) if n.startswith(shm_mod.PREFIX))
    except OSError:
        names = []
    users = shm_users(shm_dir)
    busy_runs: dict[str, set[int]] = {}
    for name in names:
        rid = segment_run_id(name)
        if run_ids is not None and rid not in run_ids:
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # gone meanwhile
        if st.st_uid != uid or not stat.S_ISREG(st.st_mode):
            continue  # not ours to judge (and not removable by us)
        it = Item("segment", name, rid, False, "", size=st.st_size, path=path)
        live_dirs = [rd for rd in dirs.get(rid, []) if rd.alive] if rid else []
        pids = users.get(path)
        if pids:
            it.why = f"in use by pid {_pids(pids)}"
            if rid:
                busy_runs.setdefault(rid, set()).update(pids)
        elif live_dirs:
            rd = live_dirs[0]
            it.why = f"run {rid} is live (owner pid {rd.pid})" if rd.pid else f"run {rid} is being created"
        elif rid and rid in dirs:
            it.remove = True
            it.why = f"run {rid} is dead ({_dead_why(dirs[rid][0])})"
        else:
            age = now - st.st_mtime
            if age < grace_s:
                it.why = f"no run directory, not in use, but only {age:.1f}s old (grace {grace_s:g}s)"
            else:
                it.remove = True
                it.why = "no run directory and no process maps or holds it"
        rep.items.append(it)

    for rid, rds in sorted(dirs.items()):
        for rd in rds:
            it = Item("run dir", str(rd.path), rid, False, "", path=str(rd.path))
            if rd.alive:
                it.why = f"owner pid {rd.pid} is live" if rd.pid else "no owner.pid yet (being created)"
            elif rid in busy_runs:
                it.why = f"{_dead_why(rd)}, but its segments are in use by pid {_pids(busy_runs[rid])}"
            else:
                it.remove = True
                it.why = _dead_why(rd)
            rep.items.append(it)
    return rep


def _dead_why(rd: rundir.RunDir) -> str:
    return f"owner pid {rd.pid} is gone" if rd.pid else "no readable owner.pid"


def apply(rep: Report) -> Report:
    """Remove what ``rep`` marks for removal (segments first, then run directories)."""
    for it in rep.items:
        if not it.remove:
            continue
        try:
            if it.kind == "segment":
                try:
                    os.unlink(it.path)
                except FileNotFoundError:
                    pass  # gone meanwhile (its owner's resource tracker, another clean)
            else:
                rundir.remove_run_dir(it.name)
                if Path(it.name).exists():
                    raise OSError(f"{it.name} still exists after removal")
            it.removed = True
        except Exception as e:  # report and go on with the rest
            it.error = str(e) or type(e).__name__
    return rep


def clean(dry_run: bool = False, **scan_kw) -> Report:
    rep = scan(**scan_kw)
    rep.dry_run = dry_run
    return rep if dry_run else apply(rep)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def print_report(rep: Report, file=None) -> None:
    out = file or sys.stdout
    verb = "would remove" if rep.dry_run else "removed"
    for it in rep.items:
        size = f" ({_mib(it.size)})" if it.kind == "segment" else ""
        if it.error:
            print(f"FAILED to remove {it.kind} {it.name}{size}: {it.error}", file=out)
        elif it.remove:
            print(f"{verb} {it.kind} {it.name}{size}: {it.why}", file=out)
        else:
            print(f"kept {it.kind} {it.name}{size}: {it.why}", file=out)
    segs = [i for i in rep.of("segment", True) if not i.error]
    dirs = [i for i in rep.of("run dir", True) if not i.error]
    kept_s, kept_d = rep.of("segment", False), rep.of("run dir", False)
    line = (f"clean{' (dry run)' if rep.dry_run else ''}: {verb} {len(segs)} segment(s) "
            f"({_mib(sum(i.size for i in segs))}) and {len(dirs)} run dir(s); "
            f"kept {len(kept_s)} segment(s) and {len(kept_d)} run dir(s) in use")
    if rep.errors:
        line += f"; {len(rep.errors)} could not be removed"
    print(line, file=out, flush=True)


def failure_dumps(remove: bool, file=None) -> int:
    """Report (``remove``: delete) the FAILURE trace dumps of runs without ``--json``
    (``vm.tracepoints.failures_root()``); returns how many could not be removed."""
    import shutil

    from vm.tracepoints import failures_root

    root = Path(failures_root())
    dumps = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    size = sum(f.stat().st_size for d in dumps for f in d.rglob("*") if f.is_file())
    out = file or sys.stdout
    if not dumps:
        print(f"failure dumps: none in {root}", file=out)
        return 0
    if not remove:
        print(f"failure dumps: {len(dumps)} in {root} ({_mib(size)}); --dumps removes them", file=out)
        return 0
    bad = 0
    for d in dumps:
        try:
            shutil.rmtree(d)
        except OSError as e:
            bad += 1
            print(f"FAILED to remove failure dump {d}: {e}", file=out)
    print(f"failure dumps: removed {len(dumps) - bad} from {root} ({_mib(size)})", file=out)
    return bad


def main(args) -> int:
    rep = clean(dry_run=bool(getattr(args, "dry_run", False)))
    bad = failure_dumps(bool(getattr(args, "dumps", False)) and not rep.dry_run)
    print_report(rep)  # its summary line stays last
    return EXIT_ERRORS if rep.errors or bad else EXIT_OK
