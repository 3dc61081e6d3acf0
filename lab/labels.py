"""What a run is called in tables, plots and verdicts: what tells it apart from the other runs
(design, clock, dilation, vCPUs, switch rate, table writes, seed, ...), never a hash."""

from __future__ import annotations

import json
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


def differing_keys(results: list[dict], skip: tuple[str, ...] = ()) -> list[str]:
    """The config keys whose value differs between ``results`` (``skip`` left out), in label order
    (design, registration, clock, dilation, vCPUs, switch rate, table writes, seed, then by name); a
    key that only follows another one (``tracked_fraction`` set by ``table_writes_per_vmrun``: the same
    partition of the runs) is left out, the first of the two kept."""
    names = list(dict.fromkeys(k for r in results for k in r["config"]))
    vals = {k: [json.dumps(r["config"].get(k), sort_keys=True) for r in results] for k in names}
    differ = [k for k in names if len(set(vals[k])) > 1 and k not in skip]
    ordered = [k for k in _LABEL_KEYS if k in differ] + sorted(k for k in differ if k not in _LABEL_KEYS)
    kept: list[str] = []
    for k in ordered:
        if not any(len(set(vals[k])) == len(set(vals[j])) == len(set(zip(vals[k], vals[j], strict=True)))
                   for j in kept):
            kept.append(k)
    return kept


def run_labels(results: list[dict], skip: tuple[str, ...] = (), number: bool = True) -> list[str]:
    """A name per run made of what tells it apart from the others (design, clock, dilation, vCPUs,
    switch rate, table writes, seed, then any other config key that differs), never a hash:
    ``"rcu-list, ×3.2, 4 vCPUs, seed 2"``. Keys in ``skip`` are left out; with ``number``, runs alike
    in everything else are numbered (``#2``); nothing left to say -> "–"."""
    keys = differing_keys(results, skip=tuple(skip) + tuple(_NOT_LABELS))
    out = []
    for r in results:
        c = r["config"]
        parts = [(_LABEL_KEYS[k](c[k]) if k in _LABEL_KEYS and c.get(k) is not None else f"{k}={c.get(k)}")
                 for k in keys]
        out.append(", ".join(parts) or "–")
    return unique_labels(out) if number else out
