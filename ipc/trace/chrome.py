"""Trace rings (``ipc.trace.Snapshot``) -> Chrome trace event JSON and an ftrace-style text dump.

API (also what ``launch.py explore`` / ``replay`` call; ``vm.tracepoints`` binds the KVM names):

- ``to_chrome(snap, **fmt) -> dict``   ``{"traceEvents": [...], "displayTimeUnit": "ns", ...}``
- ``to_text(snap, **fmt) -> str``      every process' events merged by time, one line each
- ``export(snap, path, **fmt)``        writes the Chrome JSON (what Perfetto UI and chrome://tracing open)
- ``dump_dir(snap, directory, stem="trace", **fmt) -> (json_path, text_path)``  both formats

``fmt``: ``proc_name(i) -> str`` (track names), ``arg_names {event name: (a name, b name)}``,
``hex_args`` (argument names printed in hex), ``flows [(parent, child)]`` (an arrow from each
``parent`` slice to every ``child`` slice that begins inside it, e.g. an emulated write to the
notifier calls it made).

Shape of the JSON: one Chrome *process* per simulated process (pid = process index + 1, named
"coordinator", "vCPU 0", ...), and inside it *threads* that are lanes: ``ops`` (op slices: nested
VMRUN, L2 time, VMEXIT, emulated writes, notifier calls, table create/sync/drop, grace periods),
``locks`` (lock waits ``wait <lock>`` and holds ``<lock>``) and ``rcu`` (read-side sections
``<domain> read``). Every slice is a complete event (``ph: X``) and slices on one lane always nest:
a slice that would overlap another without nesting (e.g. locks released out of order) goes to the
next lane of its group (``locks 2``...). An end whose begin was overwritten starts at the ring's
first event, a begin without end (the process stopped or died inside) ends at its last; both
carry ``args.truncated``. WARNs and faults are instants (``ph: i``); flows are ``s``/``f`` pairs.
Timestamps are µs since the earliest event of the snapshot (one clock: CLOCK_MONOTONIC; the rings'
raw TSC stamps went through one calibration in ``ipc.trace.snapshot``, so events of different
processes are ordered as the TSC ordered them: a release before the acquisition it allowed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ipc.outputs import write_atomic
from ipc.trace import CAT_HOLD, CAT_OP, CAT_RCU, CAT_WAIT, PH_B, PH_E, PH_I, Snapshot

GROUPS = ("ops", "locks", "rcu")
_GROUP = {CAT_OP: 0, CAT_WAIT: 1, CAT_HOLD: 1, CAT_RCU: 2}
LANES_PER_GROUP = 100


@dataclass
class Slice:
    name: str
    cat: int
    start: int
    end: int = -1
    args: dict = field(default_factory=dict)
    children: list = field(default_factory=list)  # flow targets
    tid: int = 0


def _default_name(i: int) -> str:
    return f"process {i}"


def _args(name: str, a: int, b: int, arg_names: dict, hex_args) -> dict:
    an = arg_names.get(name)
    if an is None:
        return {"a": a, "b": b} if (a or b) else {}
    out = {}
    for k, v in zip(an, (a, b), strict=False):
        if k:
            out[k] = hex(v) if k in hex_args else v
    return out


def _slice_name(cat: int, name: str) -> str:
    return f"wait {name}" if cat == CAT_WAIT else f"{name} read" if cat == CAT_RCU else name


def _build(events, arg_names: dict, hex_args, flows) -> tuple[list[Slice], list[tuple]]:
    """One process' events -> slices (ends matched to begins) and instants."""
    slices: list[Slice] = []
    instants = []
    stack: list[Slice] = []          # open op slices, latest last
    open_by: dict[tuple, Slice] = {}  # (cat, name) -> open lock / RCU slice
    parents = {c: p for p, c in flows}
    t_first = events[0].ts if events else 0
    t_last = events[-1].ts if events else 0
    for e in events:
        if e.phase == PH_I:
            instants.append((e.ts, e.name, _args(e.name, e.a, e.b, arg_names, hex_args)))
            continue
        if e.cat == CAT_OP:
            if e.phase == PH_B:
                s = Slice(e.name, CAT_OP, e.ts, args=_args(e.name, e.a, e.b, arg_names, hex_args))
                p = parents.get(e.name)
                if p is not None:
                    for q in reversed(stack):
                        if q.name == p:
                            q.children.append(s)
                            break
                stack.append(s)
                slices.append(s)
                continue
            k = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].name == e.name), None)
            if k is None:  # its begin was overwritten
                slices.append(Slice(e.name, CAT_OP, t_first, e.ts, {"truncated": "begin before the trace"}))
                continue
            stack.pop(k).end = e.ts  # the latest open slice of that name (L2 time spans commands)
            continue
        key = (e.cat, e.name)
        if e.phase == PH_B:
            s = open_by.pop(key, None)
            if s is not None:
                s.end, s.args["truncated"] = e.ts, "no end"
            s = Slice(_slice_name(e.cat, e.name), e.cat, e.ts)
            open_by[key] = s
            slices.append(s)
        else:
            s = open_by.pop(key, None)
            if s is None:
                slices.append(Slice(_slice_name(e.cat, e.name), e.cat, t_first, e.ts,
                                    {"truncated": "begin before the trace"}))
            else:
                s.end = e.ts
    for s in slices:
        if s.end < 0:
            s.end = t_last
            s.args["truncated"] = "no end (process stopped inside)"
    return slices, instants


def _assign_lanes(slices: list[Slice]) -> int:
    """Put each slice on the first lane of its group where it nests; returns lanes used."""
    lanes: dict[int, list[list[Slice]]] = {}
    used = 0
    for s in sorted(slices, key=lambda s: (s.start, -s.end)):
        g = _GROUP[s.cat]
        ls = lanes.setdefault(g, [])
        for i, st in enumerate(ls + [[]]):
            while st and st[-1].end <= s.start:
                st.pop()
            if not st or st[-1].end >= s.end:
                if i == len(ls):
                    ls.append(st)
                st.append(s)
                s.tid = g * LANES_PER_GROUP + i + 1
                break
        used = max(used, len(ls))
    return used


def to_chrome(snap: Snapshot, *, proc_name: Callable[[int], str] = _default_name, arg_names: dict | None = None,
              hex_args=(), flows=(), title: str = "pagetrack-sim") -> dict:
    arg_names = arg_names or {}
    t0 = min((ev[0].ts for _, ev, _ in snap.procs.values() if ev), default=0)

    def us(t: int) -> float:
        return round((t - t0) / 1000.0, 3)

    out: list[dict] = []
    flow_id = 0
    for p, (pid, events, _) in sorted(snap.procs.items()):
        cpid = p + 1
        out.append({"ph": "M", "name": "process_name", "pid": cpid, "tid": 0,
                    "args": {"name": f"{proc_name(p)} (pid {pid})"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": cpid, "tid": 0, "args": {"sort_index": p}})
        slices, instants = _build(events, arg_names, set(hex_args), flows)
        _assign_lanes(slices)
        tids = sorted({s.tid for s in slices} | ({1} if instants else set()))
        for tid in tids:
            g, i = divmod(tid - 1, LANES_PER_GROUP)
            out.append({"ph": "M", "name": "thread_name", "pid": cpid, "tid": tid,
                        "args": {"name": GROUPS[g] + (f" {i + 1}" if i else "")}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": cpid, "tid": tid, "args": {"sort_index": tid}})
        for s in slices:
            ev = {"ph": "X", "name": s.name, "cat": GROUPS[_GROUP[s.cat]], "pid": cpid, "tid": s.tid,
                  "ts": us(s.start), "dur": round(us(s.end) - us(s.start), 3)}
            if s.args:
                ev["args"] = s.args
            out.append(ev)
            for c in s.children:
                flow_id += 1
                out.append({"ph": "s", "name": f"{s.name} -> {c.name}", "cat": "flow", "id": flow_id,
                            "pid": cpid, "tid": s.tid, "ts": us(s.start)})
                out.append({"ph": "f", "bp": "e", "name": f"{s.name} -> {c.name}", "cat": "flow", "id": flow_id,
                            "pid": cpid, "tid": c.tid, "ts": us(c.start)})
        for ts, name, args in instants:
            out.append({"ph": "i", "s": "t", "name": name, "cat": "event", "pid": cpid, "tid": 1,
                        "ts": us(ts), "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ns",
            "otherData": {"title": title, "clock": "CLOCK_MONOTONIC", "t0_ns": t0,
                          "events": snap.events(),
                          "overwritten": {proc_name(p): lost for p, (_, _, lost) in snap.procs.items()}}}


_TEXT = {(CAT_WAIT, PH_B): "lock_contended", (CAT_WAIT, PH_E): "lock_wait_end",
         (CAT_HOLD, PH_B): "lock_acquired", (CAT_HOLD, PH_E): "lock_release",
         (CAT_RCU, PH_B): "rcu_read_lock", (CAT_RCU, PH_E): "rcu_read_unlock"}


def to_text(snap: Snapshot, *, proc_name: Callable[[int], str] = _default_name, arg_names: dict | None = None,
            hex_args=(), flows=(), title: str = "pagetrack-sim") -> str:
    """ftrace-style: ``TASK-PID [PROC] SECONDS: event: args``, every process merged by time."""
    arg_names = arg_names or {}
    hx = set(hex_args)
    rows = []
    for p, (pid, events, _) in snap.procs.items():
        task = proc_name(p).replace(" ", "")
        for e in events:
            if e.cat == CAT_OP:
                what = {PH_B: "begin", PH_E: "end", PH_I: ""}[e.phase]
                args = " ".join(f"{k}={v}" for k, v in _args(e.name, e.a, e.b, arg_names, hx).items())
                msg = f"{e.name}: {what}{' ' if what and args else ''}{args}".rstrip() if e.phase != PH_E \
                    else f"{e.name}: end"
            else:
                msg = f"{_TEXT.get((e.cat, e.phase), 'event')}: {e.name}"
            rows.append((e.ts, e.seq, f"{task:>16}-{pid:<7} [{p:03d}] {e.ts / 1e9:.9f}: {msg}"))
    rows.sort()
    head = [f"# tracer: {title} (last events of every process, oldest first)",
            f"# entries-in-buffer: {len(rows)}",
            "#", "#            TASK-PID     PROC   TIMESTAMP(s)  EVENT", "#"]
    return "\n".join(head + [r[2] for r in rows]) + "\n"


def export(snap: Snapshot, path: str, **fmt) -> str:
    """Write the Chrome trace JSON to ``path`` (atomically); returns ``path``."""
    doc = to_chrome(snap, **fmt)
    write_atomic(path, json.dumps(doc, separators=(",", ":")) + "\n", what="the trace (Chrome JSON)")
    return path


def dump_dir(snap: Snapshot, directory: str, stem: str = "trace", **fmt) -> tuple[str, str]:
    """Both formats into ``directory`` (created): ``<stem>.json`` and ``<stem>.txt``."""
    os.makedirs(directory, exist_ok=True)
    jp = export(snap, os.path.join(directory, f"{stem}.json"), **fmt)
    tp = os.path.join(directory, f"{stem}.txt")
    write_atomic(tp, to_text(snap, **fmt), what="the trace (text)")
    return jp, tp


def problems(doc: dict) -> list[str]:
    """What is wrong with a Chrome trace document's shape (empty = fine): ``traceEvents`` present,
    every process named, slices on one (pid, tid) nest, every ``B`` has its ``E``, every flow has
    both ends and each end lies inside a slice of its (pid, tid)."""
    out: list[str] = []
    evs = doc.get("traceEvents") if isinstance(doc, dict) else None
    if not isinstance(evs, list):
        return ["no traceEvents list"]
    named = {e["pid"] for e in evs if e.get("ph") == "M" and e.get("name") == "process_name"}
    tracks: dict[tuple, list[tuple[float, float, str]]] = {}
    open_b: dict[tuple, list[str]] = {}
    flows: dict[object, dict[str, dict]] = {}
    eps = 1e-6
    for e in evs:
        ph, key = e.get("ph"), (e.get("pid"), e.get("tid"))
        if ph != "M" and e.get("pid") not in named:
            out.append(f"event {e.get('name')!r} on unnamed process {e.get('pid')}")
        if ph == "X":
            tracks.setdefault(key, []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
        elif ph == "B":
            open_b.setdefault(key, []).append(e["name"])
        elif ph == "E":
            if not open_b.get(key):
                out.append(f"E {e.get('name')!r} without B on {key}")
            else:
                open_b[key].pop()
        elif ph in ("s", "f"):
            flows.setdefault(e.get("id"), {})[ph] = e
    out += [f"B {n!r} without E on {k}" for k, names in open_b.items() for n in names]
    for key, sl in tracks.items():
        stack: list[tuple[float, float, str]] = []
        for s in sorted(sl, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][1] <= s[0] + eps:
                stack.pop()
            if stack and s[1] > stack[-1][1] + eps:
                out.append(f"slices {stack[-1][2]!r} and {s[2]!r} overlap without nesting on {key}")
            stack.append(s)
    for fid, ends in flows.items():
        if set(ends) != {"s", "f"}:
            out.append(f"flow {fid} has only {sorted(ends)}")
            continue
        for ph, e in ends.items():
            key = (e.get("pid"), e.get("tid"))
            if not any(a - eps <= e["ts"] <= b + eps for a, b, _ in tracks.get(key, ())):
                out.append(f"flow {fid} {ph} at {e['ts']} points at no slice on {key}")
    return out
