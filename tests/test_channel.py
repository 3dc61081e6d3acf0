"""ipc.channel: ROUTER/DEALER control channel across real processes (spawn context).

The worker functions below run in spawned children, which import this module by name (pytest puts
tests/ on sys.path and spawn passes sys.path to the child)."""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import stat
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from ipc.channel import (
    HARD_MAX_FRAME,
    OWNER_FILE,
    RUN_PREFIX,
    CoordinatorChannel,
    PeerUnreachable,
    WorkerChannel,
    check_endpoint,
    list_run_dirs,
    make_run_dir,
    new_token,
    read_owner,
    remove_run_dir,
    run_base,
)
from ipc.errors import UsageError
from ipc.messages import (
    MAX_FRAME,
    VERSION,
    Batch,
    BatchAck,
    Command,
    CommandResult,
    Config,
    Heartbeat,
    Hello,
    Result,
    Stats,
    Stop,
    Warn,
    encode,
)
from ipc.proc import die_with_parent, reap

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


def raw_dealer(endpoint: str, identity: bytes | None = None) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    s.connect(endpoint)
    return ctx, s


def wait_counter(ch, name: str, value: int, timeout_s: float = 5.0) -> None:
    """Pump the channel until counters[name] reaches value (frames are counted on receipt)."""
    deadline = time.monotonic() + timeout_s
    while ch.counters[name] < value and time.monotonic() < deadline:
        ch.recv(20)
    assert ch.counters[name] == value, ch.counters


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


# --------------------------------------------------------------------------------------------
# run directory
# --------------------------------------------------------------------------------------------


def test_run_dir_private_and_owned(run_dir, coord):
    st_dir = os.stat(run_dir)
    assert stat.S_IMODE(st_dir.st_mode) == 0o700
    assert run_dir.parent == run_base() and run_dir.name.startswith(RUN_PREFIX + RUN_TAG)
    st_sock = os.stat(run_dir / "ctl.sock")
    assert stat.S_ISSOCK(st_sock.st_mode)
    assert stat.S_IMODE(st_sock.st_mode) == 0o600
    assert coord.endpoint == f"ipc://{run_dir}/ctl.sock"
    assert stat.S_IMODE(os.stat(run_dir / OWNER_FILE).st_mode) == 0o600
    assert read_owner(run_dir)[0] == os.getpid()
    (me,) = [r for r in list_run_dirs() if r.path == run_dir]
    assert me.pid == os.getpid() and me.alive


def test_run_dir_even_with_permissive_umask(token):
    old = os.umask(0)
    try:
        path = make_run_dir(RUN_TAG + "umask")
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
            with CoordinatorChannel(path, token):
                assert stat.S_IMODE(os.stat(path / "ctl.sock").st_mode) == 0o600
            assert not (path / "ctl.sock").exists()  # close() removes the socket file
        finally:
            remove_run_dir(path)
    finally:
        os.umask(old)


def test_dead_run_dir_is_listed_dead(procs):
    p = spawn(procs, time.sleep, 0)
    p.join(5)
    dead_pid = p.pid
    path = make_run_dir(RUN_TAG + "dead")
    try:
        (path / OWNER_FILE).write_text(f"{dead_pid}\n0\n")
        (r,) = [r for r in list_run_dirs() if r.path == path]
        assert r.pid == dead_pid and not r.alive
        # a live pid with another start time (pid reuse) is not the owner either
        (path / OWNER_FILE).write_text(f"{os.getpid()}\n1\n")
        (r,) = [r for r in list_run_dirs() if r.path == path]
        assert not r.alive
    finally:
        remove_run_dir(path)
    assert not path.exists()
    remove_run_dir(path)  # already gone: no error


def test_run_dir_validation(run_dir, token, tmp_path):
    with pytest.raises(FileExistsError):
        make_run_dir(run_dir.name[len(RUN_PREFIX):])
    for bad in ("", "../x", "a/b", "-x", "x" * 65, "a b"):
        with pytest.raises(UsageError):
            make_run_dir(bad)
    with pytest.raises(UsageError):
        remove_run_dir(tmp_path)  # not named pagetrack-sim-*
    assert tmp_path.exists()
    loose = tmp_path / (RUN_PREFIX + "loose")
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(UsageError, match="private"):
        CoordinatorChannel(loose, token)
    with pytest.raises(UsageError):
        CoordinatorChannel(run_dir, "short")


# --------------------------------------------------------------------------------------------
# endpoints
# --------------------------------------------------------------------------------------------


def test_no_tcp_listener_by_default(coord, token):
    w = WorkerChannel(coord.endpoint, 0, token)
    try:
        w.hello()
        assert coord.wait_for_hellos(1, 5) == [0]
        assert coord.endpoint.startswith("ipc://")
        assert not (_my_socket_inodes() & _listening_tcp_inodes())
    finally:
        w.close()


def test_tcp_loopback_only(run_dir, token):
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555", "tcp://10.1.2.3:1", "tcp://[::]:1",
               "tcp://example.com:80", "tcp://127.0.0.1", "pgm://x", "inproc://x", "udp://127.0.0.1:1"):
        with pytest.raises(UsageError):
            check_endpoint(ep)
    for ep in ("tcp://127.0.0.1:*", "tcp://127.0.0.5:7000", "tcp://[::1]:*", "tcp://localhost:*", "ipc:///x/y"):
        assert check_endpoint(ep) == ep
    assert check_endpoint("tcp://0.0.0.0:5555", allow_remote=True)
    with pytest.raises(UsageError, match="loopback"):
        CoordinatorChannel(run_dir, token, endpoint="tcp://0.0.0.0:*")
    with pytest.raises(UsageError, match="loopback"):
        CoordinatorChannel(run_dir, token, endpoint="tcp://*:*")
    # an explicit loopback endpoint works end to end, and its listener is on 127.0.0.1 only
    with CoordinatorChannel(run_dir, token, endpoint="tcp://127.0.0.1:*") as c:
        assert c.endpoint.startswith("tcp://127.0.0.1:")
        port = int(c.endpoint.rsplit(":", 1)[1])
        mine = _my_socket_inodes() & _listening_tcp_inodes()
        assert mine  # the /proc check sees a listener when there is one
        local = [ln.split()[1] for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if ln.split()[3] == "0A" and int(ln.split()[9]) in mine]
        assert local == [f"0100007F:{port:04X}"]
        with WorkerChannel(c.endpoint, 1, token) as w:
            w.hello()
            assert c.wait_for_hellos(1, 5) == [1]
            assert c.send(1, Stop("tcp"))
            assert w.recv(2000) == Stop("tcp")


# --------------------------------------------------------------------------------------------
# handshake
# --------------------------------------------------------------------------------------------


def test_handshake_start_barrier_and_stop(coord, token, procs):
    n = 3
    for v in range(n):
        spawn(procs, echo_worker, coord.endpoint, v, token)
    assert coord.wait_for_hellos(n, 30) == [0, 1, 2]
    for v in range(n):
        assert coord.send(v, Config({"vcpu": v, "design": "rcu-list"}))
    assert coord.broadcast(Stop("test over")) == n
    results = {}
    deadline = time.monotonic() + 10
    while len(results) < n and time.monotonic() < deadline:
        item = coord.recv(200)
        if item is not None and type(item[1]) is Result:
            results[item[0]] = item[1]
    assert sorted(results) == [0, 1, 2]
    for v, r in results.items():
        assert r.ok and r.vcpu == v and r.data["config"] == {"vcpu": v, "design": "rcu-list"}
        assert r.data["reason"] == "test over"
    assert [p.join(10) or p.exitcode for p in procs] == [0] * n
    c = coord.counters
    assert c["bad_frames"] == c["rejected_peers"] == c["unknown_peer"] == 0


def test_wrong_token_rejected_and_counted(coord, token, procs):
    p = spawn(procs, echo_worker, coord.endpoint, 0, "not-the-run-token", 1.5)
    with pytest.raises(TimeoutError):
        coord.wait_for_hellos(1, 1.0)
    wait_counter(coord, "rejected_peers", 1)
    assert coord.vcpus == []
    p.join(10)
    assert p.exitcode == 3  # the worker's handshake timed out: no Config for a rejected peer
    assert coord.send(0, Stop()) is False
    assert coord.counters["unroutable"] == 1


def test_wait_for_hellos_times_out(coord):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="0/2"):
        coord.wait_for_hellos(2, 0.3)
    assert 0.25 < time.monotonic() - t0 < 2.0


# --------------------------------------------------------------------------------------------
# bad frames
# --------------------------------------------------------------------------------------------


def test_garbage_frames_counted_coordinator_keeps_working(coord, token, procs):
    start_workers(coord, token, procs, [0])
    ctx, s = raw_dealer(coord.endpoint)
    try:
        bad = [
            b"", b"\xc1\xc1", os.urandom(64), b"hello world",
            msgspec.msgpack.encode([1, 2]),
            msgspec.msgpack.encode({"type": "nope", "version": VERSION}),
            msgspec.msgpack.encode({"type": "stop", "version": VERSION + 1}),
            msgspec.msgpack.encode({"type": "stop"}),
            msgspec.msgpack.encode({"type": "hello", "version": VERSION, "vcpu": "0", "pid": 1, "token": token}),
            b"\x81\xa4type" + b"\x91" * 100_000 + b"\x01",
        ]
        for frame in bad:
            s.send(frame)
        s.send_multipart([encode(Stop()), b"second part"])
        wait_counter(coord, "bad_frames", len(bad) + 1)
        assert coord.bad_frame_reasons["multipart"] == 1
        assert coord.bad_frame_reasons["bad_version"] == 1
        assert coord.bad_frame_reasons["too_deep"] == 1
        # valid messages from a peer that never said a valid Hello
        s.send(encode(Heartbeat(0, 1, 2)))
        s.send(encode(Stats(0, {"x": 1})))
        wait_counter(coord, "unknown_peer", 2)
        # a Hello with the right token but an identity that is not vcpu-<n>-<hex> of that vcpu
        s.send(encode(Hello(0, os.getpid(), token)))
        wait_counter(coord, "rejected_peers", 1)
        assert coord.vcpus == [0]
        # the real worker is unaffected
        ack = coord.call(0, [("add", {"a": 2, "b": 40})], timeout_s=10)
        assert ack.results == [CommandResult(True, 42)]
        assert coord.counters["received"] == 2  # the worker's Hello and its BatchAck
    finally:
        s.close()
        ctx.term()
    stop_workers(coord, procs)


def test_oversized_frames_dropped(coord, token, procs):
    start_workers(coord, token, procs, [0])
    ctx, s = raw_dealer(coord.endpoint)
    try:
        # above MAX_FRAME: delivered, counted as oversized, dropped
        s.send(encode(Config({"blob": b"x" * (MAX_FRAME + 10)})))
        wait_counter(coord, "bad_frames", 1)
        assert coord.bad_frame_reasons == {"oversized": 1}
        # above HARD_MAX_FRAME: libzmq drops the sender's connection; nothing reaches us
        s.send(b"\x00" * (HARD_MAX_FRAME + 1))
        assert coord.recv(300) is None
        assert coord.counters["bad_frames"] == 1
        ack = coord.call(0, [("echo", {"k": "v"})], timeout_s=10)
        assert ack.results[0].value == {"k": "v"}
    finally:
        s.close()
        ctx.term()
    # and the channel refuses to send an oversized message itself
    with pytest.raises(ValueError, match="oversized"):
        coord.send(0, Config({"blob": b"x" * MAX_FRAME}))
    stop_workers(coord, procs)


def test_vcpu_mismatch_and_worker_side_bad_frames(coord, token):
    """A peer may only speak for its own vCPU; a worker counts bad frames too (both in-process)."""
    w = WorkerChannel(coord.endpoint, 4, token)
    try:
        w.hello()
        assert coord.wait_for_hellos(1, 5) == [4]
        assert w.send(Stats(5, {"a": 1}))  # claims to be vcpu 5
        wait_counter(coord, "vcpu_mismatch", 1)
        assert w.send(Stats(4, {"a": 1}))
        item = coord.recv(2000)
        assert item == (4, Stats(4, {"a": 1}))
        ident = coord._by_vcpu[4]
        coord._sock.send_multipart([ident, b"\xc1garbage"])
        coord._sock.send_multipart([ident, b"a", b"b"])
        assert coord.send(4, Stop("after garbage"))
        assert w.recv(2000) == Stop("after garbage")
        assert w.counters["bad_frames"] == 2
        assert w.bad_frame_reasons == {"not_msgpack": 1, "multipart": 1}
    finally:
        w.close()


# --------------------------------------------------------------------------------------------
# scripted mode
# --------------------------------------------------------------------------------------------


def test_batch_call_ack_round_trip(coord, token, procs):
    start_workers(coord, token, procs, [2])
    ack = coord.call(2, [Command("add", {"a": 1, "b": 2}), ("echo", {"gpa": 0xFEE00000, "data": b"\x01\x02"}),
                         ("bogus",), ("echo", {"never": "run"})], timeout_s=10)
    assert isinstance(ack, BatchAck) and ack.vcpu == 2
    assert [r.ok for r in ack.results] == [True, True, False]
    assert ack.results[0].value == 3
    assert ack.results[1].value == {"gpa": 0xFEE00000, "data": b"\x01\x02"}
    assert "bogus" in ack.results[2].error

    # telemetry arriving while waiting is kept for recv() ...
    ack = coord.call(2, [("stats", {"n": 7})], timeout_s=10)
    assert ack.results == [CommandResult(True)]
    assert coord.recv(0) == (2, Stats(2, {"n": 7}))
    assert type(coord.recv(1000)[1]) is Warn
    # ... or handed to a callback
    seen = []
    coord.call(2, [("stats", {"n": 8})], timeout_s=10, on_message=lambda v, m: seen.append((v, type(m))))
    assert seen == [(2, Stats), (2, Warn)]
    assert coord.recv(100) is None

    # a timed-out call leaves a stale ack, which the next call drops
    with pytest.raises(TimeoutError):
        coord.call(2, [("sleep", {"s": 0.4})], timeout_s=0.1)
    ack = coord.call(2, [("add", {"a": 5, "b": 5})], timeout_s=10)
    assert ack.results[0].value == 10
    assert coord.counters["stale_acks"] == 1

    # call_many runs batches on several vCPUs in parallel (here one), latency stays bounded
    n = 100
    t0 = time.perf_counter()
    for i in range(n):
        assert coord.call(2, [("add", {"a": i, "b": 1})], timeout_s=10).results[0].value == i + 1
    one = (time.perf_counter() - t0) / n
    cmds = [("add", {"a": i, "b": 1}) for i in range(100)]
    t0 = time.perf_counter()
    for _ in range(20):
        ack = coord.call_many({2: cmds}, timeout_s=10)[2]
    hundred = (time.perf_counter() - t0) / 20
    assert [r.value for r in ack.results] == list(range(1, 101))
    print(f"\ncall->ack round trip: batch of 1: {one * 1e6:.0f} us, batch of 100: {hundred * 1e6:.0f} us")
    assert one < 0.05 and hundred < 0.5  # generous: catches a sleep/poll bug, not a slow machine

    assert coord.send(2, Stop())
    assert procs[0].join(10) is None and procs[0].exitcode == 0


def test_send_never_blocks_on_a_stuck_worker(run_dir, token):
    """A worker that stops reading fills its queue; the coordinator's sends then fail fast
    (send_full) instead of blocking, and call() reports it."""
    with CoordinatorChannel(run_dir, token, hwm=50) as c, WorkerChannel(c.endpoint, 0, token, hwm=50) as w:
        w.hello()
        assert c.wait_for_hellos(1, 5) == [0]
        t0 = time.monotonic()
        sent = [c.send(0, Heartbeat(-1, i)) for i in range(50_000)]
        assert time.monotonic() - t0 < 20
        assert sent[0] and not sent[-1]
        assert c.counters["send_full"] == sent.count(False) > 0
        with pytest.raises(PeerUnreachable, match="not reading"):
            c.call(0, [("nop",)], timeout_s=5)
        assert type(w.recv(1000)) is Heartbeat  # what was queued is still delivered


def test_call_to_unknown_vcpu(coord):
    with pytest.raises(PeerUnreachable):
        coord.call(7, [("add", {"a": 1, "b": 1})], timeout_s=1)
    assert coord.send(7, Stop()) is False


# --------------------------------------------------------------------------------------------
# peer death
# --------------------------------------------------------------------------------------------


def test_worker_dies_no_hang(coord, token, procs):
    start_workers(coord, token, procs, [1])
    (p,) = procs
    assert coord.call(1, [("add", {"a": 1, "b": 1})], timeout_s=10).results[0].value == 2
    # dies in the middle of a batch: call() notices the route is gone well before its timeout
    t0 = time.monotonic()
    with pytest.raises(PeerUnreachable):
        coord.call(1, [("die", {})], timeout_s=20)
    assert time.monotonic() - t0 < 5
    p.join(5)
    assert p.exitcode == 9
    t0 = time.monotonic()
    assert coord.recv(300) is None
    assert 0.25 <= time.monotonic() - t0 < 2
    assert coord.probe(1) is False
    assert coord.send(1, Stop()) is False
    # a killed worker: same
    p2 = spawn(procs, echo_worker, coord.endpoint, 2, token)
    assert coord.wait_for_hellos(2, 30) == [1, 2]
    assert coord.send(2, Config({}))
    p2.kill()
    p2.join(5)
    with pytest.raises(PeerUnreachable):
        coord.call(2, [("add", {"a": 1, "b": 1})], timeout_s=20)
    coord.forget(1)
    assert coord.vcpus == [2]


def test_coordinator_dies_no_hang(run_dir, token, procs):
    ready = CTX.Queue()
    p = spawn(procs, coordinator_proc, str(run_dir), token, ready)
    endpoint = ready.get(timeout=30)
    w = WorkerChannel(endpoint, 0, token)
    try:
        assert w.handshake(10) == Config({"hello": "world"})
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        t0 = time.monotonic()
        assert w.recv(300) is None
        assert 0.25 <= time.monotonic() - t0 < 2
        # sends never block, even with nobody reading: the queue fills, then drops are counted
        t0 = time.monotonic()
        sent = [w.send(Heartbeat(0, i)) for i in range(30_000)]
        assert time.monotonic() - t0 < 20
        assert sent[0] and not sent[-1]
        assert w.counters["dropped"] > 0
    finally:
        w.close()
        ready.close()
        ready.join_thread()
