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
(elapsed ns × vCPUs); ``gp_per_s`` = all grace periods (every domain in ``gp``) / elapsed s.
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
    """The results document(s) in ``path``: one object, or a list of them (``sweep.json``).
    Missing / unreadable / not JSON / wrong shape -> ``UsageError`` naming the file."""
    p = Path(path)
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
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid JSON ({e})") from None
    if isinstance(doc, list):
        if not doc:
            raise UsageError(f"{p}: empty list, no results")
        return [check(d, f"{p}[{i}]") for i, d in enumerate(doc)]
    return [check(doc, str(p))]


def load_many(paths: list[str]) -> tuple[list[dict], list[str]]:
    """All documents of ``paths`` and a label for each (file stem, ``stem[i]`` for list files, or a
    sweep point id)."""
    results, labels = [], []
    for path in paths:
        docs = load(path)
        stem = Path(path).stem
        for i, d in enumerate(docs):
            results.append(d)
            labels.append(str(d.get("point_id") or (stem if len(docs) == 1 else f"{stem}[{i}]")))
    return results, unique_labels(labels)


def unique_labels(labels: list[str]) -> list[str]:
    """``labels`` with repeats numbered (``r``, ``r#2``, ``r#3``) so that every run stays apart."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


# -- table ------------------------------------------------------------------------------------------


def _label(r: dict, i: int) -> str:
    return str(r.get("point_id") or r.get("run_id") or f"#{i}")


def summarize(results: list[dict], labels: list[str] | None = None) -> list[dict]:
    """One row per run: ``run, design, registration, vcpus, switch_rate, seed, vmrun_per_s,
    writes_per_s, vmrun_p99_ns, lock_wait_share, gp_per_s, verdict`` (numbers unformatted).
    ``run`` is ``labels[i]``, else the sweep point id or run id (made unique)."""
    if labels is None:
        labels = unique_labels([_label(r, i) for i, r in enumerate(results)])
    rows = []
    for i, r in enumerate(results):
        cfg = r["config"]
        elapsed = float(r["elapsed_s"])
        vcpus = int(cfg["vcpus"])
        vmrun = r["ops"]["nested_vmrun"]
        wait = sum(int(s.get("wait_ns_total", 0)) for s in r.get("locks", {}).values())
        rows.append({
            "run": labels[i],
            "design": cfg["design"],
            "registration": cfg["registration"],
            "vcpus": vcpus,
            "switch_rate": float(cfg["switch_rate"]),
            "seed": r.get("seed", cfg.get("seed")),
            "vmrun_per_s": float(vmrun["per_s"]),
            "writes_per_s": float(r["ops"]["emulated_write"]["per_s"]),
            "vmrun_p99_ns": vmrun.get("p99_ns"),
            "lock_wait_share": wait / (elapsed * 1e9 * vcpus),
            "gp_per_s": sum(int(v) for v in r.get("gp", {}).values()) / elapsed,
            "verdict": r["verdict"],
        })
    return rows


def _share(x: float) -> str:
    return f"{100 * x:.3f}%" if x < 0.1 else f"{100 * x:.1f}%"


#: (row key, header, formatter, right-aligned)
COLUMNS: list[tuple[str, str, Any, bool]] = [
    ("run", "run", str, False),
    ("design", "design", str, False),
    ("registration", "registration", str, False),
    ("vcpus", "vCPUs", str, True),
    ("switch_rate", "switch rate", lambda x: f"{x:g}", True),
    ("vmrun_per_s", "nested VMRUN/s", lambda x: f"{x:,.0f}", True),
    ("writes_per_s", "emulated writes/s", lambda x: f"{x:,.0f}", True),
    ("vmrun_p99_ns", "p99 VMRUN", fmt_ns, True),
    ("lock_wait_share", "lock wait share", _share, True),
    ("gp_per_s", "GPs/s", lambda x: f"{x:,.1f}", True),
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
    for _, h, _, right in COLUMNS:
        t.add_column(h, justify="right" if right else "left")
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


def plot_vmrun_rate(results: list[dict], path: str | Path) -> list[Path]:
    """Nested VMRUN/s vs vCPUs, one line per series (design + any other varying config key; repeats
    such as seeds are averaged, min..max shown as error bars), one figure per switch rate, written
    as ``<stem>_sw<rate><suffix>`` next to ``path`` (e.g. ``vmrun_rate_sw0.1.png``). Returns the
    written paths."""
    path = Path(path)
    varying = _varying(results)
    by_rate: dict[float, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        cfg = r["config"]
        by_rate[float(cfg["switch_rate"])][series_label(r, varying)][int(cfg["vcpus"])].append(
            float(r["ops"]["nested_vmrun"]["per_s"]))
    out = []
    for rate in sorted(by_rate):
        fig = _figure()
        ax = fig.add_subplot()
        all_x: set[int] = set()
        for label in sorted(by_rate[rate]):
            pts = by_rate[rate][label]
            xs = sorted(pts)
            all_x.update(xs)
            mean = [sum(pts[x]) / len(pts[x]) for x in xs]
            lo = [m - min(pts[x]) for m, x in zip(mean, xs, strict=True)]
            hi = [max(pts[x]) - m for m, x in zip(mean, xs, strict=True)]
            ax.errorbar(xs, mean, yerr=[lo, hi] if any(lo) or any(hi) else None, marker="o", capsize=3,
                        label=label)
        ax.set_xticks(sorted(all_x))
        ax.set_xlabel("vCPUs")
        ax.set_ylabel("nested VMRUN / virtual s" if _virtual(results) else "nested VMRUN / s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"nested VMRUN rate vs vCPUs (switch_rate={rate:g})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        out.append(_save(fig, path.with_name(f"{path.stem}_sw{rate:g}{path.suffix or '.png'}")))
    return out


def plot_lock_wait(results: list[dict], path: str | Path, labels: list[str] | None = None) -> Path:
    """Bar chart of total lock wait time (ms) per lock class: one bar per run (label from
    ``labels`` / point id / run id), or, with more than ``MAX_BARS`` runs, one bar per series
    (design + other varying config keys, vCPUs included) averaged over its runs. Returns ``path``."""
    path = Path(path)
    classes = sorted({c for r in results for c in r.get("locks", {})})
    groups: dict[str, list[dict]] = {}
    if len(results) <= MAX_BARS:
        labels = labels or unique_labels([_label(r, i) for i, r in enumerate(results)])
        for i, r in enumerate(results):
            groups.setdefault(labels[i], []).append(r)
        what = "per run"
    else:
        varying = sorted(set(_varying(results)) | {"vcpus", "switch_rate"})
        for r in results:
            groups.setdefault(series_label(r, varying), []).append(r)
        what = "mean per series"
    fig = _figure(max(7.0, 1.0 + 0.5 * len(classes) * max(1, len(groups)) ** 0.5), 4.5)
    ax = fig.add_subplot()
    if not classes:
        ax.text(0.5, 0.5, "no lock_stat data (run with stats on)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        n = len(groups)
        width = 0.8 / n
        for j, (label, rs) in enumerate(groups.items()):
            ys = [sum(r.get("locks", {}).get(c, {}).get("wait_ns_total", 0) for r in rs) / len(rs) / 1e6
                  for c in classes]
            ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(classes))], ys, width, label=label)
        ax.set_xticks(range(len(classes)), classes, rotation=20, ha="right")
        ax.set_ylabel("total lock wait (virtual ms)" if _virtual(results) else "total lock wait (ms)")
        ax.set_ylim(bottom=0, top=None if ax.get_ylim()[1] > 0 else 1.0)
        ax.legend(fontsize="small", ncols=1 if n <= 6 else 2)
        ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"lock wait time per lock class ({what})")
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
    pngs = plot_vmrun_rate(results, out / "vmrun_rate.png")
    pngs.append(plot_lock_wait(results, out / "lock_wait.png", [r["run"] for r in rows]))
    md = [f"# {title}", ""]
    if sources:
        md += [f"{len(results)} run(s) from: " + ", ".join(f"`{s}`" for s in sources), ""]
    n_ok = sum(r["verdict"] == "SUCCESS" for r in rows)
    md += [f"{len(rows)} run(s): {n_ok} SUCCESS, {len(rows) - n_ok} FAILURE.", "",
           "Lock wait share = total lock wait / (elapsed × vCPUs); GPs/s counts every RCU/SRCU domain."
           + (" Every run is on the virtual clock: rates are per virtual second, latencies and waits in "
              "virtual time (docs/virtual-time.md)." if _virtual(results) else ""), "",
           markdown_table(rows), "## Plots", ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
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
    results, labels = load_many(list(args.results))  # every file checked before anything is printed
    out = _out_dir(args.out) if args.out else None
    from rich.console import Console

    con = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    if len(results) == 1:
        from vm.results import render

        render(results[0], console=con)
    else:
        con.print(rich_table(summarize(results, labels), title=f"{len(results)} runs"))
    if out is not None:
        written = write_report(results, out, labels, sources=list(args.results))
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return EXIT_OK
