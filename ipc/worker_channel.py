"""The vCPU worker's end of the ZeroMQ control channel (a DEALER), and the socket plumbing both
ends share: frame limits, PLAIN credentials, the bounded frame-by-frame receive. The coordinator's
ROUTER, its ZAP gate and the endpoint rules are in :mod:`ipc.channel`, which re-exports these."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import deque

import zmq

from ipc.errors import UsageError
from ipc.messages import (
    MAX_FRAME,
    BadFrame,
    BatchAck,
    CommandResult,
    Config,
    Hello,
    Message,
    Msg,
    decode,
    encode,
)

#: Send / receive high-water mark (messages) of every socket.
HWM = 10_000
#: ZMQ_MAXMSGSIZE: libzmq drops the *connection* of a peer sending a bigger frame. Frames between
#: MAX_FRAME and this are delivered and then counted / dropped by decode() (reason "oversized").
HARD_MAX_FRAME = 4 * MAX_FRAME
#: Longest ZeroMQ routing id (one length byte). A message to the coordinator is [routing id,
#: frame]: its default cap (``max_message``) is max_frame + ROUTING_ID_MAX bytes in 2 frames.
ROUTING_ID_MAX = 255
#: A too-big message is drained frame by frame; the clock is read every DRAIN_BATCH frames (and
#: at least that many are taken per receive, so that even recv(0) makes progress).
DRAIN_BATCH = 256
#: ZMTP PLAIN user name of every peer; the password is derived from the run token (plain_password).
PLAIN_USER = b"pagetrack-sim"


def worker_identity(vcpu: int) -> bytes:
    """DEALER routing id of a worker: ``vcpu-<n>-<32 hex>`` (random part: a restarted worker is a
    new peer, and nobody can take over a route without knowing it)."""
    return f"vcpu-{int(vcpu)}-{secrets.token_hex(16)}".encode()  # 128 random bits: not guessable


def set_common(sock: zmq.Socket, hwm: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_FRAME)


def plain_password(token: str) -> bytes:
    """ZMTP PLAIN password of a run: a digest of the token (fixed length; PLAIN allows 255 bytes)."""
    return hashlib.sha256(b"pagetrack-sim plain\0" + token.encode("utf-8", "replace")).hexdigest().encode()


def set_plain_client(sock: zmq.Socket, token: str) -> None:
    """Make ``sock`` (before it connects) prove to the coordinator's ZAP gate that it knows ``token``."""
    sock.setsockopt(zmq.PLAIN_USERNAME, PLAIN_USER)
    sock.setsockopt(zmq.PLAIN_PASSWORD, plain_password(token))


class TimedReceiver:
    """Receive one message with a deadline, frame by frame, keeping at most ``max_parts`` frames
    and ``max_bytes`` bytes of it.

    The deadline is ZMQ_RCVTIMEO (set only when it changes): one wake-up per message, no poller
    round trip, never waits past the deadline (1 ms grain). Frames are zero-copy ``zmq.Frame``s.
    ZMQ_MAXMSGSIZE bounds a frame, not a message; a message over either cap is not kept: each of
    its remaining frames is received and released at once (drained) and ``recv`` returns the
    reason, ``multipart`` (too many frames), ``oversized_multipart`` (too many frames and bytes)
    or ``oversized`` (too many bytes). A drain reads the clock every DRAIN_BATCH frames and goes
    on in the next call if the deadline comes first: a long message cannot stretch a timeout.

    libzmq hands a multipart message over only once all of it has arrived, so this bounds what
    the channel keeps, not what libzmq queued; who may send at all is the ZAP gate's business."""

    __slots__ = ("_sock", "_rcvtimeo", "max_parts", "max_bytes", "_drain_parts", "_drain_bytes")

    def __init__(self, sock: zmq.Socket, max_parts: int, max_bytes: int):
        self._sock = sock
        self._rcvtimeo = None
        self.max_parts = max_parts
        self.max_bytes = max_bytes
        self._drain_parts = 0  # > 0: the rest of a dropped message is still to be drained
        self._drain_bytes = 0

    def recv(self, deadline: float) -> list[zmq.Frame] | str | None:
        """The frames of the next message, a reason (str) for a dropped one, or None (deadline)."""
        if self._drain_parts:
            return self._drain(deadline)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # non-blocking look (a vCPU's inbox check): no exception when nothing is there
            if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return None
            ms = 0
        else:
            ms = max(1, int(remaining * 1000.0 + 0.999))
        if ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            frame = self._sock.recv(copy=False)
        except zmq.Again:
            return None
        parts = [frame]
        size = len(frame)
        while frame.more:
            if len(parts) >= self.max_parts or size > self.max_bytes:
                self._drain_parts, self._drain_bytes = len(parts), size
                parts = frame = None  # release what was kept before draining the rest
                return self._drain(deadline)
            frame = self._sock.recv(zmq.NOBLOCK, copy=False)  # the rest is queued already
            parts.append(frame)
            size += len(frame)
        return "oversized" if size > self.max_bytes else parts

    def _drain(self, deadline: float) -> str | None:
        sock, n, size = self._sock, self._drain_parts, self._drain_bytes
        more = True
        while more:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # cannot happen (a message is queued whole): end it here
                break
            n += 1
            size += len(frame)
            more = frame.more
            frame = None
            if more and (n - self._drain_parts) % DRAIN_BATCH == 0 and time.monotonic() >= deadline:
                self._drain_parts, self._drain_bytes = n, size
                return None
        self._drain_parts = 0
        if n > self.max_parts:
            return "oversized_multipart" if size > self.max_bytes else "multipart"
        return "oversized"


def checked_timeout_ms(timeout_ms: float) -> float:
    if timeout_ms is None or timeout_ms < 0:
        raise ValueError("timeout_ms must be >= 0 (every receive has a timeout)")
    return float(timeout_ms)


CLOSE_LINGER_MS = 500  # how long a closing worker may take to flush its last messages


class WorkerChannel:
    """A vCPU worker's DEALER, connected to the coordinator's endpoint. Create it in the worker
    process. Sends never block (a full queue, e.g. coordinator gone, is counted in ``dropped``).

    Every message from the coordinator is one frame: ``max_message`` (default ``max_frame``) caps
    what one received message may hold; a longer or multipart one is drained and counted."""

    def __init__(
        self,
        endpoint: str,
        vcpu: int,
        token: str,
        *,
        max_frame: int = MAX_FRAME,
        max_message: int | None = None,
        hwm: int = HWM,
    ):
        if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://")):
            raise UsageError(f"unsupported endpoint {endpoint!r}")
        if type(vcpu) is not int or vcpu < 0:
            raise UsageError(f"bad vcpu index {vcpu!r}")
        if not isinstance(token, str):
            raise UsageError("token must be a string")
        self.vcpu = vcpu
        self.endpoint = endpoint
        self._token = token
        self.max_frame = int(max_frame)
        self.max_message = self.max_frame if max_message is None else int(max_message)
        self.identity = worker_identity(vcpu)
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.DEALER)
        try:
            set_common(self._sock, hwm)
            self._sock.setsockopt(zmq.ROUTING_ID, self.identity)
            set_plain_client(self._sock, token)
            if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://::"):
                self._sock.setsockopt(zmq.IPV6, 1)
            self._sock.connect(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            self._ctx.term()
            raise
        self._timed = TimedReceiver(self._sock, 1, self.max_message)
        self._pending: deque[Message] = deque()
        self._counters = {"received": 0, "sent": 0, "dropped": 0, "bad_frames": 0}
        self.bad_frame_reasons: dict[str, int] = {}
        self._closed = False

    @property
    def counters(self) -> dict[str, int]:
        """Copy of: received, sent, dropped (send queue full), bad_frames."""
        return dict(self._counters)

    def send(self, msg: Msg) -> bool:
        """Queue ``msg`` for the coordinator without blocking; False (counted) if the queue is
        full. Raises BadFrame for a message bigger than ``max_frame``."""
        frame = encode(msg)
        if len(frame) > self.max_frame:
            raise BadFrame("oversized", f"refusing to send {type(msg).__name__} of {len(frame)} bytes")
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self._counters["dropped"] += 1
            return False
        self._counters["sent"] += 1
        return True

    def hello(self) -> bool:
        """Send Hello(vcpu, pid, token)."""
        return self.send(Hello(self.vcpu, os.getpid(), self._token))

    def ack(self, seq: int, results: list[CommandResult]) -> bool:
        """Answer Batch ``seq`` with one CommandResult per executed command."""
        return self.send(BatchAck(seq, self.vcpu, results))

    def _recv_wire(self, timeout_ms: float) -> Message | None:
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            got = self._timed.recv(deadline)
            if got is None:
                return None
            if type(got) is str:
                reason = got
            else:
                try:
                    msg = decode(got[0].buffer, self.max_frame)
                except BadFrame as e:
                    reason = e.reason
                else:
                    self._counters["received"] += 1
                    return msg
            self._counters["bad_frames"] += 1
            self.bad_frame_reasons[reason] = self.bad_frame_reasons.get(reason, 0) + 1
            if time.monotonic() >= deadline:
                return None

    def recv(self, timeout_ms: float = 0) -> Message | None:
        """Next message from the coordinator (those set aside by ``handshake`` first) or None
        after ``timeout_ms``. Bad frames are counted, never raised."""
        if self._pending:
            return self._pending.popleft()
        return self._recv_wire(checked_timeout_ms(timeout_ms))

    def handshake(self, timeout_s: float) -> Config:
        """Send Hello and wait for the coordinator's Config (other messages are kept for
        ``recv``). TimeoutError if none comes (coordinator gone, or our token was rejected)."""
        self.hello()
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"vcpu {self.vcpu}: no Config from {self.endpoint} within {timeout_s:g}s "
                    "(coordinator gone or token rejected)"
                )
            msg = self._recv_wire(remaining * 1000.0)
            if msg is None:
                continue
            if type(msg) is Config:
                return msg
            self._pending.append(msg)

    def close(self, linger_ms: int = CLOSE_LINGER_MS) -> None:
        """Close the socket and its context. Idempotent. Messages still queued (a vCPU's final
        Result, sent just before it exits) get up to ``linger_ms`` to reach the coordinator; a
        coordinator that is gone costs no more than that."""
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=max(0, int(linger_ms)))
        self._ctx.term()

    def __enter__(self) -> WorkerChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
