"""The trace of one controlled schedule (``launch.py explore`` / ``replay``): built from the
scheduler's step log, not from the trace rings, so that it is exactly the interleaving the scheduler
ran and the same bytes every time the schedule is replayed.

Time is the step index: step ``k`` (the k-th choice of the scheduler) occupies [k, k+1) µs, and
only the chosen vCPU runs inside it (the trace metadata says so: ``otherData.clock``). Real
timestamps of rings in scheduled processes would mostly measure the futex hand-offs between turns
and differ at every replay; the log already names every point the vCPU passed.

From the log, per vCPU (a point is where a vCPU stopped; what it names happens when the vCPU is
chosen there): an instant per scheduling point (``args.step``; ``retry`` after blocking); op slices
(``op <what>`` point until the vCPU stops at its next op, ``vcpu_load`` ... ``vcpu_put``); lock waits
(``<lock>: lock`` whose try failed, i.e. the vCPU's next point is ``<lock>: wait``, until the step in
which it got the lock) and holds (acquired until ``<lock>: unlock``); RCU / SRCU read-side sections
(outermost ``read_lock`` .. ``read_unlock``); ``synchronize <domain>`` (its gp_lock held) and the
``grace period <domain>`` wait inside it (blocked while readers are inside). The coordinator track
has the sampling checker's findings at the step before which it ran them, and the verdict
(``FAILURE`` / ``SUCCESS``) with the final oracle's findings after the last step; a vCPU's own WARNs
are instants on its track at the end of the op in which it raised them.
"""

from __future__ import annotations

import json
import os

from ipc.outputs import write_atomic
from ipc.trace import CAT_HOLD, CAT_OP, CAT_RCU, CAT_WAIT, PH_B, PH_E, PH_I, Event, Snapshot, chrome
from vm import tracepoints

NS_PER_STEP = 1000  # 1 µs per scheduling step in the Chrome JSON (its unit is µs)
POINT_ARGS = ("step", "retry")


class _Track:
    def __init__(self) -> None:
        self.ev: list[Event] = []

    def add(self, ts: int, cat: int, phase: int, name: str, a: int = 0, b: int = 0) -> None:
        self.ev.append(Event(ts, cat, phase, name, a, b, len(self.ev)))

    def sorted(self) -> list[Event]:
        out = sorted(self.ev, key=lambda e: (e.ts, e.seq))
        for i, e in enumerate(out):
            e.seq = i
        return out


def _vcpu_track(log: list[tuple[int, str, bool]], ks: list[int]) -> _Track:
    tr = _Track()
    op_open = ""
    depth: dict[str, int] = {}
    names = [log[k][1] for k in ks]
    for j, k in enumerate(ks):
        name, retry = names[j], log[k][2]
        nxt = names[j + 1] if j + 1 < len(ks) else None
        t = k * NS_PER_STEP
        tr.add(t, CAT_OP, PH_I, name, k, int(retry))
        if name.startswith("op "):
            if op_open:
                tr.add(ks[j - 1] * NS_PER_STEP + 990, CAT_OP, PH_E, op_open)
            op_open = name[3:]
            tr.add(t + 10, CAT_OP, PH_B, op_open, k)
            continue
        lock, _, what = name.rpartition(": ")
        if what in ("lock", "wait"):
            got = nxt != f"{lock}: wait"
            if what == "lock":
                tr.add(t + 20, CAT_HOLD if got else CAT_WAIT, PH_B, lock)
            elif got:
                tr.add(t + 20, CAT_WAIT, PH_E, lock)
            if got:
                if what == "wait":
                    tr.add(t + 21, CAT_HOLD, PH_B, lock)
                if lock.endswith(".gp_lock"):
                    tr.add(t + 22, CAT_OP, PH_B, f"synchronize {lock.removesuffix('.gp_lock')}")
        elif what == "unlock":
            if lock.endswith(".gp_lock"):
                tr.add(t + 19, CAT_OP, PH_E, f"synchronize {lock.removesuffix('.gp_lock')}")
            tr.add(t + 20, CAT_HOLD, PH_E, lock)
        elif what in ("read_lock", "read_unlock"):
            d = depth.get(lock, 0) + (1 if what == "read_lock" else -1)
            depth[lock] = d
            if (what == "read_lock" and d == 1) or (what == "read_unlock" and d == 0):
                tr.add(t + 20, CAT_RCU, PH_B if d else PH_E, lock)
        elif what == "grace period waits for readers":
            gp = f"grace period {lock}"
            if j and names[j - 1] != name:  # blocked at the end of its previous step
                tr.add(ks[j - 1] * NS_PER_STEP + 500, CAT_OP, PH_B, gp)
            if nxt != name:
                tr.add(t + 20, CAT_OP, PH_E, gp)
    if op_open and ks:
        tr.add(ks[-1] * NS_PER_STEP + 990, CAT_OP, PH_E, op_open)
    return tr


def snapshot(log: list[tuple[int, str, bool]], n: int, findings=(), verdict: str = "",
             final: tuple[str, ...] = ()) -> Snapshot:
    """The schedule as a :class:`ipc.trace.Snapshot` (process 0 = coordinator, v + 1 = vCPU v).
    ``findings``: (step, process, message) instants; ``verdict`` and ``final`` (the oracle's
    findings) go on the coordinator after the last step."""
    steps: list[list[int]] = [[] for _ in range(n)]
    for k, (v, _, _) in enumerate(log):
        steps[v].append(k)
    tracks = {v + 1: _vcpu_track(log, steps[v]) for v in range(n)}
    tracks[0] = _Track()
    for step, proc, msg in findings:
        tracks.setdefault(proc, _Track()).add(max(0, step * NS_PER_STEP - (5 if proc == 0 else -900)),
                                              CAT_OP, PH_I, msg, step)
    end = len(log) * NS_PER_STEP
    if verdict:
        tracks[0].add(end, CAT_OP, PH_I, verdict, len(log))
    for msg in final:
        tracks[0].add(end + 1, CAT_OP, PH_I, msg, len(log))
    snap = Snapshot(sorted({name for _, name, _ in log}))  # the point names
    for p, tr in sorted(tracks.items()):
        ev = tr.sorted()
        if ev:
            snap.procs[p] = (p, ev, 0)
    return snap


def _fmt(snap: Snapshot, title: str) -> dict:
    ev = [e for _, evs, _ in snap.procs.values() for e in evs if e.cat == CAT_OP]
    f = tracepoints.fmt()
    points = set(snap.names)
    f["arg_names"] = {**{e.name: POINT_ARGS if e.name in points else ("step", "") for e in ev if e.phase != PH_E},
                      **f["arg_names"]}
    f["title"] = title
    return f


def to_chrome(snap: Snapshot, title: str) -> dict:
    doc = chrome.to_chrome(snap, **_fmt(snap, title))
    for e in doc["traceEvents"]:
        if e.get("ph") == "M" and e["name"] == "process_name":
            e["args"]["name"] = e["args"]["name"].rsplit(" (pid", 1)[0]
    doc["otherData"].update(clock="scheduling step: 1 us = 1 step of the controlled scheduler (step k is "
                                  "[k, k+1) us; only the chosen vCPU runs in it)", t0_ns=0)
    return doc


def to_text(snap: Snapshot, title: str) -> str:
    head = "# time: 1 us = 1 scheduling step (step k at k us)\n"
    return head + chrome.to_text(snap, **_fmt(snap, title))


def write(snap: Snapshot, path: str, title: str, text_path: str | None = None) -> list[str]:
    """The Chrome JSON to ``path`` (and the ftrace-style text to ``text_path``); the paths written."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    write_atomic(path, json.dumps(to_chrome(snap, title), separators=(",", ":")) + "\n", what="the schedule's trace")
    out = [path]
    if text_path:
        write_atomic(text_path, to_text(snap, title), what="the schedule's trace (text)")
        out.append(text_path)
    return out
