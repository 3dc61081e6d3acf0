"""``launch.py sweep GRID.toml --out DIR [--scheduler tls://HOST:PORT --security F] [--workers N]``: run every point
of a parameter grid as a full ``launch.py run`` on Dask distributed, then merge and report.

GRID.toml::

    [grid]              # Config keys (vm/config.py) -> lists of values; the points are the
    design = ["mirror"] # cartesian product, in the order the keys are written
    vcpus = [1, 2]
    switch_rate = [0, 0.1]
    [fixed]             # optional: single values shared by every point
    duration = 1.0
    seed = 1

Every point is validated (``vm.config.from_dict``) before anything starts; a bad grid is a
``UsageError`` naming the key (exit 2). A point's id is a short stable hash of its full, normalized
Config, so a result always belongs to exactly one configuration.

Each point runs in its own process: ``python <repo>/launch.py run --json DIR/points/<id>.json --quiet
<flags>`` (Config keys as flags, underscores -> dashes; keys without a flag — ``churn_rate``,
``max_nodes``, ``heartbeat_ms``, ``progress`` — go through a ``--scenario DIR/points/<id>.toml``).
The process gets SIGINT when the Dask worker running it dies (PR_SET_PDEATHSIG, set by a small
bootstrap that then execs the command), so closing the cluster never leaves a run behind.

Points go to a ``LocalCluster`` (``--workers`` processes, one thread each, bound to 127.0.0.1, mutual TLS
with credentials made for the run, no dashboard) or, with ``--scheduler`` (lab/scheduler.py), to an existing
scheduler (its workers must see this checkout and DIR at the same paths). A progress bar counts points.

Resumable: a point whose ``points/<id>.json`` exists, parses and has the point's config is skipped.
A point that ends in FAILURE (exit 1, JSON written) is recorded; a point that crashes (no JSON) is
recorded with its exit code and stderr tail, and is retried by the next sweep into DIR.

Outputs in DIR: ``points/<id>.json`` (one per point), ``sweep.json`` (list of the results in grid
order, each with its ``point_id``), ``status.json`` (counts, failed / crashed points, timings),
``report.md`` and PNG plots (:func:`lab.report.write_report`).

Exit code: 0 when every point produced a result and every verdict is SUCCESS; 1 when a point crashed
or ended in FAILURE (everything is still merged and reported); 2 for bad input.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from ipc.errors import UsageError
from ipc.inputs import read_toml
from lab import outputs, report, uncertainty
from lab.scheduler import CONNECT_TIMEOUT_S, connect_error, local_security, probe_scheduler, resolve
from vm.config import CLI_KEYS, Config, from_dict

EXIT_OK, EXIT_FAILURE = 0, 1
MAX_POINTS = 10_000
#: Config keys with a ``launch.py run`` flag
FLAG_KEYS = CLI_KEYS
CONFIG_KEYS = tuple(f.name for f in msgspec.structs.fields(Config))
STDERR_TAIL = 2000  # characters of a crashed point's stderr kept


# -- grid -------------------------------------------------------------------------------------------


class Point(msgspec.Struct):
    point_id: str
    values: dict[str, Any]  # the grid + fixed keys of this point, as written
    config: dict[str, Any]  # the full normalized Config
    varying: dict[str, Any]  # the grid keys only (for display)

    @property
    def desc(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.varying.items()) or "(single point)"


def point_id(cfg: Config) -> str:
    """12 hex digits of the SHA-256 of the normalized config (sorted-key JSON)."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _table(doc: dict, name: str, where: str) -> dict[str, Any]:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise UsageError(f"{where}: {name} must be a table ([{name}])")
    for k in t:
        if k not in CONFIG_KEYS:
            raise UsageError(f"{where}: {name}.{k}: unknown key (Config keys: {', '.join(CONFIG_KEYS)})")
    return t


def parse_grid(doc: dict, where: str = "grid") -> list[Point]:
    """``{"grid": {key: [values]}, "fixed": {key: value}}`` -> validated points (cartesian product)."""
    unknown = sorted(set(doc) - {"grid", "fixed"})
    if unknown:
        raise UsageError(f"{where}: unknown table {unknown[0]!r} (expected [grid] and optional [fixed])")
    if "grid" not in doc and "fixed" not in doc:
        raise UsageError(f"{where}: no [grid] table")
    grid = _table(doc, "grid", where)
    fixed = _table(doc, "fixed", where)
    for k, vals in grid.items():
        if not isinstance(vals, list):
            raise UsageError(f"{where}: grid.{k}: expected a list of values, got {type(vals).__name__} "
                             f"(single values go under [fixed])")
        if not vals:
            raise UsageError(f"{where}: grid.{k}: empty list")
        for v in vals:
            if isinstance(v, list | dict):
                raise UsageError(f"{where}: grid.{k}: expected a list of single values, got {v!r}")
        if len({json.dumps(v) for v in vals}) != len(vals):
            raise UsageError(f"{where}: grid.{k}: duplicate values in {vals!r}")
    for k, v in fixed.items():
        if isinstance(v, list) or (isinstance(v, dict) and k != "prices"):  # prices: a table (ns per name)
            raise UsageError(f"{where}: fixed.{k}: expected a single value, got {v!r} (lists go under [grid])")
        if k in grid:
            raise UsageError(f"{where}: fixed.{k}: also in [grid]")
    if "fuzz" not in grid:
        fixed = {**fixed, "fuzz": fixed.get("fuzz", "off")}  # a sweep measures: no race widening
    if "trace_events" not in grid:
        fixed = {**fixed, "trace_events": fixed.get("trace_events", 0)}  # ... and no trace ring
    n = 1
    for vals in grid.values():
        n *= len(vals)
    if n > MAX_POINTS:
        raise UsageError(f"{where}: grid has {n} points, more than {MAX_POINTS}")
    points: list[Point] = []
    seen: dict[str, Point] = {}
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        varying = dict(zip(keys, combo, strict=True))
        values = {**fixed, **varying}
        try:
            cfg = from_dict(values)
        except UsageError as e:
            msg = str(e)
            key = msg.split(":", 1)[0]
            table = "grid." if key in grid else "fixed." if key in fixed else ""
            ctx = ", ".join(f"{k}={v!r}" for k, v in varying.items())
            raise UsageError(f"{where}: {table}{msg}" + (f" (point {ctx})" if ctx else "")) from None
        pid = point_id(cfg)
        p = Point(pid, values, cfg.to_dict(), varying)
        if pid in seen:
            raise UsageError(f"{where}: points {seen[pid].desc!r} and {p.desc!r} are the same configuration "
                             "(duplicate values, e.g. 0 and 0.0?)")
        seen[pid] = p
        points.append(p)
    return points


def with_clock(doc: dict, clock: str | None, prices: dict | None = None) -> dict:
    """``--clock`` / ``--prices`` of ``sweep``: every point's value, unless the grid varies it."""
    if clock is None and not prices:
        return doc
    grid = doc.get("grid", {}) if isinstance(doc.get("grid", {}), dict) else {}
    fixed = dict(doc.get("fixed", {})) if isinstance(doc.get("fixed", {}), dict) else {}
    if clock is not None and "clock" not in grid:
        fixed["clock"] = clock
    if prices and "prices" not in grid:
        fixed["prices"] = {**fixed.get("prices", {}), **prices}
    return {**doc, "fixed": fixed}


def with_repeats(doc: dict, repeats: int | None, where: str) -> dict:
    """``--repeats N``: every point at seeds seed .. seed+N-1 (seed: the grid's fixed one, else 1)."""
    if not repeats or repeats == 1:
        return doc
    grid = doc.get("grid", {}) if isinstance(doc.get("grid", {}), dict) else {}
    if "seed" in grid:
        raise UsageError(f"{where}: --repeats {repeats}: the grid already lists its seeds (grid.seed); drop one")
    fixed = dict(doc.get("fixed", {})) if isinstance(doc.get("fixed", {}), dict) else {}
    seed = fixed.pop("seed", 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"{where}: fixed.seed: expected an integer, got {seed!r}")
    return {**doc, "grid": {**grid, "seed": [seed + k for k in range(repeats)]}, "fixed": fixed}


def load_grid(path: str, clock: str | None = None, prices: dict | None = None, repeats: int | None = None) -> list[Point]:
    doc = read_toml(path, f"grid file {path}")
    return parse_grid(with_repeats(with_clock(doc, clock, prices), repeats, path), path)


# -- one point --------------------------------------------------------------------------------------


def launch_py() -> Path:
    """launch.py next to the vm package (checkout root, or site-packages after ``pip install``)."""
    p = Path(__file__).resolve().parent.parent / "launch.py"
    if not p.is_file():
        raise UsageError(f"sweep: cannot find launch.py (looked for {p})")
    return p


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):  # an inline table (prices)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def _flag_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def point_command(p: Point, points_dir: Path, launch: Path) -> tuple[list[str], str | None]:
    """(argv, scenario TOML text or None) of a point's ``launch.py run``."""
    cmd = [sys.executable, str(launch), "run", "--json", str(points_dir / f"{p.point_id}.json"), "--quiet"]
    scenario = {}
    if "design" not in p.values:  # a bare `run` is the newcomer's tour (launch.py): name the Config default
        cmd += ["--design", str(p.config["design"])]
    for k in p.values:
        v = p.config[k]  # normalized (an int written for a float key is a float here)
        if k in FLAG_KEYS:
            cmd += [f"--{k.replace('_', '-')}", _flag_value(v)]
        elif k == "stats":
            if not v:
                cmd.append("--no-stats")
        else:
            scenario[k] = v
    if not scenario:
        return cmd, None
    cmd += ["--scenario", str(points_dir / f"{p.point_id}.toml")]
    text = "# written by launch.py sweep\n[config]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in scenario.items())
    return cmd, text


# the child first asks for SIGINT when its parent (the Dask worker thread that started it) dies, then
# becomes the run: SIGINT makes launch.py stop cleanly (KeyboardInterrupt, shm unlinked, exit 130)
_BOOT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT), 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(125)\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT (background job) stays ignored across exec\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def run_point(cmd: list[str], json_path: str, timeout_s: float) -> dict[str, Any]:
    """Run one point (on a Dask worker): returns returncode, stderr tail, wall time and the results
    JSON text (None if the run wrote none). Never raises for a failing run."""
    import os
    import signal
    import subprocess
    import time

    t0 = time.monotonic()
    argv = [cmd[0], "-S", "-c", _BOOT, str(os.getpid()), *cmd]  # -S: the bootstrap needs no site
    try:
        os.unlink(json_path)  # a stale unreadable file must not pass for this run's result
    except FileNotFoundError:
        pass
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    timed_out = False
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGINT)  # clean stop first (the coordinator unlinks its segments)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    text = None
    try:
        with open(json_path) as f:
            text = f.read()
    except OSError:
        pass
    tail = (err or "")[-STDERR_TAIL:]
    if timed_out:
        tail += f"\n[sweep: timed out after {timeout_s:g}s, stopped]"
    return {"returncode": proc.returncode, "stderr_tail": tail, "wall_s": time.monotonic() - t0,
            "json": text, "timed_out": timed_out}


def point_timeout(p: Point) -> float:
    if p.config.get("clock") == "virtual":  # duration is virtual: ~5-60 wall s per virtual s and vCPU
        return 120.0 + 100.0 * float(p.config["duration"]) * int(p.config["vcpus"])
    return 120.0 + 3.0 * float(p.config["duration"]) + 2.0 * int(p.config["vcpus"])


def existing_result(p: Point, points_dir: Path) -> dict | None:
    """The saved result of ``p`` if it parses, has the results shape and the point's config."""
    path = points_dir / f"{p.point_id}.json"
    if not path.is_file():
        return None
    try:
        docs = report.load(path)
    except UsageError:
        return None
    doc = docs[0] if len(docs) == 1 else None
    if doc is None or not isinstance(doc.get("config"), dict):
        return None
    if any(doc["config"].get(k) != v for k, v in p.config.items()):
        return None
    return doc


def _result_from(outcome: dict, p: Point) -> tuple[dict | None, str | None]:
    """(result, None) or (None, why it is not a result)."""
    text = outcome.get("json")
    if text is None:
        return None, f"no results JSON (exit code {outcome.get('returncode')})"
    try:
        doc = report.check(json.loads(text), f"points/{p.point_id}.json")
    except (json.JSONDecodeError, UsageError) as e:
        return None, f"results JSON unusable: {e}"
    return doc, None


# -- the sweep --------------------------------------------------------------------------------------


def _out_dir(out: str) -> Path:
    p = outputs.check_out_dir(out, "--out")  # a directory, writable, with room; created if missing
    try:
        (p / "points").mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out}/points: {e.strerror}") from None
    return p


class _Lock:
    """An exclusive flock on DIR/.sweep.lock: two sweeps never write one directory."""

    def __init__(self, out: Path):
        self.fd = os.open(out / ".sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"--out: another sweep is running in {out}") from None

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _write_json(path: Path, doc: Any, what: str | None = None) -> None:  # a failed write: rescued, named
    outputs.write_atomic(path, json.dumps(doc, indent=2) + "\n", what=what or f"the {path.name} document")


def _client(scheduler: str | None, workers: int, scratch: str, by_value=None, connect_timeout=CONNECT_TIMEOUT_S,
            security=None):
    """(client, cluster or None, start seconds). ``by_value``: the module whose functions the tasks
    run, pickled by value for a remote scheduler (default: this one); ``security``: that scheduler's
    (``lab.scheduler.resolve``). The LocalCluster makes its own (``local_security``)."""
    from distributed import Client, LocalCluster

    t0 = time.monotonic()
    if scheduler:
        import cloudpickle

        cloudpickle.register_pickle_by_value(by_value or sys.modules[__name__])  # workers need not import vm
        try:
            client = Client(scheduler, timeout=f"{connect_timeout:g}s", security=security)
        except Exception as e:  # noqa: BLE001 (refused, timed out, or not a Dask scheduler: garbage frames)
            raise connect_error(scheduler, e) from None
        return client, None, time.monotonic() - t0
    # no dashboard; the HTTP server a scheduler always starts gets no routes (dask config set by the caller)
    # and a random loopback port; every listener is tls:// wanting this run's client cert (issue 21)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           protocol="tls", security=(sec := local_security()),
                           dashboard_address=None, worker_dashboard_address=None,
                           scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                           silence_logs=logging.ERROR, local_directory=scratch, memory_limit=0)
    try:
        client = Client(cluster, security=sec)
    except BaseException:
        cluster.close()
        raise
    return client, cluster, time.monotonic() - t0


def run_points(todo: list[Point], out: Path, *, scheduler: str | None, workers: int,
               console, connect_timeout: float = CONNECT_TIMEOUT_S,
               security=None) -> tuple[dict[str, dict], dict[str, dict], float]:
    """Run ``todo`` on Dask; returns (outcomes by point id, results by point id, cluster start s)."""
    from distributed import as_completed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    points_dir = out / "points"
    launch = launch_py()
    cmds = {}
    for p in todo:
        cmd, scenario = point_command(p, points_dir, launch)
        if scenario is not None:
            (points_dir / f"{p.point_id}.toml").write_text(scenario)
        cmds[p.point_id] = cmd
    by_id = {p.point_id: p for p in todo}
    outcomes: dict[str, dict] = {}
    results: dict[str, dict] = {}
    import dask

    from ipc import safe_delete

    scratch = safe_delete.make_owned_dir("pagetrack-sweep-dask-")  # its marker: clean knows a killed sweep's
    try:
        with dask.config.set({"temporary-directory": scratch, "distributed.scheduler.http.routes": [],
                              "distributed.worker.http.routes": []}):
            client, cluster, start_s = _client(scheduler, workers, scratch, connect_timeout=connect_timeout,
                                               security=security)
            try:
                futs = {}
                for p in todo:
                    f = client.submit(run_point, cmds[p.point_id], str(points_dir / f"{p.point_id}.json"),
                                      point_timeout(p), key=f"point-{p.point_id}", pure=False, retries=0)
                    futs[f] = p.point_id
                with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=console, transient=False) as prog:
                    task = prog.add_task("points", total=len(todo))
                    for fut in as_completed(list(futs)):
                        pid = futs[fut]
                        outcomes[pid], doc = _collect(fut, by_id[pid], points_dir, prog.console)
                        if doc is not None:
                            results[pid] = doc
                        prog.advance(task)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        safe_delete.remove_quietly(scratch, marker=True, shared_root=True)  # never through a link (issue 21)
    return outcomes, results, start_s


def _collect(fut, p: Point, points_dir: Path, console) -> tuple[dict, dict | None]:
    """(outcome record, result document or None) of a finished point future; prints one line."""
    try:
        oc = fut.result()
        doc, why = _result_from(oc, p)
    except Exception as e:  # the task itself failed (its worker died, ...)
        oc = {"returncode": None, "stderr_tail": "", "wall_s": None, "timed_out": False}
        doc, why = None, f"task failed: {type(e).__name__}: {e}"
    oc.pop("json", None)
    path = points_dir / f"{p.point_id}.json"
    if doc is not None:
        if not path.is_file():  # the worker wrote it on another file system
            try:
                _write_json(path, doc, f"the result of point {p.point_id}")
            except outputs.OutputError as e:  # kept in memory: merged into sweep.json all the same
                console.print(str(e), markup=False, highlight=False)
        style = "green" if doc["verdict"] == "SUCCESS" else "bold red"
        console.print(f"{p.point_id} {p.desc}: [{style}]{doc['verdict']}[/] ({oc['wall_s']:.1f}s)", highlight=False)
    else:
        console.print(f"{p.point_id} {p.desc}: [bold red]CRASHED[/] {why}", highlight=False)
    return {**oc, "error": why}, doc


def main(args) -> int:
    from vm.config import clock_values

    cv = clock_values(getattr(args, "clock", None), getattr(args, "prices", None))
    points = load_grid(args.grid, cv.get("clock"), cv.get("prices"),  # everything validated before anything starts
                       getattr(args, "repeats", None))
    scheduler, security = resolve(args)  # tcp:// only with --insecure; the --security files checked
    connect_timeout = float(getattr(args, "connect_timeout", None) or CONNECT_TIMEOUT_S)
    workers = int(args.workers or 1)
    if scheduler:
        probe_scheduler(scheduler, connect_timeout, security)  # an unreachable scheduler: before --out gets a file
    out = _out_dir(args.out)
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    lock = _Lock(out)
    old = _sigterm_interrupts()
    try:
        return _sweep(points, out, scheduler, workers, console, args.grid, connect_timeout, security)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        lock.release()


def _sigterm_interrupts():
    """SIGTERM -> KeyboardInterrupt, so ``kill`` also closes the cluster (and with it every run)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _sweep(points: list[Point], out: Path, scheduler: str | None, workers: int, console, grid_path: str,
           connect_timeout: float = CONNECT_TIMEOUT_S, security=None) -> int:
    t0 = time.monotonic()
    points_dir = out / "points"
    done = {p.point_id: d for p in points if (d := existing_result(p, points_dir)) is not None}
    todo = [p for p in points if p.point_id not in done]
    console.print(f"sweep {grid_path}: {len(points)} point(s); {len(done)} already done (skipped), "
                  f"{len(todo)} to run" + (f" on {scheduler}" if scheduler and todo else
                                           f" on a LocalCluster of {workers} worker(s)" if todo else "")
                  + " (trace ring off unless the grid sets trace_events)",
                  highlight=False)
    outcomes: dict[str, dict] = {}
    start_s = 0.0
    if todo:
        outcomes, ran, start_s = run_points(todo, out, scheduler=scheduler, workers=workers, console=console,
                                            connect_timeout=connect_timeout, security=security)
        done.update(ran)
    results, crashed, failed = [], [], []
    for p in points:
        doc = done.get(p.point_id)
        if doc is None:
            oc = outcomes.get(p.point_id, {})
            crashed.append({"point_id": p.point_id, "point": p.values, "returncode": oc.get("returncode"),
                            "error": oc.get("error"), "stderr_tail": oc.get("stderr_tail", "")})
            continue
        results.append({**doc, "point_id": p.point_id})
        if doc["verdict"] != "SUCCESS":
            failed.append(p.point_id)
    walls = [(oc["wall_s"], done[pid]["elapsed_s"]) for pid, oc in outcomes.items()
             if oc.get("wall_s") is not None and pid in done]
    overhead = (sum(w - e for w, e in walls) / len(walls)) if walls else None
    status = {
        "grid": str(grid_path), "points": len(points), "skipped": len(points) - len(todo), "ran": len(todo),
        "results": len(results), "success": len(results) - len(failed), "failed": failed, "crashed": crashed,
        "scheduler": scheduler or f"LocalCluster({workers})", "cluster_start_s": round(start_s, 3),
        "wall_s": round(time.monotonic() - t0, 3),
        "mean_point_wall_s": round(sum(w for w, _ in walls) / len(walls), 3) if walls else None,
        "mean_point_overhead_s": round(overhead, 3) if overhead is not None else None,
        "point_ids": [p.point_id for p in points],
        "interference": (flags := uncertainty.interference(results)),
    }
    lost = []
    for name, doc, what in (("sweep.json", results, f"the merged results of {len(results)} point(s)"),
                            ("status.json", status, "the sweep status (counts, crashed points, timings)")):
        try:
            _write_json(out / name, doc, what)
        except outputs.OutputError as e:  # a full disk: still try the other one, then stop
            lost.append(str(e))
    if lost:
        raise outputs.OutputError("; ".join(lost) + "; report.md not written")
    extra = [f"Sweep of `{grid_path}`: {len(points)} point(s), {status['skipped']} resumed from earlier "
             f"results, {status['ran']} run now; {len(crashed)} crashed."]
    if overhead is not None:
        extra.append(f"Mean wall time per point {status['mean_point_wall_s']:.2f}s, of which "
                     f"{overhead:.2f}s overhead (process start, setup, teardown, Dask).")
    over_seeds = uncertainty.seed_table(results)
    if over_seeds:
        extra += ["", over_seeds]
    if flags:
        extra += ["", uncertainty.interference_md(flags)]
    if crashed:
        extra += ["", "## Crashed points (no result)", ""]
        extra += [f"- `{c['point_id']}` {c['point']}: {c['error']}" for c in crashed]
    report.write_report(results, out, title="pagetrack-sim sweep",
                        extra_md="\n".join(extra))
    summary = (f"sweep: {len(results)}/{len(points)} point(s) with results ({status['success']} SUCCESS, "
               f"{len(failed)} FAILURE), {len(crashed)} crashed; {status['skipped']} skipped")
    if overhead is not None:
        summary += (f"; per point {status['mean_point_wall_s']:.2f}s wall, {overhead:.2f}s overhead; "
                    f"cluster start {start_s:.2f}s")
    if flags:
        summary += (f"; [yellow]host interference flagged on {len(flags)} run(s)/point(s)[/] (status.json "
                    "'interference', report.md)")
    console.print(summary, highlight=False)
    for c in crashed:
        console.print(f"[red]crashed[/] {c['point_id']} {c['point']}: {c['error']}", highlight=False)
        tail = [ln for ln in (c["stderr_tail"] or "").strip().splitlines() if ln.strip()][-5:]
        for ln in tail:
            console.print(f"    {ln}", markup=False, highlight=False)
    console.print(f"wrote {out / 'sweep.json'}, {out / 'status.json'}, {out / 'report.md'}", highlight=False)
    return EXIT_OK if not crashed and not failed else EXIT_FAILURE
