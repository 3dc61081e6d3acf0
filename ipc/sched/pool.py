"""Client processes for controlled scheduling (ipc/sched): forked once, reused for schedule after
schedule (a fork costs several ms here; a schedule of a small scenario costs about as much).

``Pool(run_id, n, body)`` forks ``n`` clients that each wait for a job number (``H_JOB`` of the
turnstile, futex) and run ``body(index, client, job) -> bytes`` under the turnstile; ``pool.run(
strategy, max_steps, check, wake)`` starts the next job, acts as its scheduler and returns the scheduler
(``outcome``, ``log``) and each client's bytes (a length-prefixed frame on the client's pipe).
A client that dies or does not come back is killed and the pool is marked ``broken`` (make a new
one); ``close()`` tells the clients to quit, reaps them and unlinks the turnstile.
"""

from __future__ import annotations

import os
import select

from ipc import _prims
from ipc.proc import die_with_parent, pid_alive
from ipc.sched import H_JOB, H_QUIT, S_PID, Client, Scheduler, abort, install, layout
from ipc.shm import Region

_WAIT_NS = 200_000_000


def _client_main(run_id: str, n: int, i: int, body, wfd: int) -> None:
    """A forked client: serve jobs until told to quit (never returns)."""
    code = 1
    try:
        die_with_parent()
        parent = os.getppid()
        client = Client(Region.attach(run_id, layout(n)), i)
        install(client)
        m, job_w, seen = client.mem, client.hdr + H_JOB, 0
        while True:
            while m.load(job_w) == seen:
                if m.futex_wait(job_w, seen, _WAIT_NS) and os.getppid() != parent:
                    raise SystemExit
            if m.load(client.hdr + H_QUIT):
                code = 0
                break
            seen = m.load(job_w)
            report = body(i, client, seen)  # the body reports its own errors
            client.done()
            frame = len(report).to_bytes(8, "little") + report
            while frame:
                frame = frame[os.write(wfd, frame):]
    except BaseException:  # noqa: S110  (exit status 1: the parent sees a dead client)
        pass
    finally:
        os._exit(code)


def _read_exact(fd: int, n: int, deadline_ns: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        left = deadline_ns - _prims.now_ns()
        if left <= 0 or not select.select([fd], [], [], left / 1e9)[0]:
            return None
        b = os.read(fd, n - len(buf))
        if not b:
            return None
        buf += b
    return buf


class Pool:
    def __init__(self, run_id: str, n: int, body, hang_s: float = 10.0):
        self.n = n
        self.hang_s = hang_s
        self.region = Region.create(run_id, layout(n))
        self.region.v["hdr"][:] = 0
        self.region.v["slots"][:] = 0
        self.mem = self.region.mem
        self.hdr = self.region.word("hdr")
        self.pids: list[int] = []
        self.fds: list[int] = []
        self.job = 0
        self.broken = False
        try:
            for i in range(n):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    _client_main(run_id, n, i, body, w)
                os.close(w)
                self.pids.append(pid)
                self.fds.append(r)
        except BaseException:
            self.close()
            raise

    def run(self, strategy, max_steps: int, check=None, wake=None) -> tuple[Scheduler, list[bytes | None]]:
        if self.broken:
            raise RuntimeError("schedule pool is broken (a client died or hung): make a new one")
        m, v = self.mem, self.region.v
        v["slots"][:] = 0
        for i, pid in enumerate(self.pids):  # who each slot is (a deadlock names a lock's holder by
            m.store(self.region.word("slots", i) + S_PID, pid)  # pid): the clients' own store raced this reset
        for w in range(H_JOB):
            m.store(self.hdr + w, 0)
        self.job += 1
        m.store(self.hdr + H_JOB, self.job)
        m.futex_wake(self.hdr + H_JOB)
        s = Scheduler(self.region, self.n, strategy, max_steps, alive=lambda i: pid_alive(self.pids[i]),
                      hang_s=self.hang_s, check=check, wake=wake)
        s.run()
        deadline = _prims.now_ns() + int(self.hang_s * 1e9)
        out: list[bytes | None] = []
        for fd in self.fds:
            head = _read_exact(fd, 8, deadline)
            out.append(None if head is None else _read_exact(fd, int.from_bytes(head, "little"), deadline))
        if None in out or s.outcome in ("crash", "hang"):
            self.broken = True
            self._kill()
        return s, out

    def _kill(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def close(self) -> list[int]:
        """Quit the clients, reap them (exit statuses), unlink the turnstile."""
        codes = []
        try:
            if self.pids and not self.broken:
                # clients parked on their turn mid-schedule (an exception, SIGTERM) unwind first
                abort(self.mem, self.hdr, self.region.word("slots"), self.n)
                self.mem.store(self.hdr + H_QUIT, 1)
                self.mem.store(self.hdr + H_JOB, self.job + 1)
                self.mem.futex_wake(self.hdr + H_JOB)
                deadline = _prims.now_ns() + int(self.hang_s * 1e9)
                while any(pid_alive(p) for p in self.pids) and _prims.now_ns() < deadline:
                    _prims.spin_ns(1_000_000)
            self._kill()
            for pid in self.pids:
                try:
                    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
                except ChildProcessError:
                    codes.append(0)
            self.pids = []
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
            self.region.close()
        return codes

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_forked(run_id: str, n: int, body, strategy, max_steps: int, check=None,
               hang_s: float = 10.0, wake=None) -> tuple[Scheduler, list[bytes], list[int]]:
    """One schedule on fresh clients running ``body(index, client) -> bytes``; returns the
    scheduler, each client's bytes (b"" if none) and exit status."""
    pool = Pool(run_id, n, lambda i, c, job: body(i, c), hang_s)
    try:
        s, out = pool.run(strategy, max_steps, check, wake)
    finally:
        codes = pool.close()
    return s, [b or b"" for b in out], codes
