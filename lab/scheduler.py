"""``--scheduler tcp://HOST:PORT`` (sweep, compare --map, chaos): the address checked, then the scheduler
reached within ``--connect-timeout`` (default ``CONNECT_TIMEOUT_S``) before the command creates
anything in ``--out``. Refused fails at once; a host that does not answer, a name that does not resolve,
or something listening that is not a Dask scheduler fails within the timeout; each is one ``UsageError``
line naming the address (exit 2)."""

from __future__ import annotations

import re
import socket
import threading

from ipc.errors import UsageError

CONNECT_TIMEOUT_S = 5.0
_SCHED_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$")


def check_scheduler(addr: str) -> str:
    m = _SCHED_RE.match(addr)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UsageError(f"--scheduler: expected tcp://HOST:PORT, got {addr!r}")
    return addr


def connect_error(addr: str, e: BaseException) -> UsageError:
    """One line for a failed ``distributed.Client(addr)`` (refused, timed out, garbage frames)."""
    return UsageError(f"--scheduler: cannot connect to {addr}: {type(e).__name__}: {str(e)[:200]}".splitlines()[0])


def probe_scheduler(addr: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection and the scheduler's first bytes within ``timeout_s`` (name lookup included,
    hence the thread: a Dask listener speaks first, its handshake), then a Dask client handshake."""
    m = _SCHED_RE.match(check_scheduler(addr))
    box: list[OSError | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((m.group(1).strip("[]"), int(m.group(2))), timeout=timeout_s) as s:
                box.append(None if s.recv(8) else ConnectionResetError(0, "closed without a Dask handshake"))
        except OSError as e:
            box.append(e)

    t = threading.Thread(target=attempt, name="scheduler-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not box or isinstance(box[0], TimeoutError):
        raise UsageError(f"--scheduler: cannot connect to {addr}: no answer within {timeout_s:g} s "
                         "(--connect-timeout)")
    if box[0] is not None:
        raise UsageError(f"--scheduler: cannot connect to {addr}: {box[0].strerror or box[0]}")
    from distributed import Client

    try:
        Client(addr, timeout=f"{timeout_s:g}s", set_as_default=False).close()
    except Exception as e:  # noqa: BLE001 (something listens and speaks, but not Dask)
        raise connect_error(addr, e) from None
