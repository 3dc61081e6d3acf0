"""ZeroMQ control / telemetry channel: one ROUTER (the coordinator) and a DEALER per vCPU worker.

Control (config, start barrier, stop, fault injection, scripted command batches) and telemetry
(stats snapshots, WARN events, heartbeats, results) only: the hot path is shared memory, never a
message (DESIGN.md hard rule 1). Frames are :mod:`ipc.messages` (msgpack, versioned, never pickle);
an unknown, malformed or oversized frame is counted and dropped, never raised (hard rule 5); a
well-formed BatchAck naming a batch its vCPU was never sent (nor given up) is a protocol error,
raised as :class:`AckMismatch` inside ``call`` / ``call_many`` (the run's FAILURE, not a crash).

Endpoints: by default ``ipc://<run_dir>/ctl.sock`` inside a private run directory
(``$XDG_RUNTIME_DIR`` or ``/tmp``, ``pagetrack-sim-<run_id>``, mode 0700, socket 0600, with an
``owner.pid`` file so that ``clean`` can tell live runs from dead ones). No TCP unless an explicit
``tcp://`` endpoint is given, and then only on loopback unless ``allow_remote=True``.

Peers: a connection must first prove it knows the run's token (ZMTP PLAIN, password derived from
the token, checked by a ZAP handler thread: a peer without it can deliver no message at all, which
matters because libzmq buffers a whole multipart message before the first frame can be read and
ZMQ_MAXMSGSIZE bounds only one frame). A worker is then known by its vCPU index after a valid
:class:`~ipc.messages.Hello` carrying the token; the DEALER's routing id is ``vcpu-<n>-<random>``
and must match the Hello's vcpu; once the owner said what it spawned (``bind``), also a spawned
index, that process's pid (on ipc://, the kernel's) and the index's first connection: the rule is
:mod:`ipc.peers` (a refusal counts in ``rejected_peers``). Everything else from a peer that never
said a valid Hello is counted (``unknown_peer``) and dropped. Messages are received frame by frame
with a cap on their frames and total bytes (``max_message``); a bigger one is drained, counted and
dropped.

Every receive has a timeout; sends never block (a full queue or a vanished peer is counted and
reported by the return value), so a dead worker or coordinator can never hang the other side.
Channels are not thread-safe and must be created in the process that uses them (after fork).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import zmq

from ipc.endpoints import check_endpoint, tcp_host
from ipc.errors import UsageError
from ipc.messages import (
    MAX_FRAME,
    BadFrame,
    Batch,
    BatchAck,
    Command,
    Heartbeat,
    Hello,
    Message,
    Msg,
    decode,
    encode,
    printable,
)
from ipc.peers import hello_refusal, sender_refusal
from ipc.rundir import (  # re-exported: the channel's endpoint lives in a run dir
    OWNER_FILE,
    RUN_PREFIX,
    SOCKET_NAME,
    SUN_PATH_MAX,
    RunDir,
    list_run_dirs,
    make_run_dir,
    read_owner,
    remove_run_dir,
    run_base,
)
from ipc.worker_channel import (  # re-exported: the plumbing both ends share
    DRAIN_BATCH,
    HARD_MAX_FRAME,
    HWM,
    PLAIN_USER,
    ROUTING_ID_MAX,
    TimedReceiver,
    checked_timeout_ms,
    plain_password,
    set_common,
    set_plain_client,
    worker_identity,
)

__all__ = [
    "RUN_PREFIX",
    "SOCKET_NAME",
    "OWNER_FILE",
    "HWM",
    "HARD_MAX_FRAME",
    "ROUTING_ID_MAX",
    "DRAIN_BATCH",
    "TimedReceiver",
    "checked_timeout_ms",
    "set_common",
    "plain_password",
    "set_plain_client",
    "RunDir",
    "PeerUnreachable",
    "run_base",
    "make_run_dir",
    "remove_run_dir",
    "read_owner",
    "list_run_dirs",
    "new_token",
    "check_endpoint",
    "worker_identity",
    "CoordinatorChannel",
]

#: ZAP (RFC 27): a context's handler binds this.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

_COUNTERS = (
    "received", "sent", "bad_frames", "rejected_peers", "unknown_peer", "vcpu_mismatch",
    "unroutable", "send_full", "replaced_peers", "stale_acks", "auth_denied",
)
_log = logging.getLogger("pagetrack.channel")


def _log_once(seen: set[str], what: str, reason: str, detail: str) -> None:
    """One stderr line for the first ``reason`` (a peer's text escaped); later ones are only counted."""
    if reason not in seen:
        seen.add(reason)
        _log.warning("control channel: %s (%s); further ones are counted in the run's channel counters",
                     what, printable(f"{reason}: {detail}" if detail else reason)[:300])


class PeerUnreachable(ConnectionError):
    """The coordinator cannot deliver to a vCPU: it never said Hello, or its connection is gone."""


class AckMismatch(ConnectionError):
    """A BatchAck from a vCPU that names neither its outstanding batch nor one abandoned by an earlier
    call (timed out, peer gone, mismatch): the two ends disagree about the protocol; raised when that
    ack arrives. ``vcpu``: the vCPU whose ack it was (not necessarily one the call waited for)."""

    def __init__(self, msg: str, vcpu: int):
        super().__init__(msg)
        self.vcpu = vcpu


def _abandon(abandoned: dict[int, set[int]], waiting: dict[int, int]) -> None:
    """The batches ``waiting`` ({vCPU: seq}) of a call that gave up: their acks may still come."""
    for v, seq in waiting.items():
        abandoned.setdefault(v, set()).add(seq)


def _stale_ack(abandoned: dict[int, set[int]], counters: dict[str, int], v: int, seq: int,
               outstanding: int | None) -> None:
    """An ack from vCPU ``v`` that is not its outstanding batch: stale (counted, dropped) if an
    earlier call gave batch ``seq`` up, else a protocol error (AckMismatch)."""
    if seq not in abandoned.get(v, ()):
        mine = "it has no batch outstanding" if outstanding is None else f"its outstanding batch is {outstanding}"
        raise AckMismatch(f"vcpu {v} acknowledged batch {seq}, never sent to it or not yet ({mine}; "
                          f"no earlier call gave batch {seq} up)", v)
    abandoned[v].discard(seq)
    if not abandoned[v]:
        del abandoned[v]
    counters["stale_acks"] += 1


def new_token() -> str:
    """A fresh per-run secret for Hello (128 bits, hex)."""
    return secrets.token_hex(16)


# --------------------------------------------------------------------------------------------
# endpoints and identities
# --------------------------------------------------------------------------------------------


class _ZapGate(threading.Thread):
    """ZAP handler of one context (RFC 27): accepts a PLAIN handshake iff its password is the
    run's, so a peer without the token never gets a message queued. Runs until the context is
    terminated (its blocking recv then fails with ETERM and it closes its socket, which lets
    ``term()`` return). ``denied`` is written by this thread only."""

    def __init__(self, ctx: zmq.Context, password: bytes):
        super().__init__(name="zap-gate", daemon=True)
        self._sock = ctx.socket(zmq.REP)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.bind(ZAP_ENDPOINT)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._password = password
        self.denied = 0

    def run(self) -> None:
        sock = self._sock
        try:
            while True:
                req = sock.recv_multipart()  # version, id, domain, address, identity, mechanism, creds
                ok = len(req) == 8 and req[5] == b"PLAIN" and hmac.compare_digest(req[7], self._password)
                if not ok:
                    self.denied += 1
                sock.send_multipart([b"1.0", req[1] if len(req) > 1 else b"", b"200" if ok else b"400",
                                     b"OK" if ok else b"bad credentials", PLAIN_USER if ok else b"", b""])
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)


def _as_commands(commands: Iterable[Command | tuple]) -> list[Command]:
    out = []
    for c in commands:
        if isinstance(c, Command):
            out.append(c)
        else:
            op, *rest = c
            out.append(Command(op, dict(rest[0]) if rest else {}))
    return out


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------


def _endpoint_in(run_dir: Path, endpoint: str | None, allow_remote: bool) -> str:
    """The endpoint to bind: ``endpoint`` (checked) or ``ipc://<run_dir>/ctl.sock``; the run dir
    must be private either way."""
    st = os.stat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
        raise UsageError(f"run dir {run_dir} must be a private directory (mode 0700)")
    if endpoint is None:
        sock_path = run_dir / SOCKET_NAME
        if len(str(sock_path).encode()) > SUN_PATH_MAX:
            raise UsageError(f"socket path {sock_path} too long for ipc://")
        endpoint = f"ipc://{sock_path}"
    return check_endpoint(endpoint, allow_remote)


def _open_router(endpoint: str, token: str, hwm: int) -> tuple[zmq.Context, _ZapGate, zmq.Socket, str]:
    """A context whose ZAP gate runs, and a PLAIN-server ROUTER bound to ``endpoint`` (a socket
    file gets mode 0600). Returns (context, gate, socket, bound endpoint); closes all on failure."""
    ctx = zmq.Context(io_threads=1)
    sock = None
    try:
        gate = _ZapGate(ctx, plain_password(token))  # bound before any connection can ask
        gate.start()
        sock = ctx.socket(zmq.ROUTER)
        set_common(sock, hwm)
        sock.setsockopt(zmq.PLAIN_SERVER, 1)  # the ZAP gate checks every connection
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable -> EHOSTUNREACH, not silent
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker takes its route back
        if endpoint.startswith("tcp://") and ":" in tcp_host(endpoint):
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(endpoint)
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if bound.startswith("ipc://"):
            os.chmod(bound[len("ipc://"):], 0o600)
    except BaseException:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()  # also ends the gate
        raise
    return ctx, gate, sock, bound


class BatchCalls:
    """Scripted mode of :class:`CoordinatorChannel`: a Batch of commands to a vCPU and its BatchAck,
    matched by sequence number (``_seq``); the batches of a call that gave up (``_abandoned``) may
    still be acknowledged later (stale acks). Uses the channel's send / receive methods."""

    def call(
        self,
        vcpu: int,
        commands: Iterable[Command | tuple],
        timeout_s: float = 10.0,
        *,
        on_message: Callable[[int, Message], None] | None = None,
        probe_s: float = 0.25,
    ) -> BatchAck:
        """Scripted mode: send ``commands`` (Command or ``(op, args)`` tuples) as one Batch to
        ``vcpu`` and wait for its BatchAck. Other messages arriving meanwhile go to
        ``on_message(vcpu, msg)`` or are kept for ``recv``; acks of batches an earlier call gave up
        on are dropped (``stale_acks``). Raises PeerUnreachable if the vCPU is not (or no longer)
        connected — checked every ``probe_s`` while waiting —, TimeoutError after ``timeout_s``,
        and AckMismatch at once when an ack names a batch this vCPU was never sent or not yet."""
        return self.call_many({vcpu: commands}, timeout_s, on_message=on_message, probe_s=probe_s)[vcpu]

    def call_many(
        self,
        batches: Mapping[int, Iterable[Command | tuple]],
        timeout_s: float = 10.0,
        *,
        on_message: Callable[[int, Message], None] | None = None,
        probe_s: float = 0.25,
    ) -> dict[int, BatchAck]:
        """``call`` for several vCPUs at once (all batches are sent first, so they run in
        parallel): returns ``{vcpu: BatchAck}``; same errors as ``call``."""
        waiting: dict[int, int] = {}
        try:
            for vcpu, commands in batches.items():
                seq = next(self._seq)
                why = self._send_frame(vcpu, self._encode(Batch(seq, _as_commands(commands))))
                if why == "unroutable":
                    raise PeerUnreachable(f"vcpu {vcpu} is not connected (no valid Hello or connection gone)")
                if why == "full":
                    raise PeerUnreachable(f"vcpu {vcpu} is not reading (send queue full)")
                waiting[vcpu] = seq
            acks: dict[int, BatchAck] = {}
            start = time.monotonic()
            deadline = start + timeout_s
            next_probe = start + probe_s if probe_s > 0 else float("inf")
            while waiting:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"no BatchAck from vcpu {sorted(waiting)} within {timeout_s:g}s")
                if now >= next_probe:
                    for v in waiting:
                        if not self.probe(v):
                            raise PeerUnreachable(f"vcpu {v} disconnected while running batch {waiting[v]}")
                    next_probe = now + probe_s
                item = self._recv_wire(max(0.0, min(deadline, next_probe) - now) * 1000.0)
                if item is None:
                    continue
                v, msg = item
                if type(msg) is BatchAck:
                    if waiting.get(v) == msg.seq:
                        del waiting[v]
                        acks[v] = msg
                    else:
                        _stale_ack(self._abandoned, self._counters, v, msg.seq, waiting.get(v))
                    continue
                self._set_aside(item, on_message)
            return acks
        finally:  # given up (timeout, peer gone, mismatch): an ack still in flight is stale, not an error
            _abandon(self._abandoned, waiting)


class CoordinatorChannel(BatchCalls):
    """The coordinator's ROUTER. Peers are addressed by vCPU index.

    ``recv`` returns ``(vcpu, msg)`` for every valid message of a known peer, including each valid
    Hello (so the caller can send that worker its Config); ``send``/``broadcast`` never block.

    ``max_message`` caps one received message, routing id included (default ``max_frame +
    ROUTING_ID_MAX``): the channel never keeps more of one message; a longer one, or one of more
    than two frames, is drained frame by frame and counted (``multipart``,
    ``oversized_multipart``, ``oversized``). What libzmq queues before the channel sees a message
    is bounded by who may connect: only peers that know the token pass the ZAP gate.
    """

    def __init__(self, run_dir: str | os.PathLike, token: str, *, endpoint: str | None = None,
                 allow_remote: bool = False, max_frame: int = MAX_FRAME, max_message: int | None = None,
                 hwm: int = HWM):
        if not isinstance(token, str) or len(token) < 8:
            raise UsageError("token must be a string of at least 8 characters (see new_token())")
        self.run_dir = Path(run_dir)
        endpoint = _endpoint_in(self.run_dir, endpoint, allow_remote)
        self._token = token.encode()
        self.max_frame = int(max_frame)
        #: cap of one received message, routing id included (see TimedReceiver)
        self.max_message = self.max_frame + ROUTING_ID_MAX if max_message is None else int(max_message)
        #: from a peer that never said a valid Hello, a bigger frame is no Hello: dropped undecoded
        self.hello_max = 4096 + len(self._token)
        self._ctx, self._gate, self._sock, self.endpoint = _open_router(endpoint, token, hwm)
        self._timed = TimedReceiver(self._sock, 2, self.max_message)
        self._by_ident: dict[bytes, int] = {}
        self._by_vcpu: dict[int, bytes] = {}
        self._spawned: dict[int, int] | None = None  # {vCPU index: pid} once bind() was called
        self.rejected_reasons: dict[str, int] = {}
        self._logged: set[str] = set()
        self.last_seen: dict[int, float] = {}
        self._pending: deque[tuple[int, Message]] = deque()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self.bad_frame_reasons: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._abandoned: dict[int, set[int]] = {}  # {vCPU: seqs of batches whose call gave up}: stale acks
        self._hb_seq = itertools.count(1)
        self._closed = False

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, int]:
        """Copy of the channel counters: received, sent, bad_frames, rejected_peers (refused Hellos,
        see rejected_reasons), unknown_peer, vcpu_mismatch, unroutable, send_full, replaced_peers,
        stale_acks, auth_denied (connections refused by the ZAP gate: wrong token)."""
        return {**self._counters, "auth_denied": self._gate.denied}

    @property
    def vcpus(self) -> list[int]:
        """vCPUs that said a valid Hello (sorted)."""
        return sorted(self._by_vcpu)

    def bind(self, vcpu: int, pid: int) -> None:
        """Process ``pid`` was spawned as ``vcpu`` (before any receive: Hellos wait in the socket).
        From the first call on, only a spawned index, with its pid, on its first connection, registers."""
        self._spawned = {**(self._spawned or {}), int(vcpu): int(pid)}

    def forget(self, vcpu: int) -> None:
        """Drop a peer (e.g. after its process was reaped); its later messages count as unknown."""
        ident = self._by_vcpu.pop(vcpu, None)
        if ident is not None:
            self._by_ident.pop(ident, None)
        self.last_seen.pop(vcpu, None)
        (self._spawned or {}).pop(vcpu, None)

    def _bad(self, reason: str, detail: str = "") -> None:
        self._counters["bad_frames"] += 1
        self.bad_frame_reasons[reason] = self.bad_frame_reasons.get(reason, 0) + 1
        _log_once(self._logged, "dropped a bad frame", reason, detail)

    # -- receive ------------------------------------------------------------------------------
    def _accept(self, parts: list[zmq.Frame]) -> tuple[int, Message] | None:
        """Validate one ROUTER message ([identity, frame]); None if it was counted and dropped."""
        if len(parts) != 2:
            self._bad("multipart")
            return None
        ident = parts[0].bytes
        frame = parts[1]
        c = self._counters
        if self.hello_max < len(frame) <= self.max_frame and ident not in self._by_ident:
            c["unknown_peer"] += 1  # not a Hello, and nobody we know: not worth decoding
            return None
        try:
            msg = decode(frame.buffer, self.max_frame)
        except BadFrame as e:
            self._bad(e.reason, e.detail)
            return None
        if type(msg) is Hello:
            why = hello_refusal(ident, msg, frame, self._token, self._spawned, self._by_vcpu, self.endpoint)
            if why is not None:
                return self._refuse(why, f"a Hello as vCPU {msg.vcpu}")
            old = self._by_vcpu.get(msg.vcpu)
            if old is not None and old != ident:
                self._by_ident.pop(old, None)
                c["replaced_peers"] += 1
            self._by_vcpu[msg.vcpu] = ident
            self._by_ident[ident] = msg.vcpu
            vcpu = msg.vcpu
        else:
            vcpu = self._by_ident.get(ident)
            if vcpu is None:
                c["unknown_peer"] += 1
                return None
            if getattr(msg, "vcpu", vcpu) != vcpu:
                c["vcpu_mismatch"] += 1
                return None
            why = sender_refusal(vcpu, frame, self._spawned, self.endpoint)
            if why is not None:  # the right routing id from another process (ROUTER_HANDOVER)
                return self._refuse(why, f"a message as vCPU {vcpu}")
        c["received"] += 1
        self.last_seen[vcpu] = time.monotonic()
        return vcpu, msg

    def _refuse(self, why: str, what: str) -> None:
        self._counters["rejected_peers"] += 1
        self.rejected_reasons[why] = self.rejected_reasons.get(why, 0) + 1
        _log_once(self._logged, f"refused {what}", why, "")

    def _recv_wire(self, timeout_ms: float) -> tuple[int, Message] | None:
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            got = self._timed.recv(deadline)
            if got is None:
                return None
            if type(got) is str:  # dropped whole by the receiver (too many frames / bytes)
                self._bad(got)
            else:
                item = self._accept(got)
                if item is not None:
                    return item
            if time.monotonic() >= deadline:  # a flood of bad frames cannot extend the timeout
                return None

    def recv(self, timeout_ms: float = 0) -> tuple[int, Message] | None:
        """Next ``(vcpu, msg)`` (messages set aside by ``wait_for_hellos``/``call`` first), or None
        after ``timeout_ms`` (0: only what is already there). Bad frames are counted, never raised."""
        if self._pending:
            return self._pending.popleft()
        return self._recv_wire(checked_timeout_ms(timeout_ms))

    # -- send ---------------------------------------------------------------------------------
    def _encode(self, msg: Msg) -> bytes:
        frame = encode(msg)
        if len(frame) > self.max_frame:
            raise BadFrame("oversized", f"refusing to send {type(msg).__name__} of {len(frame)} bytes")
        return frame

    def _send_frame(self, vcpu: int, frame: bytes) -> str | None:
        """Queue one frame for ``vcpu``; None on success, else why not ("unroutable", "full")."""
        ident = self._by_vcpu.get(vcpu)
        if ident is None:
            self._counters["unroutable"] += 1
            return "unroutable"
        try:
            self._sock.send_multipart((ident, frame), zmq.NOBLOCK)
        except zmq.Again:
            self._counters["send_full"] += 1
            return "full"
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self._counters["unroutable"] += 1
                return "unroutable"
            raise
        self._counters["sent"] += 1
        return None

    def send(self, vcpu: int, msg: Msg) -> bool:
        """Queue ``msg`` for ``vcpu`` without blocking. False (and counted) if that vCPU never said
        Hello, its connection is gone (``unroutable``) or its queue is full (``send_full``).
        Raises BadFrame for a message bigger than ``max_frame`` (a bug of the sender)."""
        return self._send_frame(vcpu, self._encode(msg)) is None

    def broadcast(self, msg: Msg) -> int:
        """Send ``msg`` to every known vCPU; returns how many it was queued for."""
        frame = self._encode(msg)
        return sum(self._send_frame(v, frame) is None for v in list(self._by_vcpu))

    def probe(self, vcpu: int) -> bool:
        """Is ``vcpu`` still connected? Sends it a coordinator Heartbeat (vcpu=-1); False if the
        route is gone (its process died and the connection closed) or it never said Hello."""
        return self._send_frame(vcpu, encode(Heartbeat(-1, next(self._hb_seq)))) != "unroutable"

    # -- helpers ------------------------------------------------------------------------------
    def _set_aside(self, item, on_message):
        if on_message is None:
            self._pending.append(item)
        else:
            on_message(*item)

    def wait_for_hellos(
        self,
        n: int,
        timeout_s: float,
        *,
        on_message: Callable[[int, Message], None] | None = None,
    ) -> list[int]:
        """Start barrier: wait until ``n`` distinct vCPUs have said a valid Hello. Hellos are
        consumed; other messages go to ``on_message(vcpu, msg)`` or are kept for ``recv``.
        Returns the sorted vCPU list; raises TimeoutError naming what is missing."""
        deadline = time.monotonic() + timeout_s
        while len(self._by_vcpu) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{len(self._by_vcpu)}/{n} vCPUs said hello within {timeout_s:g}s "
                    f"(have {self.vcpus}; counters {self.counters})"
                )
            item = self._recv_wire(remaining * 1000.0)
            if item is not None and type(item[1]) is not Hello:
                self._set_aside(item, on_message)
        return self.vcpus

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket (linger 0: queued messages are discarded) and its context. Idempotent.
        The run directory is the caller's (remove_run_dir)."""
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        self._ctx.term()  # the gate's recv fails with ETERM, it closes its socket and ends
        self._gate.join(5.0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def __enter__(self) -> CoordinatorChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
