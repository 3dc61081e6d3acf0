"""``launch.py report RESULTS.json... [--out DIR]``: re-render tables and plots from saved results.

Input: results documents as ``launch.py run --json`` writes them (shape: :mod:`vm.results`), or a
JSON list of them (``sweep.json``). One run: the usual run summary (:func:`vm.results.render`);
several: a comparison table, one row per run. ``--out DIR`` also writes ``report.md`` (markdown
table) and PNG plots.

Reusable pieces (``compare`` and ``sweep`` use them), all taking a list of result dicts:

* :func:`load` / :func:`check` — read and shape-check documents (``UsageError`` naming the file);
* :func:`summarize` -> rows (plain dicts of numbers), :func:`markdown_table`, :func:`rich_table`;
* :func:`plot_vmrun_rate` — nested VMRUN/s vs vCPUs, one line per design (plus any other config key
  that varies, except the seed), one PNG per switch rate;
* :func:`plot_lock_wait` — total lock wait time per lock class, one bar per run (per series when
  there are many runs);
* :func:`write_report` — report.md + the plots into a directory.

Row metrics: ``vmrun_per_s`` and ``writes_per_s`` are ``ops.nested_vmrun.per_s`` and
``ops.emulated_write.per_s``; ``vmrun_p99_ns`` is ``ops.nested_vmrun.p99_ns`` (None without
histograms, ``--no-stats``); ``lock_wait_share`` = sum over lock classes of ``wait_ns_total`` /
(elapsed ns × vCPUs); ``gp_per_s`` = all grace periods (every domain in ``gp``) / elapsed s. A
scripted run (``rate_meaningful`` false: its duration is a script's, not a measurement's) has None
for the four rates ("–" in the tables).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import msgspec

from ipc.errors import UsageError
from vm.results import fmt_ns

EXIT_OK = 0
MAX_BARS = 8  # lock-wait chart: more runs than this are grouped by series

# -- shape ------------------------------------------------------------------------------------------


class _Cfg(msgspec.Struct):
    design: str
    registration: str
    vcpus: int
    switch_rate: float
    seed: int


class _Op(msgspec.Struct):
    count: int
    per_s: float
    p50_ns: int | None = None
    p99_ns: int | None = None
    p999_ns: int | None = None
    max_ns: int | None = None


class _Lock(msgspec.Struct):
    acquisitions: int
    contentions: int
    wait_ns_total: int
    wait_ns_max: int
    wait_ns_min: int
    wait_ns_avg: int | float
    hold_ns_total: int
    hold_ns_max: int
    hold_ns_min: int
    hold_ns_avg: int | float


class _Warn(msgspec.Struct):
    kind: str
    message: str


class _Result(msgspec.Struct):
    config: _Cfg
    seed: int
    elapsed_s: float
    ops: dict[str, dict]  # entries checked one by one (msgspec names dict values only as [...])
    locks: dict[str, dict]
    gp: dict[str, int]
    warnings: list[_Warn]
    warn_count: int
    oracle: list[str]
    verdict: Literal["SUCCESS", "FAILURE"]
    reasons: list[str]


REQUIRED_OPS = ("nested_vmrun", "emulated_write")


def check(doc: Any, where: str) -> dict:
    """Shape-check one results document (what :func:`vm.results.render` and :func:`summarize` read);
    ``UsageError("<where>: <field>: <problem>")`` if it does not fit. Returns ``doc`` unchanged."""
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: not a results document (expected a JSON object, got {type(doc).__name__})")
    r = _convert(doc, _Result, where, "")
    for table, typ in (("ops", _Op), ("locks", _Lock)):
        for k, v in doc[table].items():
            _convert(v, typ, where, f"{table}.{k}")
    for op in REQUIRED_OPS:
        if op not in r.ops:
            raise UsageError(f"{where}: ops.{op}: missing")
    if not r.elapsed_s > 0 or not math.isfinite(r.elapsed_s):
        raise UsageError(f"{where}: elapsed_s: must be > 0, got {r.elapsed_s!r}")
    if r.config.vcpus < 1:
        raise UsageError(f"{where}: config.vcpus: must be >= 1, got {r.config.vcpus}")
    return doc


def _convert(obj: Any, typ: type, where: str, prefix: str):
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as e:
        msg = str(e)
        at = prefix
        if " - at `$" in msg:
            msg, path = msg.rsplit(" - at `$", 1)
            at = (prefix + path.rstrip("`")).lstrip(".")
        msg = f"{msg[0].lower()}{msg[1:]}"
        raise UsageError(f"{where}: {at}: {msg}" if at else f"{where}: {msg}") from None


def load(path: str | Path) -> list[dict]:
    """The results document(s) in ``path``: one object, a list of them (``sweep.json``) or a
    ``compare.json`` (its points). Missing / unreadable / not JSON / wrong shape -> ``UsageError``
    naming the file."""
    p = Path(path)
    return _shape(read_json(p), p)


def read_json(p: Path) -> Any:
    """The parsed JSON of ``p``; ``UsageError`` naming the file if it cannot be read or parsed."""
    try:
        with open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{p}: is a directory, not a results file") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot read: {e.strerror}") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid JSON ({e})") from None


def _shape(doc: Any, p: Path) -> list[dict]:
    if isinstance(doc, dict) and kind_of(doc) == "compare":
        if not isinstance(doc["points"], list) or not doc["points"]:
            raise UsageError(f"{p}: points: expected a non-empty list of results")
        return [check(d, f"{p}: points[{i}]") for i, d in enumerate(doc["points"])]
    if isinstance(doc, dict) and kind_of(doc) == "map":
        raise UsageError(f"{p}: a map.json (compare --map) holds no runs: give it alone to re-render its map")
    if isinstance(doc, list):
        if not doc:
            raise UsageError(f"{p}: empty list, no results")
        return [check(d, f"{p}[{i}]") for i, d in enumerate(doc)]
    return [check(doc, str(p))]


def kind_of(doc: Any) -> str:
    """"compare" (compare.json), "map" (map.json) or "runs" (a run's results, or a list: sweep.json)."""
    if isinstance(doc, dict) and "points" in doc and "assessment" in doc:
        return "compare"
    if isinstance(doc, dict) and "maps" in doc and "axes" in doc:
        return "map"
    return "runs"


def load_many(paths: list[str]) -> tuple[list[dict], list[str]]:
    """All documents of ``paths`` and a label for each: the file's stem for a one-run file, and for a
    file of several runs (sweep.json, compare.json) what tells its runs apart (:func:`run_labels`),
    after the stem when several files are given."""
    results, labels = [], []
    for path in paths:
        docs = load(path)
        stem = Path(path).stem
        results += docs
        if len(docs) == 1:
            labels.append(stem)
        else:
            labels += [lab if len(paths) == 1 else f"{stem}: {lab}"
                       for lab in run_labels(docs, skip=_COLUMN_KEYS, number=False)]
    return results, labels


def unique_labels(labels: list[str]) -> list[str]:
    """``labels`` with repeats numbered (``r``, ``r#2``, ``r#3``) so that every run stays apart."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


# -- table ------------------------------------------------------------------------------------------


#: how a config key that tells runs apart is written in a label, in this order (others: ``key=value``)
_LABEL_KEYS: dict[str, Any] = {
    "design": str, "registration": str, "clock": str, "dilate": lambda x: f"×{x:g}",
    "vcpus": lambda x: f"{x} vCPUs", "switch_rate": lambda x: f"switch {x:g}",
    "table_writes_per_vmrun": lambda x: f"{x:g} table writes", "seed": lambda x: f"seed {x}",
}
_NOT_LABELS = {"progress", "run_id"}


def run_labels(results: list[dict], skip: tuple[str, ...] = (), number: bool = True) -> list[str]:
    """A name per run made of what tells it apart from the others (design, clock, dilation, vCPUs,
    switch rate, table writes, seed, then any other config key that differs), never a hash:
    ``"rcu-list, ×3.2, 4 vCPUs, seed 2"``. Keys in ``skip`` are left out; with ``number``, runs alike
    in everything else are numbered (``#2``); nothing left to say -> "–"."""
    vals: dict[str, set] = defaultdict(set)
    for r in results:
        for k, v in r["config"].items():
            vals[k].add(json.dumps(v, sort_keys=True))
    differ = [k for k in vals if len(vals[k]) > 1 and k not in _NOT_LABELS and k not in skip]
    keys = [k for k in _LABEL_KEYS if k in differ] + sorted(k for k in differ if k not in _LABEL_KEYS)
    out = []
    for r in results:
        c = r["config"]
        parts = [(_LABEL_KEYS[k](c[k]) if k in _LABEL_KEYS and c.get(k) is not None else f"{k}={c.get(k)}")
                 for k in keys]
        out.append(", ".join(parts) or "–")
    return unique_labels(out) if number else out


_COLUMN_KEYS = ("design", "registration", "vcpus", "switch_rate")  # config keys the table shows as columns


def _label(r: dict, i: int) -> str:
    return str(r.get("run_id") or f"#{i}")


def summarize(results: list[dict], labels: list[str] | None = None) -> list[dict]:
    """One row per run: ``run, design, registration, vcpus, switch_rate, seed, vmrun_per_s,
    writes_per_s, vmrun_p99_ns, lock_wait_share, gp_per_s, verdict`` (numbers unformatted).
    ``run`` is ``labels[i]``, else what tells the run apart beyond the table's design / registration /
    vCPUs / switch rate columns (:func:`run_labels`: clock, dilation, table writes, seed, ...); a lone
    run: its run id."""
    if labels is None:
        labels = (run_labels(results, skip=_COLUMN_KEYS, number=False) if len(results) > 1
                  else [_label(results[0], 0)] if results else [])
    rows = []
    for i, r in enumerate(results):
        cfg = r["config"]
        elapsed = float(r["elapsed_s"])
        vcpus = int(cfg["vcpus"])
        vmrun = r["ops"]["nested_vmrun"]
        wait = sum(int(s.get("wait_ns_total", 0)) for s in r.get("locks", {}).values())
        rated = r.get("rate_meaningful", True)  # False: a scripted run, whose duration bears no rate
        rows.append({
            "run": labels[i],
            "design": cfg["design"],
            "registration": cfg["registration"],
            "vcpus": vcpus,
            "switch_rate": float(cfg["switch_rate"]),
            "seed": r.get("seed", cfg.get("seed")),
            "vmrun_per_s": float(vmrun["per_s"]) if rated else None,
            "writes_per_s": float(r["ops"]["emulated_write"]["per_s"]) if rated else None,
            "vmrun_p99_ns": vmrun.get("p99_ns"),
            "lock_wait_share": wait / (elapsed * 1e9 * vcpus) if rated else None,
            "gp_per_s": sum(int(v) for v in r.get("gp", {}).values()) / elapsed if rated else None,
            "verdict": r["verdict"],
        })
    return rows


def _share(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.3f}%" if x < 0.1 else f"{100 * x:.1f}%"


#: (row key, header, formatter, right-aligned)
COLUMNS: list[tuple[str, str, Any, bool]] = [
    ("run", "run", str, False),
    ("design", "design", str, False),
    ("registration", "registration", str, False),
    ("vcpus", "vCPUs", str, True),
    ("switch_rate", "switch rate", lambda x: f"{x:g}", True),
    ("vmrun_per_s", "nested VMRUN/s", lambda x: "–" if x is None else f"{x:,.0f}", True),
    ("writes_per_s", "emulated writes/s", lambda x: "–" if x is None else f"{x:,.0f}", True),
    ("vmrun_p99_ns", "p99 VMRUN", fmt_ns, True),
    ("lock_wait_share", "lock wait share", _share, True),
    ("gp_per_s", "GPs/s", lambda x: "–" if x is None else f"{x:,.1f}", True),
    ("verdict", "verdict", str, False),
]


def format_row(row: dict) -> list[str]:
    return [fmt(row[key]) for key, _, fmt, _ in COLUMNS]


def markdown_table(rows: list[dict]) -> str:
    """A GitHub-flavoured markdown table of :func:`summarize` rows (ends with a newline)."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---:" if right else ":---" for *_, right in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in format_row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rich_table(rows: list[dict], title: str = "runs"):
    from rich.table import Table

    t = Table(title=title, show_edge=False)
    for key, h, _, right in COLUMNS:  # a run's name is never cut short: it says what tells it apart
        t.add_column(h, justify="right" if right else "left", overflow="fold" if key == "run" else "ellipsis",
                     min_width={"run": 12, "design": 18}.get(key))
    for r in rows:
        cells = format_row(r)
        v = cells[-1]
        cells[-1] = f"[green]{v}[/]" if v == "SUCCESS" else f"[bold red]{v}[/]"
        t.add_row(*cells)
    return t


# -- plots ------------------------------------------------------------------------------------------
_SERIES_EXCLUDE = {"vcpus", "switch_rate", "seed", "design", "progress", "duration"}


def _varying(results: list[dict]) -> list[str]:
    """Config keys (other than the plot axes, seed, duration) whose value differs between runs."""
    keys: dict[str, set] = defaultdict(set)
    for r in results:
        for k, v in r["config"].items():
            keys[k].add(json.dumps(v, sort_keys=True))
    return sorted(k for k, vals in keys.items() if len(vals) > 1 and k not in _SERIES_EXCLUDE)


def series_label(r: dict, varying: list[str]) -> str:
    cfg = r["config"]
    return ", ".join([str(cfg["design"])] + [f"{k}={cfg.get(k)}" for k in varying])


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _virtual(results: list[dict]) -> bool:
    """Every run on the virtual clock: rates are per virtual second, times virtual (ipc/vtime.py)."""
    return bool(results) and all(r.get("config", {}).get("clock") == "virtual" for r in results)


LEGEND_MAX = 8  # vmrun plot: legend entries (designs + line styles); more combinations -> facets


def _design_order(designs) -> list[str]:
    """Known designs in palette order, then the others alphabetically: the same order in every plot."""
    from lab.palette import DESIGN_COLOURS

    known = [d for d in DESIGN_COLOURS if d in designs]
    return known + sorted(set(designs) - set(known))


def _value_sort(v: str):
    x = json.loads(v)
    return (0, float(x), "") if isinstance(x, int | float) and not isinstance(x, bool) else (1, 0.0, v)


_SHORT_KEYS = {"table_writes_per_vmrun": "table writes/VMRUN", "registration": "reg"}


def _fmt_value(k: str, v: str) -> str:
    """A config key's value (JSON text) as a legend entry / panel title: ``reg=bool``,
    ``undilated`` / ``dilated ×3``, ``clock=virtual``."""
    x = json.loads(v)
    if k == "dilate" and isinstance(x, int | float):
        return "undilated" if float(x) == 1.0 else f"dilated ×{float(x):g}"
    k = _SHORT_KEYS.get(k, k)
    return f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}"


def plot_vmrun_rate(results: list[dict], path: str | Path, *, figures: list | None = None) -> list[Path]:
    """Nested VMRUN/s vs vCPUs, one figure per switch rate, written as ``<stem>_sw<rate><suffix>``
    next to ``path`` (e.g. ``vmrun_rate_sw0.1.png``). Colour = design (:mod:`lab.palette`); each
    point is the median over repeats (seeds), error bars min..max. Another config key that varies
    (registration, dilate, ...) is a line style + marker when the legend stays within ``LEGEND_MAX``
    entries, else (and every further key) a facet: a grid of small panels sharing the y axis, each
    titled ``key=value``. A switch rate whose every series has a single vCPU count is not drawn (no
    line to show; :func:`vmrun_plot_note` says so). Returns the written paths; ``figures``, when
    given, receives the :class:`~matplotlib.figure.Figure` objects (tests inspect them)."""
    import statistics

    from matplotlib.lines import Line2D

    from lab import palette

    path = Path(path)
    varying = _varying(results)
    values = {k: sorted({json.dumps(r["config"].get(k), sort_keys=True) for r in results}, key=_value_sort)
              for k in varying}  # the same value keeps its line style in every file
    designs = _design_order({str(r["config"]["design"]) for r in results})
    unit = "nested VMRUN / virtual s" if _virtual(results) else "nested VMRUN / s"
    by_rate: dict[float, list[dict]] = defaultdict(list)
    for r in results:
        by_rate[float(r["config"]["switch_rate"])].append(r)
    out = []
    for rate in sorted(by_rate):
        runs = by_rate[rate]
        vary = [k for k in varying if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]
        rate_designs = [d for d in designs if any(str(r["config"]["design"]) == d for r in runs)]
        fits = [k for k in vary if len(values[k]) <= len(palette.LINESTYLES)
                and len(rate_designs) + len(values[k]) <= LEGEND_MAX]
        style_key = min(fits, key=lambda k: (len(values[k]), k)) if fits else None
        facet_keys = [k for k in vary if k != style_key]
        # facet -> (design, style value) -> vcpus -> rates
        cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in runs:
            cfg = r["config"]
            facet = tuple(json.dumps(cfg.get(k), sort_keys=True) for k in facet_keys)
            sv = json.dumps(cfg.get(style_key), sort_keys=True) if style_key else None
            cells[facet][(str(cfg["design"]), sv)][int(cfg["vcpus"])].append(
                float(r["ops"]["nested_vmrun"]["per_s"]))
        if all(len(pts) < 2 for series in cells.values() for pts in series.values()):
            continue  # every series is one point: a "line plot" would have no line
        facets = sorted(cells, key=lambda f: [_value_sort(v) for v in f])
        ncols = min(len(facets), 3)
        nrows = math.ceil(len(facets) / ncols)
        if len(facets) == 1:
            fig = _figure(8.0, 4.5)
        else:
            fig = _figure(min(14.0, 2.2 + 3.6 * ncols), min(24.0, 1.2 + 2.8 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True, sharex=True)
        xs_all = sorted({int(r["config"]["vcpus"]) for r in runs})
        dodge = 0.012 * max(1, xs_all[-1] - xs_all[0])  # designs side by side: equal values stay visible
        spread = False
        for n, facet in enumerate(facets):
            ax = axes[n // ncols][n % ncols]
            for (design, sv), pts in sorted(cells[facet].items(),
                                            key=lambda kv: (designs.index(kv[0][0]), _value_sort(kv[0][1] or "0"))):
                xs = sorted(pts)
                med = [statistics.median(pts[x]) for x in xs]
                lo = [m - min(pts[x]) for m, x in zip(med, xs, strict=True)]
                hi = [max(pts[x]) - m for m, x in zip(med, xs, strict=True)]
                spread = spread or any(len(pts[x]) > 1 for x in xs)
                st = palette.style(values[style_key].index(sv)) if style_key else {"linestyle": "-", "marker": "o"}
                shift = dodge * (rate_designs.index(design) - (len(rate_designs) - 1) / 2)
                eb = ax.errorbar([x + shift for x in xs], med, yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=3,
                                 color=palette.colour(design), markersize=5, linewidth=1.6,
                                 label=", ".join([design] + ([_fmt_value(style_key, sv)] if style_key else [])),
                                 **st)
                eb.lines[0].set_gid(design)  # the data line: tests check its colour
            ax.set_xticks(xs_all)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if facet_keys:
                title = ", ".join(_fmt_value(k, v) for k, v in zip(facet_keys, facet, strict=True))
                ax.set_title(title if len(title) <= 36 else title.replace(", ", "\n", 1), fontsize=9)
        for n in range(len(facets), nrows * ncols):
            axes[n // ncols][n % ncols].set_axis_off()
            if n >= ncols:  # the panel above an empty slot is the last of its column: its ticks show
                axes[n // ncols - 1][n % ncols].xaxis.set_tick_params(labelbottom=True)
        ylabel = unit + ("\n(median over seeds; bars: min–max)" if spread else "")
        if len(facets) == 1:
            axes[0][0].set_xlabel("vCPUs")
            axes[0][0].set_ylabel(ylabel)
        else:
            fig.supxlabel("vCPUs", fontsize=10)
            fig.supylabel(ylabel, fontsize=10)
        handles = [Line2D([], [], color=palette.colour(d), linewidth=2.5, label=d) for d in rate_designs]
        if style_key:
            handles += [Line2D([], [], color="0.35", label=_fmt_value(style_key, v), **palette.style(i))
                        for i, v in enumerate(values[style_key])
                        if any(sv == v for series in cells.values() for (_, sv) in series)]
        fig.legend(handles=handles, loc="outside right center", fontsize="small",
                   title="colour: design" + (" · line: " + style_key if style_key else ""),
                   title_fontsize="small")
        fig.suptitle(f"Does nested VMRUN throughput scale with vCPUs? (switch rate {rate:g})")
        if figures is not None:
            figures.append(fig)
        out.append(_save(fig, path.with_name(f"{path.stem}_sw{rate:g}{path.suffix or '.png'}")))
    return out


def vmrun_plot_note(results: list[dict], pngs: list[Path]) -> str:
    """report.md's sentence on the switch rates :func:`plot_vmrun_rate` drew no figure for ("" if none)."""
    rates = sorted({float(r["config"]["switch_rate"]) for r in results})
    drawn = {p.stem.rsplit("_sw", 1)[-1] for p in pngs}
    skipped = [f"{x:g}" for x in rates if f"{x:g}" not in drawn]
    if not skipped:
        return ""
    if len(skipped) == len(rates):
        vcpus = sorted({int(r["config"]["vcpus"]) for r in results})
        return ("No nested-VMRUN-rate plot: it draws VMRUN/s over vCPUs, and "
                + (f"every run here has {vcpus[0]} vCPU(s)" if len(vcpus) == 1 else
                   "every series here (design and settings) ran at a single vCPU count")
                + ", so each design's line would be a single point; the table above has the numbers.")
    return (f"No nested-VMRUN-rate plot for switch rate {', '.join(skipped)}: there every series ran at a "
            "single vCPU count, so each line would be a single point; the table above has the numbers.")


def plot_lock_wait(results: list[dict], path: str | Path, labels: list[str] | None = None, *,
                   figures: list | None = None) -> Path:
    """Where is lock wait time spent? One small panel per design (colour = design, :mod:`lab.palette`),
    one bar per lock class: the total wait of the run, or with several runs of a design the mean per
    run with min..max whiskers. Units ms (µs when every wait is below 0.1 ms), virtual when every run
    is on the virtual clock. A design with a single run is titled with its label (``labels`` / point
    id / run id). ``figures``, when given, receives the Figure. Returns ``path``."""
    from lab import palette

    path = Path(path)
    labels = labels or unique_labels([_label(r, i) for i, r in enumerate(results)])
    by_design: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_design[str(r["config"]["design"])].append(i)
    designs = _design_order(by_design)
    classes = {d: sorted({c for i in by_design[d] for c in results[i].get("locks", {})}) for d in designs}
    waits = {d: {c: [float(results[i].get("locks", {}).get(c, {}).get("wait_ns_total", 0) or 0)
                     for i in by_design[d]] for c in classes[d]} for d in designs}
    peak = max([w for d in designs for ws in waits[d].values() for w in ws], default=0.0)
    scale, unit = (1e6, "ms") if peak >= 1e5 else (1e3, "µs")
    unit = ("virtual " if _virtual(results) else "") + unit
    several = any(len(ix) > 1 for ix in by_design.values())
    what = "mean total lock wait per run" if several else "total lock wait"
    if not any(classes.values()):
        fig = _figure()
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no lock_stat data (run with stats on)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        fig.suptitle("Where is lock wait time spent?")
        if figures is not None:
            figures.append(fig)
        return _save(fig, path)
    ncols = min(len(designs), 3)
    nrows = math.ceil(len(designs) / ncols)
    n_cls = max(len(c) for c in classes.values())
    fig = _figure(min(14.0, 1.0 + ncols * min(4.8, max(2.8, 1.0 + 0.45 * n_cls))), min(14.0, 1.3 + 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for n, d in enumerate(designs):
        ax = axes[n // ncols][n % ncols]
        ix = by_design[d]
        ax.set_title(f"{d} ({len(ix)} runs)" if len(ix) > 1 else f"{d} ({labels[ix[0]]})", fontsize=9,
                     color=palette.colour(d))
        if not classes[d]:
            ax.text(0.5, 0.5, "no lock_stat data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        ws = [[w / scale for w in waits[d][c]] for c in classes[d]]
        mean = [sum(w) / len(w) for w in ws]
        err = ([[m - min(w) for m, w in zip(mean, ws, strict=True)],
                [max(w) - m for m, w in zip(mean, ws, strict=True)]] if len(ix) > 1 else None)
        ax.bar(range(len(ws)), mean, 0.65, color=palette.colour(d), yerr=err, capsize=3, ecolor="0.25",
               gid=d, label=d)
        ax.set_xticks(range(len(ws)), classes[d], rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        if not any(w for c in ws for w in c):
            ax.text(0.5, 0.5, "no lock wait in these runs", ha="center", va="center", transform=ax.transAxes,
                    color="0.35")
        if n % ncols == 0:
            ax.set_ylabel(f"{what} ({unit})")
    for n in range(len(designs), nrows * ncols):
        axes[n // ncols][n % ncols].set_axis_off()
    axes[0][0].set_ylim(bottom=0, top=None if peak > 0 else 1.0)
    fig.suptitle(f"Where is lock wait time spent? {what[0].upper() + what[1:]}, per lock class ({unit})"
                 + ("\n(bar: mean over the design's runs; whiskers: min–max)" if several else ""), fontsize=11)
    if figures is not None:
        figures.append(fig)
    return _save(fig, path)


# -- report.md --------------------------------------------------------------------------------------


def write_report(results: list[dict], out_dir: str | Path, labels: list[str] | None = None, *,
                 title: str = "pagetrack-sim report", sources: list[str] | None = None,
                 extra_md: str = "") -> list[Path]:
    """``report.md`` (table, plots, FAILURE reasons, ``extra_md``) and the PNG plots into
    ``out_dir`` (created). Returns the written paths, report.md first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, labels)
    vmrun_pngs = plot_vmrun_rate(results, out / "vmrun_rate.png")
    pngs = [*vmrun_pngs, plot_lock_wait(results, out / "lock_wait.png", [r["run"] for r in rows])]
    md = [f"# {title}", ""]
    if sources:
        md += [f"{len(results)} run(s) from: " + ", ".join(f"`{s}`" for s in sources), ""]
    n_ok = sum(r["verdict"] == "SUCCESS" for r in rows)
    md += [f"{len(rows)} run(s): {n_ok} SUCCESS, {len(rows) - n_ok} FAILURE.", "",
           "Lock wait share = total lock wait / (elapsed × vCPUs); GPs/s counts every RCU/SRCU domain."
           + (" Every run is on the virtual clock: rates are per virtual second, latencies and waits in "
              "virtual time (docs/virtual-time.md)." if _virtual(results) else ""), "",
           markdown_table(rows), "## Plots", ""]
    note = vmrun_plot_note(results, vmrun_pngs)  # why a vmrun plot is missing, if one is
    md += [f"![{p.stem}]({p.name})" for p in pngs] + (["", note] if note else []) + [""]
    failed = [(row["run"], r) for row, r in zip(rows, results, strict=True) if r["verdict"] != "SUCCESS"]
    if failed:
        md += ["## FAILURE reasons", ""]
        md += [f"- **{label}**: " + ("; ".join(r.get("reasons", [])) or "(no reason recorded)").replace("\n", " ")
               for label, r in failed]
        md.append("")
    if extra_md:
        md += [extra_md.rstrip("\n"), ""]
    report = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(report)
    return [report, *pngs]


def _out_dir(out: str) -> Path:
    from lab.outputs import check_out_dir

    return check_out_dir(out, "--out")  # a writable directory with room (created if missing), else UsageError


def main(args) -> int:
    paths = list(args.results)
    kinds = {p: kind_of(read_json(Path(p))) for p in paths}
    special = [p for p in paths if kinds[p] != "runs"]
    if special and len(paths) > 1:
        raise UsageError(f"{special[0]}: a {Path(special[0]).name} is re-rendered alone (give it as the only file)")
    if special and kinds[special[0]] == "map":
        from lab import map as map_

        return map_.rerender(read_json(Path(special[0])), special[0], _out_dir(args.out) if args.out else None)
    results, labels = load_many(paths)  # every file checked before anything is printed
    out = _out_dir(args.out) if args.out else None
    from rich.console import Console

    con = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    if special:  # compare.json: its runs' table, then the verdicts as they were written
        con.print(rich_table(summarize(results, labels), title=f"compare: {len(results)} runs"))
        assessment = str(read_json(Path(special[0])).get("assessment", ""))
        con.print(assessment, markup=False, highlight=False)
        if out is not None:
            written = write_report(results, out, labels, sources=paths, extra_md=assessment,
                                   title="pagetrack-sim compare: nested AVIC designs")
            print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
        return EXIT_OK
    if len(results) == 1:
        from vm.results import render

        render(results[0], console=con)
    else:
        con.print(rich_table(summarize(results, labels), title=f"{len(results)} runs"))
    if out is not None:
        written = write_report(results, out, labels, sources=list(args.results))
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return EXIT_OK
