"""Torture tests of the primitives (ipc/torture/) and their self-tests.

Real primitives must give SUCCESS; a broken grace period / a lock that does not lock must give
FAILURE (the harness has teeth). Every test also checks that no worker process and no
``/dev/shm/pts_tt<pid>n*`` segment of ours is left behind.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import _cmdline, launch_in_process

from ipc import torture
from ipc.errors import UsageError
from ipc.rcu import RcuDomain
from ipc.shm import SHM_DIR

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WRITES_RE = re.compile(r"Writes:  Total: (\d+)  Max/Min: (\d+)/(\d+)  Fail: (\d+)")
# The CLI tests use real processes; allow for a slow, loaded 2-core machine.
CLI_TIMEOUT = 120


# ------------------------------------------------------------------------------------ helpers

def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])  # zombies count: not reaped yet


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _descendants(root: int) -> set[int]:
    parent = {}
    for pid in _all_pids():
        pp = _ppid(pid)
        if pp is not None:
            parent[pid] = pp
    out: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def _is_mp_helper(pid: int) -> bool:
    """The forkserver and the resource tracker are long-lived direct children of this process by
    design; the torture workers are children of the forkserver."""
    if _ppid(pid) != os.getpid():
        return False
    cmd = _cmdline(pid)
    return "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd


def _workers_alive(before: set[int]) -> list[str]:
    new = _descendants(os.getpid()) - before
    return [f"{p}: {_cmdline(p)[:100]}" for p in sorted(new) if not _is_mp_helper(p)]


def _our_segments(pid: int) -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"pts_tt{pid}n"))


def _wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _marked_pids(marker: str) -> list[int]:
    out = []
    needle = f"PTS_TORTURE_TEST={marker}".encode()
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module", autouse=True)
def _forkserver(request):
    """Start the session's forkserver with the suite's preload list (tests/conftest.py's ``ctx``)
    if there is one, so that run_torture's own preload request does not decide it for later tests."""
    try:
        ctx = request.getfixturevalue("ctx")
    except pytest.FixtureLookupError:
        return
    p = ctx.Process(target=os.getpid)
    p.start()
    p.join(30)


@pytest.fixture(autouse=True)
def torture_no_leaks():
    """After each test: no torture worker alive, no segment of this process left (on top of any
    suite-wide leak check)."""
    before = _descendants(os.getpid())
    yield
    assert _wait_until(lambda: not _workers_alive(before), 5.0), _workers_alive(before)
    assert _our_segments(os.getpid()) == []


def _run(kind, procs=2, duration=1.0, **kw):
    buf = io.StringIO()
    doc = torture.run_torture(kind, procs, duration, out=buf, **kw)
    return doc, buf.getvalue()


def _cli(*args, marker: str | None = None, **kw):
    env = dict(os.environ)
    env["PTS_TORTURE_TEST"] = marker or uuid.uuid4().hex
    return subprocess.run([sys.executable, "launch.py", "torture", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, **kw)


def _assert_cli_clean(marker: str, pid: int) -> None:
    # the launcher's forkserver exits once the launcher is gone; its workers before that
    assert _wait_until(lambda: not _marked_pids(marker), 10.0), \
        [(p, _cmdline(p)[:100]) for p in _marked_pids(marker)]
    assert _our_segments(pid) == []


# ------------------------------------------------------------------------------------ rcu / srcu

@pytest.mark.parametrize("kind", ["rcu", "srcu"])
def test_rcu_real_primitives_succeed(kind, tmp_path):
    path = tmp_path / "r.json"
    doc, out = _run(kind, procs=3, duration=1.5, stat_interval=0.5, json_path=str(path))
    assert doc["verdict"] == "SUCCESS", (doc["reasons"], out)
    c = doc["counts"]
    assert c["reads"] > 1000 and c["versions"] > 10 and c["gp_seq"] > 10
    assert c["poisoned_reads"] == 0 and c["reused_reads"] == 0
    assert c["async_retires"] > 0  # call_rcu path used
    if hasattr(RcuDomain, "get_state"):  # polled grace-period API present: exercised too
        assert c["cond_retires"] > 0 and c["poll_retires"] > 0
    pipe = doc["histograms"]["reader_pipe"]
    assert len(pipe) == torture.PIPE_LEN + 1 and sum(pipe) == c["reads"] and sum(pipe[2:]) == 0
    assert sum(doc["histograms"]["reader_batch"]) == c["reads"]
    # every retired element went through the whole pipe before it was freed
    fbc = doc["histograms"]["free_block_circulation"]
    assert fbc[torture.PIPE_LEN - 1] == c["frees"] > 0
    assert doc["histograms"]["gp_latency_ns"]["count"] > 0
    assert [p["reader"] for p in doc["per_process"]] == [0, 1, 2]
    assert all(p["reads"] > 0 for p in doc["per_process"])
    # output: start line with parameters, periodic stats, final verdict line echoing parameters
    lines = out.splitlines()
    assert lines[0].startswith(f"{kind}-torture:--- Start of test:") and "nreaders=3" in lines[0]
    assert sum("Reader Pipe:" in ln for ln in lines) >= 3  # >= 2 periodic + the final one
    assert f"{kind}-torture: rates: reads/s=" in out
    assert lines[-1].startswith(f"{kind}-torture:--- End of test: SUCCESS:")
    assert "nreaders=3 nfakewriters=4" in lines[-1] and "duration=1.5" in lines[-1]
    on_disk = json.loads(path.read_text())
    assert on_disk["verdict"] == "SUCCESS" and on_disk["kind"] == kind
    assert on_disk["params"]["procs"] == 3 and on_disk["histograms"]["reader_pipe"] == pipe


@pytest.mark.parametrize("kind", ["rcu", "srcu"])
def test_rcu_broken_grace_period_fails(kind, tmp_path):
    path = tmp_path / "f.json"
    doc, out = _run(kind, procs=2, duration=1.0, inject="broken-gp", json_path=str(path))
    assert doc["verdict"] == "FAILURE", out
    assert sum(doc["histograms"]["reader_pipe"][2:]) > 0
    assert any("Reader Pipe index >= 2" in r for r in doc["reasons"])
    assert "!!! Reader Pipe:" in out
    # elements are freed under the readers: the mbtest checks (rtmbe) see it too
    c = doc["counts"]
    assert c["mberror_reads"] + c["poisoned_reads"] + c["reused_reads"] > 0
    assert any("mbtest errors" in r for r in doc["reasons"])
    last = out.splitlines()[-1]
    assert last.startswith(f"{kind}-torture:--- End of test: FAILURE") and "inject=broken-gp" in last
    on_disk = json.loads(path.read_text())  # written on FAILURE too
    assert on_disk["verdict"] == "FAILURE" and on_disk["reasons"] == doc["reasons"]


# ------------------------------------------------------------------------------------ locks

@pytest.mark.parametrize("kind", ["spinlock", "mutex"])
def test_lock_real_primitives_succeed(kind, tmp_path):
    path = tmp_path / "l.json"
    doc, out = _run(kind, procs=3, duration=1.0, stat_interval=0.4, json_path=str(path))
    assert doc["verdict"] == "SUCCESS", (doc["reasons"], out)
    c = doc["counts"]
    assert c["writes"] > 1000 and c["n_lock_fail"] == 0 and c["lost_updates"] == 0
    assert sum(p["acquisitions"] for p in doc["per_process"]) == c["writes"]
    assert c["max"] == max(p["acquisitions"] for p in doc["per_process"])
    assert c["min"] == min(p["acquisitions"] for p in doc["per_process"]) > 0
    (st,) = doc["lock_stat"].values()  # one lock class, real lock_stat accounting
    assert st["acquisitions"] == c["writes"] and st["hold_ns_max"] > 0
    lines = [ln for ln in out.splitlines() if WRITES_RE.search(ln)]
    assert len(lines) >= 3  # periodic + final
    total, mx, mn, fail = map(int, WRITES_RE.search(lines[-1]).groups())
    assert (total, mx, mn, fail) == (c["writes"], c["max"], c["min"], 0)
    assert "!!!" not in lines[-1]
    assert lines[-1].endswith("???") == (mx // 2 > mn)
    assert "lock_stat" in out
    assert out.splitlines()[-1].startswith(f"{kind}-torture:--- End of test: SUCCESS:")
    assert json.loads(path.read_text())["verdict"] == "SUCCESS"


@pytest.mark.parametrize("kind", ["spinlock", "mutex"])
def test_lock_busted_lock_fails(kind, tmp_path):
    path = tmp_path / "b.json"
    doc, out = _run(kind, procs=2, duration=1.0, inject="busted-lock", json_path=str(path))
    assert doc["verdict"] == "FAILURE", out
    assert doc["counts"]["n_lock_fail"] > 0
    assert any("n_lock_fail" in r for r in doc["reasons"])
    final = [ln for ln in out.splitlines() if WRITES_RE.search(ln)][-1]
    assert final.endswith("!!!")
    assert out.splitlines()[-1].startswith(f"{kind}-torture:--- End of test: FAILURE")
    assert json.loads(path.read_text())["verdict"] == "FAILURE"


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kind,procs,kw,msg", [
    ("rcu", 2, {"inject": "busted-lock"}, "busted-lock applies to spinlock/mutex"),
    ("srcu", 2, {"inject": "busted-lock"}, "busted-lock"),
    ("mutex", 2, {"inject": "broken-gp"}, "broken-gp applies to rcu/srcu"),
    ("spinlock", 1, {"inject": "busted-lock"}, "--procs >= 2"),
    ("rcu", 0, {}, "--procs"),
    ("rcu", 1000, {}, "--procs"),
    ("rwlock", 2, {}, "unknown kind"),
    ("rcu", 2, {"inject": "nope"}, "unknown --inject"),
    ("rcu", 2, {"stat_interval": 0}, "--stat-interval"),
    ("rcu", 2, {"json_path": "/nonexistent-dir-pts/x.json"}, "does not exist"),
])
def test_bad_parameters_are_usage_errors(kind, procs, kw, msg):
    with pytest.raises(UsageError, match=re.escape(msg)):
        torture.run_torture(kind, procs, 1.0, out=io.StringIO(), **kw)


def test_bad_duration_is_usage_error():
    with pytest.raises(UsageError, match="--duration"):
        torture.run_torture("rcu", 2, 0, out=io.StringIO())


# ------------------------------------------------------------------------------------ CLI

def test_cli_success_exit_0_and_json(tmp_path):
    path = tmp_path / "ok.json"
    marker = uuid.uuid4().hex
    r = _cli("rcu", "--procs", "2", "--duration", "1", "--stat-interval", "0.5", "--json", str(path),
             marker=marker)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "End of test: SUCCESS" in r.stdout.splitlines()[-1]
    doc = json.loads(path.read_text())
    assert doc["verdict"] == "SUCCESS" and doc["kind"] == "rcu" and doc["params"]["procs"] == 2
    run_pid = int(re.search(r"run_id=tt(\d+)n", r.stdout).group(1))
    _assert_cli_clean(marker, run_pid)


def test_cli_failure_exit_1_and_json(tmp_path):
    path = tmp_path / "bad.json"
    marker = uuid.uuid4().hex
    r = _cli("mutex", "--procs", "2", "--duration", "1", "--inject", "busted-lock", "--json", str(path),
             marker=marker)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "End of test: FAILURE" in r.stdout.splitlines()[-1]
    assert json.loads(path.read_text())["verdict"] == "FAILURE"
    run_pid = int(re.search(r"run_id=tt(\d+)n", r.stdout).group(1))
    _assert_cli_clean(marker, run_pid)


@pytest.mark.parametrize("args,msg", [
    (["rcu", "--procs", "0"], "--procs"),
    (["rcu", "--inject", "busted-lock"], "busted-lock"),
    (["spinlock", "--inject", "broken-gp"], "broken-gp"),
    (["mutex", "--procs", "1", "--inject", "busted-lock"], "--procs >= 2"),
    (["rwlock"], "invalid choice"),
])
def test_cli_bad_input_exit_2_one_line(args, msg):
    r = launch_in_process("torture", *args)  # refused before anything starts
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], r.stderr
    assert r.stdout == ""


def _as_a_foreground_job():
    """SIGINT at its default, as a terminal's foreground job has it: a test run started in the
    background of a non-interactive shell (``pytest &``) ignores SIGINT, and the launcher would
    inherit that and ignore the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_ctrl_c_cleans_up():
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) mid-run: exit 130 at once,
    workers gone, segment unlinked."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, PTS_TORTURE_TEST=marker)
    p = subprocess.Popen([sys.executable, "launch.py", "torture", "rcu", "--procs", "2", "--duration", "60"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=_as_a_foreground_job)
    try:
        first = p.stdout.readline()
        assert "Start of test" in first, first + p.stderr.read()
        deadline = time.monotonic() + 20  # workers running: launcher, forkserver, writer, fake writers, readers
        while len(_marked_pids(marker)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_marked_pids(marker)) >= 5
        os.killpg(p.pid, signal.SIGINT)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err
    _assert_cli_clean(marker, p.pid)
