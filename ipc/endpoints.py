"""The control channel's endpoints (ipc/channel.py binds them): which ones may be bound, and the
host part of a tcp endpoint."""

from __future__ import annotations

import ipaddress

from ipc.errors import UsageError


def tcp_host(endpoint: str) -> str:
    """The host part of ``tcp://host:port`` (``[v6addr]`` unwrapped); UsageError if malformed."""
    rest = endpoint[len("tcp://"):]
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise UsageError(f"bad tcp endpoint {endpoint!r}: expected tcp://[v6addr]:port")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise UsageError(f"bad tcp endpoint {endpoint!r}: expected tcp://host:port")
    if ";" in host or not host or not port or not (port == "*" or port.isdigit()):
        raise UsageError(f"bad tcp endpoint {endpoint!r}: expected tcp://host:port (port may be *)")
    return host


def check_endpoint(endpoint: str, allow_remote: bool = False) -> str:
    """Validate an endpoint to bind: ``ipc://<path>`` always; ``tcp://`` only on a loopback address
    (127.0.0.0/8, ::1, localhost) unless ``allow_remote``. Returns it unchanged. (No ``inproc://``:
    every channel has its own ZeroMQ context.)"""
    if not isinstance(endpoint, str):
        raise UsageError(f"endpoint must be a string, not {type(endpoint).__name__}")
    if endpoint.startswith("ipc://"):
        if len(endpoint) == len("ipc://"):
            raise UsageError(f"bad endpoint {endpoint!r}")
        return endpoint
    if not endpoint.startswith("tcp://"):
        raise UsageError(f"unsupported endpoint {endpoint!r}: use ipc:// or tcp://")
    host = tcp_host(endpoint)
    if allow_remote:
        return endpoint
    if host == "localhost":
        return endpoint
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # "*", interface names, host names
    if not loopback:
        raise UsageError(
            f"refusing to bind {endpoint!r}: not a loopback address (127.0.0.1, ::1); "
            "pass allow_remote=True to expose the control channel"
        )
    return endpoint
