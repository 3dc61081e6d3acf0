"""ipc.rundir and peer death: private run directories, live vs dead owners, and a channel whose
peer dies never hangs the other side (children and fixtures: tests/ipc/channel_kit.py)."""

from __future__ import annotations

import os
import signal
import stat
import time

import msgspec
import pytest
from channel_kit import (  # noqa: F401  (fixtures)
    CTX,
    RUN_TAG,
    _listening_tcp_inodes,
    _my_socket_inodes,
    coord,
    coordinator_proc,
    echo_worker,
    procs,
    raw_dealer,
    run_dir,
    spawn,
    start_workers,
    stop_workers,
    token,
    wait_counter,
)

from ipc.channel import (
    OWNER_FILE,
    RUN_PREFIX,
    CoordinatorChannel,
    PeerUnreachable,
    list_run_dirs,
    make_run_dir,
    read_owner,
    remove_run_dir,
    run_base,
)
from ipc.errors import UsageError
from ipc.messages import (
    Config,
    Heartbeat,
    Hello,
    Stop,
    Warn,
    encode,
)
from ipc.worker_channel import WorkerChannel, worker_identity

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


# --------------------------------------------------------------------------------------------
# issue 21: a connection is bound to the vCPU index and pid it was spawned as; a message that
# fails its strict types is a counted bad frame, the channel goes on
# --------------------------------------------------------------------------------------------


def _hello_raw(endpoint: str, token: str, vcpu: int, pid: int):
    """A peer holding the token that says Hello as ``vcpu`` with ``pid`` (a worker's identity)."""
    ctx, s = raw_dealer(endpoint, worker_identity(vcpu), token)
    s.send(encode(Hello(vcpu, pid, token)))
    return ctx, s


def test_bound_channel_accepts_only_what_was_spawned(coord, token, caplog):
    me = os.getpid()
    coord.bind(0, me)  # "spawned": this process as vCPU 0, pid me + 1 as vCPU 1
    coord.bind(1, me + 1)
    peers = [_hello_raw(coord.endpoint, token, 100, me)]  # never spawned
    wait_counter(coord, "rejected_peers", 1)
    assert coord.rejected_reasons == {"not_spawned": 1}
    peers.append(_hello_raw(coord.endpoint, token, 1, me))  # spawned index, another pid
    wait_counter(coord, "rejected_peers", 2)
    assert coord.rejected_reasons == {"not_spawned": 1, "wrong_pid": 1}
    # claiming the spawned pid does not help: on ipc:// the channel reads the sender's own (SO_PEERCRED)
    peers.append(_hello_raw(coord.endpoint, token, 1, me + 1))
    wait_counter(coord, "rejected_peers", 3)
    assert coord.rejected_reasons == {"not_spawned": 1, "wrong_pid": 1, "false_pid": 1}
    w = WorkerChannel(coord.endpoint, 0, token)  # the real vCPU 0: its pid is ours
    second = WorkerChannel(coord.endpoint, 0, token)  # same process, a second connection
    try:
        w.hello()
        assert coord.wait_for_hellos(1, 10) == [0]
        second.hello()
        wait_counter(coord, "rejected_peers", 4)
        assert coord.rejected_reasons == {"not_spawned": 1, "wrong_pid": 1, "false_pid": 1,
                                          "already_registered": 1}
        # the refused peers are nobody: what they send is dropped as unknown
        peers[0][1].send(encode(Warn(100, "fake", "SUCCESS")))
        second.send(Warn(0, "fake", "SUCCESS"))
        wait_counter(coord, "unknown_peer", 2)
        assert coord.vcpus == [0]
        assert coord.send(0, Config({}))
        assert w.recv(5000) == Config({})  # the first connection keeps the index
        w.send(Warn(0, "real", "hello"))
        got = coord.recv(5000)
        assert got is not None and got[1].kind == "real"
    finally:
        w.close()
        second.close()
        for ctx, s in peers:
            s.close(0)
            ctx.term()
    # one log line per reason, whatever the number of refusals
    lines = [r.getMessage() for r in caplog.records if r.name == "pagetrack.channel"]
    assert len(lines) == 4 and any("vCPU 100" in x and "not_spawned" in x for x in lines), lines


def test_unbound_channel_keeps_the_old_rules(coord, token):
    """Without bind() (tests, tools), any index matching its routing id registers, as before."""
    ctx, s = _hello_raw(coord.endpoint, token, 100, os.getpid())
    try:
        assert coord.wait_for_hellos(1, 10) == [100]
        assert coord.counters["rejected_peers"] == 0
    finally:
        s.close(0)
        ctx.term()


def test_bad_warn_is_a_counted_bad_frame_and_the_channel_goes_on(coord, token):
    w = WorkerChannel(coord.endpoint, 0, token)
    try:
        w.hello()
        assert coord.wait_for_hellos(1, 10) == [0]
        bad = [{1: 2}, {"a": [1, [2]]}, {"a": {"b": 1}}, {"a": float("nan")}, {"a": {b"k": 1}}]
        for data in bad:  # sent raw: a peer is not bound to our constructors
            w._sock.send(msgspec.msgpack.encode({"type": "warn", "version": 1, "vcpu": 0, "kind": "x",
                                                 "message": "m", "data": data}))
        w._sock.send(msgspec.msgpack.encode({"type": "warn", "version": 1, "vcpu": 0, "kind": "x",
                                             "message": "\x1b[2J\x1b[HSUCCESS", "data": {"n": 1}}))
        got = coord.recv(5000)
        assert got is not None, coord.counters
        vcpu, msg = got
        assert vcpu == 0 and type(msg) is Warn and msg.data == {"n": 1}
        assert "\x1b" not in msg.message and msg.message == "\\x1b[2J\\x1b[HSUCCESS"
        assert coord.counters["bad_frames"] == len(bad)
        assert coord.bad_frame_reasons == {"wrong_type": len(bad)}
    finally:
        w.close()


_IMPOSTOR = """
import sys, time, zmq
from ipc.channel import set_plain_client
from ipc.messages import Warn, encode
endpoint, ident, token = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 500)
s.setsockopt(zmq.ROUTING_ID, ident); set_plain_client(s, token); s.connect(endpoint)
time.sleep(0.3)
s.send(encode(Warn(0, "fake", "impostor says SUCCESS")))
time.sleep(0.5); s.close(); ctx.term()
"""


def test_a_registered_routing_id_taken_over_by_another_process_is_refused(coord, token):
    """ROUTER_HANDOVER lets a connection presenting a registered routing id take its route over; on
    ipc:// every message's kernel pid is checked against the process bound to the vCPU."""
    import subprocess
    import sys

    coord.bind(0, os.getpid())
    w = WorkerChannel(coord.endpoint, 0, token)
    try:
        w.hello()
        assert coord.wait_for_hellos(1, 10) == [0]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        p = subprocess.run([sys.executable, "-c", _IMPOSTOR, coord.endpoint, w.identity.hex(), token],
                           cwd=root, capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": root})
        assert p.returncode == 0, p.stderr
        wait_counter(coord, "rejected_peers", 1)
        assert coord.rejected_reasons == {"impostor": 1}
        got = coord.recv(200)
        assert got is None or got[1].message != "impostor says SUCCESS", got
    finally:
        w.close()
