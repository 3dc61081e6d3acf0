"""Virtual time (``--clock virtual``, ipc/vtime.py): how fast it simulates, and whether its numbers
agree with the C cost model and with real time where they should.

    python -m bench.vtime [--json PATH] [--quick]

- ``virtual_s_per_wall_s``: {"2", "4", "16"}: virtual seconds simulated per wall second of the run
  phase (spawn and teardown excluded; ``launch_wall_s`` has the whole command) on the realistic
  workload (mutex-hash), goal >= 0.1 at 4 vCPUs; ``handoffs_per_vmrun`` at the same vCPU counts
  (goal <= 2): turns handed from one vCPU process to another per nested VMRUN
- ``paths_1vcpu``: at 1 vCPU, per code path of lab/dilation.py (nested VMRUN get/put, switch,
  tracked write, register/unregister), the virtual ns one call advances the clock (``virtual_ns``)
  beside the C estimate ``--dilate auto`` computes for it: its primitive part (``c_prims_ns``, the
  same price table: the two must be equal) and the whole estimate with the interpreted code priced
  per bytecode (``c_estimate_ns``); ``paths_agree``: every path's virtual_ns == c_prims_ns
- ``contention``: mutex-hash at 1 and 4 vCPUs × switch rate 0 and 0.5 on both clocks, side by
  side: nested VMRUN/s and the share of vCPU time spent waiting for tables_lock (real time on this
  host, virtual time on the model's clock)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPS = 64  # calls per path at 1 vCPU (the sampled histograms time about 1 in 32)


def _run(args: list[str], tmp: str) -> tuple[dict, float]:
    out = os.path.join(tmp, "r.json")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), "run", "--quiet", "--json", out, *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if p.returncode not in (0, 1) or not os.path.exists(out):
        raise RuntimeError(f"launch.py run {' '.join(args)} failed: {p.stderr[-1500:]}")
    with open(out) as f:
        return json.load(f), wall


def speed(tmp: str, quick: bool) -> dict:
    rates, hand, launch = {}, {}, {}
    for n, dur in ((2, 0.1), (4, 0.1), (16, 0.02)):
        if quick:
            dur /= 10
        res, wall = _run(["--clock", "virtual", "--design", "mutex-hash", "--workload", "realistic", "--vcpus", str(n),
                          "--duration", f"{dur:g}"], tmp)
        rates[str(n)] = round(res["virtual_s"] / res["wall_s"], 4)
        hand[str(n)] = round(res["vtime"]["handoffs"] / max(res["ops"]["nested_vmrun"]["count"], 1), 3)
        launch[str(n)] = round(wall, 2)
        print(f"  {n:>2} vCPUs: {res['virtual_s'] * 1e3:.1f} virtual ms in {res['wall_s']:.2f} s "
              f"({rates[str(n)]:.3f} virtual s / wall s), {hand[str(n)]:.2f} hand-offs per nested VMRUN",
              file=sys.stderr)
    return {"virtual_s_per_wall_s": rates, "handoffs_per_vmrun": hand, "launch_wall_s": launch}


def paths_1vcpu() -> dict:
    """Each path's virtual cost (one process on the virtual clock) beside its C estimate."""
    import secrets

    import vm.avic  # noqa: F401  (registers the designs)
    from ipc import _prims, sched, vtime
    from ipc.shm import Region
    from lab import dilation
    from vm.config import Config
    from vm.kvm import Kvm
    from vm.nested import make_design

    est = {p: v for p, v in dilation.measure_design("mutex-hash", budget_s=0.01)["paths"].items()}
    cfg = Config(design="mutex-hash", vcpus=2, l2s=4, fuzz="off", notifiers=0, trace_events=0, clock="virtual")
    rid = "bvt" + secrets.token_hex(4)
    turn = vtime.create(rid, 1, 1)
    saved = (sched.ACTIVE, _prims.spin_ns, _prims.sched_yield)
    from ipc import fuzz

    saved_fuzz = fuzz.ACTIVE
    vc = vtime.install(Region.attach(rid, vtime.layout(1)), 0, vtime.PRICES)
    kvm = d = None
    out = {}
    try:
        kvm = Kvm.create(cfg, rid, frozenset())
        d = make_design(kvm, cfg)
        d.setup()
        for v in range(cfg.vcpus):
            d.vcpu_init(v)
            d.vcpu_load(v)
        paths = dilation._paths(kvm, d, cfg)
        vc.join()
        for name in dilation.PATHS:
            fn = paths[name]
            if name == "track_write":  # as dilation.measure_design: the table in use by both vCPUs
                d.nested_vmrun(0, 0)
                d.nested_vmrun(1, 0)
            fn()
            # the same calls are priced on the clock and counted for the estimate: a sampled latency
            # histogram times about 1 call in 32 (a clock read, a sample), so two calls may differ;
            # REPS calls include sampled ones; the figures are per call
            v_ns, c_prims = 0, 0.0
            for _ in range(REPS):
                t0 = _prims.vt_now()
                _, prims, _ = dilation.count_ops(fn)
                v_ns += _prims.vt_now() - t0
                c_prims += sum(n * dilation.PRIM_NS.get(k, dilation.DEFAULT_PRIM_NS) for k, n in prims.items())
            v_ns, c_prims = v_ns / REPS, c_prims / REPS
            p = est[name]
            out[name] = {"virtual_ns": v_ns, "c_prims_ns": c_prims, "c_estimate_ns": p["c_ns"],
                         "python_ns": p["py_ns"]}
            if name == "track_write":
                d.nested_vmexit(0, 0, True)
                d.nested_vmexit(1, 0, True)
        vc.done()
    finally:
        _prims.vt_detach()
        sched.ACTIVE, _prims.spin_ns, _prims.sched_yield = saved
        fuzz.ACTIVE = saved_fuzz
        vtime.ACTIVE = None
        if d is not None:
            try:
                d.teardown()
            finally:
                d.close()
        if kvm is not None:
            kvm.close()
        turn.close()
    for name, r in out.items():
        print(f"  {name:<20} virtual {r['virtual_ns']:>7.1f} ns, C estimate: primitives {r['c_prims_ns']:>7.1f} ns, "
              f"with the interpreted code {r['c_estimate_ns']:>7} ns (Python: {r['python_ns']} ns)", file=sys.stderr)
    return out


def contention(tmp: str, quick: bool) -> list[dict]:
    rows = []
    for clock, dur in (("real", 0.5), ("virtual", 0.05)):
        for v in (1, 4):
            for sw in (0.0, 0.5):
                d = dur / 5 if quick else dur
                args = ["--clock", clock, "--design", "mutex-hash", "--workload", "realistic", "--vcpus", str(v),
                        "--switch-rate", f"{sw:g}",
                        "--duration", f"{d:g}", "--fuzz", "off", "--trace-events", "0"]
                res, _ = _run(args, tmp)
                w = res.get("locks", {}).get("tables_lock", {}).get("wait_ns_total", 0)
                share = w / (float(res["elapsed_s"]) * 1e9 * v)
                rows.append({"clock": clock, "vcpus": v, "switch_rate": sw,
                             "vmrun_per_s": res["ops"]["nested_vmrun"]["per_s"],
                             "tables_lock_wait_share": round(share, 6)})
    print("  clock    vCPUs switch   VMRUN/s/vCPU  tables_lock wait share", file=sys.stderr)
    for r in rows:
        print(f"  {r['clock']:<8} {r['vcpus']:>5} {r['switch_rate']:>6g} {r['vmrun_per_s'] / r['vcpus']:>14,.0f} "
              f"{100 * r['tables_lock_wait_share']:>10.3f} %", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = ap.parse_args(argv)
    doc: dict = {"machine": {"cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(prefix="bench-vtime-") as tmp:
        print("speed (realistic workload, mutex-hash):", file=sys.stderr)
        doc.update(speed(tmp, args.quick))
        print("1 vCPU: virtual cost of each path vs the C estimate of --dilate auto:", file=sys.stderr)
        doc["paths_1vcpu"] = paths_1vcpu()
        doc["paths_agree"] = all(abs(r["virtual_ns"] - r["c_prims_ns"]) < 1e-6 for r in doc["paths_1vcpu"].values())
        print("contention on both clocks:", file=sys.stderr)
        doc["contention"] = contention(tmp, args.quick)
    text = json.dumps(doc, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
