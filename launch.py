#!/usr/bin/env python3
"""pagetrack-sim command line: torture, run, compare, scenario, explore, replay, clean, report, chaos, sweep.

Thin composition root: parses and validates arguments, then calls vm/ (and ipc/ for torture).
Bad input ends with a one-line error and exit code 2; SUCCESS exits 0, FAILURE 1. Every output
location (--json, --trace, --out) is input too: checked before anything starts (ipc/outputs.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ipc.errors import UsageError
from vm.hooks import HOOKS  # (no imports of its own: --help stays cheap)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
WORKLOAD_NAMES = ("realistic", "heavy")  # vm/workloads.py (kept here: --help needs no vm import)
MAX_PROCS = 256
MAX_DURATION_S = 24 * 3600.0


class _Version(argparse.Action):  # --version: read when asked (not at every start-up): this checkout's
    def __call__(self, parser, namespace, values, option_string=None):  # pyproject.toml, else installed
        import tomllib
        from importlib import metadata

        try:
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
                v = str(tomllib.load(f)["project"]["version"])
        except (OSError, ValueError, KeyError):
            try:
                v = metadata.version("pagetrack-sim")
            except metadata.PackageNotFoundError:
                v = "unknown"
        print(f"pagetrack-sim {v}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the full usage otherwise)
        raise UsageError(f"{self.prog}: {message}")


def int_range(lo: int, hi: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be in {lo}..{hi}, got {v}")
        return v

    return parse


def float_range(lo: float, hi: float, what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {s!r}") from None
        if not (lo <= v <= hi) or v != v:
            raise argparse.ArgumentTypeError(f"{what} must be in {lo:g}..{hi:g}, got {s}")
        return v

    return parse


def int_list(lo: int, hi: int, what: str):
    one = int_range(lo, hi, what)

    def parse(s: str) -> list[int]:
        vals = [one(x) for x in s.split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        return vals

    return parse


def float_list(lo: float, hi: float, what: str):
    one = float_range(lo, hi, what)

    def parse(s: str) -> list[float]:
        vals = [one(x) for x in s.split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        return vals

    return parse


HOOK_HELP = ("bugs break the kernel code on purpose (the run is meant to end in FAILURE), widenings widen a race "
             "window (a correct design still ends in SUCCESS): " + ", ".join(
                 f"{k} ({'widening' if v.startswith('widening') else 'bug'})" for k, v in sorted(HOOKS.items()))
             + " (repeatable; docs/success.md lists what each does and how often it fails in 1 s)")
SEED = int_range(0, 2**63 - 1, "--seed")
DURATION = float_range(0.001, MAX_DURATION_S, "--duration")  # real clock: >= 0.05 (vm/config.py)


def dilate_arg(s: str) -> str | float:
    """``--dilate auto|off|N`` (N >= 1)."""
    if s in ("auto", "off"):
        return s
    v = float_range(1, 10000, "--dilate")(s)
    return "off" if v == 1 else v


REPLAY_EXITS = ("exit codes: 0 SUCCESS (no longer fails); 1 FAILURE (the code's failure); 2 bad input, one line: "
                "unreadable, edited (its [schedule] hash does not match its body), an unknown hook, vcpus that disagree "
                "with the programs, steps after the failing one, max_steps below the failing step, or a schedule the "
                "code no longer follows (the code changed); 3 STEP-BOUND (the replay reached its step bound: no "
                "verdict on the code); 4 STOPPED (a vCPU process stopped from outside, e.g. SIGSTOP, died or hung)")
REGISTRATION_CHOICES = ["refcount", "bool", "naive", "split", "node-refcount"]


FIDELITY_KEYS = ("mmio_walk", "page_track", "redundant_registration", "split_warn", "avic_vmrun_lock",
                 "indirect_shadow_pages", "entry_update")


def _add_page_track_args(p: argparse.ArgumentParser) -> None:
    """Page-track fidelity options (run and scenario); None = not given (the config default)."""
    p.add_argument("--mmio-walk", dest="mmio_walk", action="store_const", const=True, default=None,
                   help="MMIO writes walk the notifier list too (Maxim's line in the seed; default off, as in "
                        "x86.c emulator_write_phys)")
    p.add_argument("--page-track", dest="page_track", choices=["v6.0", "v6.6"], default=None,
                   help="page-track API era: v6.0 registers KVM's own kvm_mmu_pte_write node at VM creation "
                        "(default v6.0)")
    p.add_argument("--redundant-registration", dest="redundant_registration", choices=["warn", "mainline"],
                   default=None,
                   help="registering a node already on the list: WARN and refuse (default), or mainline's "
                        "second hlist_add_head_rcu (a cycle)")
    p.add_argument("--split-warn", dest="split_warn", choices=["on", "off"], default=None,
                   help="split: WARN when a notifier is registered while write tracking is off (default on)")
    p.add_argument("--avic-vmrun-lock", dest="avic_vmrun_lock", choices=["change", "every"], default=None,
                   help="mutex-hash / per-table-notifier nested VMRUN takes tables_lock only when the table "
                        "changes or needs a sync (RFC v3, default) or on every VMRUN")
    p.add_argument("--indirect-shadow-pages", dest="indirect_shadow_pages", choices=["auto", "0"], default=None,
                   help="KVM's own write handler takes mmu_lock for write on every emulated RAM write once L2 "
                        "has run (auto: nested NPT makes indirect shadow pages, default) or never (0)")
    p.add_argument("--entry-update", dest="entry_update", choices=["reread", "gentry"], default=None,
                   help="a physid entry update re-reads guest memory (default) or applies the written bytes "
                        "to the cached entry (RFC v3: concurrent writers can lose a write)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Run options; None = not given (a scenario file or the default decides)."""
    from vm.config import MAX_VCPUS

    p.add_argument("--vcpus", type=int_range(1, MAX_VCPUS, "--vcpus"), help="vCPU processes (default 2)")
    p.add_argument("--duration", type=DURATION, help="seconds (default 2)")
    p.add_argument("--seed", type=SEED, help="run seed (default 1)")
    p.add_argument("--design", choices=["mirror", "mutex-hash", "rcu-list", "per-table-notifier"],
                   help="nested AVIC design (default mirror: no AVIC, a mirror notifier)")
    p.add_argument("--registration", choices=REGISTRATION_CHOICES,
                   help="notifier registration variant (default refcount)")
    p.add_argument("--l2s", type=int_range(1, 64, "--l2s"), help="L2 VMs per L1 (default 4)")
    p.add_argument("--switch-rate", dest="switch_rate", type=float_range(0, 1, "--switch-rate"),
                   help="probability L1 switches L2 at a VMEXIT (default 0.1)")
    p.add_argument("--policy", choices=["sticky", "round-robin", "random"], help="L2 selection (default random)")
    p.add_argument("--guest-time-us", dest="guest_time_us", type=float_range(0, 1e6, "--guest-time-us"),
                   help="L2 run time per VMRUN (default 20)")
    p.add_argument("--writes-per-exit", dest="writes_per_exit", type=int_range(0, 10000, "--writes-per-exit"),
                   help="L1 guest writes between VMRUNs (default 8)")
    p.add_argument("--tracked-fraction", dest="tracked_fraction", type=float_range(0, 1, "--tracked-fraction"))
    p.add_argument("--mmio-fraction", dest="mmio_fraction", type=float_range(0, 1, "--mmio-fraction"))
    p.add_argument("--table-invalidate-fraction", dest="table_invalidate_fraction",
                   type=float_range(0, 1, "--table-invalidate-fraction"),
                   help="share of L1's physid table writes that change a backing page or Valid bit and "
                        "erase the table (default 0.001; vm/workloads.py)")
    p.add_argument("--tracked-pages", dest="tracked_pages", type=int_range(0, 4096, "--tracked-pages"))
    p.add_argument("--notifiers", type=int_range(0, 64, "--notifiers"), help="mirror notifiers (default 1)")
    p.add_argument("--memory-mib", dest="memory_mib", type=int_range(1, 1024, "--memory-mib"))
    p.add_argument("--memslots", type=int_range(1, 64, "--memslots"))
    p.add_argument("--preempt-rate", dest="preempt_rate", type=float_range(0, 1, "--preempt-rate"))
    p.add_argument("--stall-ms", dest="stall_ms", type=int_range(1, 3_600_000, "--stall-ms"))
    p.add_argument("--fuzz", choices=["off", "light", "heavy"],
                   help="race widening: seeded delays at named preemption points (default light)")
    _add_page_track_args(p)
    p.add_argument("--table-writes-per-vmrun", dest="table_writes_per_vmrun",
                   type=float_range(0, 10000, "--table-writes-per-vmrun"),
                   help="L1 writes to its physical APIC ID tables per nested VMRUN (sets tracked_fraction)")
    p.add_argument("--workload", choices=list(WORKLOAD_NAMES),
                   help="a named workload point (vm/workloads.py); explicit flags override its values "
                        "(default: realistic when --design is not given, else the Config defaults = heavy)")
    p.add_argument("--dilate", type=dilate_arg, metavar="auto|off|N",
                   help="time dilation: guest time and modelled delays x N; auto measures N (lab/dilation.py)")
    _add_clock_args(p)
    p.add_argument("--no-stats", dest="stats", action="store_const", const=False, default=None,
                   help="turn lock_stat and latency histograms off")
    p.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="kill-vcpu:K@{rcu-read,srcu-read,mmu-lock,tables-lock,random}, stall-vcpu:K:MS, "
                        "kill-coordinator (repeatable)")
    p.add_argument("--hook", action="append", default=[], choices=sorted(HOOKS), metavar="HOOK",
                   help=HOOK_HELP)
    p.add_argument("--json", metavar="PATH", default=None, help="write the results document here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--trace-events", dest="trace_events", type=int_range(0, 1 << 20, "--trace-events"),
                   help="events kept per process in its trace ring (default 4096, at least 2; 0 = no ring, no trace)")
    _add_trace_arg(p)


def _add_clock_args(p: argparse.ArgumentParser, default_text: str = "real") -> None:
    p.add_argument("--clock", choices=["real", "virtual"], default=None,
                   help="real: host time (finds races); virtual: one vCPU process runs at a time on "
                        "simulated ns, the same numbers on any host; --duration is then virtual seconds "
                        f"(default {default_text}; docs/virtual-time.md)")
    p.add_argument("--prices", metavar="FILE.toml", default=None,
                   help="virtual time: override the price table ([prices] name = ns; ipc/vtime.py)")


def _add_trace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", metavar="PATH", default=None,
                   help="write the run's trace (Chrome trace event JSON: Perfetto UI, chrome://tracing)")


def build_parser() -> argparse.ArgumentParser:
    # the console script (pyproject [project.scripts]) is pagetrack-sim; else launch.py
    p = _Parser(prog="pagetrack-sim" if os.path.basename(sys.argv[0] or "") == "pagetrack-sim" else "launch.py",
                description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("torture", help="rcutorture / locktorture on the shm primitives")
    t.add_argument("kind", choices=["rcu", "srcu", "spinlock", "mutex"])
    t.add_argument("--procs", type=int_range(1, MAX_PROCS, "--procs"), default=4,
                   help="reader / writer processes (default 4)")
    t.add_argument("--duration", type=DURATION, default=3.0, help="seconds (default 3)")
    t.add_argument("--seed", type=SEED, default=1)
    t.add_argument("--inject", choices=["broken-gp", "gp-single-flip", "gp-skip-alternate", "gp-share-early",
                                        "gp-no-wait-before-flip", "busted-lock"], default=None,
                   help="break the primitive on purpose: the run must end in FAILURE")
    t.add_argument("--stat-interval", type=float_range(0.1, 3600, "--stat-interval"), default=1.0,
                   help="seconds between stats lines (default 1)")
    t.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")

    r = sub.add_parser("run", help="a free-running N-vCPU simulation with a contention report")
    _add_run_args(r)
    r.add_argument("--scenario", metavar="FILE.toml", default=None,
                   help="TOML: [config] keys as below; [[step]] entries make it a scripted run")

    cp = sub.add_parser("compare", help="every nested AVIC design on the same workload; table, plots, verdicts")
    cp.add_argument("--vcpus", type=int_list(1, 256, "--vcpus"), default=None,
                    help="comma-separated vCPU counts (default 1,2,4,8; --map: 2,4)")
    cp.add_argument("--switch-rates", dest="switch_rates", type=float_list(0, 1, "--switch-rates"),
                    default=None, help="comma-separated switch rates (default 0,0.01,0.1,0.5)")
    cp.add_argument("--duration", type=DURATION, default=None,
                    help="seconds per run (default 1.5; --map: 1)")
    cp.add_argument("--seed", type=SEED, default=1)
    cp.add_argument("--out", metavar="DIR", required=True)
    cp.add_argument("--workload", choices=list(WORKLOAD_NAMES), default="realistic",
                    help="the workload point (vm/workloads.py; default realistic, heavy = the old default)")
    cp.add_argument("--dilate", type=dilate_arg, default=None, metavar="auto|off|N",
                    help="--clock real: also run every point dilated by N (auto: measured; default auto; off: "
                         "undilated only)")
    _add_clock_args(cp, "real; --map: virtual")
    cp.add_argument("--map", action="store_true",
                    help="the map: table writes per VMRUN x switch rate at each vCPU count, on Dask "
                         "(map.json, map.png, map.md; resumable)")
    cp.add_argument("--table-writes", dest="table_writes", type=float_list(0, 10000, "--table-writes"),
                    default=None, help="--map: table writes per nested VMRUN (default 0.002,0.02,0.2,2)")
    cp.add_argument("--repeats", type=int_range(1, 100, "--repeats"), default=None,
                    help="seeds per point / map cell (the median; their spread [min-max] is reported; "
                         "default 3: three times the runs of one seed)")
    cp.add_argument("--designs", type=str, default=None,
                    help="comma-separated designs (default: all three; the map needs mutex-hash and rcu-list)")
    _add_scheduler_args(cp, "--map: an existing Dask scheduler (default: a LocalCluster on this machine)")
    cp.add_argument("--workers", type=int_range(1, 64, "--workers"), default=1,
                    help="--map: LocalCluster workers (default 1: runs are multiprocess already)")

    sc = sub.add_parser("scenario", help="a scripted scenario from the seed, over ZeroMQ, deterministic")
    sc.add_argument("name", choices=["kaboom"],
                    help="kaboom: X registers, Y registers, X unregisters, L1 writes Y's table, Y VMRUNs")
    sc.add_argument("--registration", choices=REGISTRATION_CHOICES, default="refcount")
    sc.add_argument("--design", choices=["mutex-hash", "rcu-list", "per-table-notifier"], default="mutex-hash")
    sc.add_argument("--seed", type=SEED, default=1)
    _add_page_track_args(sc)
    sc.add_argument("--table", action="store_true",
                    help="kaboom: the verdict of every registration variant x design (x warn/mainline), "
                         "in-process, as a Markdown table")
    sc.add_argument("--fuzz", choices=["off", "light", "heavy"], default="light",
                    help="race widening at named preemption points (default light)")
    sc.add_argument("--inject", action="append", default=[], metavar="FAULT")
    sc.add_argument("--hook", action="append", default=[], choices=sorted(HOOKS), metavar="HOOK", help=HOOK_HELP)
    sc.add_argument("--json", metavar="PATH", default=None)
    sc.add_argument("--quiet", action="store_true")
    _add_trace_arg(sc)

    ex = sub.add_parser("explore", help="search interleavings of a small scenario under a controlled scheduler")
    ex.add_argument("scenario", metavar="SCENARIO", help="kaboom, flood-drop, tlb-flush, invalidate, memslot, gp-share (3 "
                    "vCPUs), notifier (3 vCPUs), share, running, reader (rcu-list), free (seeded op streams), or a FILE.toml whose "
                    "[[step]]s are per-vCPU programs (no global order); each runs as scripted vCPU commands "
                    "(the executor and L1 write path of `run --scenario`)")
    ex.add_argument("--strategy", choices=["pct", "random"], default="pct")
    ex.add_argument("--depth", type=int_range(1, 10, "--depth"), default=3, help="PCT bug depth d (default 3)")
    ex.add_argument("--schedules", type=int_range(1, 10_000_000, "--schedules"), default=1000,
                    help="schedules to try before SUCCESS (default 1000); progress on stderr (every "
                         "$PAGETRACK_PROGRESS_S s, default 5, when not a terminal)")
    ex.add_argument("--seed", type=SEED, default=1)
    ex.add_argument("--out", metavar="DIR", default="explore-out", help="where failing-schedule.toml goes")
    ex.add_argument("--registration", choices=REGISTRATION_CHOICES, default=None)
    ex.add_argument("--design", choices=["mutex-hash", "rcu-list", "per-table-notifier"], default=None)
    ex.add_argument("--coverage", action="store_true",
                    help="report the paths the schedules reached: named AVIC / page-track / grace-period paths and "
                         "the functions of vm/ and vm/avic/ (sys.settrace call events in every process; slower)")
    ex.add_argument("--no-shrink", dest="shrink", action="store_false",
                    help="save a failing schedule as found (default: shrunk first, fewer switches and steps, same "
                         "diagnosis; the file keeps original_steps / original_switches)")
    ex.add_argument("--hook", action="append", default=[], choices=sorted(HOOKS), metavar="HOOK", help=HOOK_HELP)
    ex.add_argument("--max-steps", dest="max_steps", type=int_range(10, 10_000_000, "--max-steps"), default=5000,
                    help="step bound per schedule (default 5000)")
    ex.add_argument("--memory-model", dest="memory_model", choices=["sc", "tso"], default="sc", help="sc (default): every access reaches memory at once; tso: a FIFO store buffer per vCPU process (x86-TSO, docs/explore.md)")
    ex.add_argument("--json", metavar="PATH", default=None, help="write the summary as JSON")
    _add_trace_arg(ex)
    rpl = sub.add_parser("replay", help="re-execute a failing-schedule.toml exactly", epilog=REPLAY_EXITS)
    rpl.add_argument("file", metavar="FILE")
    _add_trace_arg(rpl)

    c = sub.add_parser("clean", help="remove shm segments and run directories of dead runs")
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    c.add_argument("--dumps", action="store_true", help="also remove the FAILURE trace dumps of runs without --json")

    rp = sub.add_parser("report", help="re-render tables and plots from saved results JSON")
    rp.add_argument("results", nargs="+", metavar="RESULTS.json")
    rp.add_argument("--out", metavar="DIR", default=None, help="also write report.md and PNG plots here")

    ch = sub.add_parser("chaos", help="break real runs on purpose (signals to every process); check each ends well")
    ch.add_argument("--runs", type=int_range(1, 100_000, "--runs"), default=20, help="cases (default 20)")
    ch.add_argument("--seed", type=SEED, default=1)
    ch.add_argument("--out", metavar="DIR", default="chaos-out", help="cases and chaos.json (default chaos-out)")
    ch.add_argument("--json", metavar="PATH", default=None, help="write the figures here")
    _add_scheduler_args(ch, "run the cases on this Dask scheduler's workers (default: one after another here)")

    sw = sub.add_parser("sweep", help="run every point of a parameter grid on Dask distributed")
    sw.add_argument("grid", metavar="GRID.toml")
    sw.add_argument("--out", metavar="DIR", required=True, help="results directory (resumable)")
    _add_scheduler_args(sw, "an existing Dask scheduler (default: a LocalCluster on this machine)")
    sw.add_argument("--workers", type=int_range(1, 64, "--workers"), default=1,
                    help="LocalCluster workers (default 1: runs are multiprocess already)")
    sw.add_argument("--repeats", type=int_range(1, 100, "--repeats"), default=None,
                    help="seeds per point (seed, seed+1, ...; the grid must not list seed): each point's "
                         "median and [min-max] are reported (default 1, or the grid's own seed list)")
    _add_clock_args(sw)
    return p


def _add_scheduler_args(p: argparse.ArgumentParser, what: str) -> None:  # checked by lab/scheduler.py
    p.add_argument("--scheduler", metavar="tls://HOST:PORT", default=None,
                   help=what + "; tls:// with --security, tcp:// (unauthenticated) only with --insecure")
    p.add_argument("--connect-timeout", dest="connect_timeout", type=float_range(0.1, 600, "--connect-timeout"),
                   default=None, metavar="S", help="seconds to reach --scheduler before giving up (default 5)")
    p.add_argument("--security", metavar="FILE.toml", default=None,
                   help="TLS for --scheduler tls://: ca_file, cert, key (PEM paths; relative: to FILE's directory)")
    p.add_argument("--insecure", action="store_true",
                   help="accept a tcp:// --scheduler: whoever reaches it runs code as you")


def _dispatch(args: argparse.Namespace) -> int:
    from lab.outputs import check_command_outputs

    check_command_outputs(args)  # --json, --trace, --out: before anything starts, nothing created
    if getattr(args, "scheduler", None) and (args.command == "chaos" or getattr(args, "map", False)):
        from lab.scheduler import CONNECT_TIMEOUT_S, probe_scheduler, resolve  # (sweep: after its grid)

        probe_scheduler(args.scheduler, args.connect_timeout or CONNECT_TIMEOUT_S, resolve(args)[1])
    if args.command == "torture":
        from ipc import torture

        return torture.main(args)
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "scenario":
        return _cmd_scenario(args)
    if args.command == "compare" and args.map:
        from lab import map as cmap

        return cmap.main(args)
    if args.command == "compare":
        from lab import compare

        return compare.main(args, run_quiet)
    if args.command == "clean":
        from lab import cleanup

        return cleanup.main(args)
    if args.command == "report":
        from lab import rerender

        return rerender.main(args)
    if args.command == "sweep":
        from lab import sweep

        return sweep.main(args)
    if args.command in ("explore", "replay"):
        from lab import explore

        _check_json_path(getattr(args, "json", None))
        _check_json_path(args.trace, "--trace")
        return explore.main(args) if args.command == "explore" else explore.main_replay(args)
    if args.command == "chaos":
        from lab import chaos

        return chaos.main(args)
    raise UsageError(f"launch.py: command {args.command!r} is not available yet")


def _check_json_path(path: str | None, flag: str = "--json") -> None:
    from ipc.outputs import check_out_file

    if path is not None:
        check_out_file(path, flag)  # its directory exists, is writable and has room; not a directory


def _check_trace(args: argparse.Namespace, cfg) -> None:
    _check_json_path(args.trace, "--trace")
    if args.trace and not cfg.trace_events:
        raise UsageError("--trace: the trace ring is off (trace_events = 0)")


NEXT_STEPS = ("next: `launch.py compare --out DIR` measures every design (and `--map` where the mutex "
              "hurts); `launch.py scenario kaboom --registration bool` replays the seed's registration bug")


def run_base(args: argparse.Namespace, file_cfg: dict) -> tuple[dict, bool]:
    """(Config values under the flags, newcomer?): a named workload, then the scenario file. A bare
    ``run`` (no --design, no scenario file) is the newcomer's tour: mutex-hash at the realistic point."""
    from vm import workloads

    newcomer = not args.scenario and args.design is None
    name = args.workload or ("realistic" if newcomer else None)
    base = dict(workloads.NEWCOMER) if newcomer else {}
    if name:
        base.update(workloads.workload(name))
    base.update(file_cfg)
    if args.tracked_fraction is not None or "tracked_fraction" in file_cfg:
        base.pop("table_writes_per_vmrun", None)  # an explicit fraction wins over the preset's rate
    return base, newcomer


def _cmd_run(args: argparse.Namespace) -> int:
    from vm import config

    file_cfg, steps = config.load_toml(args.scenario) if args.scenario else ({}, [])
    base, newcomer = run_base(args, file_cfg)
    cli = {k: getattr(args, k) for k in config.CLI_KEYS + ("stats",)}
    cli["dilate"] = None
    cli.update(config.clock_values(args.clock, args.prices))
    cfg = config.build(base, cli)  # validated before any measuring
    _check_json_path(args.json)
    _check_trace(args, cfg)
    if cfg.clock == "virtual":
        if args.dilate not in (None, "off"):
            raise UsageError(config.DILATE_VIRTUAL)
        if steps:
            raise UsageError("--clock virtual: free-running runs only (the scenario has [[step]]s)")
        if args.inject:
            raise UsageError("--inject: fault injection needs --clock real")
    script = config.parse_steps(steps, cfg) if steps else None  # every step checked before any measuring
    from lab import dilation
    from vm import faults

    injected = [faults.parse(f, cfg.vcpus) for f in args.inject]
    factor, dil_doc = dilation.resolve(args.dilate, cfg.to_dict(), (cfg.design,))
    if factor != 1.0:
        cli["dilate"] = factor
        cfg = config.build(base, cli)
    return run_and_report(cfg, script=script, json_path=args.json, quiet=args.quiet, faults=injected,
                          hooks=tuple(args.hook), trace_path=args.trace,
                          extra={"dilation": dil_doc} if dil_doc else None,
                          footer=NEXT_STEPS if newcomer and not script else None)


def _cmd_scenario(args: argparse.Namespace) -> int:
    from vm import config, faults
    from vm.avic.kaboom import kaboom_steps

    fidelity = {k: getattr(args, k) for k in FIDELITY_KEYS
                if getattr(args, k) is not None}
    if args.table:
        from vm.avic.kaboom import verdict_table

        print(verdict_table(args.seed, fidelity))
        return EXIT_OK
    cfg = config.from_dict({"vcpus": 2, "design": args.design, "registration": args.registration,
                            "seed": args.seed, "l2s": 2, "duration": 1.0, "fuzz": args.fuzz, **fidelity})
    _check_json_path(args.json)
    _check_trace(args, cfg)
    injected = [faults.parse(f, cfg.vcpus) for f in args.inject]
    steps = kaboom_steps(args.registration, args.design)
    if not args.quiet:
        for v, op, a in steps:
            print(f"  step: vCPU {v} {op} {a}", file=sys.stderr)
    return run_and_report(cfg, script=steps, json_path=args.json, quiet=args.quiet, faults=injected,
                          hooks=tuple(args.hook), trace_path=args.trace)


def run_and_report(cfg, *, script=None, json_path=None, quiet=False, hooks=(), faults=(), trace_path=None,
                   extra=None, footer=None) -> int:
    """Run (free or scripted), print the summary, write JSON (and the trace); exit code from the verdict."""
    from vcpu.worker import vcpu_main
    from vm import results, tracepoints
    from vm.coordinator import Coordinator, LiveProgress, RunError, print_progress_line, run_script

    try:
        with Coordinator(cfg, vcpu_main, preload=("vcpu.worker",), hooks=hooks, faults=faults,
                         results_path=json_path) as co:
            if not quiet:
                print(f"run {co.run_id}: {cfg.vcpus} vCPU(s), design {cfg.design}, "
                      f"{'scripted' if script else f'{cfg.duration:g}s'}"
                      + (" of virtual time" if cfg.clock == "virtual" and not script else ""),
                      file=sys.stderr, flush=True)
            if script:
                res = run_script(co, script)
            elif quiet:
                res = co.run_free(None)
            elif sys.stderr.isatty():
                with LiveProgress(cfg.duration) as live:
                    res = co.run_free(live)
            else:
                res = co.run_free(print_progress_line)
    except RunError as e:
        print(f"FAILURE: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if extra:
        res.update(extra)
    results.render(res)
    if trace_path and co.trace_snapshot is not None:
        try:
            tracepoints.export(co.trace_snapshot, trace_path, co.run_id)
            print(f"trace: {trace_path} ({co.trace_snapshot.events():,} events)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 (the results JSON below must still be written)
            res["trace_error"] = f"--trace {trace_path}: {type(e).__name__}: {e}"  # write_atomic: no .tmp left
            print(f"trace: not written: {res['trace_error']}", file=sys.stderr)
    if res.get("failure_trace"):
        print(f"last events of every process: {', '.join(res['failure_trace'])}", file=sys.stderr)
    if footer:
        print(footer)
    if json_path:
        results.write_json(json_path, res)
    return EXIT_OK if res["verdict"] == "SUCCESS" else EXIT_FAILURE


def run_quiet(cfg_dict: dict) -> dict:
    """One free run in this process, no printing; returns the results document (a run that could
    not start becomes a FAILURE document)."""
    from vcpu.worker import vcpu_main
    from vm import config
    from vm.coordinator import Coordinator, RunError

    cfg = config.from_dict(cfg_dict)
    try:
        with Coordinator(cfg, vcpu_main, preload=("vcpu.worker",)) as co:
            return co.run_free()
    except RunError as e:
        raise UsageError(f"run {cfg_dict}: {e}") from None


class Terminated(BaseException):
    """SIGTERM: unwinds like KeyboardInterrupt, so every context manager (the coordinator reaping its
    vCPUs and unlinking its segments) runs on the way out."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return _dispatch(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated by SIGTERM: vCPUs reaped, shared memory released", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if callable(old):  # called in-process by code with its own handler: give it back
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    rc = main()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the run is over: a late SIGTERM changes nothing
    sys.exit(rc)
