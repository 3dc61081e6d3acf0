"""Per-process event rings in shared memory: what every process did last, on one clock.

A traced run has one ``trace`` region with one fixed-size ring per process (oldest events
overwritten) and a table of interned names. Layout (declared once, :func:`fields`; the C side is
described in ``ipc/prims/trace.c``):

- ``trace_meta``  8 words: [0] names interned so far
- ``trace_names`` (NNAMES, NAME_BYTES) bytes: NUL-padded UTF-8 names; a name id is its row
- ``trace_hdr``   (nprocs, 8) words, one line per process: [0] head (events ever written), [1] pid,
  [2] capacity
- ``trace_ev``    (nprocs, nevents, 4) words: [0] ts (the raw stats clock of ``_prims``: cycles,
  or CLOCK_MONOTONIC ns without them), [1] code = (category << 40) | (phase << 32) | name id, [2] a, [3] b

Categories: ``CAT_OP`` (Python tracepoints: op begin/end, instants), ``CAT_WAIT`` / ``CAT_HOLD``
(lock wait and hold, emitted inside the C lock calls), ``CAT_RCU`` (outermost RCU/SRCU read-side
section, emitted by the C reader). Phases: ``PH_B`` begin, ``PH_E`` end, ``PH_I`` instant.

Emission is bound when an object or closure is made, like ``ipc.fuzz``: ``configure(region, proc)``
attaches this process' ring and sets :data:`ACTIVE`; code that emits reads ``trace.ACTIVE`` once
at creation and keeps ``emit = tr.emit`` and the codes it needs (``tr.pair(name)``), so with
tracing off an emission point costs one predictable branch (``if emit:``). Locks and RCU readers
made while tracing is on are the ``Traced*`` C types (ipc/locks.py, ipc/rcu.py): nothing changes
for the plain types.

Reading: :func:`snapshot` copies every ring (consistent for stopped writers; for a live writer the
events that may have been overwritten while copying are left out) and decodes it into a
:class:`Snapshot`, which ``ipc.trace.chrome`` turns into Chrome trace JSON or an ftrace-style text.
The raw stamps of every ring go through one calibration (``_prims.trace_clock``), so a release and
the acquisition it allowed keep their order across processes (per-process calibrations could
differ by more than the gap between them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ipc import _prims

EV_WORDS = _prims.TR_EV_WORDS
PH_B, PH_E, PH_I = _prims.TR_PH_B, _prims.TR_PH_E, _prims.TR_PH_I
CAT_OP, CAT_WAIT, CAT_HOLD, CAT_RCU = _prims.TR_CAT_OP, _prims.TR_CAT_WAIT, _prims.TR_CAT_HOLD, _prims.TR_CAT_RCU
NNAMES = 512
OVERFLOW_NAME = "(name table full)"
NAME_BYTES = 32
META_NAMES = 0
HDR_HEAD, HDR_PID, HDR_CAP = 0, 1, 2

ACTIVE: Tracer | None = None


def _drop_in_child() -> None:
    """A forked child does not write its parent's ring (two writers, one non-atomic head): it
    configures its own, or traces nothing."""
    global ACTIVE
    ACTIVE = None
    _prims.trace_attach(None)


os.register_at_fork(after_in_child=_drop_in_child)


def code(cat: int, phase: int, name_id: int) -> int:
    return (cat << 40) | (phase << 32) | name_id


def fields(nprocs: int, nevents: int) -> list:
    """The ``trace`` region's fields (one ring of ``nevents`` per process)."""
    return [
        ("trace_meta", "i8", (8,)),
        ("trace_names", "u1", (NNAMES, NAME_BYTES)),
        ("trace_hdr", "i8", (nprocs, 8)),
        ("trace_ev", "i8", (nprocs, nevents, EV_WORDS)),
    ]


def init(region) -> None:
    """Owner-side initialisation (fresh segment)."""
    for name in ("trace_meta", "trace_names", "trace_hdr", "trace_ev"):
        region.v[name][...] = 0


class Tracer:
    """This process' ring: ``emit(code, a=0, b=0)`` (a C function), name interning, codes."""

    emit = staticmethod(_prims.trace_emit)

    def __init__(self, region, proc: int):
        self.region = region
        self.proc = proc
        self.mem = region.mem
        self.names = region.v["trace_names"]
        self.count_w = region.word("trace_meta") + META_NAMES
        self._ids: dict[str, int] = {}
        nev = region.v["trace_ev"].shape[1]
        _prims.trace_attach(self.mem, region.word("trace_hdr", proc), region.word("trace_ev", proc), nev)

    def intern(self, name: str) -> int:
        """The id of ``name`` in the region's name table (shared by every process of the run); once
        the table is full, further names share its last entry, ``OVERFLOW_NAME``."""
        i = self._ids.get(name)
        if i is not None:
            return i
        raw = name.encode()[:NAME_BYTES - 1]
        n = min(self.mem.load(self.count_w), NNAMES)
        for j in range(n):
            if bytes(self.names[j]).rstrip(b"\0") == raw:
                self._ids[name] = j
                return j
        j = self.mem.fetch_add(self.count_w, 1)
        if j >= NNAMES - 1:  # full (hundreds of per-table locks at 256 vCPUs): one shared last name
            j, raw = NNAMES - 1, OVERFLOW_NAME.encode()
        row = np.zeros(NAME_BYTES, np.uint8)
        row[:len(raw)] = np.frombuffer(raw, np.uint8)
        self.names[j] = row
        self._ids[name] = j
        return j

    def pair(self, name: str) -> tuple[int, int]:
        """(begin code, end code) of the op slice ``name``."""
        i = self.intern(name)
        return code(CAT_OP, PH_B, i), code(CAT_OP, PH_E, i)

    def instant(self, name: str) -> int:
        return code(CAT_OP, PH_I, self.intern(name))

    def name_object(self, obj, name: str):
        """Give a traced lock / reader its name in the trace; returns ``obj``."""
        obj.trace_id = self.intern(name)
        return obj

    def detach(self) -> None:
        _prims.trace_attach(None)


def configure(region, proc: int = 0) -> Tracer | None:
    """Attach this process' ring in ``region`` (None: tracing off) and make it :data:`ACTIVE`."""
    global ACTIVE
    if ACTIVE is not None:
        ACTIVE.detach()
    ACTIVE = Tracer(region, proc) if region is not None else None
    return ACTIVE


# -- reading ---------------------------------------------------------------------------------
@dataclass
class Event:
    ts: int      # ns, CLOCK_MONOTONIC
    cat: int
    phase: int
    name: str
    a: int
    b: int
    seq: int


@dataclass
class Snapshot:
    """Decoded rings: ``procs[i]`` = (pid, events oldest first, events lost to overwriting)."""
    names: list[str]
    procs: dict[int, tuple[int, list[Event], int]] = field(default_factory=dict)

    def events(self) -> int:
        return sum(len(ev) for _, ev, _ in self.procs.values())


def snapshot(region) -> Snapshot:
    """Copy and decode every ring of ``region`` (a ``trace`` region, owner or attached)."""
    v = region.v
    rings = []
    nprocs, cap = v["trace_ev"].shape[:2]
    for p in range(nprocs):
        h0 = int(v["trace_hdr"][p, HDR_HEAD])
        ev = v["trace_ev"][p].copy()
        rings.append((h0, ev, int(v["trace_hdr"][p, HDR_HEAD])))
    # names after the rings: every name an event uses was interned before the event was written
    # (a row still being written reads empty and is shown as #id)
    n = min(int(v["trace_meta"][META_NAMES]), NNAMES)
    names = [bytes(v["trace_names"][j]).rstrip(b"\0").decode(errors="replace") for j in range(n)]
    snap = Snapshot(names)
    to_ns = _clock()
    for p, (h0, ev, h1) in enumerate(rings):
        if h1 == 0:
            continue
        # seqs h0..h1-1 were (re)written while copying and slot h1 may be in progress: both
        # overwrite older seqs, so only h1-cap+1 .. h0-1 are sure to be intact
        first = max(0, h1 - cap + 1)
        out = []
        for s in range(first, h0):
            ts, c, a, b = (int(x) for x in ev[s % cap])
            nid = c & 0xFFFFFFFF
            nm = (names[nid] if nid < len(names) else "") or f"#{nid}"
            out.append(Event(to_ns(ts), (c >> 40) & 0xFF, (c >> 32) & 0xFF, nm, a, b, s))
        snap.procs[p] = (int(v["trace_hdr"][p, HDR_PID]), out, first)
    return snap


def _clock():
    """raw ring stamp -> CLOCK_MONOTONIC ns, one calibration for every ring of a snapshot"""
    cycles, c0, n0, mult = _prims.trace_clock()
    if not cycles:
        return int
    k = mult / 2**32
    return lambda c: n0 + round((c - c0) * k)
