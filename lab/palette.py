"""One fixed, colour-blind-safe colour per design, for every plot (issue 20).

The colours are Okabe–Ito's (Okabe & Ito, "Color Universal Design", 2008), distinguishable with the
common colour-vision deficiencies. A design keeps its colour in every panel and every file, whatever
else varies (dilation, clock, vCPU count, registration, ...): those are drawn as line styles / markers
(:data:`LINESTYLES`, :data:`MARKERS`) or as facets, never as extra colours.

:func:`colour` maps a design name to its colour; a name not in :data:`DESIGN_COLOURS` gets one of the
other Okabe–Ito colours, chosen by a stable hash of the name (the same on every run and host, never a
design's colour).
"""

from __future__ import annotations

import zlib

OKABE_ITO = {
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
    "black": "#000000",
}

DESIGN_COLOURS = {
    "mutex-hash": OKABE_ITO["vermillion"],  # the VM-wide mutex: the warm colour
    "rcu-list": OKABE_ITO["blue"],
    "per-table-notifier": OKABE_ITO["bluish green"],
    "mirror": OKABE_ITO["reddish purple"],  # the mainline-like baseline (vm/config.py Design)
}

# unknown design names: the rest of the set (yellow last: it is faint on white)
FALLBACK_COLOURS = [c for name, c in OKABE_ITO.items() if c not in DESIGN_COLOURS.values() and name != "yellow"] + [
    OKABE_ITO["yellow"]]

# secondary axes (dilation, clock, registration, ...): line style and marker together, value by value
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D"]


def colour(design: str) -> str:
    """The colour of ``design`` (a hex string): fixed for the known designs, else a stable pick from
    :data:`FALLBACK_COLOURS`."""
    if design in DESIGN_COLOURS:
        return DESIGN_COLOURS[design]
    return FALLBACK_COLOURS[zlib.crc32(str(design).encode()) % len(FALLBACK_COLOURS)]


def style(i: int) -> dict:
    """Line style and marker of the ``i``-th value of a secondary axis (``Axes.plot`` keyword arguments)."""
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}
