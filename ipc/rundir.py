"""Run directories: the private per-run directory ``<base>/pagetrack-sim-<run_id>`` (mode 0700)
that holds the control socket and an ``owner.pid`` file (coordinator pid + start time), so that
``launch.py clean`` can tell a live run from a dead one even across pid reuse."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from ipc.errors import UsageError
from ipc.proc import pid_alive
from ipc.proc import proc_starttime as _proc_starttime  # pid + start time name one process

RUN_PREFIX = "pagetrack-sim-"
SOCKET_NAME = "ctl.sock"
OWNER_FILE = "owner.pid"
#: A run dir without owner.pid younger than this is assumed to be being created (not stale).
OWNER_GRACE_S = 60.0
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class RunDir(NamedTuple):
    path: Path
    pid: int | None  # coordinator pid from owner.pid (None: missing / unreadable)
    alive: bool


def run_base() -> Path:
    """Where run directories live: ``$XDG_RUNTIME_DIR`` if it is a usable directory, else ``/tmp``
    (the system temp dir)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg)
    return Path(tempfile.gettempdir())


def make_run_dir(run_id: str, base: str | os.PathLike | None = None) -> Path:
    """Create the private run directory ``<base>/pagetrack-sim-<run_id>`` (mode 0700, must not
    exist yet) with ``owner.pid`` (this process's pid and start time, mode 0600)."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise UsageError(f"bad run id {run_id!r}: 1-64 characters [A-Za-z0-9_-], not starting with - or _")
    root = Path(base) if base is not None else run_base()
    path = root / f"{RUN_PREFIX}{run_id}"
    sock_len = len(str(path / SOCKET_NAME).encode())
    if sock_len > SUN_PATH_MAX:
        raise UsageError(f"run dir {path} too long for an ipc:// socket ({sock_len} > {SUN_PATH_MAX} bytes)")
    os.mkdir(path, 0o700)  # FileExistsError if it exists (also if it is a symlink)
    try:
        os.chmod(path, 0o700)  # whatever the umask
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise UsageError(f"run dir {path} is not a directory owned by us")
        pid = os.getpid()
        fd = os.open(path / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid}\n{_proc_starttime(pid) or 0}\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def remove_run_dir(path: str | os.PathLike) -> None:
    """Remove a run directory and everything in it (no error if it is already gone). Refuses
    anything that is not a real directory named ``pagetrack-sim-*``."""
    p = Path(path)
    if not p.name.startswith(RUN_PREFIX):
        raise UsageError(f"not a run directory: {p}")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"not a run directory (not a real directory): {p}")
    shutil.rmtree(p, ignore_errors=True)


def read_owner(path: str | os.PathLike) -> tuple[int, int | None] | None:
    """(pid, start time or None) from a run dir's owner.pid; None if missing or unreadable."""
    try:
        with open(Path(path) / OWNER_FILE) as f:
            lines = f.read(256).split()
        pid = int(lines[0])
        start = int(lines[1]) if len(lines) > 1 and int(lines[1]) > 0 else None
        return (pid, start) if pid > 0 else None
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, start: int | None) -> bool:
    if not pid_alive(pid):
        return False
    return start is None or _proc_starttime(pid) == start


def list_run_dirs(base: str | os.PathLike | None = None) -> list[RunDir]:
    """Run directories of this user under ``base`` (default: both ``run_base()`` and the temp
    dir), with the owner pid and whether that coordinator is still alive (pid alive and same start
    time). A directory without a readable owner.pid counts as alive while younger than
    ``OWNER_GRACE_S`` (it may be being created)."""
    bases = [Path(base)] if base is not None else list(dict.fromkeys([run_base(), Path(tempfile.gettempdir())]))
    out: list[RunDir] = []
    uid = os.getuid()
    for b in bases:
        try:
            entries = sorted(os.scandir(b), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if not e.name.startswith(RUN_PREFIX):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            owner = read_owner(e.path)
            if owner is None:
                alive = time.time() - st.st_mtime < OWNER_GRACE_S
                out.append(RunDir(Path(e.path), None, alive))
            else:
                out.append(RunDir(Path(e.path), owner[0], _owner_alive(*owner)))
    return out
