"""ipc.rundir and peer death: private run directories, live vs dead owners, and a channel whose
peer dies never hangs the other side (children and fixtures: tests/ipc/channel_kit.py)."""

from __future__ import annotations

import os
import signal
import stat
import time

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
    Stop,
)
from ipc.worker_channel import WorkerChannel

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
