"""The x86-TSO memory model for controlled schedules (``explore --memory-model tso``, ``ipc.sched``).

Under ``sc`` (the default) every access of a scheduled process reaches shared memory when it
happens: every interleaving is sequentially consistent, and a store→load fence dropped from the code
can never be observed. Under ``tso`` each scheduled process has one FIFO store buffer, as an x86 CPU
has (Owens, Sarkar, Sewell, "A better x86 memory model: x86-TSO", TPHOLs 2009):

- a plain ``store`` of a shared word (through :class:`TsoPoints`, the ``SharedPoints`` of
  ``kvm.mem`` and of the AVIC region) is still a scheduling point, then goes into the buffer;
- a ``load`` returns the newest buffered value of that word from the process' own buffer (store
  forwarding), else memory;
- a read-modify-write (``fetch_add`` / ``xchg`` / ``cmpxchg``: x86 locked instructions) and
  ``_prims.smp_mb`` drain the buffer first (after their scheduling point: the point is "about to",
  other processes may run while the stores are still buffered);
- so does every other synchronization primitive of a scheduled process (conservative: a drain only
  removes reorderings, it can never make a false FAILURE): every lock acquire, ``mutex_unlock`` and
  ``read_unlock`` (locked instructions on x86), RCU / SRCU read lock / unlock, the grace-period reader
  scan, futex wait / wake, a bulk ``write``, a blocked retry (``sched_yield`` spin waits, lock waits)
  and an idle turn (a vCPU left in L2: whoever spins on its words must see them, or the schedule
  would end in a false deadlock);
- ``spin_unlock`` and ``write_unlock`` are what x86 Linux makes them, a store-release (one plain
  store: ``queued_spin_unlock``, ``queued_write_unlock``): the release goes into the buffer behind the
  critical section's stores and the lock is free in memory once it is written (:class:`FencedLock`);
  so a store made before a spin_unlock can still be invisible at a load after it, as on x86;
- at each of the process' own scheduling points the oldest entry is written to memory with a
  probability drawn per process and schedule from ``FLUSH_PS`` (1.0: every entry), from an RNG
  seeded by the schedule's memory seed and the client's index (the same schedule replays the same
  flushes), and whenever the buffer holds more than ``BOUND`` entries;
- at the end of the process' program everything left is written (the final oracle and teardown read
  memory after every process ended).

Not modelled (x86 does not do them either): load→load, store→store and load→store reordering; any
other architecture's weaker orders. Words outside ``SharedPoints`` (guest memory, ``gfn_track``, the
RCU domains' own words, the statistics words) are written to memory at once. Such a direct store
made while earlier stores sit in the buffer would overtake them (store -> store, which x86 never
does, so a possible false FAILURE); today every one of them follows a drain in program order
(``gfn_track`` after mmu_lock's acquire, the mapped guest store after ``guest_mode``'s read lock, the
emulated write after a ``read_unlock``, the RCU words inside the grace-period mutex, statistics words
are read by no decision), which a new direct-store site must keep. The sampling checker, which runs
between two steps in the scheduler's process, reads memory: it sees what another CPU would see.

``sc`` costs nothing: nothing here is called unless ``MODEL`` is ``tso`` when the clients are forked.
"""

from __future__ import annotations

import random
from collections import deque

from ipc import _prims
from ipc.sched.points import K_LOAD, K_STORE, SharedPoints

MODELS = ("sc", "tso")
MODEL = "sc"  # the memory model of the processes forked from now on (set_model)
BOUND = 8  # entries a store buffer holds at most (oldest written first)
# per process and schedule, drawn at its start: the chance that it writes its oldest entry at one
# of its own scheduling points; 1.0 = it writes every entry there (an eager buffer: the others'
# lazy buffers then hold their stores across its whole critical sections)
FLUSH_PS = (0.05, 0.25, 1.0)
H_SEED = 5  # the turnstile's header word (ipc.sched: reserved) that holds the schedule's memory seed


def set_model(model: str) -> str:
    """Set ``MODEL`` (for processes forked from now on); returns the previous one."""
    global MODEL
    if model not in MODELS:
        raise ValueError(f"unknown memory model {model!r} ({', '.join(MODELS)})")
    old, MODEL = MODEL, model
    return old


class StoreBuffer:
    """One process' FIFO store buffer: entries (location, Mem, word, value), oldest first, and per
    buffered location its newest value and how many entries it has (forwarding)."""

    def __init__(self):
        self.q: deque[tuple[int, object, int, int]] = deque()
        self.last: dict[int, list[int]] = {}  # location -> [newest value, entries]
        self.rng = random.Random(0)
        self.p = FLUSH_PS[0]
        self.flushed = self.forwarded = 0

    def begin(self, seed: int, index: int) -> None:
        """A new schedule: empty, the flush decisions seeded by its memory seed and this client."""
        self.q.clear()
        self.last.clear()
        self.rng.seed(seed * 1_000_003 + index)
        self.p = self.rng.choice(FLUSH_PS)

    def put(self, loc: int, mem, w: int, v: int) -> None:
        self.q.append((loc, mem, w, v))
        e = self.last.get(loc)
        if e is None:
            self.last[loc] = [v, 1]
        else:
            e[0] = v
            e[1] += 1
        if len(self.q) > BOUND:
            self.flush_one()

    def act(self, fn) -> None:
        """A store that is an action (a lock's release store): ``fn()`` when it is written."""
        self.q.append((-1, None, fn, 0))
        if len(self.q) > BOUND:
            self.flush_one()

    def flush_one(self) -> None:
        loc, mem, w, v = self.q.popleft()
        if mem is None:
            self.flushed += 1
            w()
            return
        mem.store(w, v)
        e = self.last[loc]
        e[1] -= 1
        if not e[1]:
            del self.last[loc]
        self.flushed += 1

    def drain(self) -> None:
        while self.q:
            self.flush_one()

    def tick(self) -> None:
        """One of this process' scheduling points: maybe write the oldest entry (every entry, if
        this schedule made the buffer eager)."""
        if self.q and self.rng.random() < self.p:
            self.drain() if self.p >= 1.0 else self.flush_one()

    def discard(self) -> None:
        """The schedule was aborted: nothing more reaches memory."""
        self.q.clear()
        self.last.clear()


class TsoPoints(SharedPoints):
    """``SharedPoints`` whose plain stores go into the process' store buffer (module doc)."""

    def __init__(self, region, client, what: str, statistics: dict, mode: str = "access"):
        super().__init__(region, client, what, statistics, "access")
        if mode != "access":
            raise ValueError("memory model tso needs scheduling points at every access (--points access)")
        self.buf: StoreBuffer = client.tso
        mem, drain = self.inner, self.buf.drain
        for attr in ("write", "futex_wait", "futex_wake"):
            setattr(self, attr, _drained(getattr(mem, attr), drain))
        self.plain = PlainView(mem, self.buf, self._loc_base)

    def load(self, w: int) -> int:
        if w in self.stats:
            return self.inner.load(w)
        self._point("load", w, K_LOAD)
        e = self.buf.last.get(self._loc_base | w)
        if e is not None:
            self.buf.forwarded += 1
            return e[0]
        return self.inner.load(w)

    def store(self, w: int, v: int) -> None:
        if w in self.stats:
            self.inner.store(w, v)
            return
        self._point("store", w, K_STORE)
        self.buf.put(self._loc_base | w, self.inner, w, v)

    def fetch_add(self, w: int, v: int) -> int:
        if w not in self.stats:
            self._point("fetch_add", w, K_STORE)
            self.buf.drain()
        return self.inner.fetch_add(w, v)

    def xchg(self, w: int, v: int) -> int:
        if w not in self.stats:
            self._point("xchg", w, K_STORE)
            self.buf.drain()
        return self.inner.xchg(w, v)

    def cmpxchg(self, w: int, old: int, new: int) -> int:
        if w not in self.stats:
            self._point("cmpxchg", w, K_STORE)
            self.buf.drain()
        return self.inner.cmpxchg(w, old, new)


class PlainView:
    """The region's plain ``Mem`` for the process' own accesses that are no scheduling points (the
    AVIC design's ``_smem``: statistics, the checker's words, kick polls): loads forward from the
    process' store buffer; its stores and read-modify-writes go to memory at once (only words that
    are never buffered are written this way)."""

    def __init__(self, mem, buf: StoreBuffer, loc_base: int):
        self.inner, self.buf, self._loc_base = mem, buf, loc_base
        for attr in ("store", "fetch_add", "xchg", "cmpxchg", "write", "futex_wait", "futex_wake", "nwords",
                     "nop", "release"):
            setattr(self, attr, getattr(mem, attr))

    def load(self, w: int) -> int:
        e = self.buf.last.get(self._loc_base | w)
        return self.inner.load(w) if e is None else e[0]


def _drained(fn, drain):
    def call(*a, **kw):
        drain()
        return fn(*a, **kw)

    return call


class FencedLock:
    """A lock (``ipc.locks``) as x86 Linux implements it: every acquire is a locked instruction
    (drain first); ``mutex_unlock`` and ``read_unlock`` are locked too; ``spin_unlock`` and
    ``write_unlock`` are a store-release (``queued_spin_unlock``, ``queued_write_unlock``: one plain
    store), which goes into the store buffer behind the critical section's stores: the lock is
    released in memory when that entry is written. Until then this process does not hold it
    (``is_held`` is false: lockdep), while the others still find it held."""

    def __init__(self, inner, buf: StoreBuffer):
        self._inner, self._buf, self._pending = inner, buf, 0
        drain = buf.drain
        for attr in ("trylock", "unlock", "read_trylock", "read_unlock", "lock", "read_lock"):
            if hasattr(inner, attr):
                setattr(self, attr, _drained(getattr(inner, attr), drain))
        if "Mutex" not in type(inner).__name__:  # SpinLock, RwLock (write side): a release store
            self.unlock = self._release_store

    def _release_store(self) -> None:
        self._pending += 1
        self._buf.act(self._released)

    def _released(self) -> None:
        self._pending -= 1
        self._inner.unlock()

    def is_held(self) -> bool:
        return not self._pending and self._inner.is_held()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def install(client) -> None:
    """Give a scheduled process (``ipc.sched.install``) its store buffer and the drains of the module
    doc: its scheduling points may write the oldest entry; a blocked retry, an idle turn and the
    end drain it; so do ``_prims.smp_mb`` and the grace-period reader scan. Under ``sc``: nothing."""
    if MODEL != "tso":
        return
    buf = client.tso = StoreBuffer()
    access, block, idle, done = client.access, client.block, client.idle, client.done
    tick, drain = buf.tick, buf.drain

    def access_t(pid: int, loc: int, kind: int) -> None:
        tick()
        access(pid, loc, kind)

    client.access = access_t
    client.block = _drained(block, drain)
    client.idle = _drained(idle, drain)
    client.done = _drained(done, drain)
    _prims.smp_mb = _drained(_prims.smp_mb, drain)
    _prims.rcu_wait_readers = _drained(_prims.rcu_wait_readers, drain)


def fence_lock(lock, client):
    """A scheduled lock (``ipc.sched.SchedLock``) as it is, or (the client has a store buffer) with
    its inner lock a :class:`FencedLock`: its scheduling point first, then the drain, then the try."""
    buf = getattr(client, "tso", None)
    if buf is not None:
        lock.inner = FencedLock(lock.inner, buf)
        for attr in ("trylock", "read_trylock", "is_held"):
            if hasattr(lock, attr):
                setattr(lock, attr, getattr(lock.inner, attr))
    return lock


def fenced(fn, client):
    """``fn`` itself, or (the client has a store buffer) ``fn`` after a drain."""
    buf = getattr(client, "tso", None)
    return fn if buf is None else _drained(fn, buf.drain)


def announce(region, hdr: int, seed: int) -> None:
    """The scheduler's side: the memory seed of the schedule about to start (``begin`` reads it)."""
    region.mem.store(hdr + H_SEED, seed & 0x7FFFFFFFFFFFFFFF)


def begin(client) -> None:
    """A schedule starts in this client: its buffer empty, its flushes seeded (no-op under sc)."""
    buf = getattr(client, "tso", None)
    if buf is not None:
        buf.begin(client.mem.load(client.hdr + H_SEED), client.index)


def settle(client, aborted: bool) -> None:
    """The program ended (before the VM is detached): write what is buffered, or drop it if the
    schedule was aborted (no-op under sc)."""
    buf = getattr(client, "tso", None)
    if buf is not None:
        buf.discard() if aborted else buf.drain()
