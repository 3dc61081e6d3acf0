"""The VM's tracepoints (like include/trace/events/kvm.h): event names, their arguments, the flows
drawn between them, and the run-level trace helpers that ``launch.py`` and the coordinator use.

Events (``ipc.trace`` rings; B/E = slice, I = instant):
- ``nested_vmrun`` (l2, vcpu), ``L2`` (l2), ``nested_vmexit`` (l2, leaving): a vCPU's nested entry,
  the L2's run time and the exit (vcpu/vcpu.py); ``cmd <op>``: one scripted command
- ``emulated_write`` (gpa, bytes), ``track_write`` (node, gpa): the emulated-write path and each
  notifier call it made (vm/page_track.py); a flow arrow links a write to its calls
- ``table_create`` / ``table_sync`` / ``table_drop`` (table, gfn): nested AVIC shadow tables
- ``synchronize <domain>`` and ``grace period <domain>`` (gp_state): ipc/rcu.py
- ``page_fault`` (gpa): a write fault on a write-tracked gfn, emulated; ``WARN <kind>`` instants;
  ``inject <fault>`` (vcpu, ms): an --inject fault fired by the coordinator
- from the C primitives: lock waits and holds per lock, RCU/SRCU read-side sections per domain

API: ``snapshot(kvm)`` (the run's rings, decoded), ``export(snap, path)`` (Chrome trace JSON),
``dump(snap, directory, stem)`` (JSON + ftrace-style text), ``save_failure(snap, res, json_path)``
(what the coordinator does on every FAILURE: both formats beside the results, ``failure_dir``).
"""

from __future__ import annotations

import os
import tempfile

from ipc import trace
from ipc.trace import chrome
from vm.layout import DOMAINS

ARGS = {
    "nested_vmrun": ("l2", "vcpu"), "L2": ("l2", ""), "nested_vmexit": ("l2", "leaving"),
    "emulated_write": ("gpa", "bytes"), "track_write": ("node", "gpa"), "page_fault": ("gpa", ""),
    "table_create": ("table", "gfn"), "table_sync": ("table", "gfn"), "table_drop": ("table", "gfn"),
    **{f"grace period {d}": ("gp_state", "") for d, _ in DOMAINS},
    **{f"inject {k}": ("vcpu", "ms") for k in ("kill-vcpu", "stall-vcpu", "kill-coordinator")},
}
HEX_ARGS = ("gpa", "gfn")
FLOWS = (("emulated_write", "track_write"),)
TABLE_EVENTS = ("table_create", "table_sync", "table_drop")
FAILURE_DIR_ENV = "PTS_FAILURE_DIR"
#: a dump dir of ``failures_root()`` holds only ``<FAILURE_STEM>.json`` / ``.txt`` (how ``clean`` knows it)
FAILURE_STEM = "failure-trace"


def proc_name(proc: int) -> str:
    return "coordinator" if proc == 0 else f"vCPU {proc - 1}"


def fmt(run_id: str = "") -> dict:
    """The formatting arguments of ``ipc.trace.chrome`` for a VM run."""
    return {"proc_name": proc_name, "arg_names": ARGS, "hex_args": HEX_ARGS, "flows": FLOWS,
            "title": f"pagetrack-sim {run_id}".strip()}


def snapshot(kvm, res: dict | None = None) -> trace.Snapshot | None:
    """Every process' ring of ``kvm``'s run (None when the run was not traced). With ``res``, a
    ring that cannot be read is ``res["trace_error"]`` and None: the trace never costs a verdict."""
    r = kvm.regions.get("trace")
    if r is None or r.closed:
        return None
    if res is None:
        return trace.snapshot(r)
    try:
        return trace.snapshot(r)
    except Exception as e:  # noqa: BLE001 (a decoder bug must not replace the results)
        res["trace_error"] = f"snapshot: {type(e).__name__}: {e}"
        return None


def export(snap: trace.Snapshot, path: str, run_id: str = "") -> str:
    return chrome.export(snap, path, **fmt(run_id))


def dump(snap: trace.Snapshot, directory: str, stem: str = "trace", run_id: str = "") -> tuple[str, str]:
    return chrome.dump_dir(snap, directory, stem, **fmt(run_id))


def save_failure(snap: trace.Snapshot | None, res: dict, json_path: str | None) -> None:
    """A FAILURE's trace dump (``failure_dir``); ``res["failure_trace"]`` = [json path, text path]."""
    if snap is None:
        return
    d, stem = failure_dir(json_path, res["run_id"])
    try:
        res["failure_trace"] = list(dump(snap, d, stem, res["run_id"]))
    except Exception as e:  # noqa: BLE001 (disk full or an exporter bug: the verdict stays)
        res["failure_trace"] = [f"not saved: {type(e).__name__}: {e}"]


def failure_dir(json_path: str | None, run_id: str) -> tuple[str, str]:
    """Where a FAILURE's last events go: beside the results JSON (``<stem>.failure-trace.*``), or
    without one in ``failures_root()/<run_id>/``. Returns (directory, stem)."""
    if json_path:
        d = os.path.dirname(os.path.abspath(json_path))
        stem = os.path.basename(json_path).removesuffix(".json")
        return d, f"{stem}.failure-trace"
    return os.path.join(failures_root(), run_id), FAILURE_STEM


def failures_root() -> str:
    """Where FAILURE dumps of runs without ``--json`` go: ``$PTS_FAILURE_DIR`` (the tests point it
    at their own temporary directory), else ``<tmp>/pts-failures``; ``launch.py clean --dumps``
    removes them."""
    return os.environ.get(FAILURE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "pts-failures")
