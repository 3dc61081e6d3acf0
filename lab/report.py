"""``launch.py report RESULTS.json... [--out DIR]``: re-render tables and plots from saved results.

Input: results documents as ``launch.py run --json`` writes them (shape: :mod:`vm.results`), a
JSON list of them (``sweep.json``) or a ``compare.json`` (its runs, then its verdicts; a map.json
goes to lab/map.py, lab/rerender.py dispatches). One run: the usual run summary
(:func:`vm.results.render`); several: a comparison table, one row per run, named by what tells it
apart (lab/labels.py). ``--out DIR`` also writes ``report.md`` (markdown table) and PNG plots.

Reusable pieces (``compare`` and ``sweep`` use them), all taking a list of result dicts:

* :func:`load` / :func:`check` — read and shape-check documents (``UsageError`` naming the file);
* :func:`summarize` -> rows (plain dicts of numbers), :func:`markdown_table`, :func:`rich_table`;
* :func:`write_report` — report.md + the plots (lab/plots.py) into a directory.

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
from pathlib import Path
from typing import Any, Literal

import msgspec

from ipc.errors import UsageError
from ipc.messages import printable
from lab.labels import run_labels, run_name, unique_labels
from lab.outputs import write_atomic
from lab.plots import is_virtual, plot_lock_wait, plot_vmrun_rate, vmrun_plot_note
from vm.results import fmt_ns

__all__ = ["plot_lock_wait", "plot_vmrun_rate", "run_labels", "unique_labels"]  # re-exported (lab/labels.py, lab/plots.py)

EXIT_OK = 0

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


def load_many(paths: list[str], parsed: dict[str, Any] | None = None) -> tuple[list[dict], list[str]]:
    """All documents of ``paths`` (``parsed``: their JSON, already read) and a label for each: the
    file's stem for a one-run file, and for a file of several runs (sweep.json, compare.json) what
    tells its runs apart (:func:`run_labels`), after the stem when several files are given."""
    results, labels = [], []
    for path in paths:
        docs = _shape(parsed[path], Path(path)) if parsed is not None else load(path)
        stem = Path(path).stem
        results += docs
        if len(docs) == 1:
            labels.append(stem)
        else:
            labels += [lab if len(paths) == 1 else f"{stem}: {lab}"
                       for lab in run_labels(docs, skip=_COLUMN_KEYS, number=False)]
    return results, labels


# -- table ------------------------------------------------------------------------------------------


_COLUMN_KEYS = ("design", "registration", "vcpus", "switch_rate")  # config keys the table shows as columns


def summarize(results: list[dict], labels: list[str] | None = None) -> list[dict]:
    """One row per run: ``run, design, registration, vcpus, switch_rate, seed, vmrun_per_s,
    writes_per_s, vmrun_p99_ns, lock_wait_share, gp_per_s, verdict`` (numbers unformatted).
    ``run`` is ``labels[i]``, else what tells the run apart beyond the table's design / registration /
    vCPUs / switch rate columns (:func:`run_labels`: clock, dilation, table writes, seed, ...); a lone
    run: its run id."""
    if labels is None:
        labels = (run_labels(results, skip=_COLUMN_KEYS, number=False) if len(results) > 1
                  else [run_name(results[0], 0)] if results else [])
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


# -- report.md --------------------------------------------------------------------------------------


def write_report(results: list[dict], out_dir: str | Path, labels: list[str] | None = None, *,
                 title: str = "pagetrack-sim report", sources: list[str] | None = None,
                 extra_md: str = "", verdict_md: str = "") -> list[Path]:
    """``report.md`` (``verdict_md`` first — the answer before the evidence —, then the table, plots,
    FAILURE reasons, ``extra_md``) and the PNG plots into ``out_dir`` (created). Returns the written
    paths, report.md first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, labels)
    vmrun_pngs = plot_vmrun_rate(results, out / "vmrun_rate.png")
    pngs = [*vmrun_pngs, plot_lock_wait(results, out / "lock_wait.png", [r["run"] for r in rows])]
    md = [f"# {title}", ""]
    if verdict_md:
        md += [verdict_md.rstrip("\n"), "", "## The runs", ""]
    if sources:
        md += [f"{len(results)} run(s) from: " + ", ".join(f"`{s}`" for s in sources), ""]
    n_ok = sum(r["verdict"] == "SUCCESS" for r in rows)
    md += [f"{len(rows)} run(s): {n_ok} SUCCESS, {len(rows) - n_ok} FAILURE.", "",
           "Lock wait share = total lock wait / (elapsed × vCPUs); GPs/s counts every RCU/SRCU domain."
           + (" Every run is on the virtual clock: rates are per virtual second, latencies and waits in "
              "virtual time (docs/virtual-time.md)." if is_virtual(results) else ""), "",
           markdown_table(rows), "## Plots", ""]
    note = vmrun_plot_note(results, vmrun_pngs)  # why a vmrun plot is missing, if one is
    md += [f"![{p.stem}]({p.name})" for p in pngs] + (["", note] if note else []) + [""]
    failed = [(row["run"], r) for row, r in zip(rows, results, strict=True) if r["verdict"] != "SUCCESS"]
    if failed:
        md += ["## FAILURE reasons", ""]
        md += [f"- **{label}**: " + printable(("; ".join(r.get("reasons", [])) or "(no reason recorded)").replace("\n", " "))
               for label, r in failed]
        md.append("")
    if extra_md:
        md += [extra_md.rstrip("\n"), ""]
    report = out / "report.md"
    write_atomic(report, "\n".join(md), what="the report (tables, verdicts, FAILURE reasons)")
    return [report, *pngs]


def _out_dir(out: str) -> Path:
    from lab.outputs import check_out_dir

    return check_out_dir(out, "--out")  # a writable directory with room (created if missing), else UsageError


def read_all(paths: list[str]) -> dict[str, Any]:
    """Every file's parsed JSON, each read once (``UsageError`` naming a file that cannot be)."""
    return {p: read_json(Path(p)) for p in paths}


def special_file(paths: list[str], parsed: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, path) when ``paths`` (their JSON in ``parsed``) is one compare.json or map.json, else
    None; either among other files (or twice) -> UsageError (each is re-rendered alone)."""
    special = [(kind_of(parsed[p]), p) for p in paths if kind_of(parsed[p]) != "runs"]
    if special and len(paths) > 1:
        p = special[0][1]
        raise UsageError(f"{p}: a {Path(p).name} is re-rendered alone (give it as the only file)")
    return special[0] if special else None


def main(args, parsed: dict[str, Any] | None = None) -> int:
    """``launch.py report`` for runs and compare.json (a map.json: lab.map.rerender, lab/rerender.py);
    ``parsed``: the files' JSON if already read."""
    paths = list(args.results)
    parsed = read_all(paths) if parsed is None else parsed
    kind_path = special_file(paths, parsed)
    if kind_path and kind_path[0] == "map":
        raise UsageError(f"{kind_path[1]}: a map.json is re-rendered by lab.map.rerender (launch.py report)")
    results, labels = load_many(paths, parsed)  # every file checked before anything is printed
    out = _out_dir(args.out) if args.out else None
    from rich.console import Console

    con = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    # a compare.json: its runs' table, then the verdicts as they were written
    assessment = str(parsed[kind_path[1]].get("assessment", "")) if kind_path else ""
    if len(results) == 1 and not kind_path:
        from vm.results import render

        render(results[0], console=con)
    else:
        con.print(rich_table(summarize(results, labels), title=("compare: " if kind_path else "")
                             + f"{len(results)} runs"))
    if assessment:
        con.print(assessment, markup=False, highlight=False)
    if out is not None:
        written = write_report(results, out, labels, sources=paths, verdict_md=assessment,
                               **({"title": "pagetrack-sim compare: nested AVIC designs"} if kind_path else {}))
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return EXIT_OK
