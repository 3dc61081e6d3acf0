"""rcutorture- and locktorture-style stress tests of the shared-memory primitives.

``python launch.py torture {rcu,srcu,spinlock,mutex} --procs N --duration S [--inject ...]``

Every participant is a real OS process (forkserver workers); everything they share lives in one
segment ``pts_<run>_torture`` that this (coordinating) process creates and unlinks.

rcu / srcu (after kernel/rcu/rcutorture.c)
    A pool of ``NPOOL`` elements (pipe_count, mb = 1 while allocated / 0 once freed, generation,
    state). One writer process allocates a free element, publishes it as current (one atomic
    exchange of ``gen << 16 | index``) and retires the old one; a retired element's pipe_count
    advances once per grace period (after ``synchronize``, or from a ``call_rcu`` callback), and at
    ``PIPE_LEN`` (10) the element is freed (poisoned: mb = 0) and may be reused. Like
    rcutorture's writer it mixes the ways of waiting: synchronize, call_rcu callbacks, and (when
    the domain has the polled API) get_state + cond_synchronize / poll_state. ``--procs``
    reader processes loop: read_lock, load current, read its pipe_count, sometimes hold it (spin a
    few us, rarely a long hold; SRCU readers sleep for the long hold), re-read the pipe_count,
    check mb and generation (a freed or reused element = use-after-free), read_unlock; they bump a
    per-reader "Reader Pipe" histogram at min(pipe_count, 10) and a "Reader Batch" histogram of
    the grace periods completed during the read. ``NFAKEWRITERS`` fake writers call synchronize at
    random times (grace-period sharing). FAILURE: any Reader Pipe count at index >= 2, any read of
    a freed/reused element, a worker that died, or no progress.

spinlock / mutex (after kernel/locking/locktorture.c)
    ``--procs`` writer processes take the lock, check-and-set a held flag (already set:
    n_lock_fail++), increment a shared counter non-atomically (lost updates = a second witness of
    broken mutual exclusion), hold a short delay (1 in 2000 a long one, to force contention),
    clear the flag and unlock. ``Writes:  Total: N  Max/Min: a/b  Fail: f`` (``???`` = unfair,
    max/2 > min; ``!!!`` = failures). FAILURE: n_lock_fail > 0, lost updates, a dead worker.

``--inject broken-gp`` makes synchronize return without waiting, ``--inject busted-lock`` uses a
lock that does not lock: both must end in FAILURE (the harness' self-test).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections import deque
from typing import Any, TextIO

import numpy as np

from ipc import _prims
from ipc import hist as _hist
from ipc.errors import UsageError
from ipc.locks import LOCK_WORDS, STAT_WORDS, init_lockstat, merge_lockstat, new_lock
from ipc.proc import die_with_parent, forkserver_context, reap, sigterm_to_exit
from ipc.rcu import RcuDomain, SrcuDomain
from ipc.shm import Layout, Region, ShmError

KINDS = ("rcu", "srcu", "spinlock", "mutex")
RCU_KINDS = ("rcu", "srcu")
LOCK_KINDS = {"spinlock": "spin", "mutex": "mutex"}
INJECTS = {"broken-gp": RCU_KINDS, "busted-lock": tuple(LOCK_KINDS)}
MAX_PROCS = 256
SCHEMA = 1

PIPE_LEN = 10  # RCU_TORTURE_PIPE_LEN
PIPE_SLOTS = PIPE_LEN + 1
ROW = 16  # words per histogram row (two cache lines)
NPOOL = 32
NFAKEWRITERS = 2

# pool element words
EL_PIPE, EL_MB, EL_GEN, EL_STATE = 0, 1, 2, 3
EL_WORDS = 8
ST_FREE, ST_CURRENT, ST_RETIRED = 0, 1, 2
IDX_BITS = 16
IDX_MASK = (1 << IDX_BITS) - 1

# control block words
CTL_GO, CTL_STOP, CTL_READY, CTL_START = 0, 1, 2, 3

# reader stat row
R_READS, R_POISON, R_REUSE, R_LONG = 0, 1, 2, 3
# writer / fake-writer stat row
W_VERSIONS, W_ALLOCS, W_ALLOC_FAIL, W_FREES, W_GPS, W_SHARED, W_STALLS, W_ASYNC, W_COND, W_POLL = range(10)
W_WORDS = 16
# how the writer waits for the grace period of a retired element (rcutorture's gp_sync, gp_async,
# gp_cond, gp_poll); cond/poll need the polled-GP API (get_state/poll_state/cond_synchronize)
MODE_SYNC, MODE_ASYNC, MODE_COND, MODE_POLL = 0, 1, 2, 3
# lock writer stat row
L_ACQ, L_FAIL, L_LONG = 0, 1, 2
# critical-section words of the lock torture
CS_HELD, CS_COUNTER = 0, 1

WRITER_TAG = 100_000  # rcu writer tags (readers use 1..nreaders)
DELAY_TABLE = 8192  # per-process precomputed (seeded) delay pattern, cycled
STALL_NS = 1_000_000_000
FLUSH_NS = 2_000_000  # writers publish their counters at least this often
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOCK_LONG_HOLD_NS = 100_000
LOCK_SHORT_HOLD_NS = 2_000

_run_counter = itertools.count(1)


# ------------------------------------------------------------------------------------ config

def _check_params(kind: str, procs: int, duration: float, seed: int, inject: str | None,
                  stat_interval: float, json_path: str | None, nfakewriters: int) -> None:
    if kind not in KINDS:
        raise UsageError(f"torture: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if isinstance(procs, bool) or not isinstance(procs, int) or not 1 <= procs <= MAX_PROCS:
        raise UsageError(f"torture: --procs must be in 1..{MAX_PROCS}, got {procs!r}")
    if not isinstance(duration, int | float) or not duration > 0 or duration != duration:
        raise UsageError(f"torture: --duration must be > 0 seconds, got {duration!r}")
    if not isinstance(stat_interval, int | float) or not stat_interval > 0:
        raise UsageError(f"torture: --stat-interval must be > 0 seconds, got {stat_interval!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UsageError(f"torture: --seed must be in 0..2**63-1, got {seed!r}")
    if not isinstance(nfakewriters, int) or not 0 <= nfakewriters <= 64:
        raise UsageError(f"torture: nfakewriters must be in 0..64, got {nfakewriters!r}")
    if inject is not None:
        if inject not in INJECTS:
            raise UsageError(f"torture: unknown --inject {inject!r} (choose from {', '.join(INJECTS)})")
        if kind not in INJECTS[inject]:
            raise UsageError(f"torture: --inject {inject} applies to {'/'.join(INJECTS[inject])}, "
                             f"not {kind}")
        if inject == "busted-lock" and procs < 2:
            raise UsageError("torture: --inject busted-lock needs --procs >= 2 "
                             "(a single writer cannot overlap itself)")
    if json_path is not None:
        if os.path.isdir(json_path):
            raise UsageError(f"torture: --json {json_path}: is a directory")
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent):
            raise UsageError(f"torture: --json {json_path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"torture: --json {json_path}: directory {parent} is not writable")


def _domain_cls(kind: str):
    return SrcuDomain if kind == "srcu" else RcuDomain


def _layout(cfg: dict) -> Layout:
    kind = cfg["kind"]
    if kind in RCU_KINDS:
        nr, nw = cfg["nreaders"], 1 + cfg["nfakewriters"]
        return Layout("torture", [
            ("ctl", "i8", (8,)),
            *_domain_cls(kind).fields(kind, nr),
            ("cur", "i8", (8,)),
            ("pool", "i8", (NPOOL, EL_WORDS)),
            ("rstat", "i8", (nr, 8)),
            ("rpipe", "i8", (nr, ROW)),
            ("rbatch", "i8", (nr, ROW)),
            ("wstat", "i8", (nw, W_WORDS)),
            ("wcount", "i8", (ROW,)),
            ("gphist", "i8", (nw, _hist.HIST_WORDS)),
            ("lockstat", "i8", (nw, 1, STAT_WORDS)),
        ])
    nw = cfg["nwriters"]
    return Layout("torture", [
        ("ctl", "i8", (8,)),
        ("lock", "i8", (LOCK_WORDS,)),
        ("cs", "i8", (8,)),
        ("wstat", "i8", (nw, 8)),
        ("lockstat", "i8", (nw, 1, STAT_WORDS)),
    ])


def _init_region(region: Region, cfg: dict) -> None:
    v = region.v
    for name in v:
        v[name][...] = 0
    if cfg["kind"] in RCU_KINDS:
        _domain_cls(cfg["kind"]).init(region, cfg["kind"])
        _hist.init(v["gphist"])
        init_lockstat(v["lockstat"])
        # element 0 is the initial current element, generation 1
        v["pool"][0, EL_MB] = 1
        v["pool"][0, EL_GEN] = 1
        v["pool"][0, EL_STATE] = ST_CURRENT
        v["cur"][0] = (1 << IDX_BITS) | 0
    else:
        init_lockstat(v["lockstat"])


def _rng(seed: int, role: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, role, index])


def _reader_delays(seed: int, r: int) -> list[int]:
    """ns to hold the element (0: none; < 0: a long hold, sleeping for SRCU)."""
    rng = _rng(seed, 1, r)
    u = rng.random(DELAY_TABLE)
    d = np.zeros(DELAY_TABLE, dtype=np.int64)
    m = u < 0.25
    d[m] = rng.integers(1_000, 5_000, int(m.sum()))
    m = u < 0.01
    d[m] = rng.integers(20_000, 100_000, int(m.sum()))
    m = u < 0.0005
    d[m] = -rng.integers(200_000, 1_000_000, int(m.sum()))
    return d.tolist()


def _lock_delays(seed: int, w: int, nwriters: int) -> list[int]:
    rng = _rng(seed, 3, w)
    u = rng.random(DELAY_TABLE)
    d = np.zeros(DELAY_TABLE, dtype=np.int64)
    d[u < 1.0 / (4 * nwriters)] = LOCK_SHORT_HOLD_NS
    d[u < 1.0 / 2000] = LOCK_LONG_HOLD_NS
    return d.tolist()


# ------------------------------------------------------------------------------------ workers

def _worker_main(run_id: str, cfg: dict, role: str, index: int) -> None:
    """Entry point of every torture process (runs in a forkserver child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C and stops us
    sigterm_to_exit()
    die_with_parent()
    region = Region.attach(run_id, _layout(cfg))
    try:
        _ROLES[role](region, cfg, index)
    except BaseException as e:
        # drop the numpy views / C objects those frames hold: nothing may outlive the mapping
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        gc.collect()
        try:
            region.close()
        except BufferError:
            pass  # an export survived: the mapping goes with the process


def _wait_for_go(mem, ctl_w: int) -> None:
    mem.fetch_add(ctl_w + CTL_READY, 1)
    while not mem.load(ctl_w + CTL_GO):
        mem.futex_wait(ctl_w + CTL_GO, 0, 20_000_000)


def _rcu_reader(region: Region, cfg: dict, r: int) -> None:
    kind = cfg["kind"]
    dom = _domain_cls(kind)(region, kind, r, r + 1, name=kind)
    dom.register()
    mem = region.mem
    load, store = mem.load, mem.store
    rl, ru, nesting = dom.read_lock, dom.read_unlock, dom.reader.nesting
    spin = _prims.spin_ns
    sleep = time.sleep
    sleepable = kind == "srcu"
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    cur_w = region.word("cur")
    pool_w = region.word("pool")
    gp_w = dom.hdr_w + 1
    st_w, pipe_w, batch_w = region.word("rstat", r), region.word("rpipe", r), region.word("rbatch", r)
    delays = _reader_delays(cfg["seed"], r)
    mask = len(delays) - 1
    pipe = [0] * PIPE_SLOTS
    batch = [0] * PIPE_SLOTS

    def flush(reads: int, poison: int, reuse: int, longd: int) -> None:
        for i in range(PIPE_SLOTS):
            store(pipe_w + i, pipe[i])
            store(batch_w + i, batch[i])
        store(st_w + R_POISON, poison)
        store(st_w + R_REUSE, reuse)
        store(st_w + R_LONG, longd)
        store(st_w + R_READS, reads)

    _wait_for_go(mem, ctl_w)
    n = poison = reuse = longd = 0
    try:
        while True:
            if not n & 255:
                flush(n, poison, reuse, longd)
                if load(stop_w):
                    break
            d = delays[n & mask]
            rl()
            g0 = load(gp_w)
            c = load(cur_w)
            e = pool_w + (c & IDX_MASK) * EL_WORDS
            pc = load(e)
            if d:
                if d > 0:
                    spin(d)
                else:
                    longd += 1
                    if sleepable:
                        sleep(-d * 1e-9)
                    else:
                        spin(-d)
                pc = load(e)  # re-read after holding the element
            if not load(e + EL_MB):
                poison += 1  # element was freed under us
            elif load(e + EL_GEN) != c >> IDX_BITS:
                reuse += 1  # element was freed and reallocated under us
            g1 = load(gp_w)
            ru()
            pipe[pc if pc < PIPE_LEN else PIPE_LEN] += 1
            b = g1 - g0
            batch[b if b < PIPE_LEN else PIPE_LEN] += 1
            n += 1
    finally:
        while nesting():
            ru()
        flush(n, poison, reuse, longd)
        dom.unregister()


def _gp_domain(region: Region, cfg: dict, w: int, counters: list[int]):
    """The writer's / a fake writer's view of the domain (no reader slot)."""
    kind = cfg["kind"]
    mem = region.mem
    slots = region.v[f"{kind}_slots"]
    tag = f"{kind}-torture"

    def on_stall(slot: int, elapsed: int) -> None:
        counters[W_STALLS] += 1
        print(f"{tag}: writer stall: reader {slot} (pid {int(slots[slot, 2])}) in read-side critical "
              f"section for {elapsed // 1_000_000} ms", file=sys.stderr, flush=True)

    return _domain_cls(kind)(
        region, kind, None, WRITER_TAG + w, name=kind,
        gp_lock_stats_word=region.word("lockstat", w, 0),
        gp_hist=_prims.Histogram(mem, region.word("gphist", w)),
        broken=cfg["inject"] == "broken-gp", stall_ns=STALL_NS, on_stall=on_stall,
        slot_name=lambda i: f"reader {i}")


def _rcu_writer(region: Region, cfg: dict, w: int) -> None:
    mem = region.mem
    load, store, xchg = mem.load, mem.store, mem.xchg
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    cur_w = region.word("cur")
    pool_w = region.word("pool")
    st_w = region.word("wstat", w)
    wc_w = region.word("wcount")
    counters = [0] * W_WORDS
    dom = _gp_domain(region, cfg, w, counters)
    polled = all(hasattr(dom, a) for a in ("get_state", "poll_state", "cond_synchronize"))
    rng = _rng(cfg["seed"], 2, w)
    u = rng.random(DELAY_TABLE)
    modes = np.select([u < 0.2, u < 0.3, u < 0.4], [MODE_ASYNC, MODE_COND, MODE_POLL], MODE_SYNC)
    if not polled:
        modes[modes >= MODE_COND] = MODE_SYNC
    modes = modes.tolist()
    naps = rng.integers(0, 200_000, DELAY_TABLE).tolist()  # ns between get_state and cond_sync
    mask = len(modes) - 1
    free: deque[int] = deque(range(1, NPOOL))
    retired: list[int] = []  # retired by the synchronous path (advanced after each synchronize)
    wcount = [0] * PIPE_SLOTS  # Free-Block Circulation
    gen = 1

    def advance(i: int) -> bool:
        """rcu_torture_pipe_update_one: one more grace period for element i; True when freed."""
        e = pool_w + i * EL_WORDS
        p = load(e + EL_PIPE)
        if p > PIPE_LEN:
            p = PIPE_LEN
        wcount[p] += 1
        p += 1
        store(e + EL_PIPE, p)
        if p >= PIPE_LEN:
            store(e + EL_MB, 0)  # poison
            store(e + EL_STATE, ST_FREE)
            free.append(i)
            counters[W_FREES] += 1
            return True
        return False

    def cb(i: int) -> None:  # rcu_torture_cb
        if not advance(i):
            dom.call_rcu(functools.partial(cb, i))

    def flush() -> None:
        counters[W_SHARED] = dom.shared_gps
        for i, c in enumerate(counters):
            store(st_w + i, c)
        for i, c in enumerate(wcount):
            store(wc_w + i, c)

    now = _prims.now_ns
    _wait_for_go(mem, ctl_w)
    n = 0
    next_flush = now() + FLUSH_NS
    try:
        while not load(stop_w):
            if not free:  # everything is in the pipe: wait for grace periods (rtaf)
                counters[W_ALLOC_FAIL] += 1
                dom.synchronize()
                counters[W_GPS] += 1
                retired = [i for i in retired if not advance(i)]
                continue
            i = free.popleft()
            gen += 1
            e = pool_w + i * EL_WORDS
            store(e + EL_PIPE, 0)
            store(e + EL_GEN, gen)
            store(e + EL_STATE, ST_CURRENT)
            store(e + EL_MB, 1)
            old = xchg(cur_w, (gen << IDX_BITS) | i)  # rcu_assign_pointer
            counters[W_VERSIONS] += 1
            counters[W_ALLOCS] += 1
            oi = old & IDX_MASK
            store(pool_w + oi * EL_WORDS + EL_STATE, ST_RETIRED)
            mode = modes[n & mask]
            if mode == MODE_ASYNC:
                counters[W_ASYNC] += 1
                dom.call_rcu(functools.partial(cb, oi))
                dom.poll()
            else:
                if mode == MODE_SYNC:
                    dom.synchronize()
                    counters[W_GPS] += 1
                elif mode == MODE_COND:  # get_state, a little work, cond_synchronize
                    cookie = dom.get_state()
                    time.sleep(naps[n & mask] * 1e-9)
                    dom.cond_synchronize(cookie)
                    counters[W_COND] += 1
                else:  # poll_state for a while (fake writers drive GPs), then cond_synchronize
                    cookie = dom.get_state()
                    for _ in range(20):
                        if dom.poll_state(cookie) or load(stop_w):
                            break
                        time.sleep(50e-6)
                    dom.cond_synchronize(cookie)
                    counters[W_POLL] += 1
                retired.append(oi)
                retired = [i for i in retired if not advance(i)]
            n += 1
            t = now()
            if t >= next_flush:  # time-based: stats stay fresh however slow grace periods get
                next_flush = t + FLUSH_NS
                flush()
    finally:
        flush()


def _rcu_fake_writer(region: Region, cfg: dict, w: int) -> None:
    mem = region.mem
    load, store = mem.load, mem.store
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    st_w = region.word("wstat", w)
    counters = [0] * W_WORDS
    dom = _gp_domain(region, cfg, w, counters)
    rng = _rng(cfg["seed"], 4, w)
    naps = np.where(rng.random(DELAY_TABLE) < 0.25, 0, rng.integers(0, 500_000, DELAY_TABLE)).tolist()
    mask = len(naps) - 1
    now = _prims.now_ns

    def flush() -> None:
        counters[W_SHARED] = dom.shared_gps
        for i, c in enumerate(counters):
            store(st_w + i, c)

    _wait_for_go(mem, ctl_w)
    n = 0
    next_flush = now() + FLUSH_NS
    try:
        while not load(stop_w):
            s = naps[n & mask]
            if s:
                time.sleep(s * 1e-9)
            dom.synchronize()
            counters[W_GPS] += 1
            n += 1
            t = now()
            if t >= next_flush:
                next_flush = t + FLUSH_NS
                flush()
    finally:
        flush()


def _lock_writer(region: Region, cfg: dict, w: int) -> None:
    mem = region.mem
    load, store, xchg = mem.load, mem.store, mem.xchg
    tag = w + 1
    lk = new_lock(LOCK_KINDS[cfg["kind"]], mem, region.word("lock"), region.word("lockstat", w, 0),
                  tag=tag, busted=cfg["inject"] == "busted-lock")
    lock, unlock = lk.lock, lk.unlock
    spin = _prims.spin_ns
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    held_w = region.word("cs") + CS_HELD
    cnt_w = region.word("cs") + CS_COUNTER
    st_w = region.word("wstat", w)
    delays = _lock_delays(cfg["seed"], w, cfg["nwriters"])
    mask = len(delays) - 1

    _wait_for_go(mem, ctl_w)
    n = fail = longh = 0
    try:
        while True:
            if not n & 255:
                store(st_w + L_FAIL, fail)
                store(st_w + L_LONG, longh)
                store(st_w + L_ACQ, n)
                if load(stop_w):
                    break
            d = delays[n & mask]
            lock()
            if xchg(held_w, tag):
                fail += 1  # someone else is inside: n_lock_fail
            c = load(cnt_w)
            if d:
                if d >= LOCK_LONG_HOLD_NS:
                    longh += 1
                spin(d)
            store(cnt_w, c + 1)  # non-atomic increment: lost updates if exclusion is broken
            store(held_w, 0)
            unlock()
            n += 1
    finally:
        if lk.is_held() and not cfg["inject"]:
            unlock()
        store(st_w + L_FAIL, fail)
        store(st_w + L_LONG, longh)
        store(st_w + L_ACQ, n)


_ROLES = {
    "reader": _rcu_reader,
    "writer": _rcu_writer,
    "fakewriter": _rcu_fake_writer,
    "lockwriter": _lock_writer,
}


# ------------------------------------------------------------------------------------ coordinator

def _new_run_id() -> str:
    return f"tt{os.getpid()}n{next(_run_counter)}"


def _create_region(layout: Layout) -> tuple[str, Region]:
    for _ in range(5):
        run_id = _new_run_id()
        try:
            return run_id, Region.create(run_id, layout)
        except ShmError as e:
            if "already exists" not in str(e):
                raise
            last = e
    raise last


def _workers(cfg: dict) -> list[tuple[str, str, int]]:
    """(name, role, index) of every process of the run."""
    if cfg["kind"] in RCU_KINDS:
        out = [("writer", "writer", 0)]
        out += [(f"fakewriter {i}", "fakewriter", i) for i in range(1, 1 + cfg["nfakewriters"])]
        out += [(f"reader {i}", "reader", i) for i in range(cfg["nreaders"])]
        return out
    return [(f"writer {i}", "lockwriter", i) for i in range(cfg["nwriters"])]


def _rcu_snapshot(region: Region, kind: str) -> dict:
    v = region.v
    rs, ws = v["rstat"], v["wstat"]
    return {
        "versions": int(ws[0, W_VERSIONS]),
        "allocs": int(ws[0, W_ALLOCS]),
        "alloc_fail": int(ws[0, W_ALLOC_FAIL]),
        "frees": int(ws[0, W_FREES]),
        "async_retires": int(ws[0, W_ASYNC]),
        "cond_retires": int(ws[0, W_COND]),
        "poll_retires": int(ws[0, W_POLL]),
        "writer_synchronize": int(ws[0, W_GPS]),
        "fake_synchronize": int(ws[1:, W_GPS].sum()),
        "shared_gps": int(ws[:, W_SHARED].sum()),
        "stalls": int(ws[:, W_STALLS].sum()),
        "gp_seq": int(v[f"{kind}_hdr"][1]),
        "reads": int(rs[:, R_READS].sum()),
        "poisoned_reads": int(rs[:, R_POISON].sum()),
        "reused_reads": int(rs[:, R_REUSE].sum()),
        "long_holds": int(rs[:, R_LONG].sum()),
        "reader_pipe": [int(x) for x in v["rpipe"][:, :PIPE_SLOTS].sum(axis=0)],
        "reader_batch": [int(x) for x in v["rbatch"][:, :PIPE_SLOTS].sum(axis=0)],
        "free_block_circulation": [int(x) for x in v["wcount"][:PIPE_SLOTS]],
        "current": int(v["cur"][0]),
    }


def _lock_snapshot(region: Region) -> dict:
    ws = region.v["wstat"]
    acq = [int(x) for x in ws[:, L_ACQ]]
    return {
        "writes": sum(acq),
        "max": max(acq),
        "min": min(acq),
        "n_lock_fail": int(ws[:, L_FAIL].sum()),
        "long_holds": int(ws[:, L_LONG].sum()),
        "counter": int(region.v["cs"][CS_COUNTER]),
        "per_writer": acq,
    }


def _rcu_lines(tag: str, s: dict) -> list[str]:
    bad = sum(s["reader_pipe"][2:])
    return [
        f"{tag}: rtc: {s['current'] & IDX_MASK} ver: {s['versions']} rta: {s['allocs']} "
        f"rtaf: {s['alloc_fail']} rtf: {s['frees']} "
        f"rtmbe: {s['poisoned_reads'] + s['reused_reads']} nt: {s['reads']} gp_seq: {s['gp_seq']} "
        f"sync: {s['writer_synchronize']}+{s['fake_synchronize']} shared: {s['shared_gps']} "
        f"async/cond/poll: {s['async_retires']}/{s['cond_retires']}/{s['poll_retires']} "
        f"stalls: {s['stalls']}",
        f"{tag}: {'!!! ' if bad else ''}Reader Pipe:  " + " ".join(map(str, s["reader_pipe"])),
        f"{tag}: Reader Batch:  " + " ".join(map(str, s["reader_batch"])),
        f"{tag}: Free-Block Circulation:  " + " ".join(map(str, s["free_block_circulation"])),
    ]


def _writes_line(tag: str, s: dict) -> str:
    line = (f"{tag}: Writes:  Total: {s['writes']}  Max/Min: {s['max']}/{s['min']}  "
            f"Fail: {s['n_lock_fail']}")
    if s["max"] // 2 > s["min"]:
        line += " ???"
    if s["n_lock_fail"]:
        line += " !!!"
    return line


def _params_str(cfg: dict) -> str:
    if cfg["kind"] in RCU_KINDS:
        who = f"nreaders={cfg['nreaders']} nfakewriters={cfg['nfakewriters']}"
    else:
        who = f"nwriters_stress={cfg['nwriters']}"
    return (f"torture_type={cfg['kind']} {who} stat_interval={cfg['stat_interval']:g} "
            f"duration={cfg['duration']:g} seed={cfg['seed']} inject={cfg['inject'] or 'none'}")


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.{os.getpid()}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def run_torture(kind: str, procs: int, duration: float, seed: int = 1, inject: str | None = None,
                stat_interval: float = 1.0, json_path: str | None = None, out: TextIO | None = None,
                nfakewriters: int = NFAKEWRITERS) -> dict[str, Any]:
    """Run one torture test; returns the results document (``doc["verdict"]`` is ``"SUCCESS"`` or
    ``"FAILURE"``, ``doc["reasons"]`` says why). Raises :class:`UsageError` on bad parameters."""
    _check_params(kind, procs, duration, seed, inject, stat_interval, json_path, nfakewriters)
    out = sys.stdout if out is None else out
    is_rcu = kind in RCU_KINDS
    cfg = {
        "kind": kind, "procs": procs, "duration": float(duration), "seed": seed, "inject": inject,
        "stat_interval": float(stat_interval),
    }
    if is_rcu:
        cfg.update(nreaders=procs, nfakewriters=nfakewriters, pipe_len=PIPE_LEN, npool=NPOOL)
    else:
        cfg.update(nwriters=procs, long_hold_ns=LOCK_LONG_HOLD_NS, short_hold_ns=LOCK_SHORT_HOLD_NS)
    tag = f"{kind}-torture"

    muted = False

    def emit(line: str) -> None:
        nonlocal muted
        if muted:
            return
        try:
            print(line, file=out, flush=True)
        except BrokenPipeError:  # `... | head`: keep running (and cleaning up) silently
            muted = True
            if out is sys.stdout:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    layout = _layout(cfg)
    run_id, region = _create_region(layout)
    procs_list: list = []
    names: list[str] = []
    try:
        _init_region(region, cfg)
        emit(f"{tag}:--- Start of test: {_params_str(cfg)} run_id={run_id}")
        ctx = forkserver_context(["ipc.torture"])
        for name, role, index in _workers(cfg):
            p = ctx.Process(target=_worker_main, args=(run_id, cfg, role, index),
                            name=f"{tag} {name}", daemon=True)
            p.start()
            procs_list.append(p)
            names.append(name)
        doc = _drive(region, procs_list, names, cfg, tag, emit)
        doc["run_id"] = run_id
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # drop numpy views held by the frames
        raise
    finally:
        if not region.closed:
            mem = region.mem
            mem.store(region.word("ctl") + CTL_STOP, 1)
            mem.store(region.word("ctl") + CTL_GO, 1)
            mem.futex_wake(region.word("ctl") + CTL_GO)
        reap(procs_list, STOP_TIMEOUT_S)
        region.close()
    if json_path is not None:
        _write_json(json_path, doc)
    return doc


def _drive(region: Region, procs: list, names: list[str], cfg: dict, tag: str, emit) -> dict:
    """Start the workers, print stats every stat_interval, stop them, collect, judge."""
    mem = region.mem
    ctl_w = region.word("ctl")
    is_rcu = cfg["kind"] in RCU_KINDS
    reasons: list[str] = []
    warnings: list[str] = []
    intervals: list[dict] = []

    def dead() -> list[str]:
        return [f"{n} exited with code {p.exitcode}" for n, p in zip(names, procs, strict=True)
                if p.exitcode is not None]

    # start barrier: every worker attached and waiting
    deadline = time.monotonic() + START_TIMEOUT_S
    started = True
    while mem.load(ctl_w + CTL_READY) < len(procs):
        d = dead()
        if d or time.monotonic() > deadline:
            reasons += [f"{x} before the start" for x in d] or [
                f"workers not ready after {START_TIMEOUT_S:g} s"]
            started = False
            break
        time.sleep(0.002)
    t0 = _prims.now_ns()
    mem.store(ctl_w + CTL_START, t0)
    mem.store(ctl_w + CTL_GO, 1)
    mem.futex_wake(ctl_w + CTL_GO)
    end = t0 + int(cfg["duration"] * 1e9)
    step = int(cfg["stat_interval"] * 1e9)
    next_stat = t0 + step
    last_versions = 0
    while started:
        now = _prims.now_ns()
        if now >= end:
            break
        d = dead()
        if d:
            reasons += [f"{x} during the run" for x in d]
            break
        if now >= next_stat:
            next_stat += step
            t_s = round((now - t0) / 1e9, 3)
            if is_rcu:
                s = _rcu_snapshot(region, cfg["kind"])
                for line in _rcu_lines(tag, s):
                    emit(line)
                if s["versions"] == last_versions:
                    w = (f"rcu_torture_writer stall: ver {s['versions']} unchanged for "
                         f"{cfg['stat_interval']:g} s")
                    warnings.append(w)
                    emit(f"{tag}: {w}")
                last_versions = s["versions"]
                intervals.append({"t_s": t_s, "versions": s["versions"], "gp_seq": s["gp_seq"],
                                  "reads": s["reads"], "errors": _rcu_errors(s)})
            else:
                s = _lock_snapshot(region)
                emit(_writes_line(tag, s))
                intervals.append({"t_s": t_s, "writes": s["writes"], "n_lock_fail": s["n_lock_fail"]})
        time.sleep(min(0.02, max(0.0, (min(end, next_stat) - now) / 1e9)))
    t_stop = _prims.now_ns()
    mem.store(ctl_w + CTL_STOP, 1)
    codes = reap(procs, STOP_TIMEOUT_S)
    for n, c in zip(names, codes, strict=True):
        if c != 0 and not any(r.startswith(f"{n} exited") for r in reasons):
            reasons.append(f"{n} exited with code {c}" if c is not None else f"{n} did not stop")
    elapsed = max(1e-9, (t_stop - t0) / 1e9)

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "tool": "pagetrack-sim torture",
        "kind": cfg["kind"],
        "params": dict(cfg),
        "elapsed_s": round(elapsed, 6),
    }
    report = _rcu_report if is_rcu else _lock_report
    doc.update(report(region, cfg, started, elapsed, reasons, warnings, tag, emit))
    doc["intervals"] = intervals
    doc["warnings"] = warnings
    doc["verdict"] = "FAILURE" if reasons else "SUCCESS"
    doc["reasons"] = reasons
    doc["versions"] = {"python": platform.python_version(), "numpy": np.__version__,
                       "platform": platform.platform(), "cpus": os.cpu_count()}
    for w in warnings:
        emit(f"{tag}: warning: {w}")
    if reasons:
        emit(f"{tag}:--- End of test: FAILURE ({'; '.join(reasons)}): {_params_str(cfg)}")
    else:
        emit(f"{tag}:--- End of test: SUCCESS: {_params_str(cfg)}")
    return doc


def _rcu_errors(s: dict) -> int:
    return sum(s["reader_pipe"][2:]) + s["poisoned_reads"] + s["reused_reads"]


def _rcu_report(region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
                warnings: list[str], tag: str, emit) -> dict:
    s = _rcu_snapshot(region, cfg["kind"])
    gh = region.v["gphist"]
    gp_all = _hist.summary(_hist.merge(gh))
    gp_writer = _hist.summary(_hist.merge(gh[0:1]))
    lock_stat = merge_lockstat(np.array(region.v["lockstat"]), [f"{cfg['kind']}_gp_lock"])
    rstat, rpipe = region.v["rstat"], region.v["rpipe"]
    per = [{"reader": i, "reads": int(rstat[i, R_READS]),
            "errors": int(rstat[i, R_POISON] + rstat[i, R_REUSE]),
            "pipe_ge2": int(rpipe[i, 2:PIPE_SLOTS].sum())}
           for i in range(cfg["nreaders"])]
    bad_pipe = sum(s["reader_pipe"][2:])
    if bad_pipe:
        reasons.append(f"{bad_pipe} reads saw Reader Pipe index >= 2 (a reader held an element "
                       f"across a full grace period)")
    if s["poisoned_reads"] or s["reused_reads"]:
        reasons.append(f"{s['poisoned_reads']} reads of a freed (poisoned) element, "
                       f"{s['reused_reads']} of a reallocated one")
    if started and not reasons:
        stuck = [w for w, n in (("writer", s["versions"]), ("readers", s["reads"])) if n == 0]
        for w in stuck:  # a stall; too short a run to tell for sure is only a warning
            (reasons if elapsed >= 1.0 else warnings).append(f"the {w} made no progress")
    if s["stalls"]:
        warnings.append(f"{s['stalls']} reader stall warnings (read-side critical section > "
                        f"{STALL_NS // 1_000_000} ms)")
    rates = {"reads_per_s": round(s["reads"] / elapsed, 1),
             "gps_per_s": round(s["gp_seq"] / elapsed, 1),
             "versions_per_s": round(s["versions"] / elapsed, 1)}
    for line in _rcu_lines(tag, s):
        emit(line)
    emit(f"{tag}: rates: reads/s={rates['reads_per_s']:.0f} GPs/s={rates['gps_per_s']:.0f} "
         f"versions/s={rates['versions_per_s']:.0f} over {elapsed:.2f} s")
    if gp_all["count"]:
        emit(f"{tag}: synchronize latency: n={gp_all['count']} p50={gp_all['p50_ns'] / 1e3:.1f}us "
             f"p99={gp_all['p99_ns'] / 1e3:.1f}us max={gp_all['max_ns'] / 1e3:.1f}us")
    for cls, st in lock_stat.items():
        emit(_lock_stat_line(tag, cls, st))
    return {
        "counts": {k: s[k] for k in (
            "versions", "allocs", "alloc_fail", "frees", "async_retires", "cond_retires",
            "poll_retires", "writer_synchronize",
            "fake_synchronize", "shared_gps", "stalls", "gp_seq", "reads", "poisoned_reads",
            "reused_reads", "long_holds")},
        "rates": rates,
        "histograms": {"reader_pipe": s["reader_pipe"], "reader_batch": s["reader_batch"],
                       "free_block_circulation": s["free_block_circulation"],
                       "gp_latency_ns": gp_all, "writer_gp_latency_ns": gp_writer},
        "per_process": per,
        "lock_stat": lock_stat,
    }


def _lock_report(region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
                 warnings: list[str], tag: str, emit) -> dict:
    s = _lock_snapshot(region)
    lock_stat = merge_lockstat(np.array(region.v["lockstat"]), [f"{cfg['kind']}_torture_lock"])
    lost = s["writes"] - s["counter"]
    if s["n_lock_fail"]:
        reasons.append(f"n_lock_fail={s['n_lock_fail']} (two writers inside the lock)")
    if lost:
        reasons.append(f"{lost} lost updates of the lock-protected counter")
    if started and not reasons and s["writes"] == 0:
        (reasons if elapsed >= 1.0 else warnings).append("the writers made no progress (no acquisition)")
    if s["max"] // 2 > s["min"]:
        warnings.append(f"unfair: Max/Min {s['max']}/{s['min']} (max/2 > min)")
    rates = {"writes_per_s": round(s["writes"] / elapsed, 1)}
    emit(_writes_line(tag, s))
    emit(f"{tag}: rates: writes/s={rates['writes_per_s']:.0f} over {elapsed:.2f} s")
    for cls, st in lock_stat.items():
        emit(_lock_stat_line(tag, cls, st))
    return {
        "counts": {"writes": s["writes"], "max": s["max"], "min": s["min"],
                   "n_lock_fail": s["n_lock_fail"], "lost_updates": lost, "long_holds": s["long_holds"]},
        "rates": rates,
        "histograms": {"writes_per_writer": s["per_writer"]},
        "per_process": [{"writer": i, "acquisitions": a} for i, a in enumerate(s["per_writer"])],
        "lock_stat": lock_stat,
    }


def _lock_stat_line(tag: str, cls: str, st: dict) -> str:
    return (f"{tag}: lock_stat {cls}: acquisitions={st['acquisitions']} contentions={st['contentions']} "
            f"wait avg/max={st['wait_ns_avg']}/{st['wait_ns_max']} ns "
            f"hold avg/max={st['hold_ns_avg']}/{st['hold_ns_max']} ns")


def main(args) -> int:
    """``launch.py torture``: 0 SUCCESS, 1 FAILURE (bad input raises UsageError -> 2)."""
    doc = run_torture(args.kind, args.procs, args.duration, seed=args.seed, inject=args.inject,
                      stat_interval=args.stat_interval, json_path=args.json)
    return 0 if doc["verdict"] == "SUCCESS" else 1
