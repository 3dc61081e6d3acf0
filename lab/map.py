"""``launch.py compare --map --out DIR``: where does the VM-wide mutex hurt?

A grid over **table writes per nested VMRUN** (log scale, default 0.002, 0.02, 0.2, 2) × **switch
rate** (default 0, 0.01, 0.1, 0.5) at each vCPU count (default 2, 4), every design, at the workload
point's other values (vm/workloads.py), each point undilated and dilated (``--dilate auto|N|off``,
lab/dilation.py), ``--repeats`` seeds per cell (the median of the paired ratios; their spread reported). The points run as a ``launch.py sweep`` does (lab/sweep.py): each a full run in its
own process on Dask distributed — a loopback LocalCluster by default, ``--scheduler`` for a cluster —
and resumable (a finished point in ``DIR/points`` is not run again).

Outputs in DIR, besides the sweep's own (``points/``, ``sweep.json``, ``status.json``, ``report.md``):

- ``map.json`` — axes, the ratio mutex-hash ÷ rcu-list nested-VMRUN throughput per cell, every design's
  rate, the verdict per map (structured), the dilation and how it was measured, wall time;
- ``map.png`` — one heat map of that ratio per (dilation, vCPU count), the 0.8 contour drawn, the
  workload's own point starred;
- ``map.md`` — the verdict in words: where the mutex costs >= 20 % (ratio <= 0.8), where "any solution
  is fine" holds (every design within 80 % of the best), the crossover table-write rate per switch rate,
  and which numbers (dilated or not) the verdict rests on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from ipc.errors import UsageError
from lab import sweep
from lab.compare import FINE, SLOWER, designs_arg, median

TABLE_WRITES = [0.002, 0.02, 0.2, 2.0]
SWITCH_RATES = [0.0, 0.01, 0.1, 0.5]
VCPUS = [2, 4]
DURATION = 1.0  # real clock
DURATION_VIRTUAL = 0.05  # virtual seconds: ~2,500 nested VMRUNs per vCPU per run
HURTS = SLOWER  # mutex-hash / rcu-list <= this: the mutex costs >= 20 %


def grid_doc(designs, vcpus, rates, writes, duration, seed, base: dict, dilations, repeats: int = 1) -> dict:
    """The sweep grid (lab/sweep.py format) of the map: the designs of one cell (and seed) run one after
    the other, so that they meet about the same load on a shared machine."""
    fixed = {k: v for k, v in base.items() if k not in ("switch_rate", "table_writes_per_vmrun", "tracked_fraction")}
    fixed.update({"duration": float(duration), "registration": "refcount", "fuzz": "off"})
    fixed["writes_per_exit"] = max(int(fixed.get("writes_per_exit", 8)), math.ceil(max(writes)))
    grid = {"dilate": [float(x) for x in dilations], "vcpus": list(vcpus), "switch_rate": [float(r) for r in rates],
            "table_writes_per_vmrun": [float(w) for w in writes]}
    if repeats > 1:
        grid["seed"] = [seed + k for k in range(repeats)]
    else:
        fixed["seed"] = seed
    grid["design"] = list(designs)
    return {"grid": grid, "fixed": fixed}


def _rate(r: dict) -> float:
    return float(r["ops"]["nested_vmrun"]["per_s"])


def label_of(x: float, clock: str = "real") -> str:
    return "virtual" if clock == "virtual" else "undilated" if x == 1.0 else "dilated"


def build(results: list[dict], designs, vcpus, rates, writes, dilations, clock: str = "real") -> dict:
    """``{label: {str(vcpus): {"ratio": [[sw][tw]], "rates": {design: [[...]]}, "fine": [[bool]],
    "spread": [[...]]}}}``; with several seeds per cell a rate is their median, the ratio the median of
    the per-seed ratios and ``spread`` their (max - min) / median; missing cells are None. label:
    "undilated" or "dilated" (clock real), "virtual"."""
    idx: dict = {}
    for r in results:
        c = r["config"]
        key = (float(c.get("dilate", 1.0)), int(c["vcpus"]), float(c["switch_rate"]),
               float(c.get("table_writes_per_vmrun") or 0.0), c["design"])
        idx.setdefault(key, {})[c.get("seed")] = r
    maps: dict = {}
    for x in dilations:
        label = label_of(x, clock)
        per_v = maps.setdefault(label, {"factor": float(x)})
        for v in vcpus:
            rates_d = {d: [[None] * len(writes) for _ in rates] for d in designs}
            ratio = [[None] * len(writes) for _ in rates]
            fine = [[None] * len(writes) for _ in rates]
            spread = [[None] * len(writes) for _ in rates]
            failed, cells = [], []
            for i, sw in enumerate(rates):
                for j, tw in enumerate(writes):
                    cell, runs = {}, {}
                    for d in designs:
                        by_seed = idx.get((float(x), v, float(sw), float(tw), d), {})
                        runs[d] = {s: _rate(r) for s, r in by_seed.items()}
                        failed += [r.get("point_id") for r in by_seed.values() if r.get("verdict") != "SUCCESS"]
                        if runs[d]:
                            cell[d] = rates_d[d][i][j] = median(list(runs[d].values()))
                    pairs = [m / runs["rcu-list"][s] for s, m in runs.get("mutex-hash", {}).items()
                             if runs.get("rcu-list", {}).get(s)]
                    if pairs:
                        ratio[i][j] = median(pairs)
                        if len(pairs) > 1 and ratio[i][j] > 0:
                            spread[i][j] = (max(pairs) - min(pairs)) / ratio[i][j]
                        cells.append({"vcpus": v, "dilate": float(x), "clock": clock, "switch_rate": float(sw),
                                      "table_writes": float(tw),
                                      "ratio": {"median": round(ratio[i][j], 4), "lo": round(min(pairs), 4),
                                                "hi": round(max(pairs), 4), "n": len(pairs)}})
                    if len(cell) == len(designs) and max(cell.values()) > 0:
                        fine[i][j] = min(cell.values()) / max(cell.values()) >= FINE
            per_v[str(v)] = {"ratio": ratio, "rates": rates_d, "fine": fine, "spread": spread, "failed": failed,
                             "cells": cells}
    return maps


def crossover(writes: list[float], row: list[float | None]) -> dict:
    """Along one switch rate: the table-write rate where the ratio first falls to <= HURTS,
    interpolated on log(table writes). {"at": x or None, "kind": "within" | "below" | "above" | "none"}."""
    pts = [(w, r) for w, r in zip(writes, row, strict=True) if r is not None]
    if not pts:
        return {"at": None, "kind": "none"}
    if pts[0][1] <= HURTS:
        return {"at": pts[0][0], "kind": "below"}  # already at the smallest rate measured
    for (w0, r0), (w1, r1) in zip(pts, pts[1:], strict=False):
        if r1 <= HURTS < r0:
            f = (r0 - HURTS) / (r0 - r1)
            lw = math.log(max(w0, 1e-12)) + f * (math.log(max(w1, 1e-12)) - math.log(max(w0, 1e-12)))
            return {"at": math.exp(lw), "kind": "within"}
    return {"at": None, "kind": "above"}


def judge(m: dict, rates, writes) -> dict:
    """The verdict of one map (one dilation, one vCPU count), structured."""
    hurts = [[writes[j], rates[i]] for i in range(len(rates)) for j in range(len(writes))
             if m["ratio"][i][j] is not None and m["ratio"][i][j] <= HURTS]
    fine = [[writes[j], rates[i]] for i in range(len(rates)) for j in range(len(writes)) if m["fine"][i][j]]
    cross = {f"{sw:g}": crossover(writes, m["ratio"][i]) for i, sw in enumerate(rates)}
    return {"hurts": hurts, "fine": fine, "crossover": cross,
            "cells": sum(1 for row in m["ratio"] for r in row if r is not None)}


def _fmt_cross(c: dict, writes) -> str:
    if c["kind"] == "within":
        return f"≈{c['at']:.2g}"
    if c["kind"] == "below":
        return f"≤{writes[0]:g} (already at the smallest rate)"
    if c["kind"] == "above":
        return f"none up to {writes[-1]:g}"
    return "not measured"


def _region(cells: list[list[float]], rates) -> str:
    """Cells as "switch s: table writes a, b" phrases."""
    if not cells:
        return "nowhere on this grid"
    by = {}
    for tw, sw in cells:
        by.setdefault(sw, []).append(tw)
    return "; ".join(f"switch {sw:g}: table writes {', '.join(f'{w:g}' for w in sorted(ws))}"
                     for sw, ws in sorted(by.items()))


def verdict_md(maps: dict, rates, writes, vcpus, point: dict, dil_doc: dict | None) -> tuple[str, dict]:
    """(markdown, structured verdict per label and vCPU count)."""
    out: dict = {}
    lines = ["# Where does the VM-wide mutex hurt? (compare --map)", "",
             f"Ratio = mutex-hash ÷ rcu-list nested VMRUN/s. The mutex **costs ≥ 20 %** where the ratio is "
             f"≤ {HURTS:g}; **\"any solution is fine\"** where every design reaches ≥ {FINE:.0%} of the best "
             "design's rate. Axes: table writes per nested VMRUN × switch rate (L1 switching L2 at a VMEXIT).",
             f"The workload's own point: {point['table_writes_per_vmrun']:g} table writes per VMRUN, switch rate "
             f"{point['switch_rate']:g} (vm/workloads.py says where these rates come from).", ""]
    labels = [x for x in ("virtual", "dilated", "undilated") if x in maps]
    if "load" in point and "virtual" not in maps:
        lines += [f"Machine: {point['load']['cpus']} CPUs, load average {point['load']['start']:.1f} when the map "
                  f"started and {point['load']['end']:.1f} when it ended (all work on the host, not only the map's).",
                  ""]
    if "virtual" in maps:
        lines += ["**The verdict rests on virtual-time numbers** (--clock virtual, docs/virtual-time.md): every vCPU "
                  "has its own CPU and clock and the code is priced at kernel C costs, so a cell's numbers depend "
                  "on its seed only, not on the host or its load; the spread below is the seeds'.", ""]
    elif "dilated" in maps:
        f = maps["dilated"]["factor"]
        how = (f"measured, range {dil_doc['low']:g}-{dil_doc['high']:g}; {dil_doc['method']}"
               if dil_doc and "low" in dil_doc else "given with --dilate")
        lines += [f"**The verdict rests on the dilated numbers** (guest time and delays ×{f:g}, {how}): they keep "
                  "the kernel's ratio of time in the code under study to guest time. The undilated map (the Python "
                  "model as it runs, every lock-wait share inflated) follows for reference.", ""]
    else:
        lines += ["**The verdict rests on undilated numbers** (no --dilate): the Python model as it runs, where the "
                  "code under study is slow relative to guest time, so the mutex looks worse than in a kernel.", ""]
    for label in labels:
        f = maps[label]["factor"]
        lines += [f"## {label}" + (f" (×{f:g})" if f != 1 else ""), ""]
        for v in vcpus:
            m = maps[label].get(str(v))
            if m is None:
                continue
            j = judge(m, rates, writes)
            out.setdefault(label, {})[str(v)] = j
            pt = _at_point(m, rates, writes, point)
            lines += [f"### {v} vCPUs", "",
                      f"- mutex costs ≥ 20 %: {_region(j['hurts'], rates)}.",
                      f"- any solution is fine: {_region(j['fine'], rates)}.",
                      "- crossover (table writes per VMRUN where the ratio falls to 0.8): " + "; ".join(
                          f"switch {sw}: {_fmt_cross(c, writes)}" for sw, c in j["crossover"].items()) + "."]
            if pt is not None:
                lines.append(f"- at the workload's point: ratio {pt[0]:.2f}, "
                             + ("any solution is fine there." if pt[1] else "not every design is within 80 % there."))
            sp = [s for row in m.get("spread", []) for s in row if s is not None]
            if sp:
                lines.append(f"- repeatability: the ratio's spread over seeds, (max - min) / median, is "
                             f"{median(sp):.2f} for the median cell and {max(sp):.2f} at most.")
            if m["failed"]:
                lines.append(f"- **{len(m['failed'])} point(s) ended in FAILURE**: {', '.join(map(str, m['failed'][:4]))}.")
            lines.append("")
    if "virtual" in maps:
        lines += ["A cell is one run per design and seed (``--repeats`` seeds: the median of the per-seed ratios).", ""]
    else:
        lines += ["A cell is one run per design and seed (``--repeats`` seeds: the median). The ratio of two runs "
                  "moves with the machine's load (other work on a shared host steals the vCPUs' CPUs at random "
                  "moments), so a single cell near 0.8 is not a finding — a region is; read the spread above. "
                  "`--clock virtual` (the map's default) takes the host out of the numbers.", ""]
    return "\n".join(lines), out


def _at_point(m: dict, rates, writes, point: dict):
    try:
        i = [float(r) for r in rates].index(float(point["switch_rate"]))
        j = [float(w) for w in writes].index(float(point["table_writes_per_vmrun"]))
    except ValueError:
        return None
    r = m["ratio"][i][j]
    return None if r is None else (r, bool(m["fine"][i][j]))


def plot(maps: dict, rates, writes, vcpus, point: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [x for x in ("virtual", "undilated", "dilated") if x in maps]
    fig, axes = plt.subplots(len(labels), len(vcpus), figsize=(4.2 * len(vcpus), 3.6 * len(labels)),
                             squeeze=False, constrained_layout=True)
    im = None
    for a, label in enumerate(labels):
        for b, v in enumerate(vcpus):
            ax = axes[a][b]
            m = maps[label].get(str(v))
            z = np.array([[np.nan if r is None else r for r in row] for row in m["ratio"]], dtype=float)
            im = ax.imshow(z, origin="lower", cmap="RdYlGn", vmin=0.4, vmax=1.2, aspect="auto")
            for i in range(len(rates)):
                for j in range(len(writes)):
                    if not np.isnan(z[i, j]):
                        ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=8)
            if len(rates) > 1 and len(writes) > 1 and np.isfinite(z).sum() >= 4 and np.nanmin(z) < HURTS < np.nanmax(z):
                ax.contour(np.arange(len(writes)), np.arange(len(rates)), np.nan_to_num(z, nan=1.0), levels=[HURTS],
                           colors="black", linewidths=1.5)
            try:
                pj = [float(w) for w in writes].index(float(point["table_writes_per_vmrun"]))
                pi = [float(r) for r in rates].index(float(point["switch_rate"]))
                ax.plot([pj], [pi], marker="*", color="blue", markersize=14, markerfacecolor="none")
            except ValueError:
                pass
            ax.set_xticks(range(len(writes)), [f"{w:g}" for w in writes])
            ax.set_yticks(range(len(rates)), [f"{r:g}" for r in rates])
            ax.set_xlabel("table writes per nested VMRUN (log)")
            ax.set_ylabel("switch rate")
            f = maps[label]["factor"]
            ax.set_title(f"{v} vCPUs, {label}" + (f" ×{f:g}" if f != 1 else ""), fontsize=10)
    fig.suptitle("mutex-hash ÷ rcu-list nested VMRUN/s\n(black: 0.8 contour; star: the workload's point)",
                 fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="mutex-hash ÷ rcu-list")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(out: Path, results: list[dict], *, designs, vcpus, rates, writes, dilations, point: dict,
                  dil_doc: dict | None, extra: dict | None = None, clock: str = "real") -> tuple[dict, str]:
    """map.json, map.png, map.md from sweep results; returns (map document, verdict markdown)."""
    maps = build(results, designs, vcpus, rates, writes, dilations, clock)
    text, verdict = verdict_md(maps, rates, writes, vcpus, point, dil_doc)
    doc = {"axes": {"table_writes_per_vmrun": list(writes), "switch_rate": list(rates)}, "vcpus": list(vcpus),
           "designs": list(designs), "point": point, "hurts_below": HURTS, "fine_at": FINE,
           "dilation": dil_doc or {"factor": 1.0}, "clock": clock, "maps": maps,
           "cells": [c for m in maps.values() for k, per in m.items() if k != "factor" for c in per["cells"]], "verdict": verdict, "verdict_md": text,
           **(extra or {})}
    sweep._write_json(out / "map.json", doc)
    plot(maps, rates, writes, vcpus, point, out / "map.png")
    (out / "map.md").write_text(text)
    return doc, text


def main(args) -> int:
    from rich.console import Console

    from lab import dilation
    from lab.outputs import check_out_dir
    from vm.config import DILATE_VIRTUAL, clock_values
    from vm.workloads import workload

    check_out_dir(args.out, "--out", create=False)  # a directory (or creatable), writable, with room; nothing made yet
    designs = designs_arg(args.designs)
    base = workload(args.workload)
    cv = clock_values(args.clock or "virtual", args.prices)  # the map measures on virtual time by default
    base.update(cv)
    clock = cv["clock"]
    if clock == "virtual" and args.dilate not in (None, "off"):
        raise UsageError(DILATE_VIRTUAL)
    dilate = args.dilate if args.dilate is not None else ("off" if clock == "virtual" else "auto")

    if not {"mutex-hash", "rcu-list"} <= set(designs):
        raise UsageError("--map: the map is mutex-hash ÷ rcu-list; --designs must include both")
    vcpus = args.vcpus or VCPUS
    rates = args.switch_rates or SWITCH_RATES
    writes = sorted(args.table_writes or TABLE_WRITES)
    duration = args.duration or (DURATION_VIRTUAL if clock == "virtual" else DURATION)
    scheduler = sweep.check_scheduler(args.scheduler) if args.scheduler else None
    repeats = args.repeats if args.repeats is not None else (3 if clock == "virtual" else 1)
    probe = grid_doc(designs, vcpus, rates, writes, duration, args.seed, base, [1.0], repeats)
    sweep.parse_grid(probe, "compare --map")  # every point valid before anything runs or is measured
    out = sweep._out_dir(args.out)
    lock = sweep._Lock(out)
    try:
        t0 = time.monotonic()
        load0 = os.getloadavg()[0]
        factor, dil_doc = _dilation(out, dilate, base, designs, dilation)
        dilations = [1.0, factor] if factor != 1.0 else [1.0]
        points = sweep.parse_grid(grid_doc(designs, vcpus, rates, writes, duration, args.seed, base, dilations,
                                           repeats), "compare --map")
        console = Console(stderr=True, soft_wrap=True)
        rc = sweep._sweep(points, out, scheduler, int(args.workers or 1), console, "compare --map")
        results = json.loads((out / "sweep.json").read_text())
        point = {"table_writes_per_vmrun": base.get("table_writes_per_vmrun",
                                                    base.get("writes_per_exit", 8) * base.get("tracked_fraction", 0.25)),
                 "switch_rate": base.get("switch_rate", 0.1),
                 "load": {"cpus": os.cpu_count(), "start": load0, "end": os.getloadavg()[0]}}
        _, text = write_outputs(out, results, designs=designs, vcpus=vcpus, rates=rates, writes=writes,
                                dilations=dilations, point=point, dil_doc=dil_doc,
                                extra={"wall_s": round(time.monotonic() - t0, 1), "points": len(points),
                                       "workload": args.workload, "duration": duration, "repeats": repeats},
                                clock=clock)
    finally:
        lock.release()
    print(text)
    print(f"wrote {out / 'map.json'}, {out / 'map.png'}, {out / 'map.md'} "
          f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return rc


def _dilation(out: Path, dilate, base: dict, designs, dilation) -> tuple[float, dict | None]:
    """The factor of this map; ``auto`` is measured once per DIR (kept in dilation.json), so that a
    resumed map runs the same dilated points."""
    saved = out / "dilation.json"
    if dilate == "auto" and saved.is_file():
        try:
            doc = json.loads(saved.read_text())
            print(f"dilate auto: factor {doc['factor']:g}, as measured for this map before ({saved})", file=sys.stderr)
            return float(doc["factor"]), doc
        except (OSError, ValueError, KeyError, TypeError):
            pass
    factor, doc = dilation.resolve(dilate, base, designs)
    if dilate == "auto" and doc is not None:
        sweep._write_json(saved, doc)
    return factor, doc
