"""One controlled schedule of a scenario: a fresh VM, one real process per vCPU (forked from this
one), each running its own list of steps, and this process as the scheduler (ipc/sched.py) that
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
from vm.config import from_dict
from vm.coordinator import new_run_id
from vm.kvm import Kvm
from vm.nested import make_design

MAX_EVENTS = 50


@dataclass
class Scenario:
    """What to explore: the VM (``cfg`` dict, ``hooks``) and one program per vCPU, each a list of
    (op, args) run in order by that vCPU only; ``executor`` "avic" runs the ops as
    vm/avic/kaboom.apply_step (L1 stores inside the guest-mode section), "vcpu" as the scripted
    commands of vcpu/vcpu.py."""

    name: str
    cfg: dict
    hooks: tuple[str, ...]
    programs: list[list[tuple[str, dict]]]
    executor: str = "avic"

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


def describe(op: str, args: dict) -> str:
    return " ".join([op] + [f"{k}={v}" for k, v in args.items()])


def _vcpu_body(sc: Scenario, cfg, run_id: str):
    """What each forked vCPU process runs (ipc.sched.run_forked): attach the VM, run its program
    under the turnstile, return its report."""

    def body(v: int, client) -> bytes:
        report: dict = {"vcpu": v, "error": None, "events": [], "log": [], "names": {}, "aborted": False}
        try:
            kvm = Kvm.attach(cfg, run_id, v + 1, frozenset(sc.hooks))
            d = make_design(kvm, cfg)
            d.vcpu_init(v)
            run = _executor(sc.executor, kvm, d, v)
            client.hit("op vcpu_load")
            d.vcpu_load(v)
            try:
                for op, args in sc.programs[v]:
                    client.hit(f"op {describe(op, args)}")
                    report["log"].append(run(op, args))
                client.hit("op vcpu_put")
                d.vcpu_put(v)
            finally:
                report["events"] = [m for _, m, _ in kvm.events[:MAX_EVENTS]]
        except sched.ScheduleAborted:
            report["aborted"] = True
        except BaseException as e:
            report["error"] = f"{type(e).__name__}: {e}"
            report["traceback"] = traceback.format_exc()[-3000:]
        report["names"] = {str(k): n for k, n in client.names.items()}
        return msgspec.msgpack.encode(report)

    return body


def _executor(kind: str, kvm, d, v: int):
    if kind == "avic":
        from vm.avic.kaboom import apply_step

        return lambda op, args: apply_step(d, (v, op, args))
    from vcpu.vcpu import Vcpu

    vc = Vcpu(kvm, d, v)
    return lambda op, args: f"vCPU {v}: {describe(op, args)} -> {vc.execute(op, dict(args))}"


def run_schedule(sc: Scenario, strategy, max_steps: int) -> Outcome:
    """Run ``sc`` once under ``strategy`` (ipc.sched Pct / RandomWalk / Replay)."""
    cfg = from_dict({**sc.cfg, "fuzz": "off"})
    run_id = new_run_id()
    t0 = time.monotonic()
    kvm = Kvm.create(cfg, run_id, frozenset(sc.hooks))
    d = None
    try:
        d = make_design(kvm, cfg)
        d.setup()
        # the coordinator's sampling checker (I1) runs between every two steps
        s, raw, codes = sched.run_forked(run_id, sc.n, _vcpu_body(sc, cfg, run_id), strategy, max_steps,
                                         check=d.sample)
        reports = []
        for v, b in enumerate(raw):
            try:
                reports.append(msgspec.msgpack.decode(b))
            except msgspec.DecodeError:
                reports.append({"vcpu": v, "error": "no report (process died)", "events": [], "log": [],
                                "names": {}, "aborted": False})
        names: dict[int, str] = {}
        for rep in reports:
            names.update({int(k): n for k, n in rep["names"].items()})
        log = [(i, names.get(p, f"point #{p}"), b) for i, p, b in s.log]
        reasons = _reasons(s, reports, codes, names) + [m for _, m, _ in kvm.events]
        clean = s.outcome == "done" and not any(rep["error"] for rep in reports) and not any(codes)
        if clean:
            reasons += [f"oracle: {f}" for f in d.oracle()]
        reasons = _dedup(reasons)
        verdict = "MISMATCH" if s.outcome == "mismatch" else "FAILURE" if reasons else "SUCCESS"
        if clean:
            d.teardown()  # nobody holds a lock: every vCPU ended its program
        return Outcome(verdict, reasons, log, s.outcome, time.monotonic() - t0,
                       [rep["log"] for rep in reports])
    finally:
        if d is not None:
            d.close()
        kvm.close()


def _reasons(s, reports: list[dict], codes: list[int], names: dict[int, str]) -> list[str]:
    out = []
    if s.outcome != "done":
        out.append(f"{s.outcome}: {name_points(s.detail, names)}")
    for rep in reports:
        if rep["error"]:
            out.append(f"vCPU {rep['vcpu']} failed: {rep['error']}")
        out.extend(rep["events"])
    for v, c in enumerate(codes):
        if c != 0:
            out.append(f"vCPU {v} exited with status {c}")
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
