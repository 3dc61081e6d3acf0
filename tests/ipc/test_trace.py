"""ipc.trace: the per-process ring (oldest overwritten, decoded in order), name interning, and the
traced C lock / RCU reader types (events recorded inside the primitives)."""

from __future__ import annotations

import pytest

from ipc import _prims, trace
from ipc.locks import LOCK_WORDS, new_lock
from ipc.rcu import RcuDomain
from ipc.shm import Layout


@pytest.fixture
def tracer_at(region_factory):
    """``make(nprocs, nevents, proc)`` -> (region, Tracer); tracing is turned off afterwards."""

    def make(nprocs=2, nevents=64, proc=0, extra=()):
        r = region_factory(Layout("trace", trace.fields(nprocs, nevents) + list(extra)))
        trace.init(r)
        return r, trace.configure(r, proc)

    yield make
    trace.configure(None)


def test_ring_keeps_the_newest_events_in_order(tracer_at):
    r, tr = tracer_at(nprocs=2, nevents=8, proc=1)
    b, e = tr.pair("op")
    for i in range(20):
        tr.emit(b if i % 2 == 0 else e, i, -i)
    snap = trace.snapshot(r)
    assert set(snap.procs) == {1}  # process 0 wrote nothing
    pid, events, lost = snap.procs[1]
    assert pid == _prims.self_identity()[0]
    # 8 slots; the slot the writer would fill next is not trusted: the newest 7 survive
    assert [ev.a for ev in events] == list(range(13, 20))
    assert [ev.seq for ev in events] == list(range(13, 20)) and lost == 13
    assert all(ev.name == "op" and ev.cat == trace.CAT_OP for ev in events)
    assert [ev.phase for ev in events][:2] == [trace.PH_E, trace.PH_B]
    assert [ev.b for ev in events] == [-a for a in range(13, 20)]
    ts = [ev.ts for ev in events]
    assert ts == sorted(ts) and abs(ts[-1] - _prims.now_ns()) < 5_000_000_000


def test_names_are_interned_once_per_region(tracer_at):
    r, tr = tracer_at()
    ids = [tr.intern(n) for n in ("a", "b", "a")]
    assert ids[0] == ids[2] != ids[1]
    other = trace.Tracer(r, 1)  # another process' view of the same table finds the same ids
    assert other.intern("b") == ids[1]
    assert trace.snapshot(r).names[:2] == ["a", "b"]


def test_emit_without_a_ring_is_a_no_op():
    trace.configure(None)
    _prims.trace_emit(trace.code(trace.CAT_OP, trace.PH_I, 0), 1, 2)  # must not crash or raise


def test_plain_lock_types_when_tracing_is_off(region_factory):
    trace.configure(None)
    r = region_factory(Layout("lk", [("locks", "i8", (1, LOCK_WORDS))]))
    assert type(new_lock("spin", r.mem, r.word("locks", 0))) is _prims.SpinLock
    assert type(new_lock("mutex", r.mem, r.word("locks", 0))) is _prims.Mutex
    assert type(new_lock("rw", r.mem, r.word("locks", 0))) is _prims.RwLock


def _two_tags(tracer_at, kind):
    """(region, lock with tag 1, lock with tag 2): one traced lock word, both named demo_lock"""
    r, _ = tracer_at(extra=[("locks", "i8", (1, LOCK_WORDS))])
    w = r.word("locks", 0)
    return r, new_lock(kind, r.mem, w, tag=1, name="demo_lock"), new_lock(kind, r.mem, w, tag=2, name="demo_lock")


@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_traced_lock_records_wait_and_hold(tracer_at, kind):
    r, holder, me = _two_tags(tracer_at, kind)
    assert isinstance(me, {"spin": _prims.TracedSpinLock, "mutex": _prims.TracedMutex, "rw": _prims.TracedRwLock}[kind])
    assert holder.lock()
    assert me.lock(1_000_000) is False  # contended: a wait that times out, no hold
    holder.unlock()
    assert me.lock()
    me.unlock()
    evs = [(e.cat, e.phase, e.a) for e in trace.snapshot(r).procs[0][1] if e.name == "demo_lock"]
    H, W, B, E = trace.CAT_HOLD, trace.CAT_WAIT, trace.PH_B, trace.PH_E
    assert evs == [(H, B, 0), (W, B, 0), (W, E, 0), (H, E, 0), (H, B, 0), (H, E, 0)]


def test_traced_rwlock_read_side_is_a_hold_of_the_outermost_section(tracer_at):
    """Read sections: hold events with b = 1 (outermost only); a read waiting on a writer: a wait."""
    r, writer, me = _two_tags(tracer_at, "rw")
    assert me.read_lock() and me.read_lock()
    me.read_unlock()
    me.read_unlock()
    assert me.read_trylock()
    me.read_unlock()
    assert writer.lock()
    assert me.read_lock(1_000_000) is False  # a writer holds it: the wait times out, no hold
    writer.unlock()
    evs = [(e.cat, e.phase, e.a, e.b) for e in trace.snapshot(r).procs[0][1] if e.name == "demo_lock"]
    H, W, B, E = trace.CAT_HOLD, trace.CAT_WAIT, trace.PH_B, trace.PH_E
    assert evs == [(H, B, 0, 1), (H, E, 0, 1), (H, B, 0, 1), (H, E, 0, 1),
                   (H, B, 0, 0), (W, B, 0, 0), (W, E, 0, 1), (H, E, 0, 0)]


def test_traced_rcu_reader_marks_the_outermost_section_only(tracer_at):
    r, tr = tracer_at(extra=RcuDomain.fields("rcu", 2))
    RcuDomain.init(r, "rcu")
    d = RcuDomain(r, "rcu", 1, 2, name="demo_rcu")
    assert isinstance(d.reader, _prims.TracedRcuReader)
    for _ in range(2):
        d.read_lock()
        d.read_lock()
        d.read_unlock()
        d.read_unlock()
    d.synchronize()
    evs = [(e.cat, e.phase, e.name) for e in trace.snapshot(r).procs[0][1]]
    R = trace.CAT_RCU
    assert [x for x in evs if x[0] == R] == [(R, trace.PH_B, "demo_rcu"), (R, trace.PH_E, "demo_rcu")] * 2
    ops = [(ph, n) for c, ph, n in evs if c == trace.CAT_OP]
    assert ops == [(trace.PH_B, "synchronize demo_rcu"), (trace.PH_B, "grace period demo_rcu"),
                   (trace.PH_E, "grace period demo_rcu"), (trace.PH_E, "synchronize demo_rcu")]


@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_recover_from_a_killed_holder_begins_the_hold(tracer_at, kind):
    """A takeover from a SIGKILLed holder is a hold that starts at recover(), not at the ring's start."""
    import json
    import os
    import signal

    from ipc.trace import chrome

    r, tr = tracer_at(extra=[("locks", "i8", (1, LOCK_WORDS))])
    w = r.word("locks", 0)
    tr.emit(tr.instant("before"))
    pid = os.fork()
    if pid == 0:  # the child: take the lock, die holding it
        try:
            new_lock(kind, r.mem, w, tag=3).lock()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    me = new_lock(kind, r.mem, w, tag=1, name="demo_lock")
    t0 = _prims.now_ns()
    assert me.recover(*me.holder()) is True
    me.unlock()
    evs = [e for e in trace.snapshot(r).procs[0][1] if e.name == "demo_lock"]
    assert [(e.cat, e.phase, e.a) for e in evs] == [(trace.CAT_HOLD, trace.PH_B, 2), (trace.CAT_HOLD, trace.PH_E, 0)]
    assert evs[0].ts >= t0 - 1_000_000
    doc = chrome.to_chrome(trace.snapshot(r))
    (hold,) = [e for e in doc["traceEvents"] if e.get("name") == "demo_lock"]
    (before,) = [e for e in doc["traceEvents"] if e.get("name") == "before"]
    assert hold["ts"] > before["ts"] and "truncated" not in hold.get("args", {}), json.dumps(hold)


@pytest.mark.parametrize("kind", ["spin", "mutex", "rw"])
def test_unlock_by_a_non_holder_ends_no_hold(tracer_at, kind):
    r, holder, other = _two_tags(tracer_at, kind)
    assert holder.lock()
    with pytest.raises(RuntimeError):
        other.unlock()
    holder.unlock()
    evs = [(e.cat, e.phase) for e in trace.snapshot(r).procs[0][1] if e.name == "demo_lock"]
    assert evs == [(trace.CAT_HOLD, trace.PH_B), (trace.CAT_HOLD, trace.PH_E)]


def test_attach_rejects_a_ring_larger_than_the_buffer(region_factory):
    r = region_factory(Layout("trace", trace.fields(1, 8)))
    hdr, ev = r.word("trace_hdr", 0), r.word("trace_ev", 0)
    for n in (2**62, 2**61 + 1, 10**6):  # n * 4 overflows int64 for the first two
        with pytest.raises(IndexError):
            _prims.trace_attach(r.mem, hdr, ev, n)
    _prims.trace_attach(r.mem, hdr, ev, 8)
    _prims.trace_attach(None)


def test_a_forked_child_does_not_write_its_parents_ring(tracer_at):
    import os

    r, tr = tracer_at()
    tr.emit(tr.instant("parent"))
    pid = os.fork()
    if pid == 0:
        code = 0 if trace.ACTIVE is None else 1
        _prims.trace_emit(trace.code(trace.CAT_OP, trace.PH_I, 0), 1, 2)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child kept trace.ACTIVE"
    assert [e.name for e in trace.snapshot(r).procs[0][1]] == ["parent"]


def test_an_unwritten_name_row_reads_as_its_id(tracer_at):
    r, tr = tracer_at()
    tr.emit(tr.instant("named"))
    j = r.mem.fetch_add(r.word("trace_meta") + trace.META_NAMES, 1)  # counted, row not yet written
    tr.emit(trace.code(trace.CAT_OP, trace.PH_I, j))
    assert [e.name for e in trace.snapshot(r).procs[0][1]] == ["named", f"#{j}"]


def test_worker_interns_only_known_script_ops(tracer_at):
    """Ops come from the wire before validation: an unknown one must not take a name row."""
    from types import SimpleNamespace as NS

    from vcpu.worker import Worker

    r, tr = tracer_at()

    def execute(op, args):
        if op != "read":
            raise ValueError("unknown op")
        return 0

    w = Worker(None, NS(on_warn=None), NS(id=0, execute=execute), "scripted")
    ops = [f"bogus{i}" for i in range(trace.NNAMES + 1)] + ["read"]
    ack = w.batch(NS(seq=1, commands=[NS(op=op, args={}) for op in ops]))
    assert [x.ok for x in ack.results] == [False] * (trace.NNAMES + 1) + [True]
    assert trace.snapshot(r).names == ["cmd read"]


def test_a_full_name_table_shares_its_last_entry_instead_of_failing(tracer_at):
    """Hundreds of per-table locks (rcu-list at 256 vCPUs) once filled the table and crashed the vCPU."""
    r, t = tracer_at()
    ids = [t.intern(f"avic_table_lock[{i}]") for i in range(trace.NNAMES + 20)]
    assert ids[: trace.NNAMES - 1] == list(range(trace.NNAMES - 1))
    assert set(ids[trace.NNAMES - 1:]) == {trace.NNAMES - 1}
    assert trace.snapshot(r).names[trace.NNAMES - 1] == trace.OVERFLOW_NAME
    assert t.intern("avic_table_lock[3]") == 3
