"""RCU / SRCU domains across processes: grace periods wait for pre-existing readers (and only for a
full grace period that began after the call), nesting, shared grace periods, call_rcu, polled
grace periods, stall warnings, dead readers and dead gp-lock holders."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from conftest import wait_until

from ipc import _prims
from ipc.locks import LOCK_WORDS, Mutex
from ipc.proc import proc_starttime, sigterm_to_exit
from ipc.rcu import GP_COUNT, GP_CTR_PHASE, GracePeriodBlocked, RcuDomain, SrcuDomain
from ipc.shm import Layout, Region

NSLOTS = 8
K = 1 << 12  # element ring of the update/read checker
# ctl lines
C_PTR, C_NEXT, C_GO, C_STOP, C_READY, C_ERR, C_READS, C_DONE = range(8)
# reader commands
ENTER, EXIT, QUIT = 1, 2, 3


def layout() -> Layout:
    return Layout("rcu", [
        *RcuDomain.fields("rcu", NSLOTS),
        ("cmd", "i8", (NSLOTS, 8)),
        ("ack", "i8", (NSLOTS, 8)),
        ("ctl", "i8", (16, 8)),
        ("res", "i8", (NSLOTS, 8)),
        ("elem", "i8", (K,)),
        ("wlock", "i8", (LOCK_WORDS,)),
    ])


@pytest.fixture
def region(region_factory):
    r = region_factory(layout())
    RcuDomain.init(r, "rcu")
    return r


def slot_name(i: int) -> str:
    return f"vcpu{i}"


# -- a reader process driven by commands -----------------------------------------------------------
def reader_worker(run_id: str, slot: int):
    """Registers ``slot``; executes ENTER (read_lock) / EXIT (read_unlock) / QUIT commands, each
    acknowledged with its sequence number."""
    region = Region.attach(run_id, layout())
    try:
        dom = RcuDomain(region, "rcu", slot, tag=slot + 1)
        dom.register()
        mem = region.mem
        cmd, ack = region.word("cmd", slot), region.word("ack", slot)
        seen = 0
        while True:
            c = mem.load(cmd)
            seq, op = c >> 8, c & 0xFF
            if seq == seen:
                time.sleep(0.0005)
                continue
            seen = seq
            if op == ENTER:
                dom.read_lock()
            elif op == EXIT:
                dom.read_unlock()
            mem.store(ack, seq)
            if op == QUIT:
                break
        dom.unregister()
    finally:
        region.close()


class Readers:
    def __init__(self, ctx, procs, region, run_id):
        self.ctx, self.procs, self.region, self.run_id = ctx, procs, region, run_id
        self.seq = {}
        self.p = {}

    def start(self, slot: int):
        self.region.v["cmd"][slot] = 0
        self.region.v["ack"][slot] = 0
        p = self.ctx.Process(target=reader_worker, args=(self.run_id, slot))
        self.procs.append(p)
        p.start()
        self.p[slot] = p
        self.seq[slot] = 0
        wait_until(lambda: int(self.region.v["rcu_slots"][slot, 2]) == p.pid, 30, what="reader registered")
        return p

    def send(self, slot: int, op: int, wait: bool = True):
        self.seq[slot] += 1
        s = self.seq[slot]
        self.region.mem.store(self.region.word("cmd", slot), (s << 8) | op)
        if wait:
            wait_until(lambda: self.region.mem.load(self.region.word("ack", slot)) == s, 30,
                       what=f"reader {slot} op {op}")

    def quit_all(self):
        for slot, p in self.p.items():
            if p.is_alive():
                self.send(slot, QUIT)
                p.join(10)


@pytest.fixture
def readers(ctx, procs, region, run_id):
    r = Readers(ctx, procs, region, run_id)
    yield r
    r.quit_all()


class Sync(threading.Thread):
    """synchronize() in a thread of this process, so that the test can watch it block.

    The snapshot is taken (``started`` set) before the wait begins."""

    def __init__(self, dom):
        super().__init__(daemon=True)
        self.dom = dom
        self.started = threading.Event()
        self.done = threading.Event()
        self.exc = None

    def run(self):
        try:
            cookie = self.dom.get_state()
            self.started.set()
            self.dom.cond_synchronize(cookie)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.exc = e
        finally:
            self.started.set()
            self.done.set()


def _start_sync(dom) -> Sync:
    t = Sync(dom)
    t.start()
    assert t.started.wait(10)
    return t


def _gp_running(region) -> bool:
    return int(region.v["rcu_hdr"][3]) & 1 == 1


# -- read side --------------------------------------------------------------------------------------
def test_nested_read_lock_in_process(region):
    dom = RcuDomain(region, "rcu", 0, tag=1)
    dom.register()
    assert dom.reader.nesting() == 0
    dom.read_lock()
    dom.read_lock()
    with dom.reader:
        assert dom.reader.nesting() == 3
    assert dom.reader.nesting() == 2
    assert dom.readers_inside() == [0]
    with pytest.raises(RuntimeError, match="inside its own read-side"):
        dom.synchronize()
    with pytest.raises(RuntimeError, match="unregister inside"):
        dom.unregister()
    dom.read_unlock()
    dom.read_unlock()
    assert dom.reader.nesting() == 0 and dom.readers_inside() == []
    with pytest.raises(RuntimeError, match="without rcu_read_lock"):
        dom.read_unlock()
    seq = dom.gp_seq
    dom.synchronize()  # no reader: returns at once, one GP
    assert dom.gp_seq == seq + 1
    dom.unregister()


def test_slot_out_of_range(region):
    with pytest.raises(ValueError, match="outside"):
        RcuDomain(region, "rcu", NSLOTS, tag=1)


# -- synchronize vs readers in other processes ------------------------------------------------------
def test_synchronize_waits_for_nested_reader_in_other_process(region, readers):
    readers.start(1)
    readers.send(1, ENTER)
    readers.send(1, ENTER)  # nested
    dom = RcuDomain(region, "rcu", None, tag=100)
    seq = dom.gp_seq
    t = _start_sync(dom)
    assert not t.done.wait(0.3), "synchronize returned while a reader was inside"
    readers.send(1, EXIT)  # still nested once
    assert not t.done.wait(0.3), "synchronize returned while a reader was still inside (nesting 1)"
    assert dom.gp_seq == seq
    t0 = time.monotonic()
    readers.send(1, EXIT)
    assert t.done.wait(5)
    assert time.monotonic() - t0 < 0.5, "synchronize did not return promptly after the last unlock"
    assert t.exc is None
    assert dom.gp_seq == seq + 1


def _phase(region) -> int:
    return int(region.v["rcu_hdr"][0]) & GP_CTR_PHASE


def test_grace_period_does_not_wait_for_readers_after_its_flip(region, readers):
    """Liveness: a reader that entered after the GP flipped the phase is not waited for (else a
    stream of readers could starve writers)."""
    for s in (1, 2):
        readers.start(s)
    dom = RcuDomain(region, "rcu", None, tag=100)
    phase0 = _phase(region)
    readers.send(1, ENTER)  # before the GP: waited for
    t = _start_sync(dom)
    wait_until(lambda: _phase(region) != phase0, 10, what="phase flip")
    readers.send(2, ENTER)  # after the flip: not waited for
    assert not t.done.wait(0.2), "returned while a pre-existing reader was inside"
    readers.send(1, EXIT)
    assert t.done.wait(5), "grace period waited for a reader that entered after the phase flip"
    assert t.exc is None
    readers.send(2, EXIT)


def test_full_gp_after_call_required_to_share(region, readers):
    """A caller arriving while another caller's GP runs must not return at the end of that GP: a
    reader that entered after its call (and after the running GP's phase flip) is not covered by
    the running GP. (rcu_seq_snap: wait for the *next* full grace period.)"""
    for s in (1, 3):
        readers.start(s)
    d1 = RcuDomain(region, "rcu", None, tag=101)
    d2 = RcuDomain(region, "rcu", None, tag=102)
    phase0 = _phase(region)
    readers.send(1, ENTER)  # R1: pre-existing, holds up W1's GP
    w1 = _start_sync(d1)
    wait_until(lambda: _phase(region) != phase0 and _gp_running(region), 10, what="W1 flipped")
    w2 = _start_sync(d2)  # W2's call: while W1's GP runs
    readers.send(3, ENTER)  # R3: after W2's call and after W1's flip; W1's GP does not wait for it
    readers.send(1, EXIT)
    assert w1.done.wait(5) and w1.exc is None
    assert not w2.done.wait(0.3), "W2 returned at the end of a GP that began before its call"
    assert d2.shared_gps == 0
    readers.send(3, EXIT)
    assert w2.done.wait(5) and w2.exc is None
    assert d1.gps == 1 and d2.gps == 1


def test_concurrent_callers_share_grace_period(region, readers):
    readers.start(1)
    doms = [RcuDomain(region, "rcu", None, tag=200 + i) for i in range(3)]
    readers.send(1, ENTER)
    seq = doms[0].gp_seq
    w1 = _start_sync(doms[0])
    wait_until(lambda: _gp_running(region), 10, what="first GP running")
    w2, w3 = _start_sync(doms[1]), _start_sync(doms[2])  # both snapshot during the first GP
    time.sleep(0.05)
    readers.send(1, EXIT)
    for t in (w1, w2, w3):
        assert t.done.wait(5) and t.exc is None
    assert doms[0].gp_seq == seq + 2, "3 overlapping calls need exactly 2 grace periods"
    assert sum(d.shared_gps for d in doms) == 1
    assert sum(d.gps for d in doms) == 2


# -- multi-process update/read checker (rcutorture-like) -------------------------------------------
def rw_writer(run_id: str, slot: int, n: int, broken: bool):
    """n times: publish a new element, synchronize, poison the old one."""
    region = Region.attach(run_id, layout())
    try:
        dom = RcuDomain(region, "rcu", slot, tag=slot + 1, broken=broken)
        dom.register()
        mem, w = region.mem, region.word
        ptr, nxt, elem = w("ctl", C_PTR), w("ctl", C_NEXT), w("elem")
        mem.fetch_add(w("ctl", C_READY), 1)
        while not mem.load(w("ctl", C_GO)):
            time.sleep(0.0005)
        for _ in range(n):
            v = mem.fetch_add(nxt, 1)
            mem.store(elem + v % K, v)
            old = mem.xchg(ptr, v)  # publish (full barrier)
            dom.synchronize()
            mem.store(elem + old % K, -1)  # free: poison
            if broken:
                _prims.spin_ns(20_000)
        res = w("res", slot)
        mem.store(res, dom.gps)
        mem.store(res + 1, dom.shared_gps)
        dom.unregister()
        mem.fetch_add(w("ctl", C_DONE), 1)
    finally:
        region.close()


def rw_reader(run_id: str, slot: int, hold_ns: int):
    """Until told to stop: inside a read-side critical section, dereference the current element
    and check it stays valid (not poisoned, not reused) while held."""
    region = Region.attach(run_id, layout())
    try:
        dom = RcuDomain(region, "rcu", slot, tag=slot + 1)
        dom.register()
        mem, w = region.mem, region.word
        ld, lock, unlock, spin = mem.load, dom.read_lock, dom.read_unlock, _prims.spin_ns
        ptr, elem, stop = w("ctl", C_PTR), w("elem"), w("ctl", C_STOP)
        errs = reads = 0
        mem.fetch_add(w("ctl", C_READY), 1)
        while not ld(stop):
            lock()
            v = ld(ptr)
            x = ld(elem + v % K)
            spin(hold_ns)
            y = ld(elem + v % K)
            unlock()
            reads += 1
            if x != v or y != v:
                errs += 1
        mem.fetch_add(w("ctl", C_ERR), errs)
        mem.fetch_add(w("ctl", C_READS), reads)
        dom.unregister()
    finally:
        region.close()


def _run_rw(ctx, procs, region, run_id, nwriters, nreaders, n, broken, hold_ns=20_000):
    v = region.v
    v["ctl"][:] = 0
    v["res"][:] = 0
    v["elem"][:] = -1
    v["elem"][0] = 0  # element 0 is current
    v["ctl"][C_NEXT, 0] = 1
    ps = [ctx.Process(target=rw_reader, args=(run_id, i, hold_ns)) for i in range(nreaders)]
    ps += [ctx.Process(target=rw_writer, args=(run_id, nreaders + i, n, broken)) for i in range(nwriters)]
    procs.extend(ps)
    for p in ps:
        p.start()
    mem, w = region.mem, region.word
    wait_until(lambda: mem.load(w("ctl", C_READY)) == len(ps), 30, what="workers ready")
    mem.store(w("ctl", C_GO), 1)
    wait_until(lambda: mem.load(w("ctl", C_DONE)) == nwriters, 60, interval=0.005, what="writers done")
    mem.store(w("ctl", C_STOP), 1)
    for p in ps:
        p.join(30)
    assert [p.exitcode for p in ps] == [0] * len(ps)
    gps = int(v["res"][nreaders:nreaders + nwriters, 0].sum())
    shared = int(v["res"][nreaders:nreaders + nwriters, 1].sum())
    return int(v["ctl"][C_ERR, 0]), int(v["ctl"][C_READS, 0]), gps, shared


def test_concurrent_writers_share_gps_and_readers_stay_safe(ctx, procs, region, run_id):
    nw, n = 3, 40
    dom = RcuDomain(region, "rcu", None, tag=100)
    seq0 = dom.gp_seq
    errs, reads, gps, shared = _run_rw(ctx, procs, region, run_id, nw, 2, n, broken=False)
    assert reads > 0
    assert errs == 0, f"{errs} reads saw their element freed inside the critical section"
    assert gps + shared == nw * n
    assert dom.gp_seq - seq0 == gps
    assert shared > 0 and gps < nw * n, "overlapping synchronize calls never shared a grace period"


def test_checker_detects_broken_grace_period(ctx, procs, region, run_id):
    """Control: with a grace period that does not wait, the same checker must see errors."""
    for _attempt in range(4):
        errs, reads, _, _ = _run_rw(ctx, procs, region, run_id, 2, 2, 100, broken=True)
        if errs:
            return
    pytest.fail("broken grace period never detected: the checker cannot fail")


# -- call_rcu, polled grace periods, barrier ----------------------------------------------------------
def test_call_rcu_runs_only_after_grace_period(region, readers):
    me = RcuDomain(region, "rcu", None, tag=100)
    other = RcuDomain(region, "rcu", None, tag=101)  # "another process" running grace periods
    ran: list[tuple[str, int]] = []
    seq0 = me.gp_seq
    me.call_rcu(lambda: ran.append(("a", me.gp_seq)))
    me.call_rcu(lambda: ran.append(("b", me.gp_seq)))
    assert me.poll() == 0 and ran == []
    other.synchronize()  # a full GP that began after call_rcu
    assert me.poll() == 2
    assert [r[0] for r in ran] == ["a", "b"] and all(s > seq0 for _, s in ran)

    # a reader inside blocks the callback's grace period
    readers.start(1)
    readers.send(1, ENTER)
    me.call_rcu(lambda: ran.append(("c", me.gp_seq)))
    t = _start_sync(other)
    for _ in range(5):
        time.sleep(0.05)
        assert me.poll() == 0
    readers.send(1, EXIT)
    assert t.done.wait(5) and t.exc is None
    assert me.poll() == 1 and ran[-1][0] == "c"


def test_polled_grace_period_and_barrier(region):
    a = RcuDomain(region, "rcu", None, tag=100)
    b = RcuDomain(region, "rcu", None, tag=101)
    cookie = a.get_state()
    assert not a.poll_state(cookie)
    b.synchronize()
    assert a.poll_state(cookie)
    seq = a.gp_seq
    a.cond_synchronize(cookie)  # already done: no GP
    assert a.gp_seq == seq
    ran = []
    for i in range(3):
        a.call_rcu(lambda i=i: ran.append(i))
    assert a.barrier() == 3 and ran == [0, 1, 2]
    assert a.gp_seq == seq + 1, "one grace period covers all callbacks queued before it"
    assert a.barrier() == 0 and a.gp_seq == seq + 1  # nothing pending: no GP


def test_aborted_gp_state_never_reads_as_completed(region):
    """A GP that died midway leaves gp_state odd; the next GP reuses that number (ends at 6), and a
    cookie taken while the state was odd still needs a grace period after that one."""
    a = RcuDomain(region, "rcu", None, tag=100)
    region.v["rcu_hdr"][3] = 5  # a GP started at 5 and never finished
    cookie = a.get_state()
    assert cookie == 8
    a.synchronize()
    assert a.gp_state == 6 and not a.poll_state(cookie)
    a.cond_synchronize(cookie)
    assert a.gp_state == 8 and a.poll_state(cookie)


def test_broken_domain_does_not_wait(region, readers):
    readers.start(1)
    readers.send(1, ENTER)
    dom = RcuDomain(region, "rcu", None, tag=100, broken=True)
    seq = dom.gp_seq
    t = time.monotonic()
    dom.synchronize()
    assert time.monotonic() - t < 1.0 and dom.gp_seq == seq + 1
    readers.send(1, EXIT)


# -- stalls and dead processes ----------------------------------------------------------------------
def test_stall_warning_names_the_slot(region, readers):
    readers.start(3)
    readers.send(3, ENTER)
    stalls = []
    dom = SrcuDomain(region, "rcu", None, tag=100, stall_ns=150_000_000, slot_name=slot_name,
                     on_stall=lambda slot, ns: stalls.append((slot, ns)))
    t = _start_sync(dom)
    wait_until(lambda: stalls, 10, what="stall warning")
    time.sleep(0.2)
    readers.send(3, EXIT)
    assert t.done.wait(5) and t.exc is None
    assert len(stalls) == 1, f"warned more than once per slot: {stalls}"
    assert stalls[0][0] == 3 and stalls[0][1] >= 150_000_000
    assert dom.stalls == stalls


def test_stall_warning_default_prints(region, readers, capsys):
    readers.start(2)
    readers.send(2, ENTER)
    dom = RcuDomain(region, "rcu", None, tag=100, stall_ns=50_000_000, slot_name=slot_name, name="track_srcu")
    t = _start_sync(dom)
    wait_until(lambda: dom.stalls, 10, what="stall")
    readers.send(2, EXIT)
    assert t.done.wait(5)
    err = capsys.readouterr().err
    assert "RCU stall: vcpu2 in read-side critical section of track_srcu" in err


def test_dead_reader_raises_grace_period_blocked(region, readers):
    p = readers.start(4)
    readers.send(4, ENTER)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    dom = RcuDomain(region, "rcu", None, tag=100, slot_name=slot_name)
    t = time.monotonic()
    with pytest.raises(GracePeriodBlocked, match=r"dead reader slot of vcpu4"):
        dom.synchronize()
    assert time.monotonic() - t < 2.0
    # the gp lock was released: the next caller is told too (no hang)
    with pytest.raises(GracePeriodBlocked):
        dom.synchronize()
    # a new process takes the slot over: grace periods work again
    readers.start(4)
    dom.synchronize()


def test_reader_killed_during_synchronize(region, readers):
    p = readers.start(5)
    readers.send(5, ENTER)
    dom = RcuDomain(region, "rcu", None, tag=100, slot_name=slot_name)
    t = _start_sync(dom)
    assert not t.done.wait(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert t.done.wait(5)
    assert isinstance(t.exc, GracePeriodBlocked) and "vcpu5" in str(t.exc)


def gp_holder_worker(run_id: str):
    region = Region.attach(run_id, layout())
    try:
        RcuDomain(region, "rcu", None, tag=77).synchronize()  # blocks on the reader; gets killed
    finally:
        region.close()


def test_dead_gp_lock_holder_is_taken_over(ctx, procs, region, run_id, readers):
    """A writer killed while it holds the gp lock (here: waiting for a reader) leaves the lock
    recorded as held by it; the next writer notices within the dead-holder check interval, takes
    the lock over (recorded in the header for the diagnosis) and runs a full grace period."""
    readers.start(1)
    readers.send(1, ENTER)
    p = ctx.Process(target=gp_holder_worker, args=(run_id,))
    procs.append(p)
    p.start()
    dom = RcuDomain(region, "rcu", None, tag=100)
    wait_until(lambda: dom.gp_lock_holder() == p.pid, 30, what="writer holds the gp lock")
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert dom.gp_lock_holder() == p.pid  # still recorded: the dead process holds it
    t = _start_sync(dom)
    wait_until(lambda: dom.gp_lock_takeovers, 10, what="gp lock taken over")
    assert dom.gp_lock_takeovers == [(p.pid, 77)] and dom.gp_lock_dead_holder() == (77, p.pid)
    assert dom.gp_lock_holder() == os.getpid()
    assert not t.done.wait(0.3), "the grace period after the takeover did not wait for the reader"
    readers.send(1, EXIT)
    assert t.done.wait(10) and t.exc is None
    assert dom.gp_lock_holder() == 0 and dom.gp_state & 1 == 0


# -- issue 12: aborted grace periods, pid reuse, SIGTERM inside synchronize -------------------------
class Abort(Exception):
    pass


def _abort(slot, ns):
    raise Abort(f"slot {slot} after {ns} ns")


def test_aborted_gp_does_not_complete_earlier_cookies(region, readers):
    """A grace period that ends in an exception leaves gp_state odd. The next grace period must not
    make cookies taken before the abort read as complete while it still waits for a reader that
    was inside before them (defect 3: it started at cur + 2, past those cookies)."""
    readers.start(1)
    readers.send(1, ENTER)  # inside before the cookie: every GP that completes it waits for this reader
    a = RcuDomain(region, "rcu", None, tag=100, stall_ns=50_000_000, on_stall=_abort)
    cookie = a.get_state()
    ran = []
    a.call_rcu(lambda: ran.append(1))
    with pytest.raises(Abort):
        a.synchronize()
    assert a.gp_state & 1 == 1, "the aborted GP left gp_state odd"
    assert not a.poll_state(cookie)
    b = RcuDomain(region, "rcu", None, tag=101, on_stall=lambda slot, ns: None)
    t = _start_sync(b)
    gplock = Mutex(region.mem, region.word("rcu_gplock"), -1, 1)
    wait_until(lambda: gplock.owner() == 101, 10, what="second GP running")
    for _ in range(5):  # while the second GP waits for reader 1
        time.sleep(0.05)
        assert not t.done.is_set(), "the second GP ended with reader 1 inside"
        assert not a.poll_state(cookie), "cookie from before the abort reads as complete with a reader inside"
        assert a.poll() == 0 and ran == [], "call_rcu callback ran with a reader inside"
    seq = a.gp_seq
    readers.send(1, EXIT)
    assert t.done.wait(10) and t.exc is None
    assert a.gp_state & 1 == 0 and a.gp_seq == seq + 1
    assert a.poll_state(cookie) and a.poll() == 1 and ran == [1]
    a.cond_synchronize(cookie)  # done: returns at once
    assert a.gp_seq == seq + 1


def _fake_reader_slot(region, slot: int, pid: int, start: int) -> None:
    """Slot ``slot`` inside a read-side critical section, registered by (pid, start)."""
    s = region.v["rcu_slots"][slot]
    s[1], s[2], s[3] = slot + 1, pid, start
    s[0] = int(region.v["rcu_hdr"][0]) | GP_COUNT


def test_dead_reader_found_despite_pid_reuse(region):
    """A reader slot records pid + start time: a dead reader whose pid now belongs to another live
    process (here: this one, with another start time) is still found dead (defect 6)."""
    me = os.getpid()
    _fake_reader_slot(region, 6, me, proc_starttime(me) - 1)
    dom = RcuDomain(region, "rcu", None, tag=100, slot_name=slot_name, on_stall=lambda slot, ns: None)
    t = _start_sync(dom)
    try:
        assert t.done.wait(10), "grace period blocked forever by a dead reader whose pid was reused"
        assert isinstance(t.exc, GracePeriodBlocked) and "vcpu6" in str(t.exc), t.exc
    finally:
        region.v["rcu_slots"][6, 0] = 0
        t.done.wait(10)
    # control: the right start time is a live reader: the grace period waits for it
    _fake_reader_slot(region, 6, me, proc_starttime(me))
    t = _start_sync(dom)
    try:
        assert not t.done.wait(0.5), "a live reader was taken for dead"
    finally:
        region.v["rcu_slots"][6, 0] = 0
    assert t.done.wait(10) and t.exc is None


def test_register_records_pid_and_start_time(region):
    dom = RcuDomain(region, "rcu", 2, tag=3)
    dom.register()
    me = os.getpid()
    assert list(region.v["rcu_slots"][2, 1:4]) == [3, me, proc_starttime(me)]
    dom.unregister()
    assert not region.v["rcu_slots"][2, 1:4].any()


C_VICTIM = 8  # ctl line: [0] grace periods the victim completed, [1] its pid


def sync_loop_worker(run_id: str):
    """Loop on synchronize() until a SIGTERM (SystemExit, as in the vCPU workers) ends it."""
    sigterm_to_exit()
    region = Region.attach(run_id, layout())
    try:
        mem, v = region.mem, region.word("ctl", C_VICTIM)
        dom = RcuDomain(region, "rcu", None, tag=50, on_stall=lambda slot, ns: None)
        mem.store(v + 1, os.getpid())
        while True:
            dom.synchronize()
            mem.fetch_add(v, 1)
    finally:
        region.close()


class Competitor(threading.Thread):
    """Another writer: loops on synchronize(); every call must end (done or a named error)."""

    def __init__(self, dom):
        super().__init__(daemon=True)
        self.dom, self.stop, self.ended, self.errors = dom, threading.Event(), 0, []

    def run(self):
        while not self.stop.is_set():
            try:
                self.dom.synchronize()
            except (GracePeriodBlocked, RuntimeError) as e:
                self.errors.append(e)
            self.ended += 1


SIGTERMS = int(os.environ.get("PTS_TEST_SIGTERMS", "400"))


@pytest.mark.parametrize("sig,n", [(signal.SIGTERM, SIGTERMS), (signal.SIGKILL, SIGTERMS // 4)],
                         ids=["SIGTERM", "SIGKILL"])
def test_signal_never_leaks_gp_lock_without_holder(ctx, procs, region, run_id, sig, n):
    """Defect 2: a signal at a random moment of a process looping on synchronize() (SIGTERM =
    SystemExit as in the vCPU workers; SIGKILL = no cleanup at all); after each death the gp lock is
    free or recorded as held by exactly the dead process (pid + start time), and another writer's
    synchronize() keeps ending (it takes a dead writer's lock over)."""
    mem, w = region.mem, region.word
    v = region.v
    v["ctl"][:] = 0
    v["elem"][:] = 0
    churn = ctx.Process(target=rw_reader, args=(run_id, 1, 50_000))  # makes synchronize() wait
    procs.append(churn)
    churn.start()
    wait_until(lambda: mem.load(w("ctl", C_READY)) == 1, 30, what="reader")
    watch = RcuDomain(region, "rcu", None, tag=100, on_stall=lambda slot, ns: None)
    gplock = Mutex(mem, w("rcu_gplock"), -1, 1)  # a view of the gp lock: owner tag, holder
    comp = Competitor(watch)
    comp.start()
    rng = random.Random(12)
    held_by_dead = 0
    t0 = time.monotonic()
    try:
        for i in range(n):
            v["ctl"][C_VICTIM] = 0
            p = ctx.Process(target=sync_loop_worker, args=(run_id,))
            procs.append(p)
            p.start()
            wait_until(lambda: mem.load(w("ctl", C_VICTIM)) >= 1, 30, what=f"victim {i} looping")
            start = proc_starttime(p.pid)
            time.sleep(rng.uniform(0, 0.01))
            os.kill(p.pid, sig)
            p.join(10)
            assert p.exitcode in (-signal.SIGKILL, 128 + signal.SIGTERM), f"victim {i}: exit code {p.exitcode}"
            procs.remove(p)
            for _ in range(100):  # a consistent (owner, holder) pair: the competitor may take over
                tag, holder = gplock.owner(), gplock.holder()
                if gplock.owner() == tag:
                    break
            if tag == 50:
                held_by_dead += 1
                assert holder == (p.pid, start), (f"signal {i}: the gp lock is held by the dead victim "
                                                  f"{(p.pid, start)} but its recorded holder is {holder}")
            else:
                assert tag in (0, 100), f"signal {i}: gp lock owner tag {tag}"
            ended = comp.ended
            wait_until(lambda ended=ended: comp.ended > ended or not comp.is_alive(), 10,
                       what=f"another writer's synchronize ending after victim {i} died")
    finally:
        comp.stop.set()
        comp.join(15)
        mem.store(w("ctl", C_STOP), 1)
        churn.join(10)
    assert not comp.is_alive(), "a synchronize() hangs"
    assert all(isinstance(e, GracePeriodBlocked) or type(e).__name__ == "LockHolderDied"
               for e in comp.errors), comp.errors
    t = _start_sync(watch)
    assert t.done.wait(10) and t.exc is None
    print(f"{n} x {sig.name} in {time.monotonic() - t0:.1f} s: {held_by_dead} left the gp lock held by the "
          f"dead process (recorded), {len(watch.gp_lock_takeovers)} taken over by the other writer, "
          f"{len(comp.errors)} named errors in the other writer")
