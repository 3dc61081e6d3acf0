"""Named preemption points inside the C primitives (issue 23 item 2; ipc/prims/, ipc/fuzz.py).

The hook set with ``_prims.set_preempt_hook`` is called at each point with the point's name, never
when unset; an exception from it ends the C call with the primitive consistent (a read_lock
aborted after the counter load publishes nothing; a lock slow path aborted leaves the lock as it
was, a claimed RwLock write gives the claim back); ``fuzz.configure`` routes the points to the
fuzzer (and, with ``fuzz.EXPLORE_C_POINTS``, in a process scheduled by ipc/sched to its
client). And the window is what a grace period with its first wait dropped (liburcu's reason for
two waits) needs: a grace period run inside ``rcu.read_lock.after_ctr_load`` makes the reader
publish a stale phase, which the next correct grace period waits for and the buggy one does not.

The zero cost when off is a benchmark (``python -m bench.primitives``), not a test.
"""

from __future__ import annotations

import mmap
import threading

import pytest

from ipc import _prims, fuzz, sched
from ipc.rcu import GP_COUNT, GP_CTR_PHASE, RcuDomain
from ipc.shm import Layout

POINTS = (
    "rcu.read_lock.after_ctr_load",
    "spin.slow.after_trylock",
    "mutex.slow.after_trylock",
    "mutex.slow.before_sleep",
    "rw.read.slow.after_backoff",
    "rw.write.slow.after_trylock",
    "rw.write.slow.after_claim",
)
NEST = GP_CTR_PHASE - 1
HDR, SLOT, SLOT2, LK = 0, 8, 16, 24  # word indices in the test buffer
TIMEOUT = 2_000_000  # ns: a lock() that would wait returns False after this


class Abort(BaseException):  # noqa: N818  (as sched.ScheduleAborted: not an Exception)
    pass


@pytest.fixture
def mem():
    mm = mmap.mmap(-1, 4096)
    m = _prims.Mem(mm)
    m.store(HDR, GP_COUNT)
    yield m
    m.release()
    mm.close()


@pytest.fixture
def hook():
    """hook.set(fn): install fn (wrapped: records every name in hook.calls, emptied by set);
    the hook of before the test is restored afterwards."""
    calls: list[str] = []
    saved = _prims.set_preempt_hook(None)

    class H:
        def set(self, fn=None):
            calls.clear()

            def h(name):
                calls.append(name)
                if fn is not None:
                    fn(name)

            _prims.set_preempt_hook(h)

    H.calls = calls
    yield H()
    _prims.set_preempt_hook(saved)


def _raise(name):
    raise Abort(name)


def test_the_points_are_named():
    assert _prims.preempt_points() == POINTS


def test_set_preempt_hook_returns_the_previous_and_refuses_a_non_callable():
    saved = _prims.set_preempt_hook(None)
    try:
        f = print
        assert _prims.set_preempt_hook(f) is None
        assert _prims.set_preempt_hook(None) is f
        with pytest.raises(TypeError):
            _prims.set_preempt_hook(3)
        assert _prims.set_preempt_hook(None) is None
    finally:
        _prims.set_preempt_hook(saved)


# -- RCU read side ------------------------------------------------------------------------------

def test_read_lock_calls_the_hook_at_the_outermost_entry_only(mem, hook):
    r = _prims.RcuReader(mem, HDR, SLOT)
    r.lock()
    r.unlock()
    assert hook.calls == []  # unset: never called
    hook.set()
    r.lock()
    r.lock()  # nested: a single store, no point
    assert hook.calls == ["rcu.read_lock.after_ctr_load"]
    r.unlock()
    r.unlock()
    assert r.nesting() == 0 and mem.load(SLOT) & NEST == 0


def test_read_lock_aborted_after_the_counter_load_publishes_nothing(mem, hook):
    r = _prims.RcuReader(mem, HDR, SLOT)
    hook.set(_raise)
    with pytest.raises(Abort, match="rcu.read_lock.after_ctr_load"):
        r.lock()
    assert r.nesting() == 0 and mem.load(SLOT) == 0  # no half-published slot
    with pytest.raises(RuntimeError, match="without rcu_read_lock"):
        r.unlock()
    hook.set()  # the point works again after an exception (no call left "in progress")
    r.lock()
    assert r.nesting() == 1 and hook.calls[-1] == "rcu.read_lock.after_ctr_load"
    r.unlock()


def test_a_phase_flip_inside_the_window_publishes_the_old_phase(mem, hook):
    r = _prims.RcuReader(mem, HDR, SLOT)
    old = mem.load(HDR)
    hook.set(lambda name: mem.store(HDR, mem.load(HDR) ^ GP_CTR_PHASE))  # a grace period's flip
    r.lock()
    assert mem.load(SLOT) == old  # the phase loaded before the flip, nesting 1
    assert (mem.load(SLOT) ^ mem.load(HDR)) & GP_CTR_PHASE  # what the wait before the next flip sees
    r.unlock()


def test_the_hook_taking_the_same_slot_makes_the_outer_call_nest(mem, hook):
    r = _prims.RcuReader(mem, HDR, SLOT)
    hook.set(lambda name: r.lock())  # the inner call reaches the point too: skipped, no recursion
    r.lock()
    assert hook.calls == ["rcu.read_lock.after_ctr_load"]
    assert r.nesting() == 2
    r.unlock()
    r.unlock()
    assert r.nesting() == 0


def test_the_hook_is_not_reentered_by_its_own_primitives(mem, hook):
    r, r2 = _prims.RcuReader(mem, HDR, SLOT), _prims.RcuReader(mem, HDR, SLOT2)
    hook.set(lambda name: (r2.lock(), r2.unlock()))
    r.lock()
    assert hook.calls == ["rcu.read_lock.after_ctr_load"]
    r.unlock()


def test_a_region_released_by_the_hook_fails_the_call_without_touching_it(hook):
    mm = mmap.mmap(-1, 4096)
    m = _prims.Mem(mm)
    m.store(HDR, GP_COUNT)
    r = _prims.RcuReader(m, HDR, SLOT)
    hook.set(lambda name: m.release())
    with pytest.raises(ValueError, match="released"):
        r.lock()
    del r
    mm.close()  # the export was dropped when the call ended: the mapping can go


# -- lock slow paths ----------------------------------------------------------------------------

def _locks(mem, kind):
    cls = {"spin": _prims.SpinLock, "mutex": _prims.Mutex, "rw": _prims.RwLock}[kind]
    return cls(mem, LK, tag=1), cls(mem, LK, tag=2)


@pytest.mark.parametrize("kind, point", [("spin", "spin.slow.after_trylock"),
                                         ("mutex", "mutex.slow.after_trylock"),
                                         ("rw", "rw.write.slow.after_trylock")])
def test_lock_slow_path_point_and_its_abort(mem, hook, kind, point):
    a, b = _locks(mem, kind)
    assert a.lock()
    assert b.lock(TIMEOUT) is False  # unset: the slow path runs, no call
    assert hook.calls == []
    hook.set()
    assert b.lock(TIMEOUT) is False
    assert hook.calls[0] == point
    state = mem.load(LK)
    hook.set(_raise)
    with pytest.raises(Abort, match=point):
        b.lock(TIMEOUT)
    assert mem.load(LK) == state and a.is_held() and not b.is_held()  # untouched
    a.unlock()
    assert mem.load(LK) == 0
    hook.set()
    assert b.lock() and b.is_held()  # uncontended: the fast path, no point
    b.unlock()


def test_mutex_before_sleep_abort_leaves_only_the_contended_mark(mem, hook):
    a, b = _locks(mem, "mutex")
    assert a.lock()
    hook.set(lambda name: name == "mutex.slow.before_sleep" and _raise(name))
    with pytest.raises(Abort, match="mutex.slow.before_sleep"):
        b.lock(TIMEOUT)
    assert hook.calls == ["mutex.slow.after_trylock", "mutex.slow.before_sleep"]
    assert mem.load(LK) & 0xFFFFFFFF == 2  # marked contended, as any waiter leaves it
    assert a.is_held() and not b.is_held() and b.owner() == 1
    a.unlock()
    assert mem.load(LK) == 0  # the unlock cleared the mark (and woke nobody: nobody sleeps)
    assert b.lock(TIMEOUT) and b.is_held()
    b.unlock()


def test_rw_read_backoff_abort_leaves_no_reader_counted(mem, hook):
    w, rd = _locks(mem, "rw")
    assert w.lock()
    hook.set(_raise)
    with pytest.raises(Abort, match="rw.read.slow.after_backoff"):
        rd.read_lock(TIMEOUT)
    assert rd.readers() == 0 and not rd.read_held()
    hook.set()
    assert rd.read_lock(TIMEOUT) is False  # the point again on each retry round
    assert hook.calls[0] == "rw.read.slow.after_backoff"
    w.unlock()
    assert rd.read_lock(TIMEOUT) and rd.readers() == 1  # fast path now
    rd.read_unlock()
    assert rd.readers() == 0


def test_rw_write_abort_after_the_claim_gives_the_claim_back(mem, hook):
    rd, w = _locks(mem, "rw")
    assert rd.read_lock()
    hook.set(_raise)
    with pytest.raises(Abort, match="rw.write.slow.after_claim"):
        w.lock(TIMEOUT)
    assert mem.load(LK) == 0 and not w.is_held() and w.owner() == 0  # claim given back
    assert rd.readers() == 1
    rd.read_unlock()  # readers can come and go again
    assert rd.read_lock(TIMEOUT)
    rd.read_unlock()
    hook.set()
    assert w.lock(TIMEOUT) and w.is_held()  # no reader: the fast path, no point
    assert "rw.write.slow.after_claim" not in hook.calls
    w.unlock()


# -- routing (ipc/fuzz.py) ----------------------------------------------------------------------

def test_fuzz_configure_routes_the_points_to_the_fuzzer_and_off_clears_them(mem):
    saved_hook, saved = _prims.set_preempt_hook(None), fuzz.ACTIVE
    try:
        fuzz.configure("heavy", 1, 1)
        r = _prims.RcuReader(mem, HDR, SLOT)
        for _ in range(50):
            r.lock()
            r.unlock()
        assert fuzz.hits() == {"rcu.read_lock.after_ctr_load": 50}
        fuzz.configure("off", 1, 1)
        assert _prims.set_preempt_hook(None) is None
    finally:
        fuzz.ACTIVE = saved
        _prims.set_preempt_hook(saved_hook)


def test_a_scheduled_process_gets_the_points_as_scheduling_points(monkeypatch):
    saved_hook, saved = _prims.set_preempt_hook(None), fuzz.ACTIVE
    try:
        client = sched.Client.__new__(sched.Client)  # no turnstile needed: only the routing
        fuzz.ACTIVE = client
        _prims.set_preempt_hook(print)  # inherited from a parent: dropped
        fuzz.configure("light", 1, 1)
        assert fuzz.ACTIVE is client and _prims.set_preempt_hook(None) is None  # off by default
        monkeypatch.setattr(fuzz, "EXPLORE_C_POINTS", True)
        fuzz.configure("light", 1, 1)
        assert fuzz.ACTIVE is client and _prims.set_preempt_hook(None) == client.hit
    finally:
        fuzz.ACTIVE = saved
        _prims.set_preempt_hook(saved_hook)


def test_point_delay_is_seeded_and_delays_a_share_of_hits():
    a, b = fuzz.PointDelay(3, 1, p=0.25, spin_max_ns=1000), fuzz.PointDelay(3, 1, p=0.25, spin_max_ns=1000)
    for _ in range(400):
        a("x")
        b("x")
    assert a.counts == {"x": 400} and a.delays == b.delays and 60 < a.delays < 140


# -- the window a grace period with its first wait dropped needs --------------------------------

class _NoWaitBeforeFlip(RcuDomain):
    """The grace period without its wait before the flip (torture's gp-no-wait-before-flip)."""

    def _wait_readers(self, t0, warned):
        if getattr(self, "_w", None) is warned:
            super()._wait_readers(t0, warned)  # the wait after the flip only
        self._w = warned


def _finishes(fn, within: float) -> tuple[bool, threading.Thread]:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(within)
    return not t.is_alive(), t


@pytest.mark.parametrize("buggy", [False, True])
def test_a_reader_preempted_inside_read_lock_escapes_only_the_one_wait_grace_period(
        region_factory, hook, buggy):
    region = region_factory(Layout("rcu", RcuDomain.fields("rcu", 2)))
    RcuDomain.init(region, "rcu")
    reader = RcuDomain(region, "rcu", 0, 1)
    reader.register()
    gp = (_NoWaitBeforeFlip if buggy else RcuDomain)(region, "rcu", None, 100)
    # a whole grace period runs between the reader's counter load and its slot store
    hook.set(lambda name: gp.synchronize())
    reader.read_lock()
    hook.set()
    assert reader.reader.nesting() == 1 and reader.blocking_readers() == [0]  # a stale phase
    done, t = _finishes(gp.synchronize, 0.3)
    # the correct grace period waits for the reader (its wait before the flip), the buggy one not
    assert done is buggy
    reader.read_unlock()
    t.join(5)
    assert not t.is_alive()
    reader.unregister()


# -- the hook using the same object (cold review of the points) ------------------------------------


def test_a_hook_taking_the_same_rw_read_lock_makes_the_outer_call_nest(mem, hook):
    w, rd = _locks(mem, "rw")
    assert w.lock()
    done = []

    def take(name):
        if name == "rw.read.slow.after_backoff" and not done:
            w.unlock()  # the writer goes; the hook takes the read side of the waiting object itself
            done.append(rd.read_lock(TIMEOUT))

    hook.set(take)
    assert rd.read_lock(TIMEOUT) and done == [True]
    assert rd.readers() == 1  # one reader counted, nested twice (no leaked count)
    rd.read_unlock()
    rd.read_unlock()
    assert rd.readers() == 0 and not rd.read_held()
    assert w.lock(TIMEOUT)  # a writer is not blocked by a leaked reader
    w.unlock()


def test_a_hook_taking_the_same_spin_lock_is_a_recursive_lock_error_not_a_hang(mem, hook):
    a, b = _locks(mem, "spin")
    assert a.lock()

    def take(name):
        a.unlock()
        assert b.lock(TIMEOUT)  # the waiting object takes the lock inside its own slow path

    hook.set(take)
    with pytest.raises(RuntimeError, match="recursive"):
        b.lock(TIMEOUT)
    assert b.is_held()
    b.unlock()


def test_a_hook_that_forks_does_not_let_the_child_carry_on_the_primitive(mem, hook):
    import os

    r = _prims.RcuReader(mem, HDR, SLOT)

    def fork_once(name):
        pid = os.fork()
        if pid:
            fork_once.status = os.waitpid(pid, 0)[1]
        else:
            fork_once.child = True

    fork_once.child = False
    hook.set(fork_once)
    try:
        r.lock()
    except RuntimeError as e:  # the child: refused, its slot untouched
        ok = fork_once.child and "fork() inside a preemption point" in str(e)
        os._exit(0 if ok else 1)
    assert not fork_once.child and r.nesting() == 1  # the parent goes on
    assert os.waitstatus_to_exitcode(fork_once.status) == 0  # the child was refused as it should be
    r.unlock()
