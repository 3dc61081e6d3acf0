"""Shared pieces of the ipc channel tests: child processes (spawned: they import this module by
name, pytest puts tests/ipc/ on sys.path and spawn passes sys.path on), fixtures, helpers."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import secrets
import time
from pathlib import Path

import pytest
import zmq

from ipc.channel import (
    RUN_PREFIX,
    CoordinatorChannel,
    list_run_dirs,
    make_run_dir,
    new_token,
    remove_run_dir,
    set_plain_client,
)
from ipc.messages import (
    Batch,
    CommandResult,
    Config,
    Result,
    Stats,
    Stop,
    Warn,
)
from ipc.proc import die_with_parent, reap
from ipc.worker_channel import WorkerChannel

CTX = mp.get_context("spawn")
RUN_TAG = f"tst{os.getpid()}x"  # every run dir of this module starts with RUN_PREFIX + RUN_TAG


# --------------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------------


def echo_worker(endpoint: str, vcpu: int, token: str, handshake_s: float = 10.0) -> None:
    """A scripted-mode worker: handshake, then execute Batches until Stop (exit 0), or exit 2 if
    the coordinator goes silent, 3 if the handshake times out (e.g. token rejected)."""
    die_with_parent()
    ch = WorkerChannel(endpoint, vcpu, token)
    try:
        try:
            cfg = ch.handshake(handshake_s)
        except TimeoutError:
            os._exit(3)
        done = 0
        while True:
            msg = ch.recv(10_000)
            if msg is None:
                os._exit(2)
            if type(msg) is Stop:
                ch.send(Result(vcpu, True, {"batches": done, "config": cfg.payload, "reason": msg.reason}))
                time.sleep(0.05)  # linger 0: give the io thread a moment to flush the Result
                return
            if type(msg) is not Batch:
                continue
            results = []
            for c in msg.commands:
                if c.op == "echo":
                    results.append(CommandResult(True, c.args))
                elif c.op == "add":
                    results.append(CommandResult(True, c.args["a"] + c.args["b"]))
                elif c.op == "sleep":
                    time.sleep(c.args["s"])
                    results.append(CommandResult(True))
                elif c.op == "stats":  # telemetry that arrives while the coordinator waits for the ack
                    ch.send(Stats(vcpu, {"n": c.args.get("n", 0)}))
                    ch.send(Warn(vcpu, "test", "warn during batch"))
                    results.append(CommandResult(True))
                elif c.op == "die":
                    os._exit(9)
                else:
                    results.append(CommandResult(False, error=f"unknown op {c.op!r}"))
                    break
            ch.ack(msg.seq, results)
            done += 1
    finally:
        ch.close()


def coordinator_proc(run_dir: str, token: str, ready) -> None:
    """A coordinator that welcomes one worker and then idles until it is killed."""
    die_with_parent()
    ch = CoordinatorChannel(run_dir, token)
    ready.put(ch.endpoint)
    try:
        ch.wait_for_hellos(1, 10)
        (vcpu,) = ch.vcpus
        ch.send(vcpu, Config({"hello": "world"}))
        time.sleep(60)
    finally:
        ch.close()


def _status_mib(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def maxrss_mib() -> float:
    """Peak resident set size of this process (MiB): the address space's high-water mark
    (VmHWM; ru_maxrss also counts the pre-exec image of a spawned child, i.e. its parent)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_baseline_mib() -> float:
    """Reset the peak RSS to the current one where Linux allows it (clear_refs 5) and return the
    current RSS: ``maxrss_mib() - baseline`` is then the growth since now, never less (an older,
    higher peak can only overstate it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss = _status_mib("VmRSS")
    return rss if rss is not None else maxrss_mib()


def flood_coordinator(run_dir: str, token: str, out, until: str) -> None:
    """A coordinator alone in its process, so that its peak RSS is its own: puts its pid, then its
    endpoint on ``out``, pumps ``recv`` for at least 1.5 s and until ``counters[until]`` > 0 (15 s at most)
    while the parent floods it, puts ``(maxrss growth MiB, counters, bad_frame_reasons,
    max_message)``, then welcomes one worker and puts the value of one call to it (42)."""
    die_with_parent()
    ch = CoordinatorChannel(run_dir, token)
    try:
        for _ in range(5):
            ch.recv(2)
        out.put(os.getpid())  # starts the queue's feeder thread before the baseline
        time.sleep(0.2)
        base = rss_baseline_mib()
        out.put(ch.endpoint)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            ch.recv(50)
            if time.monotonic() - t0 > 1.5 and ch.counters.get(until, 0) > 0:
                break
        max_message = getattr(ch, "max_message", ch.max_frame + 255)
        out.put((maxrss_mib() - base, ch.counters, dict(ch.bad_frame_reasons), max_message))
        ch.wait_for_hellos(1, 30)
        (vcpu,) = ch.vcpus
        ch.send(vcpu, Config({}))
        out.put(ch.call(vcpu, [("add", {"a": 40, "b": 2})], timeout_s=30).results[0].value)
    finally:
        ch.close()


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _no_leftover_run_dirs():
    yield
    left = [r.path for r in list_run_dirs() if r.path.name.startswith(RUN_PREFIX + RUN_TAG)]
    assert not left, f"leftover run dirs: {left}"


@pytest.fixture
def run_dir():
    path = make_run_dir(RUN_TAG + secrets.token_hex(4))
    try:
        yield path
    finally:
        remove_run_dir(path)
    assert not path.exists()


@pytest.fixture
def token():
    return new_token()


@pytest.fixture
def coord(run_dir, token):
    ch = CoordinatorChannel(run_dir, token)
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture
def procs():
    started: list = []
    try:
        yield started
    finally:
        reap(started, timeout=5.0)
        assert not any(p.is_alive() for p in started)


def spawn(procs, target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def start_workers(coord, token, procs, vcpus) -> None:
    """Spawn echo workers, pass the start barrier and welcome each with its Config."""
    for v in vcpus:
        spawn(procs, echo_worker, coord.endpoint, v, token)
    assert coord.wait_for_hellos(len(vcpus), 30) == sorted(vcpus)
    for v in vcpus:
        assert coord.send(v, Config({"vcpu": v}))


def stop_workers(coord, procs) -> None:
    """Broadcast Stop and check every worker exits cleanly (exit code 0)."""
    coord.broadcast(Stop("test over"))
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def raw_dealer(
    endpoint: str, identity: bytes | None = None, token: str | None = None
) -> tuple[zmq.Context, zmq.Socket]:
    """A bare DEALER; with ``token`` it passes the coordinator's ZAP gate (PLAIN) as a worker
    would, without it (or with a wrong one) the gate refuses its connection."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    if token is not None:
        set_plain_client(s, token)
    s.connect(endpoint)
    return ctx, s


def wait_counter(ch, name: str, value: int, timeout_s: float = 5.0, at_least: bool = False) -> None:
    """Pump the channel until counters[name] reaches value (frames are counted on receipt; with
    ``at_least``, it may go past it, e.g. auth_denied: a refused peer retries)."""
    deadline = time.monotonic() + timeout_s
    while ch.counters[name] < value and time.monotonic() < deadline:
        ch.recv(20)
    assert ch.counters[name] >= value if at_least else ch.counters[name] == value, ch.counters


def _listening_tcp_inodes() -> set[int]:
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                inodes.add(int(f[9]))
    return inodes


def _my_socket_inodes() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


