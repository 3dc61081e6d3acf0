"""Multiprocess stress of the nested AVIC designs: real vCPU processes (forkserver) running the
vCPU loop of vcpu/ in miniature on one VM, then the coordinator's oracle.

``run_stress(cfg, run_id, hooks, duration)`` creates the VM and the design, spawns ``cfg.vcpus``
processes running ``vcpu_main``, lets them run ``duration`` seconds, stops them, collects their
WARN events (over a pipe, at exit), runs ``oracle()`` and ``teardown()`` and closes the VM (no
segment or child process is left behind, even on failure). Used by tests/vm/avic/test_avic_stress.py and
usable from a benchmark.

The loop of one vCPU (what the real worker does too): L1 guest writes (tracked ones from
``tracked_write``: emulated if the gfn is write-tracked, else stored directly inside a guest-mode
section; MMIO writes always walk the notifiers), nested VMRUN, guest time inside a guest-mode
section (the TLB-flush grace period waits for it), nested VMEXIT (leaving = switch L2 with
probability ``switch_rate``), now and then a vcpu_put/vcpu_load pair (preemption: IsRunning flips).
"""

from __future__ import annotations

import random
import sys
import time
import traceback

from ipc import _prims
from ipc.proc import die_with_parent, forkserver_context, reap, sigterm_to_exit
from vm import layout as L
from vm.avic.l1 import MMIO_APIC_GPA, guest_write
from vm.config import from_dict
from vm.kvm import Kvm
from vm.nested import make_design, untracked_range
from vm.page_track import emulator_write_phys

PRELOAD = ["numpy", "vm.avic", "vm.avic.stress"]
PREEMPT_RATE = 0.02
MAX_EVENTS = 20


def vcpu_main(cfg_dict: dict, run_id: str, proc: int, hooks: tuple, seed: int, conn) -> None:
    """One vCPU process: attach, run the loop until the coordinator says stop, report events."""
    die_with_parent()
    sigterm_to_exit()
    cfg = from_dict(cfg_dict)
    kvm = Kvm.attach(cfg, run_id, proc, frozenset(hooks))
    report = {"proc": proc, "events": [], "error": None, "vmrun": 0, "seconds": 0.0}
    try:
        d = make_design(kvm, cfg)
        v = proc - 1
        d.vcpu_init(v)
        rng = random.Random(seed * 1_000_003 + v)
        mem = kvm.mem
        run_w = kvm.flags_w + L.F_RUN_STATE
        conn.send("ready")  # the coordinator's clock starts when every vCPU is here
        while mem.load(run_w) == L.RUN_INIT:
            time.sleep(0.001)
        d.vcpu_load(v)
        t0 = time.monotonic()
        vmruns = _loop(kvm, d, cfg, v, rng, run_w)
        report["seconds"] = time.monotonic() - t0
        report["vmrun"] = vmruns
        d.vcpu_put(v)
    except BaseException as e:  # reported, then the process exits nonzero
        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        report["events"] = [(k, m) for k, m, _ in kvm.events[:MAX_EVENTS]]
        report["nevents"] = len(kvm.events)
        try:
            conn.send(report)
            conn.close()
        except OSError:
            pass
        kvm.close()
    if report["error"]:
        print(report["error"], file=sys.stderr)
        sys.exit(1)


def _loop(kvm, d, cfg, v: int, rng: random.Random, run_w: int) -> int:
    mem = kvm.mem
    gm = kvm.guest_mode
    guest_ns = cfg.guest_ns
    tf, mf = cfg.tracked_fraction, cfg.tracked_fraction + cfg.mmio_fraction
    lo, hi = untracked_range(cfg)
    span = max(1, hi - lo)
    l2 = int(rng.random() * cfg.l2s)
    n = 0
    while mem.load(run_w) != L.RUN_STOP:
        for _ in range(cfg.writes_per_exit):
            r = rng.random()
            if r < tf:
                gpa, data = d.tracked_write(v, rng)
                guest_write(kvm, gpa, data)
            elif r < mf:
                emulator_write_phys(kvm, MMIO_APIC_GPA + (int(rng.random() * 256) << 4), b"\0\0\0\0")
                kvm.count("write_mmio")
            else:
                gpa = ((lo + int(rng.random() * span)) << 12) + (v % 512) * 8
                guest_write(kvm, gpa, rng.getrandbits(64).to_bytes(8, "little"))
        leaving = cfg.l2s > 1 and rng.random() < cfg.switch_rate
        d.nested_vmrun(v, l2)
        kvm.count("vmrun")
        gm.read_lock()
        if guest_ns:
            _prims.spin_ns(guest_ns)
        gm.read_unlock()
        d.nested_vmexit(v, l2, leaving)
        kvm.count("vmexit")
        if leaving:
            l2 = (l2 + 1 + int(rng.random() * (cfg.l2s - 1))) % cfg.l2s
            kvm.count("l2_switch")
        if rng.random() < PREEMPT_RATE:
            d.vcpu_put(v)
            d.vcpu_load(v)
        kvm.count("iterations")
        n += 1
    return n


READY_TIMEOUT_S = 60.0


def _await_ready(conns, timeout: float, errors: list) -> dict:
    """Wait until every vCPU has attached and said "ready" (a loaded host can take seconds to fork
    and attach them), so that ``duration`` is time the vCPUs run, not time they start in. A vCPU
    that dies or stays silent is an error; the others are still started and stopped. Returns the
    reports of vCPUs that failed before they were ready ({index: report})."""
    deadline, early = time.monotonic() + timeout, {}
    for i, rx in enumerate(conns):
        try:
            if not rx.poll(max(0.0, deadline - time.monotonic())):
                errors.append(f"vCPU {i}: not ready within {timeout:.0f} s")
            elif (msg := rx.recv()) != "ready":
                early[i] = msg  # its report: it failed while attaching
        except (EOFError, OSError):
            pass  # died without a word: the report loop says so
    return early


def run_stress(cfg, run_id: str, hooks=(), duration: float = 1.0, seed: int | None = None,
               join_timeout: float = 20.0, ctx=None) -> dict:
    """Run the design ``cfg.design`` with ``cfg.vcpus`` vCPU processes for ``duration`` s
    (``ctx``: a multiprocessing context, default the forkserver with ``PRELOAD``).

    Returns {"oracle": [...], "errors": [...], "events": [...], "vmrun": n, "vmrun_per_s": x,
    "per_vcpu": [...], "stats": design stats, "counters": {...}, "warns": n, "poison_reads": n}."""
    seed = cfg.seed if seed is None else seed
    kvm = Kvm.create(cfg, run_id, frozenset(hooks))
    procs, conns = [], []
    d = None
    out: dict = {"errors": [], "events": [], "oracle": []}
    died = False
    try:
        d = make_design(kvm, cfg)
        d.setup()
        if ctx is None:
            ctx = forkserver_context(PRELOAD)
        for i in range(cfg.vcpus):
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=vcpu_main, name=f"vcpu{i}",
                            args=(cfg.to_dict(), run_id, i + 1, tuple(sorted(hooks)), seed, tx))
            p.start()
            tx.close()
            procs.append(p)
            conns.append(rx)
        # (starting is not hanging: a loaded host can take longer to fork and attach than a short
        # join_timeout, which bounds the vCPUs' stop)
        early = _await_ready(conns, max(join_timeout, READY_TIMEOUT_S), out["errors"])
        kvm.mem.store(kvm.flags_w + L.F_RUN_STATE, L.RUN_RUNNING)
        time.sleep(duration)
        kvm.mem.store(kvm.flags_w + L.F_RUN_STATE, L.RUN_STOP)
        reports = []
        deadline = time.monotonic() + join_timeout
        for i, rx in enumerate(conns):
            if i in early:
                reports.append(early[i])
            elif rx.poll(max(0.0, deadline - time.monotonic())):
                try:
                    msg = rx.recv()
                    while msg == "ready":  # (late: it was not ready in time, an error already)
                        if not rx.poll(max(0.0, deadline - time.monotonic())):
                            out["errors"].append(f"vCPU {i}: no report within {join_timeout:.0f} s (hung?)")
                            break
                        msg = rx.recv()
                    else:
                        reports.append(msg)
                except EOFError:
                    out["errors"].append(f"vCPU {i}: exited without a report")
            else:
                out["errors"].append(f"vCPU {i}: no report within {join_timeout:.0f} s (hung?)")
        codes = reap(procs, timeout=5.0)
        procs = []
        for i, c in enumerate(codes):
            if c != 0:
                out["errors"].append(f"vCPU {i}: exit code {c}")
        died = bool(out["errors"])  # its locks may still be held: no teardown (it takes locks)
        for r in reports:
            if r["error"]:
                out["errors"].append(f"vCPU {r['proc'] - 1}: {r['error']}")
            out["events"] += [m for _, m in r["events"]]
        out["per_vcpu"] = [{"vcpu": r["proc"] - 1, "vmrun": r["vmrun"], "seconds": r["seconds"],
                            "nevents": r["nevents"]} for r in reports]
        secs = max((r["seconds"] for r in reports), default=0.0) or duration
        ctr = kvm.vm.v["counters"]
        out["counters"] = {name: int(ctr[:, i].sum()) for i, name in enumerate(L.COUNTERS)}
        del ctr
        out["vmrun"] = out["counters"]["vmrun"]
        out["vmrun_per_s"] = out["vmrun"] / secs
        out["warns"] = kvm.warns
        out["poison_reads"] = kvm.poison_reads
        out["oracle"] = d.oracle()
        out["stats"] = d.stats()
        return out
    finally:
        if procs:
            kvm.mem.store(kvm.flags_w + L.F_RUN_STATE, L.RUN_STOP)
            reap(procs, timeout=5.0)
        for rx in conns:
            rx.close()
        try:
            if d is not None:
                try:
                    if not died and not procs:
                        d.teardown()
                finally:
                    d.close()
        finally:
            kvm.close()
