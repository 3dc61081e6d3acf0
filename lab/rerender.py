"""``launch.py report FILE... [--out DIR]``: re-render any JSON the tool writes — a run's results,
a list of them (``sweep.json``), a ``compare.json`` (lab/report.py) or a ``map.json`` (its verdict,
map.md and map.png again: lab/map.py). A compare.json or map.json is given alone."""

from __future__ import annotations

from lab import report


def main(args) -> int:
    paths = list(args.results)
    parsed = report.read_all(paths)  # each file read once
    special = report.special_file(paths, parsed)
    if special and special[0] == "map":
        from lab import map as cmap

        out = report._out_dir(args.out) if args.out else None
        return cmap.rerender(parsed[special[1]], special[1], out)
    return report.main(args, parsed)
