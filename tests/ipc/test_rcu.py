"""RCU / SRCU domains across processes: grace periods wait for pre-existing readers (and only for a
full grace period that began after the call), nesting, shared grace periods, call_rcu, polled
grace periods. Stalls, dead readers and dead gp-lock holders: test_rcu_faults.py."""


from __future__ import annotations

import time

import pytest
from conftest import wait_until
from rcu_kit import (  # noqa: F401  (fixtures and helpers shared by the RCU tests)
    C_DONE,
    C_ERR,
    C_GO,
    C_NEXT,
    C_PTR,
    C_READS,
    C_READY,
    C_STOP,
    ENTER,
    EXIT,
    NSLOTS,
    QUIT,
    K,
    Readers,
    Sync,
    _gp_running,
    _start_sync,
    layout,
    reader_worker,
    readers,
    region,
    rw_reader,
    rw_writer,
    slot_name,
)

from ipc.rcu import GP_CTR_PHASE, HDR_GP_STATE, RcuDomain


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


class _PollOffByOne(RcuDomain):
    """The operator mutant ``off-by-one@ipc/rcu.py:RcuDomain.poll:self._cbs[0][0]<=done#2``: a
    callback whose cookie is exactly the completed state waits for one more grace period."""

    def poll(self) -> int:
        done = self.mem.load(self.hdr_w + HDR_GP_STATE)
        n = 0
        while self._cbs and self._cbs[0][0] < done:
            self._cbs.popleft()[1]()
            n += 1
        return n


@pytest.mark.parametrize("domain, left", [(RcuDomain, 0), (_PollOffByOne, 1)])
def test_torture_barrier_check(region, domain, left):
    """rcutorture's rcu_barrier check (ipc/torture/rcutorture.py, run by the writer at the end of
    every rcu / srcu torture): quiet on the real domain, fails when barrier leaves a callback."""
    from ipc.torture.rcutorture import rcu_barrier_check
    a = domain(region, "rcu", None, tag=100)
    pending = [0]
    assert rcu_barrier_check(a, pending) == left
    assert pending[0] == left


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


