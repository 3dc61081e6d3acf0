"""The rcutorture pipeline (after kernel/rcu/rcutorture.c), flavor-blind: ``--kind rcu`` / ``srcu``.

A pool of ``NPOOL`` elements (pipe_count, mbtest, generation, state). One writer process
allocates a free element (pipe_count 0), sets its mbtest to 1, publishes it as current (one
atomic exchange of ``gen << 16 | index``: rcu_assign_pointer) and removes the old one. **Pipe
rule, as rcu_torture_writer()**: right after the exchange the removed element's pipe_count goes
from 0 to 1 (``old_rp->rtort_pipe_count + 1``, before any grace period), then
``rcu_torture_pipe_update_one()`` adds 1 after each grace period (after ``synchronize``, or from a
``call_rcu`` callback); at ``PIPE_LEN`` (10) the element is freed (mbtest = 0) and may be reused.
So a reader sees 0 (current) or 1 (removed, no full grace period since: legal); **2 or more means
it still held an element a whole grace period after its removal: FAILURE**. The writer counts
every step in ``wcount`` (index = the pipe_count the element had before the step; [0] =
removals, [9] = frees), printed as the kernel's "Free-Block Circulation" (the writer's pipe).
Like rcutorture's writer it mixes the ways of waiting: synchronize, call_rcu callbacks, and (when
the domain has the polled API) get_state + cond_synchronize / poll_state.

``--procs`` reader processes loop (rcu_torture_one_read): read_lock, gp_seq, load current, check
its mbtest (0 = a freed element reached through the current pointer: ``rtmbe``), the flavor's
read delay (``readdelay``: rcu_read_delay / srcu_read_delay, seeded per reader), read its
pipe_count, check mbtest and generation again (freed, or freed and reused, while held), gp_seq,
read_unlock; they bump a per-reader "Reader Pipe" histogram at min(pipe_count, 10) and a "Reader
Batch" histogram of the grace periods completed during the read. ``NFAKEWRITERS`` fake writers
call synchronize at random times (grace-period sharing), napping 0-500 us (a quarter of the time
not at all). Neither the writer is paced as rcu_torture_writer (RTWS_FIXED_DELAY / RTWS_DELAY)
nor the fake writers nap 0-9 jiffies as rcu_torture_fakewriter: tried (issue 23), together they
widened ``gp-share-early``'s window (18-19/20 seeds at 1 s) but elements were then freed ~10 ms
after removal and the mbtest checks of ``broken-gp`` saw nothing in 1-3 s (tests/ipc/test_torture.py).
FAILURE: any Reader Pipe count at index
>= 2, any mbtest failure, a worker that died, or no progress.

What differs between flavors is an :class:`RcuTortureOps` (rcutorture's ``rcu_torture_ops``):
``ipc/torture/rcu.py`` has ``rcu_ops``, ``ipc/torture/srcu.py`` ``srcu_ops``. Injected faults
(``INJECTS``): ``broken-gp`` makes synchronize return without waiting (rcutorture's
``rcu_busted_ops``); ``gp-single-flip``, ``gp-skip-alternate``, ``gp-share-early``,
``gp-no-wait-before-flip`` give the writer and fake writers a grace period with one bug
(``gpbugs``). Each reader also installs ``fuzz.torture_points``: a seeded delay at the named
preemption points inside the C primitives (``rcu.read_lock.after_ctr_load``: between loading the
grace-period counter and publishing the slot), the window ``gp-no-wait-before-flip`` needs.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ipc import _prims, fuzz
from ipc import hist as _hist
from ipc.locks import STAT_WORDS, init_lockstat, merge_lockstat
from ipc.torture.base import (
    CTL_STOP,
    DELAY_TABLE,
    FLUSH_NS,
    ROW,
    STALL_NS,
    TortureType,
    lock_stat_line,
    rng,
    wait_for_go,
)
from ipc.torture.gpbugs import GP_BUGS, gp_bug_domain
from ipc.torture.readdelay import D_LONG, D_PREEMPT, D_SHORT, D_SLEEP, SHORTDELAY_US, ReadDelay

if TYPE_CHECKING:
    from ipc.rcu import RcuDomain
    from ipc.shm import Region

PIPE_LEN = 10  # RCU_TORTURE_PIPE_LEN
PIPE_SLOTS = PIPE_LEN + 1
NPOOL = 32
NFAKEWRITERS = 2

# pool element words (EL_MB: rtort_mbtest, 1 from publication to free)
EL_PIPE, EL_MB, EL_GEN, EL_STATE = 0, 1, 2, 3
EL_WORDS = 8
ST_FREE, ST_CURRENT, ST_RETIRED = 0, 1, 2
IDX_BITS = 16
IDX_MASK = (1 << IDX_BITS) - 1

# reader stat row: reads; mbtest failures (at the dereference = rtmbe, freed while held, freed and
# reused while held); delays (mdelay + sleep, udelay, preemption, sleep alone)
R_READS, R_POISON, R_REUSE, R_LONG, R_MBERR, R_SHORT, R_PREEMPT, R_SLEEP = range(8)
# writer / fake-writer stat row
W_VERSIONS, W_ALLOCS, W_ALLOC_FAIL, W_FREES, W_GPS, W_SHARED, W_STALLS, W_ASYNC, W_COND, W_POLL = range(10)
W_WORDS = 16
# how the writer waits for the grace period of a retired element (rcutorture's gp_sync, gp_async,
# gp_cond, gp_poll); cond/poll need the polled-GP API (get_state/poll_state/cond_synchronize)
MODE_SYNC, MODE_ASYNC, MODE_COND, MODE_POLL = 0, 1, 2, 3

WRITER_TAG = 100_000  # rcu writer tags (readers use 1..nreaders)
POLLED_API = ("get_state", "poll_state", "cond_synchronize")
INJECTS = ("broken-gp", *GP_BUGS)
PIPE_RULE = "removal sets pipe_count 1, each grace period +1, a read at >= 2 fails (rcu_torture_writer)"


def has_polled_api(domain: type) -> bool:
    """True if ``domain`` offers the polled grace-period API (``POLLED_API``)."""
    return all(hasattr(domain, a) for a in POLLED_API)


@dataclass(frozen=True)
class RcuTortureOps:
    """One RCU flavor, as the pipeline sees it (rcutorture's ``struct rcu_torture_ops``)."""

    name: str  # torture_type; also the domain's field prefix in the segment
    domain: type[RcuDomain]  # RcuDomain or a subclass
    polled: bool  # get_state / poll_state / cond_synchronize usable: the writer's cond and poll modes
    # read_delay: nreaders -> per-read probability of each delay kind (readdelay: rcu_read_delay_probs,
    # srcu_read_delay_probs)
    read_delay: Callable[[int], dict[int, float]]


# ------------------------------------------------------------------------------------ workers

def rcu_torture_reader(ops: RcuTortureOps, region: Region, cfg: dict, r: int) -> None:
    kind = ops.name
    dom = ops.domain(region, kind, r, r + 1, name=kind)
    dom.register()
    mem = region.mem
    load, store = mem.load, mem.store
    rl, ru, nesting = dom.read_lock, dom.read_unlock, dom.reader.nesting
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    cur_w = region.word("cur")
    pool_w = region.word("pool")
    gp_w = dom.hdr_w + 1
    st_w, pipe_w, batch_w = region.word("rstat", r), region.word("rpipe", r), region.word("rbatch", r)
    rd = ReadDelay(ops.read_delay(cfg["nreaders"]), cfg["seed"], r)
    # the read delays reach into the C read-side entry too (rcu.read_lock.after_ctr_load): a reader
    # delayed there has its critical section delayed as well (udelay(shortdelay_us)), so that a
    # stale phase it may have published is held while the writer removes and waits
    pd = fuzz.torture_points(cfg["seed"], r)
    pd_seen = 0
    delay, nxt = rd.run, rd.next
    dcount = rd.counts
    pipe = [0] * PIPE_SLOTS
    batch = [0] * PIPE_SLOTS

    def flush(reads: int, mberr: int, poison: int, reuse: int) -> None:
        for i in range(PIPE_SLOTS):
            store(pipe_w + i, pipe[i])
            store(batch_w + i, batch[i])
        store(st_w + R_MBERR, mberr)
        store(st_w + R_POISON, poison)
        store(st_w + R_REUSE, reuse)
        store(st_w + R_LONG, dcount[D_LONG] + dcount[D_SLEEP])
        store(st_w + R_SHORT, dcount[D_SHORT])
        store(st_w + R_PREEMPT, dcount[D_PREEMPT])
        store(st_w + R_SLEEP, dcount[D_SLEEP])
        store(st_w + R_READS, reads)

    wait_for_go(mem, ctl_w)
    n = mberr = poison = reuse = 0
    try:
        while True:
            if not n & 255:
                flush(n, mberr, poison, reuse)
                if load(stop_w):
                    break
            rl()
            g0 = load(gp_w)  # started = cur_ops->get_gp_seq()
            c = load(cur_w)  # rcu_dereference(rcu_torture_current)
            e = pool_w + (c & IDX_MASK) * EL_WORDS
            if not load(e + EL_MB):
                mberr += 1  # n_rcu_torture_mberror: freed, yet reached through the current pointer
            if n == nxt:
                nxt = delay(n)  # cur_ops->read_delay()
            elif pd.delays != pd_seen:  # this read_lock was delayed inside the primitive
                pd_seen = pd.delays
                _prims.spin_ns(SHORTDELAY_US * 1_000)
            pc = load(e)  # pipe_count
            if not load(e + EL_MB):
                poison += 1  # freed while this reader held it
            elif load(e + EL_GEN) != c >> IDX_BITS:
                reuse += 1  # freed and reallocated while this reader held it
            g1 = load(gp_w)  # completed = cur_ops->get_gp_seq()
            ru()
            pipe[pc if pc < PIPE_LEN else PIPE_LEN] += 1
            b = g1 - g0
            batch[b if b < PIPE_LEN else PIPE_LEN] += 1
            n += 1
    finally:
        while nesting():
            ru()
        flush(n, mberr, poison, reuse)
        dom.unregister()


def _gp_domain(ops: RcuTortureOps, region: Region, cfg: dict, w: int, counters: list[int]):
    """The writer's / a fake writer's view of the domain (no reader slot)."""
    kind = ops.name
    mem = region.mem
    slots = region.v[f"{kind}_slots"]
    tag = f"{kind}-torture"

    def on_stall(slot: int, elapsed: int) -> None:
        counters[W_STALLS] += 1
        print(f"{tag}: writer stall: reader {slot} (pid {int(slots[slot, 2])}) in read-side critical "
              f"section for {elapsed // 1_000_000} ms", file=sys.stderr, flush=True)

    inject = cfg["inject"]
    domain = gp_bug_domain(ops.domain, inject) if inject in GP_BUGS else ops.domain
    return domain(
        region, kind, None, WRITER_TAG + w, name=kind,
        gp_lock_stats_word=region.word("lockstat", w, 0),
        gp_hist=_prims.Histogram(mem, region.word("gphist", w)),
        broken=inject == "broken-gp", stall_ns=STALL_NS, on_stall=on_stall,
        slot_name=lambda i: f"reader {i}")


def rcu_torture_writer(ops: RcuTortureOps, region: Region, cfg: dict, w: int) -> None:
    mem = region.mem
    load, store, xchg = mem.load, mem.store, mem.xchg
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    cur_w = region.word("cur")
    pool_w = region.word("pool")
    st_w = region.word("wstat", w)
    wc_w = region.word("wcount")
    counters = [0] * W_WORDS
    dom = _gp_domain(ops, region, cfg, w, counters)
    rg = rng(cfg["seed"], 2, w)
    u = rg.random(DELAY_TABLE)
    modes = np.select([u < 0.2, u < 0.3, u < 0.4], [MODE_ASYNC, MODE_COND, MODE_POLL], MODE_SYNC)
    if not ops.polled:
        modes[modes >= MODE_COND] = MODE_SYNC
    modes = modes.tolist()
    naps = rg.integers(0, 200_000, DELAY_TABLE).tolist()  # ns between get_state and cond_sync
    mask = len(modes) - 1
    free: deque[int] = deque(range(1, NPOOL))
    retired: list[int] = []  # retired by the synchronous path (advanced after each synchronize)
    wcount = [0] * PIPE_SLOTS  # rcu_torture_wcount: the writer's pipe (Free-Block Circulation)
    gen = 1

    def advance(i: int) -> bool:
        """One more step down the pipe for element i (its removal, then each grace period:
        rcu_torture_pipe_update_one); True when freed."""
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
    wait_for_go(mem, ctl_w)
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
            advance(oi)  # removed: pipe_count 0 -> 1 at once, before any grace period
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


def rcu_torture_fakewriter(ops: RcuTortureOps, region: Region, cfg: dict, w: int) -> None:
    mem = region.mem
    load, store = mem.load, mem.store
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    st_w = region.word("wstat", w)
    counters = [0] * W_WORDS
    dom = _gp_domain(ops, region, cfg, w, counters)
    rg = rng(cfg["seed"], 4, w)
    naps = np.where(rg.random(DELAY_TABLE) < 0.25, 0, rg.integers(0, 500_000, DELAY_TABLE)).tolist()
    mask = len(naps) - 1
    now = _prims.now_ns

    def flush() -> None:
        counters[W_SHARED] = dom.shared_gps
        for i, c in enumerate(counters):
            store(st_w + i, c)

    wait_for_go(mem, ctl_w)
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


ROLES = {
    "reader": rcu_torture_reader,
    "writer": rcu_torture_writer,
    "fakewriter": rcu_torture_fakewriter,
}


# ------------------------------------------------------------------------------------ stats

def rcu_snapshot(region: Region, kind: str) -> dict:
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
        "mberror_reads": int(rs[:, R_MBERR].sum()),
        "poisoned_reads": int(rs[:, R_POISON].sum()),
        "reused_reads": int(rs[:, R_REUSE].sum()),
        "long_holds": int(rs[:, R_LONG].sum()),
        "short_delays": int(rs[:, R_SHORT].sum()),
        "preempt_delays": int(rs[:, R_PREEMPT].sum()),
        "sleep_delays": int(rs[:, R_SLEEP].sum()),
        "reader_pipe": [int(x) for x in v["rpipe"][:, :PIPE_SLOTS].sum(axis=0)],
        "reader_batch": [int(x) for x in v["rbatch"][:, :PIPE_SLOTS].sum(axis=0)],
        "free_block_circulation": [int(x) for x in v["wcount"][:PIPE_SLOTS]],
        "current": int(v["cur"][0]),
    }


def mb_errors(s: dict) -> int:
    """mbtest failures: a freed element reached through the current pointer, or freed (and
    perhaps reused) while a reader held it."""
    return s["mberror_reads"] + s["poisoned_reads"] + s["reused_reads"]


def rcu_lines(tag: str, s: dict) -> list[str]:
    """rcu_torture_stats_print: "!!! " before Reader Pipe on an mbtest error or a read at index
    >= 2. The writer's pipe (rcu_torture_wcount) is the kernel's "Free-Block Circulation"."""
    bad = sum(s["reader_pipe"][2:]) or mb_errors(s)
    return [
        f"{tag}: rtc: {s['current'] & IDX_MASK} ver: {s['versions']} rta: {s['allocs']} "
        f"rtaf: {s['alloc_fail']} rtf: {s['frees']} "
        f"rtmbe: {mb_errors(s)} nt: {s['reads']} gp_seq: {s['gp_seq']} "
        f"sync: {s['writer_synchronize']}+{s['fake_synchronize']} shared: {s['shared_gps']} "
        f"async/cond/poll: {s['async_retires']}/{s['cond_retires']}/{s['poll_retires']} "
        f"stalls: {s['stalls']} delays short/long/preempt: {s['short_delays']}/{s['long_holds']}/"
        f"{s['preempt_delays']}",
        f"{tag}: {'!!! ' if bad else ''}Reader Pipe:  " + " ".join(map(str, s["reader_pipe"])),
        f"{tag}: Reader Batch:  " + " ".join(map(str, s["reader_batch"])),
        f"{tag}: Free-Block Circulation:  " + " ".join(map(str, s["free_block_circulation"])),
    ]


def rcu_errors(s: dict) -> int:
    return sum(s["reader_pipe"][2:]) + mb_errors(s)


def rcu_report(region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
               warnings: list[str], tag: str, emit) -> dict:
    s = rcu_snapshot(region, cfg["kind"])
    gh = region.v["gphist"]
    gp_all = _hist.summary(_hist.merge(gh))
    gp_writer = _hist.summary(_hist.merge(gh[0:1]))
    lock_stat = merge_lockstat(np.array(region.v["lockstat"]), [f"{cfg['kind']}_gp_lock"])
    rstat, rpipe = region.v["rstat"], region.v["rpipe"]
    per = [{"reader": i, "reads": int(rstat[i, R_READS]),
            "errors": int(rstat[i, R_MBERR] + rstat[i, R_POISON] + rstat[i, R_REUSE]),
            "pipe_ge2": int(rpipe[i, 2:PIPE_SLOTS].sum())}
           for i in range(cfg["nreaders"])]
    bad_pipe = sum(s["reader_pipe"][2:])
    if bad_pipe:
        reasons.append(f"{bad_pipe} reads saw Reader Pipe index >= 2 (a reader held an element "
                       f"across a full grace period)")
    if mb_errors(s):
        reasons.append(f"{mb_errors(s)} mbtest errors: {s['mberror_reads']} reads reached a freed "
                       f"element through the current pointer, {s['poisoned_reads']} held an element "
                       f"that was freed (poisoned), {s['reused_reads']} one that was reallocated")
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
    for line in rcu_lines(tag, s):
        emit(line)
    emit(f"{tag}: rates: reads/s={rates['reads_per_s']:.0f} GPs/s={rates['gps_per_s']:.0f} "
         f"versions/s={rates['versions_per_s']:.0f} over {elapsed:.2f} s")
    if gp_all["count"]:
        emit(f"{tag}: synchronize latency: n={gp_all['count']} p50={gp_all['p50_ns'] / 1e3:.1f}us "
             f"p99={gp_all['p99_ns'] / 1e3:.1f}us max={gp_all['max_ns'] / 1e3:.1f}us")
    for cls, st in lock_stat.items():
        emit(lock_stat_line(tag, cls, st))
    return {
        "counts": {k: s[k] for k in (
            "versions", "allocs", "alloc_fail", "frees", "async_retires", "cond_retires",
            "poll_retires", "writer_synchronize",
            "fake_synchronize", "shared_gps", "stalls", "gp_seq", "reads", "poisoned_reads",
            "reused_reads", "long_holds", "mberror_reads", "short_delays", "preempt_delays",
            "sleep_delays")},
        "rates": rates,
        "pipe_rule": PIPE_RULE,
        "histograms": {"reader_pipe": s["reader_pipe"], "reader_batch": s["reader_batch"],
                       "free_block_circulation": s["free_block_circulation"],
                       "writer_pipe": s["free_block_circulation"],
                       "gp_latency_ns": gp_all, "writer_gp_latency_ns": gp_writer},
        "per_process": per,
        "lock_stat": lock_stat,
    }


# ------------------------------------------------------------------------------------ torture type

class RcuTorture(TortureType):
    """rcutorture on one flavor: the pipeline above, driven by ``ops``."""

    injects = INJECTS

    def __init__(self, ops: RcuTortureOps):
        self.ops = ops
        self.name = ops.name

    def params(self, procs: int, nfakewriters: int) -> dict[str, Any]:
        return {"nreaders": procs, "nfakewriters": nfakewriters, "pipe_len": PIPE_LEN, "npool": NPOOL}

    def who(self, cfg: dict) -> str:
        return f"nreaders={cfg['nreaders']} nfakewriters={cfg['nfakewriters']}"

    def fields(self, cfg: dict) -> list:
        nr, nw = cfg["nreaders"], 1 + cfg["nfakewriters"]
        return [
            *self.ops.domain.fields(self.ops.name, nr),
            ("cur", "i8", (8,)),
            ("pool", "i8", (NPOOL, EL_WORDS)),
            ("rstat", "i8", (nr, 8)),
            ("rpipe", "i8", (nr, ROW)),
            ("rbatch", "i8", (nr, ROW)),
            ("wstat", "i8", (nw, W_WORDS)),
            ("wcount", "i8", (ROW,)),
            ("gphist", "i8", (nw, _hist.HIST_WORDS)),
            ("lockstat", "i8", (nw, 1, STAT_WORDS)),
        ]

    def init(self, region: Region, cfg: dict) -> None:
        v = region.v
        self.ops.domain.init(region, self.ops.name)
        _hist.init(v["gphist"])
        init_lockstat(v["lockstat"])
        # element 0 is the initial current element, generation 1
        v["pool"][0, EL_MB] = 1
        v["pool"][0, EL_GEN] = 1
        v["pool"][0, EL_STATE] = ST_CURRENT
        v["cur"][0] = (1 << IDX_BITS) | 0

    def workers(self, cfg: dict) -> list[tuple[str, str, int]]:
        out = [("writer", "writer", 0)]
        out += [(f"fakewriter {i}", "fakewriter", i) for i in range(1, 1 + cfg["nfakewriters"])]
        out += [(f"reader {i}", "reader", i) for i in range(cfg["nreaders"])]
        return out

    def run(self, role: str, region: Region, cfg: dict, index: int) -> None:
        ROLES[role](self.ops, region, cfg, index)

    def interval(self, region: Region, cfg: dict, tag: str, emit, warnings: list[str], t_s: float,
                 intervals: list[dict]) -> dict:
        last_versions = intervals[-1]["versions"] if intervals else 0
        s = rcu_snapshot(region, cfg["kind"])
        for line in rcu_lines(tag, s):
            emit(line)
        if s["versions"] == last_versions:
            w = (f"rcu_torture_writer stall: ver {s['versions']} unchanged for "
                 f"{cfg['stat_interval']:g} s")
            warnings.append(w)
            emit(f"{tag}: {w}")
        return {"t_s": t_s, "versions": s["versions"], "gp_seq": s["gp_seq"],
                "reads": s["reads"], "errors": rcu_errors(s)}

    def report(self, region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
               warnings: list[str], tag: str, emit) -> dict:
        return rcu_report(region, cfg, started, elapsed, reasons, warnings, tag, emit)
