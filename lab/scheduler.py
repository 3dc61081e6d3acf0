"""``--scheduler tls://HOST:PORT --security FILE.toml`` (or ``tcp://HOST:PORT --insecure``) of sweep,
compare --map and chaos: the address and credentials checked, then the scheduler reached within
``--connect-timeout`` (default ``CONNECT_TIMEOUT_S``) before the command creates anything in ``--out``.
Refused fails at once; a host that does not answer, a name that does not resolve, or something listening
that is not a Dask scheduler fails within the timeout; each is one ``UsageError`` line naming the address
(exit 2).

Whoever can talk to a Dask scheduler runs code on its workers, so a run's data goes only to a scheduler
that authenticates: ``tls://`` with ``--security FILE.toml`` (keys ``ca_file``, ``cert``, ``key``: PEM
paths, relative ones to the file's directory; the client side of Dask's mutual TLS). A ``tcp://``
scheduler is refused unless the user says ``--insecure``. The sweep's own LocalCluster needs none of
this: it makes fresh credentials for each run (``local_security``)."""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading

from ipc.errors import UsageError
from ipc.inputs import read_toml

CONNECT_TIMEOUT_S = 5.0
_SCHED_RE = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$")
INSECURE = ("--scheduler: tcp:// is unauthenticated: anyone who reaches it runs code as you; give --security "
            "FILE (TLS: ca/cert/key paths) with a tls:// address, or --insecure to accept")
SECURITY_KEYS = ("ca_file", "cert", "key")


def check_scheduler(addr: str) -> str:
    m = _SCHED_RE.match(addr)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise UsageError(f"--scheduler: expected tls://HOST:PORT (or tcp://HOST:PORT), got {addr!r}")
    return addr


def load_security(path: str):
    """``--security FILE.toml`` -> a client ``distributed.security.Security`` (TLS required); every file
    checked (exists, readable, loads as a certificate chain) before anything starts."""
    where = f"--security {path}"
    doc = read_toml(path, where)
    unknown = sorted(set(doc) - set(SECURITY_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(SECURITY_KEYS)})")
    base = os.path.dirname(os.path.abspath(path))
    files = {}
    for k in SECURITY_KEYS:
        v = doc.get(k)
        if not isinstance(v, str) or not v:
            raise UsageError(f"{where}: {k}: expected the path of a PEM file" + ("" if k in doc else " (missing)"))
        p = os.path.join(base, os.path.expanduser(v))
        if not os.path.isfile(p):
            raise UsageError(f"{where}: {k}: {p}: not found" if not os.path.exists(p) else f"{where}: {k}: {p}: not a file")
        if not os.access(p, os.R_OK):
            raise UsageError(f"{where}: {k}: {p}: not readable")
        files[k] = p
    from distributed.security import Security

    sec = Security(tls_ca_file=files["ca_file"], tls_client_cert=files["cert"], tls_client_key=files["key"],
                   require_encryption=True)
    try:
        sec.get_connection_args("client")  # loads the CA and the cert/key pair: a bad PEM fails here
    except (ssl.SSLError, OSError, ValueError) as e:
        raise UsageError(f"{where}: cannot load the TLS files: {e}".splitlines()[0]) from None
    return sec


def resolve(args) -> tuple[str | None, object | None]:
    """(scheduler address or None, its Security or None) from ``--scheduler``, ``--security``,
    ``--insecure``: a ``UsageError`` (one line) before anything starts."""
    addr = getattr(args, "scheduler", None)
    sec_path = getattr(args, "security", None)
    insecure = bool(getattr(args, "insecure", False))
    if not addr:
        if sec_path:
            raise UsageError("--security: only with --scheduler tls://HOST:PORT (the local cluster makes "
                             "its own TLS credentials for each run)")
        if insecure:
            raise UsageError("--insecure: only with --scheduler tcp://HOST:PORT")
        return None, None
    check_scheduler(addr)
    if addr.startswith("tcp://"):
        if sec_path:
            raise UsageError(f"--security: TLS needs a tls:// address, got --scheduler {addr}")
        if not insecure:
            raise UsageError(INSECURE)
        return addr, None
    if not sec_path:
        raise UsageError(f"--scheduler {addr}: a tls:// scheduler needs --security FILE.toml "
                         f"({', '.join(SECURITY_KEYS)}: PEM paths)")
    return addr, load_security(sec_path)


def local_security():
    """Fresh credentials for the sweep's own LocalCluster (a self-signed CA/cert/key made in memory for
    this run; every listener requires a client certificate signed by it): no other local user, and no
    other run, can connect to its scheduler, workers or nannies."""
    from distributed.security import Security

    return Security.temporary()


def connect_error(addr: str, e: BaseException) -> UsageError:
    """One line for a failed ``distributed.Client(addr)`` (refused, timed out, garbage frames)."""
    return UsageError(f"--scheduler: cannot connect to {addr}: {type(e).__name__}: {str(e)[:200]}".splitlines()[0])


def probe_scheduler(addr: str, timeout_s: float = CONNECT_TIMEOUT_S, security=None) -> None:
    """A TCP connection within ``timeout_s`` (name lookup included, hence the thread) and, for ``tcp://``,
    the scheduler's first bytes (a Dask listener speaks first, its handshake; over TLS the client speaks
    first), then a Dask client handshake (with ``security``: the TLS handshake too)."""
    m = _SCHED_RE.match(check_scheduler(addr))
    tls = m.group(1) == "tls"
    box: list[OSError | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((m.group(2).strip("[]"), int(m.group(3))), timeout=timeout_s) as s:
                box.append(None if tls or s.recv(8) else ConnectionResetError(0, "closed without a Dask handshake"))
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
        Client(addr, timeout=f"{timeout_s:g}s", set_as_default=False, security=security).close()
    except Exception as e:  # noqa: BLE001 (something listens and speaks, but not Dask, or not our TLS)
        raise connect_error(addr, e) from None
