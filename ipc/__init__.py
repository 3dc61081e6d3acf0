"""The machine: shared-memory regions, compiled atomics, locks, RCU/SRCU, histograms, ZeroMQ control.

Knows nothing about KVM."""

try:
    from ipc import _prims  # noqa: F401
except ImportError as e:  # pragma: no cover - only on an unbuilt checkout
    raise ImportError(
        "ipc._prims (the compiled primitives) is not built: run `python -m pip install .` "
        f"in the checkout ({e})"
    ) from None
