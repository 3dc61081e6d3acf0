"""The compiled primitives (ipc._prims) below the lock / RCU / histogram layers: atomics, futexes,
clocks, lifetime checks; the process helpers (ipc.proc); the primitives benchmark smoke test."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import ROOT, shm_segments, wait_until

from ipc import _prims
from ipc.proc import identity_alive, pid_alive, proc_starttime, reap, sigterm_to_exit
from ipc.shm import Layout, Region


def _mem(nbytes: int = 4096):
    mm = mmap.mmap(-1, nbytes)
    return mm, _prims.Mem(mm)


def test_atomics():
    mm, mem = _mem()
    assert mem.nwords == 512
    mem.store(3, -5)
    assert mem.load(3) == -5
    assert mem.fetch_add(3, 7) == -5 and mem.load(3) == 2
    assert mem.xchg(3, 100) == 2 and mem.load(3) == 100
    assert mem.cmpxchg(3, 99, 1) == 100 and mem.load(3) == 100  # failed: returns what it found
    assert mem.cmpxchg(3, 100, 1) == 100 and mem.load(3) == 1
    mem.store(4, (1 << 63) - 1)
    assert mem.fetch_add(4, 1) == (1 << 63) - 1 and mem.load(4) == -(1 << 63)  # wraps like the kernel
    a = np.frombuffer(mm, dtype=np.int64)
    assert a[3] == 1
    assert mem.nop() is None and _prims.nop() is None
    for bad in (-1, 512, 10**6):
        with pytest.raises(IndexError):
            mem.load(bad)
        with pytest.raises(IndexError):
            mem.store(bad, 0)
    with pytest.raises(TypeError):
        mem.store(1)
    with pytest.raises(OverflowError):
        mem.store(1, 1 << 64)


def test_mem_buffer_checks():
    mm = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError, match="aligned"):
        _prims.Mem(memoryview(mm)[1:])
    with pytest.raises((TypeError, BufferError)):
        _prims.Mem(b"\0" * 64)  # read-only
    mem = _prims.Mem(mm)
    with pytest.raises(TypeError, match="already"):
        mem.__init__(mmap.mmap(-1, 4096))  # others hold raw pointers into the first buffer
    rd_slot = _prims.RcuReader(mem, 0, 8)
    mem.release()
    mem.release()  # idempotent
    for f in (lambda: mem.load(0), lambda: mem.store(0, 1), lambda: mem.fetch_add(0, 1),
              rd_slot.lock, rd_slot.unlock, rd_slot.nesting):
        with pytest.raises(ValueError, match="released"):
            f()
    with pytest.raises(TypeError, match="already"):
        mem.__init__(mm)
    mm.close()  # the Mem released its export


def test_futex_wait_timeout_and_mismatch():
    _, mem = _mem()
    mem.store(0, 5)
    t = time.monotonic()
    assert mem.futex_wait(0, 4, 10_000_000) == 0  # value differs: returns at once
    assert time.monotonic() - t < 1.0
    t = time.monotonic()
    assert mem.futex_wait(0, 5, 30_000_000) == 1  # timed out
    assert time.monotonic() - t >= 0.025
    assert mem.futex_wake(0) == 0  # nobody waiting
    # the futex word is the low 32 bits
    mem.store(1, (7 << 32) | 3)
    assert mem.futex_wait(1, 3, 1_000_000) == 1


def futex_waiter(run_id: str):
    r = Region.attach(run_id, Layout("fx", [("w", "i8", (8,)), ("res", "i8", (8,))]))
    try:
        mem, w = r.mem, r.word("w")
        mem.store(r.word("res"), 1)  # about to wait
        while mem.load(w) == 0:
            mem.futex_wait(w, 0, 5_000_000_000)
        mem.store(r.word("res") + 1, _prims.now_ns())
    finally:
        r.close()


def test_futex_wake_across_processes(ctx, procs, region_factory, run_id):
    r = region_factory(Layout("fx", [("w", "i8", (8,)), ("res", "i8", (8,))]))
    p = ctx.Process(target=futex_waiter, args=(run_id,))
    procs.append(p)
    p.start()
    wait_until(lambda: r.v["res"][0] == 1, 30, what="waiter")
    time.sleep(0.05)
    t = _prims.now_ns()
    r.mem.store(r.word("w"), 1)
    r.mem.futex_wake(r.word("w"))
    p.join(10)
    assert p.exitcode == 0
    assert 0 < r.v["res"][1] - t < 2_000_000_000  # woken, not the 5 s timeout


def test_clocks():
    assert _prims.clock_source() in ("tsc", "cntvct", "monotonic")
    a = _prims.now_ns()
    _prims.spin_ns(2_000_000)
    b = _prims.now_ns()
    assert b - a >= 2_000_000
    assert abs(_prims.now_ns() - time.monotonic_ns()) < 1_000_000_000  # both CLOCK_MONOTONIC
    # stats clock: a delta converts to ns within 0.5 % (bracketed by now_ns readings)
    n0a = _prims.now_ns()
    c0 = _prims.stats_clock()
    n0b = _prims.now_ns()
    time.sleep(0.1)
    n1a = _prims.now_ns()
    c1 = _prims.stats_clock()
    n1b = _prims.now_ns()
    d = _prims.stats_clock_ns(c1 - c0)
    assert (n1a - n0b) * 0.995 <= d <= (n1b - n0a) * 1.005, (d, n1a - n0b, n1b - n0a)
    assert _prims.stats_clock_ns(-5) == 0
    # a reading converts to CLOCK_MONOTONIC ns (as stored in a lock's acq_ns)
    na = _prims.now_ns()
    c = _prims.stats_clock()
    nb = _prims.now_ns()
    abs_ns = _prims.stats_clock_abs_ns(c)
    assert na - 100_000 <= abs_ns <= nb + 100_000


_CLOCK_SCRIPT = textwrap.dedent("""
    import mmap, sys, json
    sys.path.insert(0, {root!r})
    import numpy as np
    from ipc import _prims
    mm = mmap.mmap(-1, 4096)
    mem = _prims.Mem(mm)
    a = np.frombuffer(mm, dtype=np.int64)
    a[8 + 4] = a[8 + 7] = np.iinfo(np.int64).max
    lk = _prims.SpinLock(mem, 0, 8, 1)
    for _ in range(3):
        lk.lock()
        _prims.spin_ns(3_000_000)
        lk.unlock()
    print(json.dumps({{"src": _prims.clock_source(), "acq": int(a[8]), "hmin": int(a[15]),
                      "hmax": int(a[14]), "htot": int(a[13])}}))
""")


@pytest.mark.parametrize("clock", ["default", "monotonic"])
def test_lock_stats_clock_in_fresh_process(tmp_path, clock):
    """Hold times are right with the calibrated cycle counter and with the clock_gettime
    fallback (PTS_PRIMS_CLOCK=monotonic), in a process that calibrates at import."""
    script = tmp_path / "clk.py"
    script.write_text(_CLOCK_SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ)
    env.pop("PTS_PRIMS_CLOCK", None)
    if clock == "monotonic":
        env["PTS_PRIMS_CLOCK"] = "monotonic"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    if clock == "monotonic":
        assert out["src"] == "monotonic"
    assert out["acq"] == 3
    assert 2_900_000 <= out["hmin"] <= out["hmax"]
    assert out["htot"] >= 3 * 2_900_000 and out["hmin"] < 10_000_000_000


def test_hist_bucket_monotonic():
    prev = -1
    for v in list(range(0, 300)) + [2**k + d for k in range(9, 62) for d in (-1, 0, 1)]:
        b = _prims.hist_bucket(v)
        assert b >= prev
        prev = b
    assert _prims.hist_bucket(2**63 - 1) < _prims.HIST_BUCKETS
    assert _prims.HIST_WORDS % 8 == 0 and _prims.HIST_WORDS >= _prims.HIST_HDR + _prims.HIST_BUCKETS


def test_rcu_reader_word_protocol():
    _, mem = _mem()
    mem.store(0, _prims.GP_COUNT)  # gp_ctr, phase 0
    rd = _prims.RcuReader(mem, 0, 8)
    rd.lock()
    assert mem.load(8) == _prims.GP_COUNT
    rd.lock()
    assert rd.nesting() == 2
    rd.unlock()
    rd.unlock()
    assert mem.load(8) & (_prims.GP_CTR_PHASE - 1) == 0
    mem.store(0, _prims.GP_COUNT | _prims.GP_CTR_PHASE)  # a writer flipped the phase
    with rd:
        assert mem.load(8) == _prims.GP_COUNT | _prims.GP_CTR_PHASE
        # a writer waiting for the old phase does not see this reader; one in the new phase would
        assert _prims.rcu_wait_readers(mem, 0, 8, 1, 0) == -1
        mem.store(0, _prims.GP_COUNT)
        assert _prims.rcu_wait_readers(mem, 0, 8, 1, 1_000_000) == 0  # times out, names slot 0
        mem.store(2, -1 & 0xFFFFFFFF)  # a writer announced that it sleeps
    assert mem.load(2) & 0xFFFFFFFF == 0, "the last unlock must clear gp_futex (and wake the writer)"
    with pytest.raises(IndexError):
        _prims.rcu_wait_readers(mem, 0, 8, 10_000, 0)


# -- ipc.proc ---------------------------------------------------------------------------------------
def _sleep_then_exit():
    sigterm_to_exit()
    time.sleep(60)


def _catches(pid: int, sig: int) -> bool:
    """``pid`` has a handler installed for ``sig`` (/proc/PID/status SigCgt): an event, not a fixed sleep
    (0.2 s was not always enough on a loaded machine: the SIGTERM came before the handler)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            cgt = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(cgt >> (sig - 1) & 1)


def test_proc_helpers(ctx, procs):
    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-1)
    p = ctx.Process(target=_sleep_then_exit)
    procs.append(p)
    p.start()
    wait_until(lambda: _catches(p.pid, signal.SIGTERM), 30, what="the child's SIGTERM handler")
    os.kill(p.pid, signal.SIGTERM)
    p.join(10)
    assert p.exitcode == 128 + signal.SIGTERM  # SystemExit(143) from the handler
    assert not pid_alive(p.pid)
    q = ctx.Process(target=time.sleep, args=(60,))
    procs.append(q)
    q.start()
    t = time.monotonic()
    assert reap([q], timeout=0.2) == [-signal.SIGTERM]
    assert time.monotonic() - t < 5


def test_process_identity(ctx, procs):
    """pid + start time (/proc/<pid>/stat field 22) name one process: what the locks record (C) and
    what ipc.proc reads (Python) agree; a dead process or a reused pid is not alive."""
    me = os.getpid()
    start = proc_starttime(me)
    assert start and start > 0
    assert _prims.self_identity() == (me, start)
    assert identity_alive(me, start) and identity_alive(me, 0)  # 0: not recorded, the pid decides
    assert not identity_alive(me, start + 1), "another start time = the pid was reused"
    p = ctx.Process(target=time.sleep, args=(60,))
    procs.append(p)
    p.start()
    wait_until(lambda: pid_alive(p.pid), 10, what="child")
    pstart = proc_starttime(p.pid)
    assert pstart >= start and identity_alive(p.pid, pstart)
    p.kill()
    p.join(10)
    assert not identity_alive(p.pid, pstart) and proc_starttime(p.pid) is None


# -- the primitives benchmark ------------------------------------------------------------------------
def test_bench_primitives_smoke(tmp_path):
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, "-m", "bench.primitives", "--iters", "2000", "--reps", "3",
                          "--contended-ms", "30", "--json", str(out)],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=240)
    assert res.returncode == 0, res.stderr
    assert "floor" in res.stdout and "spin_lock_unlock" in res.stdout
    assert "Warning" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    d = json.loads(out.read_text())
    f = d["floor_ns"]
    assert f > 0
    for name in ("rcu_read_lock_unlock", "spin_lock_unlock", "spin_lock_unlock_nostats",
                 "mutex_lock_unlock", "fetch_add", "mp_lock_acquire_release"):
        op = d["ops"][name]
        assert op["ns"] > 0 and op["ratio"] == pytest.approx(op["ns"] / f, rel=0.01, abs=0.002)
    assert d["spin_vs_mp_lock"] == pytest.approx(
        d["ops"]["spin_lock_unlock"]["ns"] / d["ops"]["mp_lock_acquire_release"]["ns"], rel=0.01)
    c = d["contended"]
    assert c["procs"] == 2 and c["spin_ops_per_s"] > 0 and c["mp_lock_ops_per_s"] > 0
    assert c["spin_acquisitions"] >= 3 * 256  # >= one batch per round; the counter is checked exact
    assert not any(n.startswith("pts_bench") for n in shm_segments())
