#!/usr/bin/env python3
"""pagetrack-sim command line: run, scenario, torture, compare, sweep, report, clean.

Thin composition root: parses and validates arguments, then calls vm/ (and ipc/ for torture).
Bad input ends with a one-line error and exit code 2; SUCCESS exits 0, FAILURE 1.
"""

from __future__ import annotations

import argparse
import sys

from ipc.errors import UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
MAX_PROCS = 256
MAX_DURATION_S = 24 * 3600.0


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


SEED = int_range(0, 2**63 - 1, "--seed")
DURATION = float_range(0.05, MAX_DURATION_S, "--duration")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("torture", help="rcutorture / locktorture on the shm primitives")
    t.add_argument("kind", choices=["rcu", "srcu", "spinlock", "mutex"])
    t.add_argument("--procs", type=int_range(1, MAX_PROCS, "--procs"), default=4,
                   help="reader / writer processes (default 4)")
    t.add_argument("--duration", type=DURATION, default=3.0, help="seconds (default 3)")
    t.add_argument("--seed", type=SEED, default=1)
    t.add_argument("--inject", choices=["broken-gp", "busted-lock"], default=None,
                   help="break the primitive on purpose: the run must end in FAILURE")
    t.add_argument("--stat-interval", type=float_range(0.1, 3600, "--stat-interval"), default=1.0,
                   help="seconds between stats lines (default 1)")
    t.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")

    c = sub.add_parser("clean", help="remove shm segments and run directories of dead runs")
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return p


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "torture":
        from ipc import torture

        return torture.main(args)
    if args.command == "clean":
        from vm import cleanup

        return cleanup.main(args)
    raise UsageError(f"launch.py: command {args.command!r} is not available yet")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
