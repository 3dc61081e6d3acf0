"""Output checks and atomic writes for the commands: the checks and the writer are :mod:`ipc.outputs`
(vm/ writes results too and may not import lab/, tests/test_architecture.py), re-exported here, and
:func:`check_command_outputs`, the early check of every output flag of a ``launch.py`` command."""

from __future__ import annotations

from ipc.outputs import MIN_FREE_BYTES, OutputError, check_out_dir, check_out_file, rescue_dir, write_atomic

__all__ = ["MIN_FREE_BYTES", "OutputError", "check_out_dir", "check_out_file", "rescue_dir", "write_atomic",
           "check_command_outputs"]


def check_command_outputs(args) -> None:
    """Every output location of a parsed command line (an argparse Namespace), before anything starts;
    nothing is created: ``--json`` and ``--trace`` files, the ``--out`` directory (a missing one is
    fine when it can be created). A UsageError naming the flag and the path otherwise."""
    for flag in ("json", "trace"):
        if getattr(args, flag, None):
            check_out_file(getattr(args, flag), f"--{flag}")
    if getattr(args, "out", None):
        check_out_dir(args.out, "--out", create=False)
