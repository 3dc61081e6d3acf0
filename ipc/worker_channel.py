"""The vCPU worker's end of the ZeroMQ control channel (a DEALER; the coordinator's ROUTER and
everything both ends share are in :mod:`ipc.channel`)."""

from __future__ import annotations

import os
import time
from collections import deque

import zmq

from ipc.channel import HWM, TimedReceiver, checked_timeout_ms, set_common, worker_identity
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


class WorkerChannel:
    """A vCPU worker's DEALER, connected to the coordinator's endpoint. Create it in the worker
    process. Sends never block (a full queue, e.g. coordinator gone, is counted in ``dropped``)."""

    def __init__(
        self,
        endpoint: str,
        vcpu: int,
        token: str,
        *,
        max_frame: int = MAX_FRAME,
        hwm: int = HWM,
    ):
        if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://")):
            raise UsageError(f"unsupported endpoint {endpoint!r}")
        if type(vcpu) is not int or vcpu < 0:
            raise UsageError(f"bad vcpu index {vcpu!r}")
        self.vcpu = vcpu
        self.endpoint = endpoint
        self._token = token
        self.max_frame = int(max_frame)
        self.identity = worker_identity(vcpu)
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.DEALER)
        try:
            set_common(self._sock, hwm)
            self._sock.setsockopt(zmq.ROUTING_ID, self.identity)
            if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://::"):
                self._sock.setsockopt(zmq.IPV6, 1)
            self._sock.connect(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            self._ctx.term()
            raise
        self._timed = TimedReceiver(self._sock)
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
            parts = self._timed.recv(deadline)
            if parts is None:
                return None
            if len(parts) != 1:
                reason = "multipart"
            else:
                try:
                    msg = decode(parts[0], self.max_frame)
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

    def close(self) -> None:
        """Close the socket (linger 0) and its context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> WorkerChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
