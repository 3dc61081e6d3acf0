"""Shared-memory accessors of the code under test as scheduling points (``ipc.sched``).

A scheduled process reaches the VM's state through a ``_prims.Mem`` of a region (``kvm.mem``, the
AVIC region). :class:`SharedPoints` wraps that ``Mem``:

- mode ``access`` (explore's default): every load, store and read-modify-write is a scheduling
  point ``<region>.<field>[<index>] <op>`` *before* it happens, and the scheduler is told which
  word it is about to touch and how (``Client.access``: the location drives the partial-order
  reduction of ipc/sched/strategies.py);
- mode ``atomic``: only the read-modify-writes are points (the older, coarser mode);
- in both, the words its layout declares as statistics (``STATISTICS`` next to each layout: vm/
  layout.py, vm/avic/table.py) are plain accesses: a counter nobody decides on is no point.

``statistics`` maps a field name to the word indices of each of its rows (the last axis) that
only count, or ``None`` when every word of the field does.
"""

from __future__ import annotations

import bisect
import zlib

import numpy as np

K_NONE, K_LOAD, K_STORE = 0, 1, 2  # what a point is about to do (a read-modify-write is a store)
K_DONE = 3  # the slot's kind once its client has ended its program (ipc/sched Client.done)
RACY_WORDS = 1024  # per client and plane, 32 bits a word: the run-ahead bitmaps (ipc.sched.layout)
RACY_W, RACY_T = 0, 1  # planes: written by another client / touched by another client
MODES = ("access", "atomic")
_LOC_POINT = 1 << 47  # locations of points that are not accesses (locks, RCU, ops): by name


_STATS_CACHE: dict[tuple, frozenset[int]] = {}


def _layout_key(layout) -> tuple:
    return (layout.name, tuple((f.name, f.dtype.str, f.shape, f.offset) for f in layout.fields.values()))


def statistic_words(layout, statistics: dict) -> frozenset[int]:
    """Word indices (``Mem`` addressing) of the words ``statistics`` declares in ``layout``; kept
    per layout shape and declaration (a scheduled process attaches the same VM layout for every
    schedule, and the set has tens of thousands of words)."""
    key = (_layout_key(layout), tuple(sorted((n, None if w is None else tuple(w)) for n, w in statistics.items())))
    got = _STATS_CACHE.get(key)
    if got is None:
        got = _STATS_CACHE[key] = _statistic_words(layout, statistics)
    return got


def _statistic_words(layout, statistics: dict) -> frozenset[int]:
    out: set[int] = set()
    for name, words in statistics.items():
        f = layout[name]
        if f.dtype.itemsize != 8:
            raise ValueError(f"layout {layout.name}: statistics field {name} is not 64-bit")
        row = f.shape[-1] if f.shape else 1
        rows = int(np.prod(f.shape[:-1], dtype=np.int64)) if len(f.shape) > 1 else 1
        cols = range(row) if words is None else tuple(words)
        if any(not 0 <= c < row for c in cols):
            raise ValueError(f"layout {layout.name}: statistics word outside {name}'s rows of {row}")
        base = f.offset // 8
        out.update(base + r * row + c for r in range(rows) for c in cols)
    return frozenset(out)


def location(what: str, word: int) -> int:
    """The location code of ``word`` of region ``what`` (both sides compute it the same way)."""
    return (zlib.crc32(what.encode()) & 0x7FFF) << 32 | word


def racy_pos(loc: int) -> tuple[int, int]:
    """(word, bit) of ``loc`` in a run-ahead bitmap (a hash: two locations may share a bit, which
    only stops a run-ahead that could have gone on)."""
    h = ((loc >> 32) * 0x9E3779B1 ^ loc * 0x85EBCA6B) & 0xFFFFFFFF
    return (h >> 5) % RACY_WORDS, 1 << (h & 31)


def name_location(name: str) -> int:
    """The location of a point that is not an access: its name (a lock, an RCU domain, an op)."""
    return _LOC_POINT | zlib.crc32(name.encode())


class SharedPoints:
    """A region's ``Mem`` whose accesses are scheduling points (see the module doc); the methods
    the code under test does not use for shared state (futex, write, release) are the plain ones."""

    def __init__(self, region, client, what: str, statistics: dict, mode: str = "access"):
        if mode not in MODES:
            raise ValueError(f"unknown scheduling-point mode {mode!r} ({', '.join(MODES)})")
        mem = region.mem
        self.inner = mem
        for attr in ("write", "futex_wait", "futex_wake", "nwords", "nop", "release"):
            setattr(self, attr, getattr(mem, attr))
        self.stats = statistic_words(region.layout, statistics)
        self.client, self.what, self.mode = client, what, mode
        self._layout = region.layout
        fields = sorted(((f.offset // 8, f) for f in region.layout.fields.values()), key=lambda x: x[0])
        self._starts = [w for w, _ in fields]
        self._fields = [f for _, f in fields]
        self._loc_base = location(what, 0)
        # (op, word) -> point id, kept per client, region and layout across schedules (the names
        # are the same; building one costs an unravel_index)
        kept = client.__dict__.setdefault("_shared_point_ids", {})
        self._ids = kept.setdefault((what, _layout_key(region.layout)), {})
        if mode == "atomic":
            self.load, self.store = mem.load, mem.store

    def _name(self, op: str, w: int) -> str:
        i = bisect.bisect_right(self._starts, w) - 1
        if i < 0:
            return f"{self.what}[{w}] {op}"
        f = self._fields[i]
        rel = w - self._starts[i]
        idx = np.unravel_index(rel, f.shape) if f.shape and rel < int(np.prod(f.shape)) else (rel,)
        return f"{self.what}.{f.name}[{','.join(str(int(x)) for x in idx)}] {op}"

    def _point(self, op: str, w: int, kind: int) -> None:
        key = (op, w)
        pid = self._ids.get(key)
        if pid is None:
            pid = self._ids[key] = self.client.name_id(self._name(op, w))
        self.client.access(pid, self._loc_base | w, kind)

    def load(self, w: int) -> int:
        if w not in self.stats:
            self._point("load", w, K_LOAD)
        return self.inner.load(w)

    def store(self, w: int, v: int) -> None:
        if w not in self.stats:
            self._point("store", w, K_STORE)
        self.inner.store(w, v)

    def fetch_add(self, w: int, v: int) -> int:
        if w not in self.stats:
            self._point("fetch_add", w, K_STORE)
        return self.inner.fetch_add(w, v)

    def xchg(self, w: int, v: int) -> int:
        if w not in self.stats:
            self._point("xchg", w, K_STORE)
        return self.inner.xchg(w, v)

    def cmpxchg(self, w: int, old: int, new: int) -> int:
        if w not in self.stats:
            self._point("cmpxchg", w, K_STORE)
        return self.inner.cmpxchg(w, old, new)


class PricedPoints:
    """A region's ``Mem`` under the virtual clock (ipc/vtime.py, which is ``sched.ACTIVE`` too): its
    read-modify-writes are the clock's priced points ``<region>: atomic <op>`` before they happen,
    as they were before per-access points; loads and stores are the plain C methods. Nothing here
    is scheduled: the virtual clock has no turnstile of choices (``Client.access``)."""

    def __init__(self, mem, hit, what: str):
        self.inner = mem
        for attr in ("load", "store", "write", "futex_wait", "futex_wake", "nwords", "nop", "release"):
            setattr(self, attr, getattr(mem, attr))
        self._hit = hit
        self._names = tuple(f"{what}: atomic {op}" for op in ("fetch_add", "xchg", "cmpxchg"))

    def fetch_add(self, w: int, v: int) -> int:
        self._hit(self._names[0])
        return self.inner.fetch_add(w, v)

    def xchg(self, w: int, v: int) -> int:
        self._hit(self._names[1])
        return self.inner.xchg(w, v)

    def cmpxchg(self, w: int, old: int, new: int) -> int:
        self._hit(self._names[2])
        return self.inner.cmpxchg(w, old, new)
