"""Primitive floors and ratios: what one compiled primitive costs when called from Python.

    python -m bench.primitives [--json PATH] [--iters N] [--reps R]

Every figure is the cost of one iteration of the same Python loop shape,

    for _ in range(n):
        a(); b()

with ``a``/``b`` bound methods looked up before the loop. The floor is that loop around a no-op C
method pair (``mem.nop(); mem.nop()``), so a ratio of 1.0 means "as cheap as calling C at all".
Pairs: lock+unlock, read_lock+read_unlock, acquire+release, two ``fetch_add`` calls.

All operations are measured in the same run, interleaved (one repetition of every operation, then the
next repetition) so that machine noise hits them alike; each figure is the median of ``--reps``
repetitions of ``--iters`` iterations. Contended figures: two processes (forkserver) increment a shared
counter (load + store, not atomic) under a SpinLock, then under a ``multiprocessing.Lock``, both for
``--contended-ms``; total ops/s and ns per op (wall time / total ops), median of 3 rounds; the counter
is checked to be exact (== the ops the workers report).

JSON: ``{"floor_ns", "ops": {name: {"ns", "ratio"}}, "spin_vs_mp_lock", "contended": {...},
"goals": {...}, ...}`` where ``spin_vs_mp_lock`` = uncontended spin pair (stats on) ns / mp.Lock pair ns.
``spin_with`` / ``mp_lock_with`` time the ``with lock: pass`` shape (``spin_vs_mp_lock_with``): a
``multiprocessing.Lock``'s ``acquire``/``release`` are C methods of its semaphore (a pair costs about
the floor), its ``__enter__``/``__exit__`` are Python functions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from ipc import _prims
from ipc.locks import LOCK_WORDS, STAT_WORDS, init_lockstat, merge_lockstat, new_lock
from ipc.proc import forkserver_context, reap
from ipc.rcu import RcuDomain
from ipc.shm import Layout, Region

NLOCKS = 5  # 0 spin+stats, 1 spin, 2 mutex+stats, 3 mutex, 4 contended spin
NPROCS = 3  # this process + 2 contending workers
CTL_COUNTER, CTL_GO, CTL_READY, CTL_STOP, CTL_T0, CTL_T1 = 0, 1, 2, 3, 4, 6  # lines of "ctl"
# CTL_T0 / CTL_T1 + i: worker i's start and end ns; word 1 of those lines: its ops
GOALS = {  # ratio to the floor pair (lower is better)
    "rcu_read_lock_unlock": 2.0,
    "spin_lock_unlock": 2.0,
    "fetch_add": 2.0,
}
SPIN_VS_MP_GOAL = 0.5


def layout() -> Layout:
    return Layout("prims", [
        ("locks", "i8", (NLOCKS, LOCK_WORDS)),
        ("lockstat", "i8", (NPROCS, NLOCKS, STAT_WORDS)),
        ("ctl", "i8", (8, 8)),  # one cache line per control word
        ("fa", "i8", (8,)),
        *RcuDomain.fields("rcu", NPROCS),
    ])


# -- the loop shapes (kept identical; only the callees differ) ---------------------------------------
def _pair(a, b, n: int) -> int:
    t = time.perf_counter_ns()
    for _ in range(n):
        a()
        b()
    return time.perf_counter_ns() - t


def floor_ns(iters: int = 200_000, reps: int = 5) -> float:
    """The floor: ns per pass of the pair loop around a no-op C-extension call (median of reps)."""
    import mmap
    import statistics

    mem = _prims.Mem(mmap.mmap(-1, 4096))
    return statistics.median(_pair(mem.nop, mem.nop, iters) / iters for _ in range(reps))


def _with(cm, n: int) -> int:
    t = time.perf_counter_ns()
    for _ in range(n):
        with cm:
            pass
    return time.perf_counter_ns() - t


def _pair_args(a, b, n: int, x, y) -> int:
    t = time.perf_counter_ns()
    for _ in range(n):
        a(x, y)
        b(x, y)
    return time.perf_counter_ns() - t


def _uncontended(region: Region, iters: int, reps: int, ctx) -> dict[str, float]:
    mem = region.mem
    w = region.word
    spin_st = new_lock("spin", mem, w("locks", 0), w("lockstat", 0, 0), tag=1)
    spin = new_lock("spin", mem, w("locks", 1), -1, tag=1)
    mtx_st = new_lock("mutex", mem, w("locks", 2), w("lockstat", 0, 2), tag=1)
    mtx = new_lock("mutex", mem, w("locks", 3), -1, tag=1)
    dom = RcuDomain(region, "rcu", 0, tag=1)
    dom.register()
    mpl = ctx.Lock()
    fa_w = w("fa")
    cases = {
        "floor": lambda n: _pair(mem.nop, mem.nop, n),
        "rcu_read_lock_unlock": lambda n: _pair(dom.read_lock, dom.read_unlock, n),
        "spin_lock_unlock": lambda n: _pair(spin_st.lock, spin_st.unlock, n),
        "spin_lock_unlock_nostats": lambda n: _pair(spin.lock, spin.unlock, n),
        "mutex_lock_unlock": lambda n: _pair(mtx_st.lock, mtx_st.unlock, n),
        "mutex_lock_unlock_nostats": lambda n: _pair(mtx.lock, mtx.unlock, n),
        "fetch_add": lambda n: _pair_args(mem.fetch_add, mem.fetch_add, n, fa_w, 1),
        "mp_lock_acquire_release": lambda n: _pair(mpl.acquire, mpl.release, n),
        "now_ns_pair": lambda n: _pair(_prims.now_ns, _prims.now_ns, n),
        # the `with lock:` shape code uses: SpinLock's __enter__/__exit__ are C methods,
        # multiprocessing.Lock's are Python functions wrapping the C semaphore
        "spin_with": lambda n: _with(spin_st, n),
        "mp_lock_with": lambda n: _with(mpl, n),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm up
        f(min(iters, 10_000))
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, f in cases.items():
                samples[name].append(f(iters) / iters)
    finally:
        if gc_was:
            gc.enable()
        dom.unregister()
    return {k: statistics.median(v) for k, v in samples.items()}


# -- contended: 2 processes ---------------------------------------------------------------------------
def _worker(run_id: str, me: int, kind: str, mp_lock) -> None:
    region = Region.attach(run_id, layout())
    try:
        mem, w = region.mem, region.word
        if kind == "spin":
            lk = new_lock("spin", mem, w("locks", 4), w("lockstat", me + 1, 4), tag=me + 2)
            a, b = lk.lock, lk.unlock
        else:
            a, b = mp_lock.acquire, mp_lock.release
        ld, st, c = mem.load, mem.store, w("ctl", CTL_COUNTER)
        mem.fetch_add(w("ctl", CTL_READY), 1)
        go, stop = w("ctl", CTL_GO), w("ctl", CTL_STOP)
        while not ld(go):
            _prims.cpu_relax()
        t0 = _prims.now_ns()
        ops = 0
        while not ld(stop):
            for _ in range(256):
                a()
                st(c, ld(c) + 1)
                b()
            ops += 256
        t1 = _prims.now_ns()
        mem.store(w("ctl", CTL_T0 + me), t0)
        mem.store(w("ctl", CTL_T1 + me), t1)
        mem.store(w("ctl", CTL_T0 + me) + 1, ops)
    finally:
        region.close()


def _contended_round(region: Region, ctx, run_id: str, kind: str, ms: int, mp_lock) -> float:
    """ns per op (wall / total ops) of 2 processes doing lock-protected increments for ``ms``."""
    v = region.v["ctl"]
    v[:] = 0
    procs = [ctx.Process(target=_worker, args=(run_id, i, kind, mp_lock), daemon=True) for i in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        while region.mem.load(region.word("ctl", CTL_READY)) < 2:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError("contended benchmark: workers did not start")
            time.sleep(0.001)
        region.mem.store(region.word("ctl", CTL_GO), 1)
        time.sleep(ms / 1000)
        region.mem.store(region.word("ctl", CTL_STOP), 1)
        for p in procs:
            p.join(120)
    finally:
        codes = reap(procs, timeout=1.0)
    if codes != [0, 0]:
        raise RuntimeError(f"contended benchmark: worker exit codes {codes}")
    total = int(v[CTL_COUNTER, 0])
    ops = int(v[CTL_T0, 1] + v[CTL_T0 + 1, 1])
    if total != ops:
        raise RuntimeError(f"contended benchmark: counter {total} != {ops} ops (lock does not lock?)")
    wall = int(max(v[CTL_T1, 0], v[CTL_T1 + 1, 0]) - min(v[CTL_T0, 0], v[CTL_T0 + 1, 0]))
    return wall / max(ops, 1)


def _contended(region: Region, ctx, run_id: str, ms: int, rounds: int = 3) -> dict:
    mpl = ctx.Lock()
    spin = statistics.median(_contended_round(region, ctx, run_id, "spin", ms, None) for _ in range(rounds))
    mp_ns = statistics.median(_contended_round(region, ctx, run_id, "mp", ms, mpl) for _ in range(rounds))
    ls = merge_lockstat(region.v["lockstat"][1:, 4:5, :], ["spin"]).get("spin", {})
    return {
        "procs": 2,
        "ms": ms,
        "spin_ns_per_op": spin,
        "mp_lock_ns_per_op": mp_ns,
        "spin_ops_per_s": 1e9 / spin,
        "mp_lock_ops_per_s": 1e9 / mp_ns,
        "spin_vs_mp_lock": spin / mp_ns,  # < 1: spin faster
        "spin_contentions": ls.get("contentions", 0),
        "spin_acquisitions": ls.get("acquisitions", 0),
    }


# -- driver -------------------------------------------------------------------------------------------
def run(iters: int, reps: int, contended_ms: int = 300) -> dict:
    run_id = f"bench{os.getpid():x}"
    ctx = forkserver_context(["numpy", "ipc.shm", "ipc.locks", "ipc.rcu"])
    region = Region.create(run_id, layout())
    try:
        init_lockstat(region.v["lockstat"])
        RcuDomain.init(region, "rcu")
        ns = _uncontended(region, iters, reps, ctx)
        cont = _contended(region, ctx, run_id, contended_ms)
    finally:
        region.close()
    floor = ns.pop("floor")
    ops = {k: {"ns": round(v, 2), "ratio": round(v / floor, 3)} for k, v in ns.items()}
    spin_vs_mp = ns["spin_lock_unlock"] / ns["mp_lock_acquire_release"]
    spin_vs_mp_with = ns["spin_with"] / ns["mp_lock_with"]
    goals = {f"{k}<={g}x_floor": ops[k]["ratio"] <= g for k, g in GOALS.items()}
    goals[f"spin_vs_mp_lock<={SPIN_VS_MP_GOAL}"] = spin_vs_mp <= SPIN_VS_MP_GOAL
    return {
        "floor_ns": round(floor, 2),
        "ops": ops,
        "spin_vs_mp_lock": round(spin_vs_mp, 3),
        "spin_vs_mp_lock_with": round(spin_vs_mp_with, 3),
        "contended": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in cont.items()},
        "goals": goals,
        "iters": iters,
        "reps": reps,
        "clock_source": _prims.clock_source() if hasattr(_prims, "clock_source") else "monotonic",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def table(res: dict) -> str:
    lines = [f"floor (mem.nop pair): {res['floor_ns']:.1f} ns   clock: {res['clock_source']}   "
             f"({res['reps']} reps x {res['iters']} iters, median)",
             f"{'operation (pair)':32s} {'ns':>9s} {'x floor':>9s}"]
    for k, v in res["ops"].items():
        goal = GOALS.get(k)
        mark = "" if goal is None else ("  ok" if v["ratio"] <= goal else f"  > goal {goal}x")
        lines.append(f"{k:32s} {v['ns']:9.1f} {v['ratio']:9.2f}{mark}")
    lines.append(f"spin pair / mp.Lock pair (uncontended): {res['spin_vs_mp_lock']:.2f} "
                 f"(goal <= {SPIN_VS_MP_GOAL}); `with` shape: {res['spin_vs_mp_lock_with']:.2f}")
    c = res["contended"]
    lines.append(f"contended, 2 procs x {c['ms']} ms: spin {c['spin_ops_per_s'] / 1e6:.2f} "
                 f"Mops/s ({c['spin_ns_per_op']:.0f} ns/op, {c['spin_contentions']} contentions in "
                 f"{c['spin_acquisitions']} acquisitions), "
                 f"mp.Lock {c['mp_lock_ops_per_s'] / 1e6:.2f} Mops/s ({c['mp_lock_ns_per_op']:.0f} ns/op); "
                 f"spin/mp.Lock = {c['spin_vs_mp_lock']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.primitives", description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON here ('-' = stdout)")
    ap.add_argument("--iters", type=int, default=200_000, help="loop iterations per repetition")
    ap.add_argument("--reps", type=int, default=9, help="repetitions (the median is reported)")
    ap.add_argument("--contended-ms", type=int, default=300,
                    help="duration of one contended round (3 rounds per lock kind)")
    a = ap.parse_args(argv)
    if a.iters < 1 or a.reps < 1 or a.contended_ms < 1:
        ap.error("--iters, --reps and --contended-ms must be >= 1")
    res = run(a.iters, a.reps, a.contended_ms)
    if a.json == "-":
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
                f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
