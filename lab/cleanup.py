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

Leftovers in the temp dir (``$TMPDIR``) are removed when their owner is dead: a multiprocessing
``pymp-*`` directory (a SIGKILLed coordinator's fork-server listener) that holds nothing but
``listener-*`` sockets no live socket is bound to (``/proc/net/unix``), and a sweep's or chaos run's
Dask scratch ``pagetrack-{sweep,chaos}-dask-*`` whose ``.pagetrack-owner`` marker names a dead process;
either is kept while a live process has its cwd or a file in it, or younger than ``LEFTOVER_GRACE_S``
(pymp).

Nothing is deleted through a symbolic link (``ipc.safe_delete``): a root that is a link or not ours is
refused, a link among the entries is reported and left alone, and a directory goes only if it is
recognised as ours. FAILURE dumps (``--dumps``) are the directories of ``failures_root()`` named like a
run id that hold nothing but ``failure-trace.json`` / ``.txt``; a dumps root that is a symbolic link or
not owned by the user is refused with one line (with ``--dumps`` that counts as not removed: exit 1).

Everything else is removed (``--dry-run``: only listed). Each item is printed with the reason, then
one summary line. Exit 0; 1 if something could not be removed (e.g. permission denied).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ipc import rundir, safe_delete
from ipc import shm as shm_mod
from ipc.proc import pid_alive

EXIT_OK, EXIT_ERRORS = 0, 1
#: A segment without any run directory and not in use is left alone while younger than this (s).
ORPHAN_GRACE_S = 5.0
_SEG_RE = re.compile(r"^[A-Za-z0-9]{1,24}$")
#: a ``pymp-*`` temp dir with only stale listener sockets is left alone while younger than this (s)
LEFTOVER_GRACE_S = 60.0
_PYMP_RE = re.compile(r"^pymp-[a-z0-9_]{8}$")  # multiprocessing.util.get_temp_dir (tempfile.mkdtemp)
_LISTENER_RE = re.compile(r"^listener-[a-z0-9_]{8}$")  # multiprocessing.connection.arbitrary_address
_SCRATCH_RE = re.compile(r"^pagetrack-(?:sweep|chaos)-dask-[a-z0-9_]{8}$")  # safe_delete.make_owned_dir
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # ipc.rundir's run ids: a dump dir's name


@dataclass
class Item:
    kind: str  # "segment" | "run dir" | "leftover"
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
         run_ids: set[str] | None = None, grace_s: float = ORPHAN_GRACE_S,
         tmp_base: str | os.PathLike | None = None, leftover_grace_s: float = LEFTOVER_GRACE_S) -> Report:
    """Decide, without changing anything, what ``clean`` removes. ``run_base``: where run
    directories are looked for (default: ``list_run_dirs``' default places); ``run_ids``: only
    consider these runs (tests use it not to touch other runs on a shared machine); ``tmp_base``:
    where leftovers are looked for (default: the temp dir, unless ``run_ids`` restricts the scan)."""
    rep = Report()
    if tmp_base is not None or run_ids is None:
        rep.items += scan_leftovers(str(tmp_base or tempfile.gettempdir()), leftover_grace_s)
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
            elif it.kind == "leftover":
                _remove_leftover(it.path)
            else:  # a real directory pagetrack-sim-*, never a link (ipc.safe_delete)
                if not Path(it.name).name.startswith(rundir.RUN_PREFIX):
                    raise OSError(f"not a run directory: {it.name}")
                safe_delete.remove_path(it.name, shared_root=True)
                if os.path.lexists(it.name):
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
    left, kept_l = [i for i in rep.of("leftover", True) if not i.error], rep.of("leftover", False)
    if left or kept_l:
        line += f"; {verb} {len(left)} leftover temp dir(s), kept {len(kept_l)}"
    if rep.errors:
        line += f"; {len(rep.errors)} could not be removed"
    print(line, file=out, flush=True)


# -- leftovers in the temp dir (item 8 of issue 21) -------------------------------------------------


def _safe(s: str) -> str:
    """A name as printed: control characters escaped (a planted name cannot drive the terminal)."""
    return s if s.isprintable() else repr(s)[1:-1]


def _bound_unix_paths() -> set[str] | None:
    """Paths of the unix sockets a live socket is bound to (``/proc/net/unix``; a dead listener's file
    is not there); None if that cannot be read (then nothing counts as stale)."""
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()[1:]
    except OSError:
        return None
    return {parts[7] for line in lines if len(parts := line.split(None, 7)) == 8}


def _holders(dirs: list[str]) -> dict[str, set[int]]:
    """``{dir: pids}`` of the live processes (that we may inspect) whose cwd or an open fd is in one
    of ``dirs``."""
    found: dict[str, set[int]] = {}
    if not dirs:
        return found
    forms = {d: (d, os.path.realpath(d)) for d in dirs}  # /proc names resolved paths
    for pid in _proc_pids():
        targets = []
        for link in ["cwd"] + [f"fd/{fd}" for fd in _listdir(f"/proc/{pid}/fd")]:
            try:
                targets.append(_strip_deleted(os.readlink(f"/proc/{pid}/{link}")))
            except OSError:
                continue
        for d, (raw, real) in forms.items():
            if any(t in (raw, real) or t.startswith((raw + "/", real + "/")) for t in targets):
                found.setdefault(d, set()).add(pid)
    live = {d: {p for p in pids if pid_alive(p)} for d, pids in found.items()}
    return {d: pids for d, pids in live.items() if pids}


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _pymp_listeners(dir_fd: int) -> tuple[list[str], float] | None:
    """(socket names, newest mtime) if the directory holds nothing but ``listener-*`` sockets (at
    least one); else None (another program's, or being set up: not ours to judge)."""
    names = os.listdir(dir_fd)
    newest = 0.0
    for n in names:
        if not _LISTENER_RE.match(n):
            return None
        st = safe_delete.lstat_at(dir_fd, n)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            return None
        newest = max(newest, st.st_mtime)
    return (names, newest) if names else None


def _judge_leftover(path: str, dir_fd: int, st: os.stat_result, bound: set[str] | None, now: float,
                    grace_s: float, alias: str) -> Item | None:
    """``alias``: ``path`` as the temp dir was given (a socket is listed by the path it was bound to)."""
    it = Item("leftover", path, None, False, "", path=path)
    if _PYMP_RE.match(os.path.basename(path)):
        socks = _pymp_listeners(dir_fd)
        if socks is None:
            return None
        age = now - max(st.st_mtime, socks[1])
        if bound is None:
            it.why = "cannot read /proc/net/unix to tell a stale listener from a live one"
        elif any(os.path.join(p, n) in bound for n in socks[0] for p in (path, alias)):
            it.why = "its listener socket is bound by a live process"
        elif age < grace_s:
            it.why = f"stale listener socket, but only {age:.1f}s old (grace {grace_s:g}s)"
        else:
            it.remove = True
            it.why = "multiprocessing temp dir with only stale listener socket(s) (their process is gone)"
        return it
    owner = safe_delete.read_marker(dir_fd)
    if owner is None:
        it.why = f"no {safe_delete.MARKER} marker (not made by this version): left alone"
    elif safe_delete.marker_owner_alive(owner):
        it.why = f"owner pid {owner[0]} is live"
    else:
        it.remove, it.why = True, f"Dask scratch of a sweep/chaos run whose owner pid {owner[0]} is gone"
    return it


def scan_leftovers(base: str, grace_s: float = LEFTOVER_GRACE_S) -> list[Item]:
    """The ``pymp-*`` and ``pagetrack-{sweep,chaos}-dask-*`` directories of ``base`` (see the module
    doc), judged; a symbolic link with such a name is listed as kept. ``base`` (the user's temp dir)
    is resolved once, as ``safe_delete.make_owned_dir`` does; nothing below it is followed."""
    items: list[Item] = []
    given, base = os.path.abspath(base), os.path.realpath(base)
    try:
        fd = safe_delete.open_root(base, shared_ok=True)
    except FileNotFoundError:
        return items
    except (safe_delete.Refused, OSError) as e:
        return [Item("leftover", base, None, False, f"temp dir refused: {e}", path=base)]
    now, bound, uid = time.time(), _bound_unix_paths(), os.geteuid()
    try:
        for name in sorted(os.listdir(fd)):
            if not (_PYMP_RE.match(name) or _SCRATCH_RE.match(name)):
                continue
            path = os.path.join(base, name)
            try:
                st = safe_delete.lstat_at(fd, name)
                if stat.S_ISLNK(st.st_mode):
                    why = "a symbolic link: never followed, not removed"
                    items.append(Item("leftover", path, None, False, why, path=path))
                    continue
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                    continue  # not ours
                dfd = safe_delete.open_dir_at(fd, name, st)
            except (safe_delete.Refused, OSError):
                continue  # gone or changed meanwhile
            try:
                it = _judge_leftover(path, dfd, st, bound, now, grace_s, os.path.join(given, name))
            except OSError:
                it = None
            finally:
                os.close(dfd)
            if it is not None:
                items.append(it)
    finally:
        os.close(fd)
    held = _holders([i.path for i in items if i.remove])
    for it in items:
        if it.path in held:
            it.remove, it.why = False, f"{it.why}, but pid {_pids(held[it.path])} has its cwd or a file in it"
    return items


def _remove_leftover(path: str) -> None:
    """Remove a leftover that ``scan_leftovers`` chose, checking again that it is still one."""
    root, name = os.path.split(path)

    def still_ours(dir_fd: int) -> str | None:
        if _PYMP_RE.match(name):
            return None if _pymp_listeners(dir_fd) is not None else "no longer holds only listener sockets"
        owner = safe_delete.read_marker(dir_fd)
        return None if owner and not safe_delete.marker_owner_alive(owner) else "its owner is not known dead"

    fd = safe_delete.open_root(root, shared_ok=True)
    try:
        safe_delete.remove_entry(fd, name, check=still_ours, label=path)
    finally:
        os.close(fd)


# -- FAILURE dumps (item 2 of issue 21) -------------------------------------------------------------


@dataclass
class Dumps:
    root: str
    refused: str | None = None
    dumps: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes)
    links: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # entries that are not dumps made by us


def _dump_files(dir_fd: int) -> tuple[int, str | None]:
    """(bytes, None) if the directory holds nothing but a FAILURE dump's regular files
    (``failure-trace.json`` / ``.txt``, at least one, and ``write_atomic``'s temporary files); else
    (0, why it is not a dump)."""
    from vm.tracepoints import FAILURE_STEM

    ours = {f"{FAILURE_STEM}.json", f"{FAILURE_STEM}.txt"}
    tmp = re.compile(rf"^\.{re.escape(FAILURE_STEM)}\.(?:json|txt)\.\d+\.[0-9a-f]+\.tmp$")
    names = os.listdir(dir_fd)
    if not ours & set(names):
        return 0, f"no {FAILURE_STEM}.json or .txt in it"
    size = 0
    for n in names:
        if n not in ours and not tmp.match(n):
            return 0, f"holds {_safe(n)!r}, which a dump never does"
        st = safe_delete.lstat_at(dir_fd, n)
        if not stat.S_ISREG(st.st_mode):
            return 0, f"{_safe(n)} is not a regular file"
        size += st.st_size
    return size, None


def scan_dumps(root: str) -> Dumps:
    """The FAILURE dumps of ``root`` (see the module doc), without changing anything."""
    d = Dumps(root)
    try:
        fd = safe_delete.open_root(root)
    except FileNotFoundError:
        return d
    except (safe_delete.Refused, OSError) as e:
        d.refused = str(e)
        return d
    uid = os.geteuid()
    try:
        for name in sorted(os.listdir(fd)):
            try:
                st = safe_delete.lstat_at(fd, name)
                if stat.S_ISLNK(st.st_mode):
                    d.links.append(name)
                    continue
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or not _RUN_ID_RE.match(name):
                    d.other.append(name)
                    continue
                dfd = safe_delete.open_dir_at(fd, name, st)
            except FileNotFoundError:
                continue
            except (safe_delete.Refused, OSError):
                d.other.append(name)
                continue
            try:
                size, why = _dump_files(dfd)
            except OSError as e:
                size, why = 0, str(e)
            finally:
                os.close(dfd)
            if why is None:
                d.dumps.append((name, size))
            else:
                d.other.append(name)
    finally:
        os.close(fd)
    return d


def failure_dumps(remove: bool, file=None, root: str | os.PathLike | None = None) -> int:
    """Report (``remove``: delete) the FAILURE trace dumps of runs without ``--json`` in ``root``
    (default ``vm.tracepoints.failures_root()``); returns how many could not be removed (a refused
    root counts as one when removing)."""
    from vm.tracepoints import failures_root

    root = os.path.abspath(os.fspath(root or failures_root()))
    out = file or sys.stdout
    d = scan_dumps(root)
    if d.refused:
        print(f"failure dumps: refused {_safe(root)}: {_safe(d.refused)}; nothing in it is removed", file=out)
        return 1 if remove else 0
    for name in d.links:
        print(f"failure dumps: skipped {_safe(os.path.join(root, name))}: a symbolic link (never followed, "
              "not removed)", file=out)
    if d.other:
        shown = ", ".join(_safe(n) for n in d.other[:4]) + (", ..." if len(d.other) > 4 else "")
        print(f"failure dumps: left {len(d.other)} other entr{'y' if len(d.other) == 1 else 'ies'} of "
              f"{_safe(root)} alone (not dumps made by pagetrack-sim): {shown}", file=out)
    size = sum(s for _, s in d.dumps)
    if not d.dumps:
        print(f"failure dumps: none in {_safe(root)}", file=out)
        return 0
    if not remove:
        print(f"failure dumps: {len(d.dumps)} in {_safe(root)} ({_mib(size)}); --dumps removes them",
              file=out)
        return 0
    bad = 0
    try:
        fd = safe_delete.open_root(root)
    except (safe_delete.Refused, OSError) as e:
        print(f"failure dumps: refused {_safe(root)}: {_safe(str(e))}; nothing in it is removed", file=out)
        return len(d.dumps)
    try:
        for name, _ in d.dumps:
            path = os.path.join(root, name)
            try:
                safe_delete.remove_entry(fd, name, check=lambda f: _dump_files(f)[1], label=path)
            except (safe_delete.Refused, OSError) as e:
                bad += 1
                print(f"FAILED to remove failure dump {_safe(path)}: {_safe(str(e))}", file=out)
    finally:
        os.close(fd)
    print(f"failure dumps: removed {len(d.dumps) - bad} from {_safe(root)} ({_mib(size)})", file=out)
    return bad


def main(args) -> int:
    rep = clean(dry_run=bool(getattr(args, "dry_run", False)))
    bad = failure_dumps(bool(getattr(args, "dumps", False)) and not rep.dry_run)
    print_report(rep)  # its summary line stays last
    return EXIT_ERRORS if rep.errors or bad else EXIT_OK
