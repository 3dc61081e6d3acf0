"""What a run is called in tables, plots and verdicts: what tells it apart from the other runs
(design, clock, dilation, vCPUs, switch rate, table writes, seed, ...), never a hash."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any


def run_name(r: dict, i: int) -> str:
    """A lone run's name: its run id, else ``#i``."""
    return str(r.get("run_id") or f"#{i}")


def unique_labels(labels: list[str]) -> list[str]:
    """``labels`` with repeats numbered (``r``, ``r#2``, ``r#3``) so that every run stays apart."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


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
