"""What /proc says about a process, for stall and death diagnosis: its scheduler state, the CPU
time it has used, and how many processes share each CPU of this host.

An RCU stall names a reader that stayed too long inside its read-side critical section. On a host
with more runnable processes than CPUs that may be the scheduler's doing, not the code's: a stall
warning therefore says which kind it saw (:func:`classify_stall`):
- ``preempted``: the reader's process is runnable and its CPU time advances — it is executing, only
  slowly or for long (on an oversubscribed host the ratio below says how many processes share a CPU);
- ``stuck``: the process is stopped (SIGSTOP, a debugger) or sleeping with its CPU time standing
  still — nothing will end the section until something else happens;
- ``gone``: the process no longer exists (the death diagnosis names it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    state: str      # R running/runnable, S sleeping, D disk sleep, T stopped, t traced, Z zombie, ...
    cpu_ticks: int  # utime + stime, clock ticks
    start: int      # start time, clock ticks after boot (pid + start = one process, across pid reuse)


def sample(pid: int) -> ProcSample | None:
    """/proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        # after the comm field: state(0) ... utime(11) stime(12) ... starttime(19)
        return ProcSample(fields[0].decode(), int(fields[11]) + int(fields[12]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def classify_stall(pid: int, per_cpu: float, interval_s: float = 0.1) -> tuple[str, str]:
    """("preempted" | "stuck" | "gone", words): watch ``pid`` for ``interval_s``. ``per_cpu`` is how
    many vCPU processes share one CPU (named in the words)."""
    a = sample(pid)
    if a is None:
        return "gone", f"process {pid} is gone"
    time.sleep(interval_s)
    b = sample(pid)
    if b is None or b.start != a.start or b.state in ("Z", "X"):
        return "gone", f"process {pid} is gone"
    ratio = f"{per_cpu:.3g} vCPU processes per CPU"
    if b.state in ("T", "t"):
        return "stuck", f"stuck: process {pid} is stopped (state {b.state}); {ratio}"
    used = (b.cpu_ticks - a.cpu_ticks) / TICKS_PER_S
    if b.state == "R" or a.state == "R" or used > 0:
        share = used / interval_s
        host = f"oversubscribed host, {ratio}" if per_cpu > 1 else ratio
        return "preempted", (f"preempted: process {pid} is runnable, CPU time advancing "
                             f"({share:.0%} of a CPU over {interval_s * 1000:.0f} ms; {host})")
    return "stuck", (f"stuck: process {pid} is not runnable (state {b.state}) and its CPU time stands "
                     f"still; {ratio}")


def forkserver_alive() -> bool:
    """Is this process' multiprocessing fork server (if it started one) still alive? Once it is gone
    every child it forked reads as exited with status 255, alive or not."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if not pid:
        return True
    s = sample(pid)  # not waitpid: reaping it here would break multiprocessing's own restart check
    return s is not None and s.state not in ("Z", "X")
