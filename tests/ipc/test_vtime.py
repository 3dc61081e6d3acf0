"""ipc.vtime: one process runs at a time, in the order of their virtual clocks; waits, kicks and
prices advance the clocks as documented; deadlocks are found; runs are deterministic."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest
from conftest import launch_in_process

from ipc import _prims, vtime
from ipc.locks import LOCK_WORDS, init_lockstat, new_lock
from ipc.shm import Layout, Region
from tests.conftest import ROOT

DATA = Layout("vtdata", [("w", "i8", (64,)), ("log", "i8", (512, 2)), ("locks", "i8", (2, LOCK_WORDS)),
                         ("stats", "i8", (2, 16))])
PRICES = dict(vtime.PRICES)


def _run(run_id: str, n: int, body, seed: int = 1, prices=None, timeout: float = 30.0, log: list | None = None):
    """Fork ``n`` processes on one virtual clock each; process i runs ``body(i, vc, data)`` between
    join and done; returns each one's dict (or {"error": ..., "kind": exception class name}); the
    shared log's entries are appended to ``log``."""
    turn = vtime.create(run_id, n, seed)
    data = Region.create(run_id, DATA)
    data.v["w"][:] = 0
    data.v["log"][:] = 0
    data.v["locks"][:] = 0
    init_lockstat(data.v["stats"])
    pids, fds = [], []
    try:
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover (child)
                os.close(r)
                out: dict = {}
                try:
                    vc = vtime.install(Region.attach(run_id, vtime.layout(n)), i, prices or PRICES)
                    d = Region.attach(run_id, DATA)
                    vc.join()
                    out = body(i, vc, d) or {}
                    vc.done()
                except BaseException as e:  # noqa: BLE001
                    out = {"error": str(e), "kind": type(e).__name__}
                os.write(w, json.dumps(out).encode())
                os._exit(0)
            os.close(w)
            pids.append(pid)
            fds.append(r)
        res = []
        for fd in fds:
            buf = b""
            while True:
                ready, _, _ = select.select([fd], [], [], timeout)
                assert ready, "a virtual-time process hung"
                b = os.read(fd, 65536)
                if not b:
                    break
                buf += b
            res.append(json.loads(buf or b"{}"))
        if log is not None:
            log += data.v["log"][: int(data.v["w"][0])].tolist()
        return res
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
        turn.close()
        data.close()


def _log_body(i: int, vc, d) -> dict:
    """Each process sleeps its own period, or (odd rounds) does priced work between plain scheduling
    points, and appends (clock, process) to a shared log."""
    period = (700, 1100, 1300)[i]
    for k in range(20):
        if k % 2:
            for _ in range(40):
                d.mem.load(32 + i)  # priced, no hand-off
                vc.hit("work")  # a scheduling point: hands over once another clock is lower
        else:
            vc.guest(period)
        n = d.mem.fetch_add(0, 1)
        d.mem.store(d.word("log", n), vc.now())
        d.mem.store(d.word("log", n) + 1, i)
    return {"clock": vc.now()}


def test_processes_run_in_the_order_of_their_clocks_and_the_same_way_twice(run_id):
    logs: list[list] = [[], []]
    for k in range(2):
        res = _run(run_id, 3, _log_body, log=logs[k])
        assert all("error" not in r for r in res), res
    log = logs[0]
    assert logs[0] == logs[1], "two runs of one seed interleaved differently"
    assert len(log) == 60
    clocks = [c for c, _ in log]
    assert clocks == sorted(clocks), f"the shared log is not in virtual-time order: {clocks[:12]}"
    assert [p for _, p in log[:3]] != [0, 0, 0] and {p for _, p in log} == {0, 1, 2}


def _lock_body(i: int, vc, d) -> dict:
    lk = new_lock("spin", d.mem, d.word("locks", 0), d.word("stats", i), tag=i + 1, name="L")
    if i == 0:
        lk.lock()
        vc.guest(10_000)  # holds L for 10 µs of its time
        t = vc.now()
        lk.unlock()
        return {"release": t}
    vc.guest(1_000)
    t0 = vc.now()
    lk.lock()
    t1 = vc.now()
    lk.unlock()
    return {"t0": t0, "t1": t1}


def test_a_lock_waiter_gets_the_lock_at_the_release_plus_the_hand_off(run_id):
    res = _run(run_id, 2, _lock_body)
    assert "error" not in res[0] and "error" not in res[1], res
    rel, t0, t1 = res[0]["release"], res[1]["t0"], res[1]["t1"]
    assert t0 < rel, "the waiter came after the release: nothing was contended"
    # the unlock pays its price and a transfer (the waiter's failed try took the line); the waiter
    # resumes wake_spin after the release and pays its retry: the lock's price and the line again
    c, line = PRICES["call"], PRICES["line"]
    release = rel + PRICES["unlock"] + c + line
    assert t1 == release + PRICES["wake_spin"] + PRICES["lock"] + c + line, (rel, t0, t1)
    assert _run(run_id, 2, _lock_body) == res  # deterministic


def _abba(i: int, vc, d) -> dict:
    a = new_lock("mutex", d.mem, d.word("locks", 0), -1, tag=i + 1, name="A")
    b = new_lock("mutex", d.mem, d.word("locks", 1), -1, tag=i + 1, name="B")
    first, second = (a, b) if i == 0 else (b, a)
    first.lock()
    vc.guest(1_000)
    second.lock()
    return {}


def test_an_abba_deadlock_is_found_and_every_process_leaves(run_id):
    res = _run(run_id, 2, _abba)
    kinds = sorted(r.get("kind", "") for r in res)
    assert kinds == ["VirtualDeadlock", "VirtualTimeAborted"], res
    assert any("deadlock" in r["error"] for r in res)


def _kick_body(i: int, vc, d) -> dict:
    if i == 0:
        vc.l2_time(1_000_000)  # a long L2 run (kickable, unlike a modelled delay)
        return {"woke": vc.now()}
    vc.guest(5_000)
    t = vc.now()
    vc.kick(0)
    return {"kick": t}


def test_a_kick_ends_guest_time_at_its_arrival(run_id):
    res = _run(run_id, 2, _kick_body)
    assert res[0]["woke"] == res[1]["kick"] + PRICES["ipi"], res


def _line_body(i: int, vc, d) -> dict:
    if i == 0:
        d.mem.store(8, 1)  # word 8: line 1 of the segment, last written by process 0
        vc.guest(10_000)
        return {}
    vc.guest(1_000)
    t0 = _prims.vt_now()
    d.mem.load(8)
    t1 = _prims.vt_now()
    d.mem.load(9)  # the same line: its copy is here now
    t2 = _prims.vt_now()
    d.mem.store(16, 1)  # a line nobody wrote: no transfer
    t3 = _prims.vt_now()
    return {"first": t1 - t0, "again": t2 - t1, "fresh": t3 - t2}


def test_a_line_another_process_wrote_costs_one_transfer(run_id):
    res = _run(run_id, 2, _line_body)[1]
    call = PRICES["call"]
    assert res == {"first": PRICES["load"] + call + PRICES["line"], "again": PRICES["load"] + call,
                   "fresh": PRICES["store"] + call}, res


def test_prices_from_a_toml_file_and_their_errors(tmp_path):
    good = tmp_path / "p.toml"
    good.write_text("[prices]\nline = 40\nwake_sleep = 5000\n")
    assert vtime.load_prices(str(good)) == {"line": 40, "wake_sleep": 5000}
    for text, what in (("[prices]\nbogus = 1\n", "unknown price 'bogus'"), ("[prices]\nline = -1\n", "line must be"),
                       ("[prices\n", "prices file")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=what):
            vtime.load_prices(str(bad))


@pytest.mark.parametrize("args, what", [
    (["--dilate", "2"], "--dilate"),
    (["--inject", "stall-vcpu:0:10"], "--inject"),
    (["--prices", "/nonexistent/p.toml"], "--prices"),
])
def test_virtual_clock_cli_errors_are_one_line_and_exit_2(args, what):
    p = launch_in_process("run", "--clock", "virtual", "--duration", "0.002", *args)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and what in lines[0], p.stderr


WALL_FIELDS = ("run_id", "launch_s", "wall_s", "versions", "channel")


def _normalized(path) -> dict:
    d = json.loads(path.read_text())
    for k in WALL_FIELDS:
        d.pop(k, None)
    d.get("design", {}).pop("invariant_check", None)  # the coordinator's wall-clock sampling
    return d


@pytest.mark.timeout(240)
def test_a_virtual_run_gives_the_same_results_idle_and_under_a_cpu_hog(tmp_path):
    """The determinism promise: same config and seed, byte-identical results (wall-clock fields aside),
    with the machine idle and with every CPU busy."""
    cmd = [sys.executable, "launch.py", "run", "--clock", "virtual", "--design", "rcu-list", "--vcpus", "3",
           "--switch-rate", "0.5", "--duration", "0.004", "--quiet", "--json"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    p = subprocess.run([*cmd, str(a)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        p = subprocess.run([*cmd, str(b)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert p.returncode == 0, p.stderr[-2000:]
    da, db = _normalized(a), _normalized(b)
    assert da["config"]["clock"] == "virtual" and da["vtime"]["handoffs"] > 0
    assert da["ops"]["nested_vmrun"]["count"] > 0
    assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)


@pytest.mark.timeout(180)
def test_at_one_vcpu_each_paths_virtual_cost_is_the_c_estimate_of_its_primitives():
    """One price table: the virtual ns a path advances the clock by equals what lab/dilation.py's
    C estimate (``--dilate auto``) charges for the primitives it counts on the same path."""
    code = ("import json; from bench import vtime as b; "
            "print(json.dumps(b.paths_1vcpu()))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-2000:]
    paths = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(paths) == {"vmrun_get_put", "vmrun_switch", "track_write", "register_unregister"}
    for name, r in paths.items():
        assert r["virtual_ns"] > 0 and abs(r["virtual_ns"] - r["c_prims_ns"]) < 1e-6, (name, r)


def _spinner(i: int, vc, d) -> dict:
    if i == 0:
        vc.guest(1_000)
        while not d.mem.load(40):  # waits for a word nobody will ever write
            _prims.sched_yield()
    return {}


def test_a_spin_wait_nobody_can_end_is_a_deadlock_not_a_hang(run_id):
    res = _run(run_id, 2, _spinner)
    assert res[0].get("kind") == "VirtualDeadlock" and "spins" in res[0]["error"], res


@pytest.mark.timeout(180)
def test_the_grace_period_price_slows_rcu_lists_switching_and_spares_tlb_flushes(tmp_path):
    """``grace_period`` is the kernel's RCU grace-period length: rcu-list's synchronize_rcu on a
    table's first / last user pays it; mutex-hash (no RCU grace period, only TLB-flush waits on
    guest_mode, which are IPIs, not grace periods) does not."""
    prices = tmp_path / "p.toml"
    prices.write_text("[prices]\ngrace_period = 1000000\n")

    def rate(design: str, *extra: str) -> float:
        out = tmp_path / f"{design}{len(extra)}.json"
        p = launch_in_process("run", "--clock", "virtual", "--design", design, "--workload", "realistic", "--switch-rate", "0.5", "--vcpus", "2", "--duration", "0.01", "--fuzz", "off", "--quiet", "--json", str(out), *extra)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(out.read_text())["ops"]["nested_vmrun"]["per_s"]

    assert rate("rcu-list", "--prices", str(prices)) < 0.5 * rate("rcu-list")
    assert rate("mutex-hash", "--prices", str(prices)) == rate("mutex-hash")
