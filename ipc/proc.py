"""Process helpers: the forkserver context, liveness checks, parent-death handling, reaping."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time

from ipc import procstat

_PR_SET_PDEATHSIG = 1


def forkserver_context(preload: list[str]):
    """The multiprocessing forkserver context with ``preload`` modules imported once in the server
    (64 workers importing numpy + pyzmq start in well under a second this way)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")
    except (FileNotFoundError, ValueError):
        return False


def proc_starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/pid/stat field 22); with the pid it
    names one process for good (a reused pid has a later start time). None if there is no such
    process."""
    s = procstat.sample(pid)
    return s.start if s is not None else None


def identity_alive(pid: int, start: int | None) -> bool:
    """Is the process ``pid`` that started at ``start`` (``proc_starttime``) still alive?  A falsy
    ``start`` (not recorded) checks the pid alone; a live process with another start time reused the
    pid: the recorded one is dead."""
    if not pid_alive(pid):
        return False
    return not start or proc_starttime(pid) == start


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (prctl PDEATHSIG).

    Under forkserver the parent is the fork server, which exits when the launching process dies,
    so a worker is never left running after its coordinator is gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)


def sigterm_to_exit() -> None:
    """Turn SIGTERM into SystemExit so finally blocks (detach, flush stats) run."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def reap(procs, timeout: float = 5.0) -> list[int | None]:
    """Join processes; SIGTERM what is still alive after ``timeout``, then SIGKILL. Never leaves an
    orphan. Returns exit codes."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    return [p.exitcode for p in procs]
