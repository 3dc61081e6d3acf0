"""``launch.py compare``: every nested-AVIC design on the same seeded workload at each point
(vCPUs × switch rate), a table, plots, and a plain-words reading of the seed's two claims (``--map``:
the same over table writes per nested VMRUN × switch rate, lab/map.py):

1. Sean: the VM-wide mutex (``mutex-hash``) serializes nested VMRUN when L1 switches L2s often.
2. "Because the code isn't executed often, pretty much any solution will provide good performance"
   — at low switching any design is fine.

Each claim is judged on the measured numbers only, with the thresholds stated in the report. The
workload is a named point (vm/workloads.py: ``realistic`` by default, ``heavy`` = the old default).
Every point runs twice, undilated and dilated (``--dilate auto|N``, lab/dilation.py: guest time ×N so
that code time / guest time is the kernel's); the verdicts say which numbers they rest on.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ipc.errors import UsageError
from lab import report
from lab.uncertainty import REPEATS, interference, interference_md, median, spread, verdict
from vm.config import from_dict
from vm.results import fidelity_line

DESIGNS = ("mutex-hash", "rcu-list", "per-table-notifier")
SLOWER = 0.8      # a design "loses" when it reaches less than this share of the best VMRUN rate
FINE = 0.8        # "any design is fine": every design within this share of the best


def points(vcpus: list[int], rates: list[float]) -> list[tuple[int, float]]:
    return [(v, r) for r in rates for v in vcpus]


def run_compare(vcpus: list[int], rates: list[float], duration: float, seed: int, out_dir: Path,
                run_one: Callable[[dict], dict], designs=DESIGNS, progress=None, base=None,
                dilations=(1.0,), repeats: int = 1) -> list[dict]:
    """Run every (dilation, seed, design, vcpus, switch_rate) once — seeds ``seed`` .. ``seed +
    repeats - 1``, the designs of one seed and point one after the other; results in order."""
    results = []
    seeds = [seed + k for k in range(repeats)]
    todo = [(x, sd, d, v, r) for x in dilations for sd in seeds for (v, r) in points(vcpus, rates) for d in designs]
    for i, (x, sd, d, v, r) in enumerate(todo):
        cfg = dict(base or {})
        cfg.update({"design": d, "vcpus": v, "switch_rate": r, "duration": duration, "seed": sd,
                    "registration": "refcount", "progress": False, "fuzz": "off",
                    "trace_events": 0, "dilate": float(x)})  # measure undisturbed: no widening, no trace ring
        res = run_one(cfg)
        res["point_id"] = (f"{d}/v{v}/s{r:g}" + (f"/x{x:g}" if x != 1 else "")
                           + (f"/seed{sd}" if repeats > 1 else ""))
        results.append(res)
        if progress:
            progress(i + 1, len(todo), res)
    return results


def _rates(results: list[dict], design: str, vcpus: int, rate: float) -> dict[int, float]:
    """nested VMRUN/s of ``design`` at (vcpus, rate), per seed."""
    return {int(r["config"].get("seed", 0)): float(r["ops"]["nested_vmrun"]["per_s"]) for r in results
            if r["config"]["design"] == design and r["config"]["vcpus"] == vcpus
            and float(r["config"]["switch_rate"]) == rate}


def _rate(results: list[dict], design: str, vcpus: int, rate: float) -> float | None:
    """The median over seeds."""
    xs = list(_rates(results, design, vcpus, rate).values())
    return median(xs) if xs else None


def _fmt(s: dict) -> str:
    return f"{s['median']:.2f}×" + (f" [{s['lo']:.2f}–{s['hi']:.2f}, n={s['n']}]" if s["n"] > 1 else " (one seed)")


def _wait_share(results: list[dict], design: str, vcpus: int, rate: float, lock: str) -> float:
    for r in results:
        c = r["config"]
        if c["design"] == design and c["vcpus"] == vcpus and float(c["switch_rate"]) == rate:
            w = r.get("locks", {}).get(lock, {}).get("wait_ns_total", 0)
            return w / (float(r["elapsed_s"]) * 1e9 * vcpus)
    return 0.0


def rests_on(factor: float, doc: dict | None) -> str:
    """The sentence saying which numbers a verdict rests on."""
    if factor == 1.0:
        return ("These verdicts rest on **undilated** numbers: the Python model as it runs, where the code "
                "under study is slower relative to guest time than the kernel's C (lab/dilation.py).")
    how = (f"measured: range {doc['low']:g}-{doc['high']:g}, {doc['method']}" if doc and "low" in doc
           else "given with --dilate")
    return (f"The verdicts below rest on the **dilated** numbers (guest time and delays ×{factor:g}, {how}): "
            "they keep the kernel's ratio of time in the code under study to time in the guest. The "
            "undilated verdicts follow for reference.")


def split_by_dilation(results: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in results:
        out.setdefault(float(r["config"].get("dilate", 1.0)), []).append(r)
    return out


def assess(results: list[dict], cpus: int | None = None, verdicts: dict | None = None) -> str:
    """Markdown paragraphs judging the two claims on ``results`` (one dilation); the structured
    verdicts go into ``verdicts`` (claim -> {ratio: {median, lo, hi, n}, verdict})."""
    cpus = cpus or os.cpu_count() or 1
    designs = sorted({r["config"]["design"] for r in results})
    vcpus = sorted({r["config"]["vcpus"] for r in results})
    rates = sorted({float(r["config"]["switch_rate"]) for r in results})
    failed = [r["point_id"] for r in results if r["verdict"] != "SUCCESS"]
    c0 = results[0]["config"]
    x = float(c0.get("dilate", 1.0))
    twv = c0["writes_per_exit"] * c0["tracked_fraction"]
    virtual = c0.get("clock") == "virtual"
    lines = ["## Verdict on the seed's claims" + (" — virtual time" if virtual else f" — dilated ×{x:g}" if x != 1
                                                  else " — undilated"), "",
             ("Measured in virtual time (--clock virtual, docs/virtual-time.md): each vCPU has its own CPU and "
              "clock, the code is priced at kernel C costs; the host's CPUs and load do not enter the numbers, "
              "only the seed does." if virtual else
              f"Measured on {cpus} CPU(s); points with more vCPUs than CPUs are oversubscribed (vCPU "
              "processes are preempted, lock holders included), which weighs on every design."), "",
             f"Workload: each nested VMRUN runs L2 for {c0['guest_time_us']:g} µs"
             + (f" (×{x:g} dilated: {c0['guest_time_us'] * x:g} µs)" if x != 1 else "") +
             f", then L1 does {c0['writes_per_exit']} guest writes, {twv:.3g} of them (per VMRUN) to physid "
             f"tables (tracked, emulated) and {c0['mmio_fraction']:.0%} to MMIO. The seed's \"the code isn't executed "
             "often\" is a statement about this rate: with longer guest runs and fewer table writes every "
             "design spends less time in the code measured here.", "",
             f"Model fidelity options (docs/fidelity.md in the project): {fidelity_line(c0)}.", ""]
    if failed:
        lines += [f"**{len(failed)} run(s) ended in FAILURE** ({', '.join(failed[:6])}); their rates are "
                  "still shown but a design that fails its oracle is not fine at any speed.", ""]
    if "mutex-hash" not in designs or len(designs) < 2:
        return "\n".join(lines + ["Not enough designs measured to judge the claims.", ""])
    others = [d for d in designs if d != "mutex-hash"]
    hi, lo, vmax = rates[-1], rates[0], vcpus[-1]
    seeds = sorted({int(r["config"].get("seed", 0)) for r in results})
    # claim 1: per seed, mutex-hash / the best other design at the highest switch rate and vCPU count
    ms, bests, pairs = _rates(results, "mutex-hash", vmax, hi), {}, []
    for d in others:
        for sd, x in _rates(results, d, vmax, hi).items():
            if x > bests.get(sd, (0.0, ""))[0]:
                bests[sd] = (x, d)
    pairs = [ms[sd] / bests[sd][0] for sd in seeds if sd in ms and bests.get(sd, (0,))[0]]
    m = _rate(results, "mutex-hash", vmax, hi) or 0.0
    best_other = max((_rate(results, d, vmax, hi) or 0.0, d) for d in others)
    share = _wait_share(results, "mutex-hash", vmax, hi, "tables_lock")
    scal = {}
    if len(vcpus) > 1:
        for d in designs:
            a, b = _rate(results, d, vcpus[0], hi), _rate(results, d, vmax, hi)
            scal[d] = (b / a) if a else 0.0
    s1 = spread(pairs or [1.0])
    v1 = verdict(s1, holds_if_below=SLOWER)
    t1 = ["| seed | mutex-hash VMRUN/s | best other design | its VMRUN/s | ratio |", "|---:|---:|:---|---:|---:|"]
    t1 += [f"| {sd} | {ms[sd]:,.0f} | {bests[sd][1]} | {bests[sd][0]:,.0f} | {ms[sd] / bests[sd][0]:.3f} |"
           for sd in seeds if sd in ms and bests.get(sd, (0,))[0]]
    lines += ["### 1. \"The VM-wide mutex serializes nested VMRUN under frequent switching\"", "",
              f"At switch rate {hi:g} with {vmax} vCPU(s), mutex-hash reaches {m:,.0f} nested VMRUN/s, "
              f"{_fmt(s1)} the best other design ({best_other[1]}: {best_other[0]:,.0f}/s; median over seeds, "
              f"[min–max]); vCPUs spend {100 * share:.2f}% of their time waiting for tables_lock."]
    if scal:
        lines[-1] += " Scaling from {} to {} vCPU(s) at that rate: {}.".format(
            vcpus[0], vmax, ", ".join(f"{d} {s:.2f}×" for d, s in scal.items()))
    lines += ["", f"**{v1.capitalize()} on these numbers** (threshold: below {SLOWER:.0%} of the best design"
              + (", every seed" if s1["n"] > 1 else "") + ")." + (
                  " The seeds disagree: run more (--repeats) or longer." if v1 == "not resolved" else
                  " The mutex is not the bottleneck at this scale." if v1 == "does not hold" and not virtual else ""),
              "", f"The numbers it rests on ({vmax} vCPU(s), switch rate {hi:g}; ratio = mutex-hash ÷ best other):",
              "", *t1, ""]
    # claim 2: per seed, the worst (slowest / best design) over the vCPU counts at the lowest rate
    per_seed = []
    worst = []
    t2 = ["| seed | vCPUs | slowest design | its VMRUN/s | best design | its VMRUN/s | ratio |",
          "|---:|---:|:---|---:|:---|---:|---:|"]
    for sd in seeds:
        ws = []
        for v in vcpus:
            rs = {d: _rates(results, d, v, lo).get(sd, 0.0) for d in designs}
            best = max(rs.values()) or 1.0
            ws.append((min(rs.values()) / best, v, min(rs, key=rs.get), max(rs, key=rs.get), rs))
        r, v, slow, fast, rs = min(ws, key=lambda t: t[:2])
        per_seed.append(r)
        worst.append((r, v, slow))
        t2.append(f"| {sd} | {v} | {slow} | {rs[slow]:,.0f} | {fast} | {rs[fast]:,.0f} | {r:.3f} |")
    w = min(worst)
    s2 = spread(per_seed)
    v2 = verdict(s2, holds_if_at_least=FINE)
    lines += [f"### 2. \"At low switching any design is fine\" (switch rate {lo:g})", "",
              f"The slowest design reaches at worst {_fmt(s2)} the best one's nested VMRUN rate "
              f"(worst seed: {w[2]} at {w[1]} vCPU(s)).", "",
              f"**{v2.capitalize()} on these numbers** (threshold: every design within {FINE:.0%} of the best "
              "at every vCPU count" + (", every seed" if s2["n"] > 1 else "") + ").", "",
              f"The numbers it rests on (switch rate {lo:g}; per seed, the vCPU count where the slowest design is "
              "furthest behind):", "", *t2, ""]
    if verdicts is not None:
        verdicts["claim1"] = {"ratio": s1, "verdict": v1, "vcpus": vmax, "switch_rate": hi}
        verdicts["claim2"] = {"ratio": s2, "verdict": v2, "switch_rate": lo}
    return "\n".join(lines)


def point_ratios(results: list[dict]) -> list[dict]:
    """Per (dilation, vCPUs, switch rate): every design's nested VMRUN/s, its share of the best design's
    and mutex-hash ÷ rcu-list, each ``{median, lo, hi, n}`` over the seeds (ratios paired per seed)."""
    out = []
    for x, part in sorted(split_by_dilation(results).items()):
        designs = sorted({r["config"]["design"] for r in part})
        for v in sorted({r["config"]["vcpus"] for r in part}):
            for sw in sorted({float(r["config"]["switch_rate"]) for r in part}):
                per = {d: _rates(part, d, v, sw) for d in designs}
                seeds = sorted(set.intersection(*(set(p) for p in per.values()))) if per else []
                best = {sd: max(per[d][sd] for d in designs) for sd in seeds}
                row = {"dilate": x, "clock": part[0]["config"].get("clock", "real"), "vcpus": v, "switch_rate": sw,
                       "rates": {d: spread(list(per[d].values())) for d in designs if per[d]},
                       "share_of_best": {d: spread([per[d][sd] / best[sd] for sd in seeds if best[sd]])
                                         for d in designs if any(best.values())}}
                pairs = [per["mutex-hash"][sd] / per["rcu-list"][sd] for sd in seeds
                         if "mutex-hash" in per and per.get("rcu-list", {}).get(sd)]
                if pairs:
                    row["mutex_over_rcu"] = spread(pairs)
                out.append(row)
    return out


def designs_arg(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DESIGNS
    ds = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in ds if d not in DESIGNS]
    if bad or not ds:
        raise UsageError(f"--designs: unknown design {bad[0] if bad else text!r} (one of {', '.join(DESIGNS)})")
    return ds


def main(args, run_one: Callable[[dict], dict]) -> int:
    from lab import dilation
    from lab.outputs import check_out_dir, write_atomic
    from vm.config import DILATE_VIRTUAL, clock_values
    from vm.workloads import workload

    out = Path(args.out)
    check_out_dir(out, "--out", create=False)  # a directory (or creatable), writable, with room; nothing made yet
    designs = designs_arg(args.designs)
    base = workload(args.workload)
    cv = clock_values(args.clock or "real", args.prices)
    base.update(cv)
    virtual = cv["clock"] == "virtual"
    if virtual and args.dilate not in (None, "off"):
        raise UsageError(DILATE_VIRTUAL)
    dilate = args.dilate if args.dilate is not None else ("off" if virtual else "auto")
    repeats = args.repeats if args.repeats is not None else REPEATS
    vcpus, rates = args.vcpus or [1, 2, 4, 8], args.switch_rates or [0, 0.01, 0.1, 0.5]
    duration = args.duration or (0.1 if virtual else 1.5)
    for v in vcpus:  # validate every point before running anything
        for r in rates:
            for d in designs:
                from_dict({**base, "design": d, "vcpus": v, "switch_rate": r, "duration": duration,
                           "seed": args.seed})
    check_out_dir(out, "--out")  # created now, checked again
    factor, dil_doc = dilation.resolve(dilate, base, designs)

    n_runs = len(designs) * len(vcpus) * len(rates) * repeats * (1 if factor == 1.0 else 2)
    print(f"compare: {n_runs} runs ({len(designs)} designs × {len(vcpus)} vCPU counts × {len(rates)} switch rates × "
          f"{repeats} seeds" + ("" if factor == 1.0 else " × 2 dilations") + f"), {duration:g} "
          + ("virtual " if virtual else "") + "s each", file=sys.stderr, flush=True)

    def progress(i, n, res):
        print(f"  [{i}/{n}] {res['point_id']}: {res['ops']['nested_vmrun']['per_s']:,.0f} VMRUN/s "
              f"{res['verdict']}", file=sys.stderr, flush=True)

    results = run_compare(vcpus, rates, duration, args.seed, out, run_one, designs=designs, progress=progress,
                          base=base, dilations=(1.0, factor) if factor != 1.0 else (1.0,), repeats=repeats)
    parts = split_by_dilation(results)
    verdicts: dict = {}
    head = ("These verdicts rest on **virtual-time** numbers (--clock virtual): deterministic per seed, the "
            f"spread over {repeats} seed(s) shown as [min–max]." if virtual else rests_on(factor, dil_doc))
    text = "\n".join([head, ""] + [assess(parts[x], verdicts=verdicts.setdefault(
        "virtual" if virtual else "dilated" if x != 1 else "undilated", {})) for x in sorted(parts, reverse=True)])
    flags = interference(results)
    text += ("\n" + interference_md(flags)) if flags else ""
    write_atomic(out / "compare.json",  # a failed write: nothing half-written, the document rescued and named
                 json.dumps({"points": results, "assessment": text, "workload": args.workload,
                             "clock": cv["clock"], "repeats": repeats, "verdicts": verdicts,
                             "ratios": point_ratios(results), "interference": flags,
                             "dilation": dil_doc or {"factor": factor},
                             "trace_events": 0}, indent=1, default=str),
                 what=f"the results of {len(results)} compare run(s)", flag="--out")
    report.write_report(results, out, title="pagetrack-sim compare: nested AVIC designs", verdict_md=text)
    rows = report.summarize(results)
    from rich.console import Console

    con = Console(width=None if sys.stdout.isatty() else 150)
    con.print(report.rich_table(rows, title="compare"))
    con.print(text, markup=False, highlight=False)
    print(f"wrote {out / 'compare.json'}, {out / 'report.md'} and plots (measured with the trace ring off)")
    return 0 if all(r["verdict"] == "SUCCESS" for r in results) else 1
