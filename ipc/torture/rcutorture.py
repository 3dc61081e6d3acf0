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
call synchronize at random times (grace-period sharing): after a nap of 0-9 jiffies, as
rcu_torture_fakewriter's ``torture_hrtimeout_jiffies(torture_random() % 10)``; there are 4 of them,
rcutorture's default ``nfakewriters``. The writer is paced as rcu_torture_writer: before each
allocation it sleeps 500 us (RTWS_FIXED_DELAY, ``torture_hrtimeout_us(500, 1000)``), before each
replacement it busy-waits 0-1023 us (RTWS_DELAY, ``udelay(torture_random() & 0x3ff)``). That
pacing is what gives ``gp-share-early`` its window: the element stays current ~1 ms, readers that
began after the phase flip of a fake writer's running grace period take it, and the writer's
removal and synchronize come while that grace period still waits for older readers (measured:
bench/selftests.py). ``broken-gp``'s call_rcu runs the callback at once (``call_rcu_busted``), so
its asynchronous removals free the element under the readers at once, whatever the pacing: the
mbtest checks see it. FAILURE: any Reader Pipe count at index >= 2, any mbtest failure, any failed
cookie check (rcutorture's: ``do_rtws_sync`` after a synchronize, and inside every read; the verdict
is ipc/torture/rcureport.py's), a worker that died, or no progress.

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
from typing import TYPE_CHECKING

import numpy as np

from ipc import _prims, fuzz
from ipc.torture.base import (
    CTL_STOP,
    DELAY_TABLE,
    FLUSH_NS,
    STALL_NS,
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
NFAKEWRITERS = 4  # rcutorture's nfakewriters default
# rcu_torture_writer's pacing (see the writer): RTWS_FIXED_DELAY torture_hrtimeout_us(500, 1000),
# RTWS_DELAY udelay(torture_random() & 0x3ff)
WRITER_FIXED_DELAY_NS = 500_000
WRITER_FIXED_FUZZ_NS = 1_000
WRITER_UDELAY_MASK_US = 0x3FF
# rcu_torture_fakewriter's nap between two synchronize calls: torture_hrtimeout_jiffies(
# torture_random(&rand) % 10, &rand), HZ = 1000
FAKEWRITER_NAP_JIFFIES = 10
NS_PER_JIFFY = 1_000_000

# pool element words (EL_MB: rtort_mbtest, 1 from publication to free)
EL_PIPE, EL_MB, EL_GEN, EL_STATE = 0, 1, 2, 3
EL_WORDS = 8
ST_FREE, ST_CURRENT, ST_RETIRED = 0, 1, 2
IDX_BITS = 16
IDX_MASK = (1 << IDX_BITS) - 1

# reader stat row: reads; mbtest failures (at the dereference = rtmbe, freed while held, freed and
# reused while held); delays (mdelay + sleep, udelay, preemption, sleep alone)
R_READS, R_POISON, R_REUSE, R_LONG, R_MBERR, R_SHORT, R_PREEMPT, R_SLEEP, R_COOKIE = range(9)
R_WORDS = 16
# writer / fake-writer stat row
(W_VERSIONS, W_ALLOCS, W_ALLOC_FAIL, W_FREES, W_GPS, W_SHARED, W_STALLS, W_ASYNC, W_COND, W_POLL,
 W_COOKIE, W_BARRIER) = range(12)
W_WORDS = 16
# how the writer waits for the grace period of a retired element (rcutorture's gp_sync, gp_async,
# gp_cond, gp_poll); cond/poll need the polled-GP API (get_state/poll_state/cond_synchronize)
MODE_SYNC, MODE_ASYNC, MODE_COND, MODE_POLL = 0, 1, 2, 3

BARRIER_ROUNDS = 3  # rcu_barrier tests at the end of the writer (each: one fresh callback, barrier, check)
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

    # rcu_torture_one_read's cookie check 2: a polled cookie taken inside the critical section
    # cannot complete before it ends (a grace period that starts after the reader is in waits for it)
    polled = ops.polled
    get_state, poll_state = dom.get_state, dom.poll_state
    cookie_errs = 0

    def flush(reads: int, mberr: int, poison: int, reuse: int) -> None:
        for i in range(PIPE_SLOTS):
            store(pipe_w + i, pipe[i])
            store(batch_w + i, batch[i])
        store(st_w + R_COOKIE, cookie_errs)
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
            if polled:
                ck = get_state()
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
            if polled and poll_state(ck):
                cookie_errs += 1  # "Cookie check 2 failed"
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


def dopoll_table(ops: RcuTortureOps, rg) -> list[bool]:
    """Which synchronize calls check a cookie (``do_rtws_sync``): the kernel's
    ``!(torture_random() & 0x300)``, a quarter of them, when the flavor has the polled API."""
    return (((rg.integers(0, 1 << 16, DELAY_TABLE) & 0x300) == 0) & ops.polled).tolist()


def do_rtws_sync(dom, dopoll: bool, counters: list[int]) -> None:
    """rcutorture's ``do_rtws_sync()``: synchronize; with ``dopoll``, take a polled cookie first
    and check that its grace period has completed when synchronize returns ("Cookie check 3")."""
    if not dopoll:
        dom.synchronize()
        return
    cookie = dom.get_state()
    dom.synchronize()
    if not dom.poll_state(cookie):
        counters[W_COOKIE] += 1


def barrier_cb(pending: list[int]) -> None:  # rcu_torture_barrier_cbs' callback
    pending[0] -= 1


def rcu_barrier_check(dom, pending: list[int], rounds: int = BARRIER_ROUNDS) -> int:
    """rcu_torture_barrier: ``rounds`` times, queue one callback and ``barrier()``; returns how many
    of the callbacks counted in ``pending`` (the writer's, and these) were still not invoked after
    a barrier returned (0 = good)."""
    for _ in range(rounds):
        pending[0] += 1
        dom.call_rcu(functools.partial(barrier_cb, pending))
        dom.barrier()
        if pending[0]:
            return pending[0]
    return 0


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
    # the writer's pacing, as rcu_torture_writer(): RTWS_FIXED_DELAY sleeps 500 us (+ up to 1 us of
    # fuzz: torture_hrtimeout_us(500, 1000, &rand)) before each allocation, RTWS_DELAY busy-waits
    # udelay(torture_random(&rand) & 0x3ff) before the replacement: the current element stays
    # current ~1 ms, so readers that began after a running grace period's phase flip hold it when
    # it is removed and the writer's synchronize is called
    fixed = (WRITER_FIXED_DELAY_NS + rg.integers(0, WRITER_FIXED_FUZZ_NS, DELAY_TABLE)).tolist()
    udelays = (rg.integers(0, WRITER_UDELAY_MASK_US + 1, DELAY_TABLE) * 1_000).tolist()
    spin, sleep = _prims.spin_ns, time.sleep
    dopoll = dopoll_table(ops, rg)
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

    pending = [0]  # call_rcu callbacks queued and not yet invoked
    stopping = [False]

    def call(i: int) -> None:
        pending[0] += 1
        dom.call_rcu(functools.partial(cb, i))

    def cb(i: int) -> None:  # rcu_torture_cb
        pending[0] -= 1
        if not advance(i) and not stopping[0]:  # the test is ending: "drop callbacks on the floor"
            call(i)

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
                do_rtws_sync(dom, dopoll[n & mask], counters)
                counters[W_GPS] += 1
                retired = [i for i in retired if not advance(i)]
                continue
            sleep(fixed[n & mask] * 1e-9)  # RTWS_FIXED_DELAY
            if load(stop_w):
                break
            i = free.popleft()
            spin(udelays[n & mask])  # RTWS_DELAY: the old element is still the current one
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
                call(oi)
                dom.poll()
            else:
                if mode == MODE_SYNC:
                    do_rtws_sync(dom, dopoll[n & mask], counters)
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
        # rcu_torture_barrier's check, then rcu_torture_cleanup's rcu_barrier: when barrier returns,
        # every callback queued before it has been invoked ("n_rcu_torture_barrier_error")
        stopping[0] = True
        left = rcu_barrier_check(dom, pending)
        if left:
            counters[W_BARRIER] += 1
            print(f"{ops.name}-torture: rcu_barrier returned with {left} callback(s) not invoked",
                  file=sys.stderr, flush=True)
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
    naps = (rg.integers(0, FAKEWRITER_NAP_JIFFIES, DELAY_TABLE) * NS_PER_JIFFY).tolist()
    dopoll = dopoll_table(ops, rg)
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
            do_rtws_sync(dom, dopoll[n & mask], counters)
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
