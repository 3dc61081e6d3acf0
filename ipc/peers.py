"""Who may register on the control channel (issue 21): the rule :class:`ipc.channel.CoordinatorChannel`
applies to every Hello.

A Hello is accepted when its connection's routing id names the Hello's vCPU index
(``vcpu-<n>-<32 hex>``, made by :func:`ipc.worker_channel.worker_identity`) and it carries the run's
token. Once the owner has said which processes it spawned (``CoordinatorChannel.bind``: {index:
pid}), it must also name a spawned index, carry that process's pid, and come from the first
connection that registered the index (a second connection is refused, not a replacement).

The pid: on ipc:// (the default endpoint) it is the kernel's — libzmq appends the peer's
SO_PEERCRED to the connection's ``Peer-Address`` metadata (``host:uid:gid:pid``), and a Hello
claiming another pid is refused. Where there is none (tcp://, a libzmq built without
SO_PEERCRED) it is the peer's word: a peer holding the token could lie about its own pid, but it
cannot take an index or a pid that was not spawned, nor an index another connection registered.

After the Hello, on ipc:// every message of a bound channel is checked the same way
(:func:`sender_refusal`): ZeroMQ's ROUTER_HANDOVER lets a connection that presents a registered
routing id take its route over, so a message whose kernel pid is not the registered vCPU's process
is refused (``impostor``) although its routing id is right.
"""

from __future__ import annotations

import hmac
import re

import zmq

from ipc.messages import Hello

#: Routing id of a worker's DEALER (ipc.worker_channel.worker_identity).
IDENT_RE = re.compile(rb"^vcpu-(\d{1,9})-[0-9a-f]{32}\Z")


def peer_pid(frame: zmq.Frame) -> int | None:
    """The kernel's pid of the ipc:// peer that sent ``frame`` (SO_PEERCRED, from the Peer-Address
    metadata ``host:uid:gid:pid``); None if it is not there."""
    try:
        parts = frame.get("Peer-Address").rsplit(":", 3)
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return None
    return int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else None


def sender_refusal(vcpu: int, frame: zmq.Frame, spawned: dict[int, int] | None, endpoint: str) -> str | None:
    """Why a registered vCPU's message (not a Hello) is refused, or None: on ipc:// of a bound
    channel, a sender whose kernel pid is not the process spawned as ``vcpu`` -> "impostor"."""
    if spawned is None or not endpoint.startswith("ipc://"):
        return None
    pid = peer_pid(frame)
    return "impostor" if pid is not None and pid != spawned.get(vcpu) else None


def hello_refusal(ident: bytes, msg: Hello, frame: zmq.Frame, token: bytes, spawned: dict[int, int] | None,
                  registered: dict[int, bytes], endpoint: str) -> str | None:
    """Why the Hello ``msg`` (in ``frame``) from connection ``ident`` is refused, or None.
    ``spawned``: {index: pid} or None (nothing bound: the routing id and the token decide);
    ``registered``: {index: routing id} of the accepted connections; ``endpoint``: the channel's
    (the kernel's pid is read on ipc:// only). Reasons: bad_identity, bad_token, not_spawned,
    false_pid (the Hello's pid is not the sender's), wrong_pid (not the spawned process's),
    already_registered."""
    m = IDENT_RE.match(ident)
    if m is None or int(m.group(1)) != msg.vcpu:
        return "bad_identity"
    if not hmac.compare_digest(msg.token.encode("utf-8", "replace"), token):
        return "bad_token"
    if spawned is None:
        return None
    if msg.vcpu not in spawned:
        return "not_spawned"
    pid = peer_pid(frame) if endpoint.startswith("ipc://") else None
    if pid is not None and pid != msg.pid:
        return "false_pid"
    if spawned[msg.vcpu] != msg.pid:
        return "wrong_pid"
    if registered.get(msg.vcpu, ident) != ident:
        return "already_registered"
    return None
