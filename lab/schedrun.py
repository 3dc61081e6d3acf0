"""One controlled schedule of a scenario: a fresh VM, one real process per vCPU (forked from this
one), each running its own list of steps, and this process as the scheduler (ipc/sched) that
lets exactly one of them run between two scheduling points. Then the oracle, teardown, unlink.

A vCPU process reports (WARNs, its step log, an error) over a pipe as one msgpack message when it
ends; shared memory carries everything else. Nothing here is timed: the same strategy and seed give
the same interleaving, the same WARNs and the same oracle findings.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import msgspec

import vm.avic  # noqa: F401  (registers the nested AVIC designs)
from ipc import sched
from ipc.sched import pool, tso
from ipc.sched.points import name_location
from vm.config import from_dict
from vm.coordinator import new_run_id
from vm.kvm import Kvm
from vm.nested import destroy_vm, make_design

MAX_EVENTS = 50


def _teardown(d, kvm) -> list[str]:
    """The design's teardown (unregister, untrack, free), counted in the verdict: a lockdep splat,
    a failure or a WARN in it (kvm.events), a registration left (a leaked VM reference), is the
    code's bug like any other."""
    n = len(kvm.events)
    reasons = destroy_vm(kvm, d)
    return reasons + [f"at teardown: {m}" for _, m, _ in kvm.events[n:]]


@dataclass
class Scenario:
    """What to explore: the VM (``cfg`` dict, ``hooks``) and one program per vCPU, each a list of
    (op, args) run in order by that vCPU only, as the scripted commands of ``run --scenario``
    (vcpu/vcpu.py ``Vcpu.execute``; ``executor`` "vcpu", the only one)."""

    name: str
    cfg: dict
    hooks: tuple[str, ...]
    programs: list[list[tuple[str, dict]]]
    executor: str = "vcpu"

    @property
    def n(self) -> int:
        return len(self.programs)


@dataclass
class Outcome:
    verdict: str  # SUCCESS | FAILURE | ABORTED (deadlock, step bound: also FAILURE) | MISMATCH
    reasons: list[str]
    log: list[tuple[int, str, bool]]  # (vCPU, point name, blocked retry) per step
    sched_outcome: str
    seconds: float
    steps_log: list[list[str]] = field(default_factory=list)  # per vCPU: what each op did
    findings: list[tuple[int, int, str]] = field(default_factory=list)  # (step, process, message) for the trace
    final: list[str] = field(default_factory=list)  # the reasons not in findings (oracle, errors, deadlock...)

    def trace(self, n: int):
        """This schedule as a trace snapshot (lab/schedtrace.py)."""
        from lab import schedtrace

        return schedtrace.snapshot(self.log, n, self.findings, self.verdict, tuple(self.final))


def describe(op: str, args: dict) -> str:
    return " ".join([op] + [f"{k}={v}" for k, v in args.items()])


def programs(sc: Scenario, cfg) -> list[list[tuple[str, dict]]]:
    """The programs as ``Vcpu.execute`` takes them: each step checked and its values converted by
    vm/config.py ``parse_steps``, as ``run --scenario`` does with a file's ``[[step]]``s (a hex
    ``data`` string becomes bytes)."""
    from vm.config import parse_steps

    out: list[list[tuple[str, dict]]] = [[] for _ in sc.programs]
    flat = [{"vcpu": v, "op": op, **args} for v, p in enumerate(sc.programs) for op, args in p]
    for v, op, args in parse_steps(flat, cfg):
        out[v].append((op, args))
    return out


OP_LOAD, OP_PUT = "op vcpu_load", "op vcpu_put"  # the points that begin a vCPU's first and last op


def op_point(op: str, args: dict) -> str:
    """The point a vCPU passes as it begins a program step (``op ...``: not an access)."""
    return f"op {describe(op, sc_args(args))}"


def op_locations(sc: Scenario) -> frozenset[int]:
    """The locations of every point that begins an op of a vCPU of ``sc``: the partial-order
    reduction counts each vCPU's ops with them (ipc/sched/strategies.py, ``Footprint``'s phases)."""
    names = {OP_LOAD, OP_PUT} | {op_point(op, args) for p in programs(sc, from_dict({**sc.cfg, "fuzz": "off"}))
                                 for op, args in p}
    return frozenset(name_location(n) for n in names)


def _vcpu_body(sc: Scenario, cfg, base: str, coverage: bool = False):
    """What each vCPU process of the pool runs for schedule ``job`` (ipc.sched.pool): attach that
    schedule's VM, run its program under the turnstile as the scripted commands of ``run
    --scenario`` (``Vcpu``: the same executor and L1 write path), detach, return its report."""
    from vcpu.vcpu import Vcpu

    progs = programs(sc, cfg)

    def body(v: int, client, job: int) -> bytes:
        report: dict = {"vcpu": v, "error": None, "events": [], "log": [], "names": {}, "aborted": False}
        kvm = d = None
        client.turns = 0
        tso.begin(client)  # under the memory model tso: an empty store buffer, this schedule's flushes
        turns: list[int] = []  # per event of kvm.events: the vCPU's turns when it was seen (for the trace)
        tracer = None
        if coverage:
            from lab.pathcov import Tracer

            tracer = Tracer()
            tracer.start()

        def seen() -> None:
            turns.extend([client.turns] * (len(kvm.events) - len(turns)))

        try:
            kvm = Kvm.attach(cfg, f"{base}j{job}", v + 1, frozenset(sc.hooks))
            d = make_design(kvm, cfg)
            d.vcpu_init(v)
            vc = Vcpu(kvm, d, v)
            client.hit(OP_LOAD)
            vc.load()
            for op, args in progs[v]:
                client.hit(op_point(op, args))
                report["log"].append(f"vCPU {v}: {describe(op, sc_args(args))} -> {vc.execute(op, dict(args))}")
                seen()
            if _runs_l2(d, v):
                report["log"] += _l2_runs_on(client, d, v, vc.l2)
                seen()
            client.hit(OP_PUT)
            vc.put()
        except sched.ScheduleAborted:
            report["aborted"] = True
        except BaseException as e:
            report["error"] = f"{type(e).__name__}: {e}"
            report["traceback"] = traceback.format_exc()[-3000:]
        finally:
            if tracer is not None:
                tracer.stop()
                report["fns"] = tracer.names()
            tso.settle(client, report["aborted"])  # its buffered stores reach memory before the VM is detached
            if kvm is not None:
                report["events"] = [m for _, m, _ in kvm.events[:MAX_EVENTS]]
                report["gp"] = {n: [dom.gps, dom.shared_gps] for n, dom in kvm.domains.items()}
                seen()
                report["turns"] = turns[:MAX_EVENTS]
                if d is not None:
                    d.close()
                kvm.close()
        report["names"] = {str(k): n for k, n in client.names.items()}
        return msgspec.msgpack.encode(report)

    return body


def sc_args(args: dict) -> dict:
    """A step's args as the scenario names them (bytes back to hex), for the point names and log."""
    return {k: (v.hex() if isinstance(v, bytes | bytearray) else v) for k, v in args.items()}


IDLE_POINT = "L2 runs on (program ended)"


def _runs_l2(d, v: int) -> bool:
    in_l2 = getattr(d, "in_l2", None)
    return in_l2 is not None and in_l2(v)


def _l2_runs_on(client, d, v: int, l2: int) -> list[str]:
    """A vCPU whose program ended while it runs L2: L2 goes on running until a reload request's
    kick (the IPI of ``kvm_make_all_cpus_request``) makes it exit; KVM serves the request and
    re-enters L2, and a requester waiting for it to leave (KVM_REQUEST_WAIT) goes on. Under the
    scheduler it idles (ipc.sched ``Client.idle``): chosen again when a kick is pending for it
    (``kick_pending``, the scheduler's ``wake``), and when every vCPU has ended or idles it exits L2
    (vcpu_put comes after a VM exit: KVM_RUN returns to user space only from the host). Without
    this a requester waits forever for a vCPU that is not run any more (a deadlock of the
    harness, not of KVM)."""
    log = []
    while True:
        client.idle(IDLE_POINT)
        if d.take_kick(v, l2):
            log.append(f"vCPU {v}: kicked out of L2 {l2} (reload request), re-entered it")
            continue
        if client.finishing() or not d.in_l2(v):
            break
    if d.leave_l2(v):
        log.append(f"vCPU {v}: VM exit from L2 {l2} (its program ended)")
    return log


class Runner:
    """Runs schedules of one scenario: vCPU processes forked once (a pool), a fresh VM per schedule
    (run id ``<base>j<job>``); ``close()`` ends the processes. Use as a context manager."""

    def __init__(self, sc: Scenario, coverage=None, hang_s: float = 10.0):
        self.sc = sc
        self.hang_s = hang_s
        self.cfg = from_dict({**sc.cfg, "fuzz": "off"})
        self.pool: pool.Pool | None = None
        self.base = ""
        self.coverage = coverage  # lab.pathcov.Coverage: what each schedule reached is added to it
        self.memory_seed = 0  # seeds the store buffers' flushes under the memory model tso (ipc/sched/tso.py)

    def _pool(self) -> pool.Pool:
        if self.pool is not None and self.pool.broken:
            self.pool.close()
            self.pool = None
        if self.pool is None:
            self.base = new_run_id()[:16]
            body = _vcpu_body(self.sc, self.cfg, self.base, self.coverage is not None and self.coverage.functions)
            self.pool = pool.Pool(self.base, self.sc.n, body, self.hang_s)
        return self.pool

    def run(self, strategy, max_steps: int) -> Outcome:
        """Run the scenario once under ``strategy`` (ipc.sched Pct / RandomWalk / Replay)."""
        sc, cfg = self.sc, self.cfg
        t0 = time.monotonic()
        pool = self._pool()
        kvm = Kvm.create(cfg, f"{self.base}j{pool.job + 1}", frozenset(sc.hooks))
        d = None
        try:
            d = make_design(kvm, cfg)
            d.setup()
            # the coordinator's sampling checker (I1) runs between every two steps
            findings: list[tuple[int, int, str]] = []
            seen_msgs: set[str] = set()

            def check(step: int) -> None:  # before step ``step`` (the log's index: run-ahead steps count)
                n0 = len(kvm.events)
                d.sample()
                findings.extend((step, 0, m) for _, m, _ in kvm.events[n0:] if m not in seen_msgs)
                seen_msgs.update(m for _, m, _ in kvm.events[n0:])  # it repeats itself: the first time only

            kick = getattr(d, "kick_pending", None)  # a vCPU left in L2 is run again when kicked
            tracer = None
            if self.coverage is not None and self.coverage.functions:
                from lab.pathcov import Tracer

                tracer = Tracer()
                tracer.start()
            try:
                tso.announce(pool.region, pool.hdr, self.memory_seed)
                s, raw = pool.run(strategy, max_steps, check=check, wake=kick)
            finally:
                if tracer is not None:
                    tracer.stop()
            reports = []
            for v, b in enumerate(raw):
                try:
                    reports.append(msgspec.msgpack.decode(b or b""))
                except msgspec.DecodeError:
                    reports.append({"vcpu": v, "error": "no report (process died or hung)", "events": [],
                                    "log": [], "names": {}, "aborted": False})
            names: dict[int, str] = {}
            for rep in reports:
                names.update({int(k): n for k, n in rep["names"].items()})
            log = [(i, names.get(p, f"point #{p}"), b) for i, p, b in s.log]
            reasons = _reasons(s, reports, names) + [m for _, m, _ in kvm.events]
            clean = s.outcome == "done" and not any(rep["error"] for rep in reports)
            if clean:
                n_ev = len(kvm.events)
                reasons += [f"oracle: {f}" for f in d.oracle()]
                reasons += [m for _, m, _ in kvm.events[n_ev:]]  # a WARN the oracle's walk raised
            if self.coverage is not None:
                self.coverage.add_schedule(d.stats() if hasattr(d, "region") else {}, reports,
                                           tracer.names() if tracer is not None else [])
            if clean:  # nobody holds a lock: every vCPU ended its program; what it finds is a finding
                reasons += _teardown(d, kvm)
            reasons = _dedup(reasons)
            findings += _vcpu_findings(s.log, reports)
            placed = {m for _, _, m in findings}  # the rest (oracle, errors, deadlock...) come at the end
            final = [r for r in reasons if r.rsplit(" (x", 1)[0] not in placed]
            verdict = "MISMATCH" if s.outcome == "mismatch" else "FAILURE" if reasons else "SUCCESS"
            return Outcome(verdict, reasons, log, s.outcome, time.monotonic() - t0,
                           [rep["log"] for rep in reports], sorted(findings), final)
        finally:
            if d is not None:
                d.close()
            kvm.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_schedule(sc: Scenario, strategy, max_steps: int) -> Outcome:
    """One schedule on processes of its own."""
    with Runner(sc) as r:
        return r.run(strategy, max_steps)


def _reasons(s, reports: list[dict], names: dict[int, str]) -> list[str]:
    out = []
    if s.outcome != "done":
        out.append(f"{s.outcome}: {name_points(s.detail, names)}")
    for rep in reports:
        if rep["error"]:
            out.append(f"vCPU {rep['vcpu']} failed: {rep['error']}")
        out.extend(rep["events"])
    return out


def _vcpu_findings(log, reports: list[dict]) -> list[tuple[int, int, str]]:
    """Each vCPU's WARNs at the global step in which it raised them (its turns -> the log)."""
    steps: dict[int, list[int]] = {}
    for k, (v, _, _) in enumerate(log):
        steps.setdefault(v, []).append(k)
    out = []
    for rep in reports:
        ks = steps.get(rep["vcpu"], [0])
        for msg, t in zip(rep["events"], rep.get("turns", []), strict=False):
            out.append((ks[min(max(t - 1, 0), len(ks) - 1)], rep["vcpu"] + 1, msg))
    return out


def name_points(text: str, names: dict[int, str]) -> str:
    """``@<point id>`` -> ``'name'`` for the points whose names are known."""
    for pid, n in names.items():
        text = text.replace(f"@{pid}", f"'{n}'")
    return text


def _dedup(msgs: list[str]) -> list[str]:
    """Each message once, in first-seen order, with how often it came (the sampling checker
    repeats itself at every step)."""
    n: dict[str, int] = {}
    for m in msgs:
        n[m] = n.get(m, 0) + 1
    return [m if c == 1 else f"{m} (x{c})" for m, c in n.items()]
