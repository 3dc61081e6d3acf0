"""Time dilation: how much slower the project's kernel paths run than the kernel's C would.

Contention depends on the ratio of the time a vCPU spends in the code under study (nested VMRUN
get/put, ``track_write``, notifier register/unregister) to its time in the guest. Here the code is
Python calling compiled primitives while guest time is real time, so that ratio — and every lock-wait
share — is inflated by a factor D. ``--dilate N`` (vm/config.py ``dilate``) makes guest time and the
modelled real-time delays N times longer; ``--dilate auto`` measures D with :func:`measure`.

Method, per path, in this process on a small VM (2 vCPUs, fuzz off, uncontended, stats on as in a run, trace ring
off as in every measuring command):

1. **Python cost** ``T_py``: wall time of one call of the path, fastest of ``reps`` timed batches.
2. **What the path executes**, counted once under ``sys.settrace`` (opcode events: Python bytecodes
   ``n_bc``) and ``sys.setprofile`` (``c_call`` events: every compiled primitive of ``ipc._prims`` by
   name, and every other builtin / numpy call).
3. **C estimate** ``T_c`` of the same sequence: each primitive costs what the same operation costs
   inlined in kernel C on x86 (``PRIM_NS``: a load 1 ns, a locked RMW 6 ns, ...); each bytecode
   stands for ``BC_NS`` of C (a bytecode is a handful of machine instructions in compiled code);
   each other builtin call for ``OTHER_NS`` (dict / int / bytes helpers: a few instructions in C).
4. ``D_path = T_py / T_c``; a run's factor weighs the paths by how often each runs per nested VMRUN
   (get/put every VMRUN, the switching get/put at ``switch_rate``, track_write at the table-write
   rate, register/unregister at ``churn_rate``): ``D = Σ w·T_py / Σ w·T_c``.

Uncertainty (reported as ``low`` / ``high``): the C constants span ``BC_NS`` 0.25–1 ns, ``OTHER_NS``
1–10 ns, primitive bodies ×0.5–×2; ``T_py`` varies with the machine's load (shared CPUs) by tens of
percent. The estimate leaves out what the kernel pays and Python does not model: cache misses on
shared lines (both pay them on contended lines), and the kernel's ``synchronize_rcu`` is a real
grace period (milliseconds; tens of µs expedited) where liburcu-memb's here takes microseconds, so
for rcu-list's switching path the kernel is slower than this estimate says (D there is an upper bound).
"""

from __future__ import annotations

import collections
import math
import random
import secrets
import sys
import time
from collections.abc import Callable

from ipc import vtime

BC_NS, BC_RANGE = 0.5, (0.25, 1.0)
OTHER_NS, OTHER_RANGE = 3.0, (1.0, 10.0)
PRIM_RANGE = (0.5, 2.0)
PATHS = ("vmrun_get_put", "vmrun_switch", "track_write", "register_unregister")
METHOD = ("D = Python wall time of each path / a C estimate of the same sequence (primitives at x86 "
          f"C costs, {BC_NS} ns per bytecode, {OTHER_NS} ns per other builtin call), weighted per "
          "nested VMRUN by the workload's rates")


def _prim_name(fn) -> str | None:
    owner = getattr(fn, "__self__", None)
    if owner is not None and type(owner).__module__.rsplit(".", 1)[-1] == "_prims":
        return f"{type(owner).__name__}.{fn.__name__}"
    if (getattr(fn, "__module__", None) or "").rsplit(".", 1)[-1] == "_prims":
        return fn.__name__
    return None


def count_ops(fn: Callable[[], object]) -> tuple[int, collections.Counter, int]:
    """(bytecodes, primitive calls by name, other builtin calls) of one call of ``fn``."""
    prims: collections.Counter = collections.Counter()
    n = {"bc": 0, "other": 0}

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            n["bc"] += 1
        return tracer

    def profiler(frame, event, arg):
        if event == "c_call" and arg is not sys.settrace and arg is not sys.setprofile:
            name = _prim_name(arg)
            if name is None:
                n["other"] += 1
            else:
                prims[name] += 1

    sys.settrace(tracer)
    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    # a `with lock:` enters through the type's slot, which the profiler does not report as a call;
    # its __exit__ is: every exit had its enter
    for name, k in list(prims.items()):
        if name.endswith(".__exit__"):
            prims[name[: -len("__exit__")] + "__enter__"] += k
    return n["bc"], prims, n["other"]


def time_ns(fn: Callable[[], object], budget_s: float = 0.05, reps: int = 5) -> float:
    """ns per call of ``fn``: the fastest of ``reps`` batches of about ``budget_s`` each (the machine is
    shared: the fastest batch is the least disturbed one)."""
    fn()
    t0 = time.perf_counter_ns()
    fn()
    one = max(time.perf_counter_ns() - t0, 50)
    n = max(3, min(200_000, int(budget_s * 1e9 / one)))
    out = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t) / n)
    return min(out)


# C cost in ns of one primitive as kernel C on x86 would pay it uncontended (the same operation,
# inlined, no Python call): ipc/vtime.py's price table, the one virtual time charges (docs/virtual-time.md
# has the sources), e.g. plain loads / stores ~1 ns, a LOCK-prefixed RMW ~6 ns, a clock read ~20 ns.
# Not measured here: a timing of the compiled primitives from Python is dominated by the call itself
# (the no-op call floor is 50-180 ns on this shared machine, larger than every difference).
PRIM_NS = {name: vtime.prim_ns(name) for name in vtime.PRIM_PRICE}
DEFAULT_PRIM_NS = 0.0  # is_held, owner, nesting, ...: lockdep-style checks, compiled out of a production kernel


def c_estimate(bc: int, prims: dict[str, int], other: int, bc_ns: float = BC_NS, other_ns: float = OTHER_NS,
               prim_scale: float = 1.0) -> float:
    """ns the same sequence would take in C (primitives at ``PRIM_NS``)."""
    p = sum(n * PRIM_NS.get(name, DEFAULT_PRIM_NS) for name, n in prims.items())
    return bc * bc_ns + other * other_ns + p * prim_scale


def _paths(kvm, d, cfg) -> dict[str, Callable[[], object]]:
    from vm import notifier
    from vm.mirror import MIRROR_KIND
    from vm.page_track import write_path

    state = {"l2": 0}

    def get_put():
        d.nested_vmrun(0, 0)
        d.nested_vmexit(0, 0, False)

    def switch():
        l2 = state["l2"]
        d.nested_vmrun(0, l2)
        d.nested_vmexit(0, l2, True)
        state["l2"] = (l2 + 1) % cfg.l2s

    emulate = write_path(kvm)[0]
    rng = random.Random(1)

    def track_write():
        gpa, data = d.tracked_write(0, rng)
        emulate(gpa, data)

    def reg_unreg():
        node = notifier.alloc_node(kvm, MIRROR_KIND, 0)
        notifier.kvm_page_track_register_notifier(kvm, node)
        notifier.kvm_page_track_unregister_notifier(kvm, node)
        notifier.free_node(kvm, node)

    return {"vmrun_get_put": get_put, "vmrun_switch": switch, "track_write": track_write,
            "register_unregister": reg_unreg}


def measure_design(design: str, budget_s: float = 0.05) -> dict:
    """Per-path Python cost, operation counts and C estimate for ``design`` (in this process)."""
    import vm.avic  # noqa: F401  (registers the nested AVIC designs)
    from vm.config import Config
    from vm.kvm import Kvm
    from vm.nested import make_design

    cfg = Config(design=design, vcpus=2, l2s=4, fuzz="off", notifiers=0, trace_events=0)
    kvm = Kvm.create(cfg, "rdil" + secrets.token_hex(4), frozenset())
    d = None
    try:
        d = make_design(kvm, cfg)
        d.setup()
        for v in range(cfg.vcpus):
            d.vcpu_init(v)
            d.vcpu_load(v)
        paths = _paths(kvm, d, cfg)
        out = {}
        for name in PATHS:
            fn = paths[name]
            if name == "track_write":  # the table in use by both vCPUs: tracked, never flood-dropped
                d.nested_vmrun(0, 0)
                d.nested_vmrun(1, 0)
            fn()
            bc, prims, other = count_ops(fn)
            py = time_ns(fn, budget_s)
            c = c_estimate(bc, prims, other)
            lo = c_estimate(bc, prims, other, BC_RANGE[0], OTHER_RANGE[0], PRIM_RANGE[0])
            hi = c_estimate(bc, prims, other, BC_RANGE[1], OTHER_RANGE[1], PRIM_RANGE[1])
            out[name] = {"py_ns": round(py, 1), "c_ns": round(c, 1), "c_ns_range": [round(lo, 1), round(hi, 1)],
                         "bytecodes": bc, "prims": dict(prims), "other_calls": other,
                         "dilation": round(py / c, 2) if c else None}
            if name == "track_write":
                d.nested_vmexit(0, 0, True)
                d.nested_vmexit(1, 0, True)
        return {"design": design, "paths": out}
    finally:
        if d is not None:
            try:
                d.teardown()
            finally:
                d.close()
        kvm.close()


def weights(cfg: dict) -> dict[str, float]:
    """How often each path runs per nested VMRUN under the workload of ``cfg`` (a Config dict)."""
    sw = float(cfg.get("switch_rate", 0.1)) if int(cfg.get("l2s", 4)) > 1 else 0.0
    twv = cfg.get("table_writes_per_vmrun")
    if twv is None:
        twv = float(cfg.get("writes_per_exit", 8)) * float(cfg.get("tracked_fraction", 0.25))
    return {"vmrun_get_put": 1.0 - sw, "vmrun_switch": sw, "track_write": float(twv),
            "register_unregister": float(cfg.get("churn_rate", 0.0))}


def combine(measured: dict, w: dict[str, float]) -> dict:
    """Weighted factor of one design's measurement: {"factor", "low", "high"}."""
    py = sum(w[p] * measured["paths"][p]["py_ns"] for p in PATHS)
    c = sum(w[p] * measured["paths"][p]["c_ns"] for p in PATHS)
    c_lo = sum(w[p] * measured["paths"][p]["c_ns_range"][0] for p in PATHS)
    c_hi = sum(w[p] * measured["paths"][p]["c_ns_range"][1] for p in PATHS)
    if not c:
        return {"factor": 1.0, "low": 1.0, "high": 1.0}
    return {"factor": py / c, "low": py / c_hi, "high": py / c_lo}


def measure(cfg: dict, designs: list[str] | tuple[str, ...], budget_s: float = 0.05) -> dict:
    """The dilation for runs of ``designs`` under the workload of ``cfg``: one factor shared by every
    design (the geometric mean of their weighted factors, so that a comparison runs one guest time),
    at least 1. Returns the document the results JSON records as ``dilation``."""
    w = weights(cfg)
    per = {}
    for des in designs:
        m = measure_design(des, budget_s)
        m.update(combine(m, w))
        per[des] = m
    gm = math.exp(sum(math.log(max(p["factor"], 1e-9)) for p in per.values()) / len(per))
    lo = math.exp(sum(math.log(max(p["low"], 1e-9)) for p in per.values()) / len(per))
    hi = math.exp(sum(math.log(max(p["high"], 1e-9)) for p in per.values()) / len(per))
    return {"factor": round(max(1.0, gm), 2), "low": round(max(1.0, lo), 2), "high": round(max(1.0, hi), 2),
            "method": METHOD, "weights": w, "designs": per}


def describe(doc: dict) -> str:
    """One line for the console: the factor and how it was measured."""
    parts = []
    for des, m in doc["designs"].items():
        p = m["paths"]
        parts.append(f"{des}: get/put {p['vmrun_get_put']['dilation']}×, switch {p['vmrun_switch']['dilation']}×, "
                     f"track_write {p['track_write']['dilation']}×, register/unregister "
                     f"{p['register_unregister']['dilation']}×")
    return (f"dilate auto: factor {doc['factor']:g} (range {doc['low']:g}-{doc['high']:g}); Python wall time "
            f"per path / C estimate of its primitive sequence, weighted per nested VMRUN — " + "; ".join(parts))


def resolve(dilate, cfg_values: dict, designs) -> tuple[float, dict | None]:
    """``--dilate auto|off|N`` (None = off) -> (factor, what the results record as ``dilation``);
    ``auto`` measures (a few seconds) and prints how."""
    if dilate is None or dilate == "off":
        return 1.0, None
    if dilate == "auto":
        doc = measure(cfg_values, designs)
        print(describe(doc), file=sys.stderr, flush=True)
        return doc["factor"], doc
    return float(dilate), {"factor": float(dilate), "method": "given on the command line (--dilate N)"}
