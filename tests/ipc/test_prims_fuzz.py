"""The compiled primitives never trust an index, a span, a count or a size (issue 21, item 7).

Every entry point of ``ipc._prims`` that takes a word index, a span, a slot count or an event count
from Python is called with random values (negatives, huge ones, 2**63 - 4, 2**64 - 1, values whose
product with the word size wraps) on a small buffer that has an inaccessible page on each side: an
access outside it faults at once instead of corrupting memory silently. Only Python exceptions may
come out. The calls run in a child process (a bad pointer kills the interpreter), driven by
hypothesis there; the parent only checks that the child exited 0, so a signal is a failure, and
names the call that was running (the child writes each call to a file before making it).

Also: every object holding pointers into a ``Mem`` refuses a second ``__init__`` (it would swap the
words under a call of another thread blocked in it: a use after unmap).
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from ipc import _prims

CHILD_TIMEOUT_S = 60  # the child stops itself at ~20 s (see BUDGET_S); this only catches a hang

# The child: hypothesis draws a buffer size and a list of calls; each call runs under a watchdog
# (a Python exception from SIGALRM ends any wait that checks signals).
CHILD = r'''
import ctypes, mmap, os, signal, sys, time

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ipc import _prims

PAGE = mmap.PAGESIZE
SEED = int(os.environ["PRIMS_FUZZ_SEED"])
EXAMPLES = int(os.environ["PRIMS_FUZZ_EXAMPLES"])
BUDGET_S = float(os.environ["PRIMS_FUZZ_BUDGET_S"])
LAST = os.open(os.environ["PRIMS_FUZZ_LAST"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
NPRICES = 17  # the C module's VP_N (ipc/vtime.C_PRICES)

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
KEEP = []  # every mapping stays mapped: only the guard pages may fault


def guarded(nwords):
    """A writable buffer of nwords words ending at an inaccessible page (and, when it is a whole
    number of pages, starting right after one)."""
    nbytes = nwords * 8
    npages = -(-nbytes // PAGE)
    mm = mmap.mmap(-1, (npages + 2) * PAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    for a in (addr, addr + (npages + 1) * PAGE):
        if libc.mprotect(a, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    end = (npages + 1) * PAGE
    KEEP.append((mm, anchor))
    return memoryview(mm)[end - nbytes:end]


class Watchdog(Exception):
    pass


ARMED = [False]


def _alarm(signum, frame):
    if ARMED[0]:
        raise Watchdog


signal.signal(signal.SIGALRM, _alarm)

SPECIAL = [2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**60, 2**61, 2**61 + 1, 2**62, 2**62 + 1,
           0x6000000000000000, 0x4000000000000001, 2**63 - 8, 2**63 - 4, 2**63 - 1, 2**63,
           2**64 - 1, 2**64, -1, -2, -4, -8, -2**31, -2**62, -2**63, -2**63 - 1, -2**64]


def index(nw):
    near = [nw, nw - 1, nw - 2, nw - 4, nw - 8, nw - 16, nw + 1, nw // 4, nw // 8, nw // 8 + 1]
    return st.one_of(st.integers(-16, nw + 16), st.sampled_from(SPECIAL + near),
                     st.integers(-2**70, 2**70))


anyint = st.one_of(st.integers(-4, 64), st.sampled_from(SPECIAL), st.integers(-2**70, 2**70))
short_ns = st.one_of(st.integers(0, 200_000), st.sampled_from([-1, 2**63 - 1, -2**63]))
LOCKS = ["SpinLock", "Mutex", "RwLock", "TracedSpinLock", "TracedMutex", "TracedRwLock"]
LOCK_CALLS = ["lock", "trylock", "unlock", "is_held", "owner", "holder", "recover", "read_lock",
              "read_trylock", "read_unlock", "read_held", "readers", "__enter__", "__exit__"]
READER_CALLS = ["lock", "unlock", "nesting", "__enter__", "__exit__"]
HIST_CALLS = ["record", "record_since", "start", "sample", "settle"]


def calls(nw):
    i = index(nw)
    mem_op = st.one_of(
        st.tuples(st.just("load"), i),
        st.tuples(st.just("store"), i, anyint),
        st.tuples(st.just("fetch_add"), i, anyint),
        st.tuples(st.just("xchg"), i, anyint),
        st.tuples(st.just("cmpxchg"), i, anyint, anyint),
        st.tuples(st.just("futex_wake"), i, anyint),
        st.tuples(st.just("futex_wait"), i, anyint, short_ns),
        st.tuples(st.just("write"), st.one_of(st.integers(-16, nw * 8 + 16), anyint), st.binary(max_size=80)),
    )
    return st.one_of(
        st.tuples(st.just("mem"), mem_op),
        st.tuples(st.just("lock_new"), st.sampled_from(LOCKS), i, st.one_of(st.just(-1), i),
                  st.one_of(st.integers(1, 5), anyint), st.integers(1, 50)),
        st.tuples(st.just("reader_new"), st.sampled_from(["RcuReader", "TracedRcuReader"]), i, i),
        st.tuples(st.just("hist_new"), i, st.one_of(st.just(1), st.integers(-2, 2**31))),
        st.tuples(st.just("use"), st.integers(0, 7), st.sampled_from(LOCK_CALLS + READER_CALLS + HIST_CALLS),
                  anyint, anyint),
        st.tuples(st.just("reinit"), st.integers(0, 7), i),
        st.tuples(st.just("rcu_wait_readers"), i, i, index(nw // 8 + 1), short_ns),
        st.tuples(st.just("trace_attach"), i, i, index(nw // 4 + 1), st.lists(anyint, max_size=6)),
        st.tuples(st.just("vt_attach"), i, i, i, st.one_of(st.sampled_from([1, 2, 4, 8, 64]), anyint),
                  st.integers(-1, 4), st.one_of(st.integers(1, 6), anyint),
                  st.lists(st.integers(0, 1000), min_size=NPRICES, max_size=NPRICES), anyint, anyint),
        st.tuples(st.just("vt_abort"), i, i, st.one_of(st.integers(1, 6), anyint)),
        st.tuples(st.just("module"), st.sampled_from(["hist_bucket", "stats_clock_ns", "stats_clock_abs_ns",
                                                      "vt_seed", "vt_advance", "trace_emit"]), anyint),
        st.tuples(st.just("release")),
    )


def make(mem, objs, c):
    kind = c[0]
    if kind == "lock_new":
        _, typ, li, si, tag, spins = c
        objs.append(getattr(_prims, typ)(mem, li, si, tag=tag, spins=spins))
    elif kind == "reader_new":
        objs.append(getattr(_prims, c[1])(mem, c[2], c[3]))
    else:
        objs.append(_prims.Histogram(mem, c[1], every=c[2]))


def run(mem, objs, c):
    kind = c[0]
    if kind == "mem":
        op, *args = c[1]
        getattr(mem, op)(*args)
    elif kind in ("lock_new", "reader_new", "hist_new"):
        make(mem, objs, c)
    elif kind == "use":
        _, k, meth, a, b = c
        if not objs:
            return
        o = objs[k % len(objs)]
        f = getattr(o, meth, None)
        if f is None:
            return
        if meth in ("lock", "read_lock", "__enter__") and isinstance(o, _prims.SpinLock | _prims.Mutex | _prims.RwLock):
            f(a % 200_000)  # a timeout: lock() waits for a holder that will never let go
        elif meth == "recover":
            f(a, b)
        elif meth == "__exit__" and isinstance(o, _prims.SpinLock | _prims.Mutex | _prims.RwLock | _prims.RcuReader):
            f(None, None, None)
        elif meth in ("record", "record_since", "sample", "settle"):
            f(a)
        else:
            f()
    elif kind == "reinit":
        if objs:
            o = objs[c[1] % len(objs)]
            try:
                o.__init__(mem, c[2], c[2])
            except RuntimeError as e:
                if "already initialised" not in str(e):
                    raise AssertionError(f"{type(o).__name__}.__init__ again: {e}") from None
            except (IndexError, ValueError, TypeError, OverflowError):
                pass  # refused for its arguments (the old code: before looking at the object)
            else:
                raise AssertionError(f"{type(o).__name__}.__init__ ran twice")
    elif kind == "rcu_wait_readers":
        _prims.rcu_wait_readers(mem, *c[1:])
    elif kind == "trace_attach":
        _, hi, ei, n, emits = c
        _prims.trace_attach(mem, hi, ei, n)
        for v in emits:
            _prims.trace_emit(v, v, v)
    elif kind == "vt_attach":
        _, hi, si, li, nl, me, n, prices, key, price = c
        if 0 <= hi + 3 < mem.nwords:
            mem.store(hi + 3, n)  # the header's process count, read by vt_attach
        _prims.vt_attach(mem, hi, si, li, nl, me, prices)
        _prims.vt_now()
        _prims.vt_advance(price)
        _prims.vt_kick(key, price)
        _prims.vt_released(key, price)
        if objs:
            o = objs[key % len(objs)]
            if hasattr(o, "trylock"):
                o.trylock()
        _prims.vt_done()
    elif kind == "vt_abort":
        _, hi, si, n = c
        if 0 <= hi + 3 < mem.nwords:
            mem.store(hi + 3, n)
        _prims.vt_abort(mem, hi, si)
    elif kind == "module":
        getattr(_prims, c[1])(c[2])
    elif kind == "release":
        mem.release()


T0 = time.monotonic()
COUNT = [0, 0, 0]


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([8, 64, 300, 512, 1024]).flatmap(
    lambda nw: st.tuples(st.just(nw), st.lists(calls(nw), min_size=1, max_size=16))))
def fuzz(case):
    nw, cs = case
    if time.monotonic() - T0 > BUDGET_S:
        return
    COUNT[0] += 1
    mem = _prims.Mem(guarded(nw))
    objs = []
    try:
        for c in cs:
            if time.monotonic() - T0 > BUDGET_S:
                break
            COUNT[1] += 1
            line = f"nwords={nw} {c!r}\n".encode()
            os.pwrite(LAST, line.ljust(4096)[:4096], 0)
            try:
                ARMED[0] = True
                signal.setitimer(signal.ITIMER_REAL, 0.1)
                try:
                    run(mem, objs, c)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    ARMED[0] = False
            except (SystemError, AssertionError):
                raise  # a C function that failed without an exception (or the reverse); a re-init
            except Watchdog:
                COUNT[2] += 1
            except Exception:  # noqa: BLE001 (a Python exception is the expected outcome)
                pass
    finally:
        try:
            _prims.vt_detach()
        except RuntimeError:
            pass
        _prims.trace_attach(None)


fuzz()
print(f"prims fuzz: seed {SEED}: {COUNT[0]} examples, {COUNT[1]} calls ({COUNT[2]} ended by the watchdog), "
      f"{time.monotonic() - T0:.1f} s")
'''


def _run_child(tmp_path, *, seed: int, examples: int, budget_s: float) -> subprocess.CompletedProcess:
    last = tmp_path / "last_call"
    env = {**os.environ, "PRIMS_FUZZ_SEED": str(seed), "PRIMS_FUZZ_EXAMPLES": str(examples),
           "PRIMS_FUZZ_BUDGET_S": str(budget_s), "PRIMS_FUZZ_LAST": str(last),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONFAULTHANDLER": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=CHILD_TIMEOUT_S)
    if p.returncode != 0:
        what = f"signal {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit {p.returncode}"
        call = last.read_bytes().decode(errors="replace").strip() if last.exists() else "?"
        pytest.fail(f"primitives fuzz (seed {seed}): the child died with {what}\nlast call: {call}\n"
                    f"stderr (end):\n{p.stderr[-3000:]}", pytrace=False)
    return p


def test_random_indices_spans_sizes_never_crash(tmp_path):
    seed = int(os.environ.get("PTS_PRIMS_FUZZ_SEED", random.randrange(2**32)))
    p = _run_child(tmp_path, seed=seed, examples=300, budget_s=15.0)
    assert "examples" in p.stdout, p.stdout + p.stderr
    print(p.stdout.strip())


# The cases the issue names: each must be an exception (before the fix each one reached memory
# outside the buffer). In a child too: the old code crashed or scribbled.
NAMED = r'''
import mmap
from ipc import _prims

mm = mmap.mmap(-1, 4096)
mem = _prims.Mem(mm)
cases = {
    "SpinLock(mem, 2**63-4)": lambda: _prims.SpinLock(mem, 2**63 - 4),
    "Mutex(mem, 0, stats_index=2**63-8)": lambda: _prims.Mutex(mem, 0, 2**63 - 8),
    "RcuReader(mem, 2**63-1, 0)": lambda: _prims.RcuReader(mem, 2**63 - 1, 0),
    "Histogram(mem, 2**63-8)": lambda: _prims.Histogram(mem, 2**63 - 8),
    "rcu_wait_readers(nslots=2**61)": lambda: _prims.rcu_wait_readers(mem, 0, 8, 2**61, 0),
    "rcu_wait_readers(nslots=2**61+1)": lambda: _prims.rcu_wait_readers(mem, 0, 8, 2**61 + 1, 0),
    "trace_attach(events at 513, n*4 wraps)": lambda: _prims.trace_attach(mem, 0, 513, 0x6000000000000000),
    "trace_attach(n*4 wraps to 0)": lambda: _prims.trace_attach(mem, 0, 8, 2**62),
    "vt_abort(slots at 2**63-8)": lambda: (mem.store(3, 1), _prims.vt_abort(mem, 0, 2**63 - 8)),
}
bad = []
for name, f in cases.items():
    try:
        f()
    except (IndexError, ValueError, OverflowError) as e:
        print(f"{name}: {type(e).__name__}: {e}")
    else:
        bad.append(name)
_prims.trace_attach(None)
_prims.trace_emit(1, 2, 3)
if bad:
    raise SystemExit("accepted: " + ", ".join(bad))
'''


def test_named_overflows_raise():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", NAMED], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert p.stdout.count("IndexError") == 9, p.stdout


def test_futex_wake_count_checked():
    mm = mmap.mmap(-1, 4096)
    mem = _prims.Mem(mm)
    with pytest.raises(ValueError, match="n < 0"):
        mem.futex_wake(0, -1)
    assert mem.futex_wake(0, 2**32) == 0  # clamped to INT_MAX, not truncated to 0
    assert mem.futex_wake(0, 2**63 - 1) == 0


@pytest.mark.parametrize("make", [
    lambda m: _prims.SpinLock(m, 0, 8), lambda m: _prims.Mutex(m, 0), lambda m: _prims.RwLock(m, 0),
    lambda m: _prims.TracedSpinLock(m, 0), lambda m: _prims.TracedMutex(m, 0),
    lambda m: _prims.TracedRwLock(m, 0), lambda m: _prims.RcuReader(m, 0, 8),
    lambda m: _prims.TracedRcuReader(m, 0, 8), lambda m: _prims.Histogram(m, 0),
], ids=["SpinLock", "Mutex", "RwLock", "TracedSpinLock", "TracedMutex", "TracedRwLock", "RcuReader",
        "TracedRcuReader", "Histogram"])
def test_reinit_refused(make):
    mm, mm2 = mmap.mmap(-1, 8192), mmap.mmap(-1, 8192)
    mem, mem2 = _prims.Mem(mm), _prims.Mem(mm2)
    o = make(mem)
    with pytest.raises(RuntimeError, match="already initialised"):
        o.__init__(mem2, 0, 16)
    with pytest.raises(RuntimeError, match="already initialised"):
        o.__init__(mem, 0)
    # still bound to the first buffer
    if isinstance(o, _prims.SpinLock | _prims.Mutex | _prims.RwLock):
        assert o.trylock() and mem.load(0) != 0 and mm2[:8] == bytes(8)
        o.unlock()
    elif isinstance(o, _prims.RcuReader):
        mem.store(0, _prims.GP_COUNT)  # gp_ctr starts at GP_COUNT (ipc/rcu.py)
        with o:
            assert mem.load(8) == _prims.GP_COUNT and mm2[64:72] == bytes(8)
    else:
        o.record(5)
        assert mem.load(0) == 1 and mm2[:8] == bytes(8)
    # an object whose __init__ failed (bad arguments) was never bound: a good __init__ may follow
    lk = _prims.SpinLock.__new__(_prims.SpinLock)
    with pytest.raises(IndexError):
        lk.__init__(mem, 2**63 - 4)
    lk.__init__(mem, 64)
    assert lk.trylock()
    lk.unlock()


def test_reinit_while_waiting_refused():
    """The use after unmap of issue 21: a thread waits in Mutex.lock() (GIL released, holding the
    lock's old pointers) while another re-runs __init__ on the same object with another buffer."""
    mm, mm2 = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    mem, mem2 = _prims.Mem(mm), _prims.Mem(mm2)
    holder, waiter = _prims.Mutex(mem, 0, tag=1), _prims.Mutex(mem, 0, tag=2)
    assert holder.lock()
    out = []
    t = threading.Thread(target=lambda: out.append(waiter.lock(2_000_000_000)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while mem.load(0) & 0xFFFFFFFF != 2:  # the waiter marked it contended: it is in the futex
            assert time.monotonic() < deadline and t.is_alive(), "the waiter never waited"
            os.sched_yield()
        with pytest.raises(RuntimeError, match="already initialised"):
            waiter.__init__(mem2, 0, tag=3)
    finally:
        holder.unlock()
        t.join(5)
    assert out == [True] and waiter.is_held()
    waiter.unlock()


REINIT_TYPES = [
    ("SpinLock", ()), ("Mutex", ()), ("RwLock", ()), ("TracedSpinLock", ()), ("TracedMutex", ()),
    ("TracedRwLock", ()), ("RcuReader", (8,)), ("TracedRcuReader", (8,)), ("Histogram", ()),
]


@pytest.mark.parametrize("tname,extra", REINIT_TYPES, ids=[t for t, _ in REINIT_TYPES])
def test_reinit_from_argument_parsing_refused(tname, extra):
    """The refusal is checked again after the arguments are parsed: an ``__index__`` (or a
    ``__bool__``) run by the parsing may initialise the object meanwhile, and the outer ``__init__``
    must then not swap its words all the same."""
    T = getattr(_prims, tname)
    mm, mm2 = mmap.mmap(-1, 8192), mmap.mmap(-1, 8192)
    mem, mem2 = _prims.Mem(mm), _prims.Mem(mm2)
    obj = T.__new__(T)

    class Idx:
        def __index__(self):
            obj.__init__(mem, 0, *extra)  # the inner __init__ binds the object first
            return 0

    with pytest.raises(RuntimeError, match="already initialised"):
        obj.__init__(mem2, Idx(), *extra)
    if tname.endswith(("SpinLock", "Mutex", "RwLock")):
        class Truthy:
            def __bool__(self):
                obj.__init__(mem2, 0)
                return False

        with pytest.raises(RuntimeError, match="already initialised"):  # busted (p) runs __bool__
            T.__new__(T).__init__(mem2, 0, -1, 1, 1000, Truthy())
        assert obj.trylock() and mem.load(0) != 0 and mm2[:8] == bytes(8)  # still bound to mem
        obj.unlock()


def test_stats_index_below_minus_one_refused():
    mem = _prims.Mem(mmap.mmap(-1, 4096))
    for T in (_prims.SpinLock, _prims.Mutex, _prims.RwLock):
        with pytest.raises(ValueError, match="stats_index"):
            T(mem, 0, -2)
        T(mem, 0, -1)  # -1: no stats block


# The attached virtual clock pins its Mem: a release() while attached only marks it unusable, the
# buffer stays exported (the clock words are still written) until the clock is detached, once,
# whichever way it is detached; a fork()ed child drops the waits of threads it does not have.
VT_PIN = r'''
import os, sys, threading, time
from ipc import _prims as P

NP = 17  # VP_N
HDR, SLOTS, LINES, NL = 0, 8, 8 + 16 * 2, 4  # hdr 8 words, 2 slots of 16, line table 2 * NL


def setup(n):
    buf = bytearray(8 * (LINES + 2 * NL))
    mem = P.Mem(buf)
    mem.store(3, n)  # VH_N
    return buf, mem


def exported(buf):
    try:
        buf.extend(b"12345678")
    except BufferError:
        return True
    del buf[-8:]
    return False


# vt_detach
buf, mem = setup(2)
P.vt_attach(mem, HDR, SLOTS, LINES, NL, 0, [1] * NP)
mem.release()
assert exported(buf), "attached clock's Mem released: export dropped"
assert P.vt_advance(5) >= 5  # written through the clock
P.vt_detach()
assert not exported(buf), "vt_detach kept the export"

# vt_done (alone: detached), then vt_detach: the pin ends once (a re-attach pins again)
buf, mem = setup(1)
P.vt_attach(mem, HDR, SLOTS, LINES, NL, 0, [1] * NP)
P.vt_done()
P.vt_detach()
P.vt_attach(mem, HDR, SLOTS, LINES, NL, 0, [1] * NP)
P.vt_attach(mem, HDR, SLOTS, LINES, NL, 0, [1] * NP)  # re-attach without a detach
mem.release()
assert exported(buf), "pin ended twice"
P.vt_detach()
assert not exported(buf), "re-attach kept a pin"

# the detach in vt_result (an aborted run)
buf, mem = setup(2)
P.vt_attach(mem, HDR, SLOTS, LINES, NL, 0, [1] * NP)
mem.release()
P.vt_abort(P.Mem(buf), HDR, SLOTS)
try:
    P.vt_hit("t")
except RuntimeError as e:
    assert "ended" in str(e), e
else:
    raise AssertionError("vt_hit after abort")
assert P.vt_now() is None and not exported(buf), "vt_result kept the export"
P.vt_detach()

# fork while a thread is parked in vt_join: the child can detach, and its export goes
buf, mem = setup(2)
P.vt_attach(mem, HDR, SLOTS, LINES, NL, 0, [1] * NP)
out = []
def join():
    try:
        P.vt_join()
    except RuntimeError as e:
        out.append(str(e))
t = threading.Thread(target=join)
t.start()
deadline = time.monotonic() + 10
while mem.load(SLOTS + 8) == 0:  # VS_PARKED: parked, GIL released
    assert time.monotonic() < deadline, "never parked"
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    code = 0
    try:
        P.vt_detach()  # the parked thread is not in the child
        mem.release()
        code = 3 if exported(buf) else 0
    except BaseException as e:
        print("child:", type(e).__name__, e, flush=True)
        code = 2
    os._exit(code)
_, status = os.waitpid(pid, 0)
P.vt_abort(mem, HDR, SLOTS)
t.join(10)
assert out and "ended" in out[0], out
assert os.waitstatus_to_exitcode(status) == 0, status
P.vt_detach()
mem.release()
assert not exported(buf)
print("ok")
'''


def test_vt_clock_pins_its_mem():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", VT_PIN], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
