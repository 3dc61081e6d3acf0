"""The torture harness, flavor-blind (kernel/torture.c's part of rcutorture and locktorture).

``python launch.py torture {rcu,srcu,spinlock,mutex} --procs N --duration S [--inject ...]``

Every participant is a real OS process (forkserver workers); everything they share lives in one
segment ``pts_<run>_torture`` that this (coordinating) process creates and unlinks. Here: the
parameter checks, the segment (control block + the kind's fields), starting the workers and the
start barrier, the stats loop every ``stat_interval``, stopping and reaping, the verdict
(``SUCCESS`` / ``FAILURE`` with the reasons), the results document and its JSON file. What a kind
does comes from its entry in ``kinds.TORTURE_TYPES``.

``--inject`` breaks the primitive on purpose and the run must end in FAILURE (the harness'
self-test): ``broken-gp`` (synchronize does not wait), ``gp-single-flip``, ``gp-skip-alternate``,
``gp-share-early`` (a grace period with one subtle bug, ``gpbugs``) for rcu/srcu, ``busted-lock``
(a lock that does not lock) for spinlock/mutex; ``kinds.INJECTS`` lists them.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import signal
import sys
import time
import traceback
from typing import Any, TextIO

import numpy as np

from ipc import _prims
from ipc.errors import UsageError
from ipc.outputs import write_atomic
from ipc.proc import die_with_parent, forkserver_context, reap, sigterm_to_exit
from ipc.shm import Layout, Region, ShmError
from ipc.torture.base import CTL_GO, CTL_READY, CTL_START, CTL_STOP
from ipc.torture.kinds import INJECTS, KINDS, TORTURE_TYPES
from ipc.torture.rcutorture import NFAKEWRITERS

MAX_PROCS = 256
SCHEMA = 1
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# what the forkserver imports once: this module (``_worker_main``) and, through kinds, every
# kind's workers
PRELOAD = ["ipc.torture.core"]

_run_counter = itertools.count(1)


# ------------------------------------------------------------------------------------ config

def _check_params(kind: str, procs: int, duration: float, seed: int, inject: str | None,
                  stat_interval: float, json_path: str | None, nfakewriters: int) -> None:
    if kind not in KINDS:
        raise UsageError(f"torture: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if isinstance(procs, bool) or not isinstance(procs, int) or not 1 <= procs <= MAX_PROCS:
        raise UsageError(f"torture: --procs must be in 1..{MAX_PROCS}, got {procs!r}")
    if not isinstance(duration, int | float) or not duration > 0 or duration != duration:
        raise UsageError(f"torture: --duration must be > 0 seconds, got {duration!r}")
    if not isinstance(stat_interval, int | float) or not stat_interval > 0:
        raise UsageError(f"torture: --stat-interval must be > 0 seconds, got {stat_interval!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UsageError(f"torture: --seed must be in 0..2**63-1, got {seed!r}")
    if not isinstance(nfakewriters, int) or not 0 <= nfakewriters <= 64:
        raise UsageError(f"torture: nfakewriters must be in 0..64, got {nfakewriters!r}")
    if inject is not None:
        if inject not in INJECTS:
            raise UsageError(f"torture: unknown --inject {inject!r} (choose from {', '.join(INJECTS)})")
        if kind not in INJECTS[inject]:
            raise UsageError(f"torture: --inject {inject} applies to {'/'.join(INJECTS[inject])}, "
                             f"not {kind}")
        TORTURE_TYPES[kind].check_inject(procs, inject)
    if json_path is not None:
        if os.path.isdir(json_path):
            raise UsageError(f"torture: --json {json_path}: is a directory")
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent):
            raise UsageError(f"torture: --json {json_path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"torture: --json {json_path}: directory {parent} is not writable")


def _layout(cfg: dict) -> Layout:
    return Layout("torture", [
        ("ctl", "i8", (8,)),
        *TORTURE_TYPES[cfg["kind"]].fields(cfg),
    ])


def _init_region(region: Region, cfg: dict) -> None:
    v = region.v
    for name in v:
        v[name][...] = 0
    TORTURE_TYPES[cfg["kind"]].init(region, cfg)


# ------------------------------------------------------------------------------------ workers

def _worker_main(run_id: str, cfg: dict, role: str, index: int) -> None:
    """Entry point of every torture process (runs in a forkserver child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C and stops us
    sigterm_to_exit()
    die_with_parent()
    region = Region.attach(run_id, _layout(cfg))
    try:
        TORTURE_TYPES[cfg["kind"]].run(role, region, cfg, index)
    except BaseException as e:
        # drop the numpy views / C objects those frames hold: nothing may outlive the mapping
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        gc.collect()
        try:
            region.close()
        except BufferError:
            pass  # an export survived: the mapping goes with the process


# ------------------------------------------------------------------------------------ coordinator

def _new_run_id() -> str:
    return f"tt{os.getpid()}n{next(_run_counter)}"


def _create_region(layout: Layout) -> tuple[str, Region]:
    for _ in range(5):
        run_id = _new_run_id()
        try:
            return run_id, Region.create(run_id, layout)
        except ShmError as e:
            if "already exists" not in str(e):
                raise
            last = e
    raise last


def _params_str(cfg: dict) -> str:
    who = TORTURE_TYPES[cfg["kind"]].who(cfg)
    return (f"torture_type={cfg['kind']} {who} stat_interval={cfg['stat_interval']:g} "
            f"duration={cfg['duration']:g} seed={cfg['seed']} inject={cfg['inject'] or 'none'}")


def _write_json(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n", what="the torture results", flag="--json")


def run_torture(kind: str, procs: int, duration: float, seed: int = 1, inject: str | None = None,
                stat_interval: float = 1.0, json_path: str | None = None, out: TextIO | None = None,
                nfakewriters: int = NFAKEWRITERS) -> dict[str, Any]:
    """Run one torture test; returns the results document (``doc["verdict"]`` is ``"SUCCESS"`` or
    ``"FAILURE"``, ``doc["reasons"]`` says why). Raises :class:`UsageError` on bad parameters."""
    _check_params(kind, procs, duration, seed, inject, stat_interval, json_path, nfakewriters)
    out = sys.stdout if out is None else out
    cfg = {
        "kind": kind, "procs": procs, "duration": float(duration), "seed": seed, "inject": inject,
        "stat_interval": float(stat_interval),
    }
    cfg.update(TORTURE_TYPES[kind].params(procs, nfakewriters))
    tag = f"{kind}-torture"

    muted = False

    def emit(line: str) -> None:
        nonlocal muted
        if muted:
            return
        try:
            print(line, file=out, flush=True)
        except BrokenPipeError:  # `... | head`: keep running (and cleaning up) silently
            muted = True
            if out is sys.stdout:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    layout = _layout(cfg)
    run_id, region = _create_region(layout)
    procs_list: list = []
    names: list[str] = []
    try:
        _init_region(region, cfg)
        emit(f"{tag}:--- Start of test: {_params_str(cfg)} run_id={run_id}")
        ctx = forkserver_context(PRELOAD)
        for name, role, index in TORTURE_TYPES[kind].workers(cfg):
            p = ctx.Process(target=_worker_main, args=(run_id, cfg, role, index),
                            name=f"{tag} {name}", daemon=True)
            p.start()
            procs_list.append(p)
            names.append(name)
        doc = _drive(region, procs_list, names, cfg, tag, emit)
        doc["run_id"] = run_id
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # drop numpy views held by the frames
        raise
    finally:
        if not region.closed:
            mem = region.mem
            mem.store(region.word("ctl") + CTL_STOP, 1)
            mem.store(region.word("ctl") + CTL_GO, 1)
            mem.futex_wake(region.word("ctl") + CTL_GO)
        reap(procs_list, STOP_TIMEOUT_S)
        region.close()
    if json_path is not None:
        _write_json(json_path, doc)
    return doc


def _drive(region: Region, procs: list, names: list[str], cfg: dict, tag: str, emit) -> dict:
    """Start the workers, print stats every stat_interval, stop them, collect, judge."""
    mem = region.mem
    ctl_w = region.word("ctl")
    tt = TORTURE_TYPES[cfg["kind"]]
    reasons: list[str] = []
    warnings: list[str] = []
    intervals: list[dict] = []

    def dead() -> list[str]:
        return [f"{n} exited with code {p.exitcode}" for n, p in zip(names, procs, strict=True)
                if p.exitcode is not None]

    # start barrier: every worker attached and waiting
    deadline = time.monotonic() + START_TIMEOUT_S
    started = True
    while mem.load(ctl_w + CTL_READY) < len(procs):
        d = dead()
        if d or time.monotonic() > deadline:
            reasons += [f"{x} before the start" for x in d] or [
                f"workers not ready after {START_TIMEOUT_S:g} s"]
            started = False
            break
        time.sleep(0.002)
    t0 = _prims.now_ns()
    mem.store(ctl_w + CTL_START, t0)
    mem.store(ctl_w + CTL_GO, 1)
    mem.futex_wake(ctl_w + CTL_GO)
    end = t0 + int(cfg["duration"] * 1e9)
    step = int(cfg["stat_interval"] * 1e9)
    next_stat = t0 + step
    while started:
        now = _prims.now_ns()
        if now >= end:
            break
        d = dead()
        if d:
            reasons += [f"{x} during the run" for x in d]
            break
        if now >= next_stat:
            next_stat += step
            t_s = round((now - t0) / 1e9, 3)
            intervals.append(tt.interval(region, cfg, tag, emit, warnings, t_s, intervals))
        time.sleep(min(0.02, max(0.0, (min(end, next_stat) - now) / 1e9)))
    t_stop = _prims.now_ns()
    mem.store(ctl_w + CTL_STOP, 1)
    codes = reap(procs, STOP_TIMEOUT_S)
    for n, c in zip(names, codes, strict=True):
        if c != 0 and not any(r.startswith(f"{n} exited") for r in reasons):
            reasons.append(f"{n} exited with code {c}" if c is not None else f"{n} did not stop")
    elapsed = max(1e-9, (t_stop - t0) / 1e9)

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "tool": "pagetrack-sim torture",
        "kind": cfg["kind"],
        "params": dict(cfg),
        "elapsed_s": round(elapsed, 6),
    }
    doc.update(tt.report(region, cfg, started, elapsed, reasons, warnings, tag, emit))
    doc["intervals"] = intervals
    doc["warnings"] = warnings
    doc["verdict"] = "FAILURE" if reasons else "SUCCESS"
    doc["reasons"] = reasons
    doc["versions"] = {"python": platform.python_version(), "numpy": np.__version__,
                       "platform": platform.platform(), "cpus": os.cpu_count()}
    for w in warnings:
        emit(f"{tag}: warning: {w}")
    if reasons:
        emit(f"{tag}:--- End of test: FAILURE ({'; '.join(reasons)}): {_params_str(cfg)}")
    else:
        emit(f"{tag}:--- End of test: SUCCESS: {_params_str(cfg)}")
    return doc


def main(args) -> int:
    """``launch.py torture``: 0 SUCCESS, 1 FAILURE (bad input raises UsageError -> 2)."""
    doc = run_torture(args.kind, args.procs, args.duration, seed=args.seed, inject=args.inject,
                      stat_interval=args.stat_interval, json_path=args.json)
    return 0 if doc["verdict"] == "SUCCESS" else 1
