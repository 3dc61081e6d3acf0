"""Typed messages of the ZeroMQ control / telemetry channel (DESIGN.md hard rules 1 and 5).

Every message is a :class:`msgspec.Struct` in one tagged union (:data:`Message`), encoded as a
msgpack map ``{"type": <tag>, ..., "version": VERSION}``. Never pickle. The channel carries control
(config, start barrier, stop, fault injection, scripted command batches) and telemetry (stats
snapshots, WARN events, heartbeats, results); the hot path never goes through it.

This module knows nothing about KVM: a :class:`Command` is a name plus arguments, a :class:`Config`
or :class:`Fault` a free-form dict; the vm/ layer gives them meaning.

:func:`decode` never raises anything but :class:`BadFrame` on wire input, whatever the bytes are.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from ipc.errors import UsageError

__all__ = [
    "VERSION",
    "MAX_FRAME",
    "BadFrame",
    "Msg",
    "Hello",
    "Config",
    "Start",
    "Stop",
    "Heartbeat",
    "Stats",
    "Warn",
    "Result",
    "Fault",
    "Command",
    "CommandResult",
    "Batch",
    "BatchAck",
    "Message",
    "MESSAGE_TYPES",
    "encode",
    "decode",
]

#: Protocol version carried by every message; a frame with another version is a BadFrame.
VERSION = 1

#: Largest frame decode() accepts by default (the channel counts and drops bigger ones).
MAX_FRAME = 1 << 20  # 1 MiB

#: Types allowed as Command argument values (lists may nest these, not dicts).
_ARG_SCALARS = (bool, int, float, str, bytes, type(None))
_ARG_SCALAR_SET = frozenset(_ARG_SCALARS)
_MAX_ARG_DEPTH = 4


class BadFrame(UsageError):
    """A frame that is not a valid message of this protocol version.

    ``reason`` is a short token (``oversized``, ``not_msgpack``, ``not_a_message``, ``missing_type``,
    ``unknown_type``, ``bad_version``, ``missing_field``, ``unknown_field``, ``wrong_type``,
    ``bad_value``, ``too_deep``, ``invalid``); ``str(exc)`` adds the detail. The channels count
    frames under these reasons and, for what they drop before decoding (see
    :class:`ipc.worker_channel.TimedReceiver`), ``multipart`` and ``oversized_multipart``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Msg(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Base of every message: carries the protocol ``version`` (always encoded)."""

    version: int = VERSION


# --- handshake / lifecycle -------------------------------------------------------------------


class Hello(Msg, tag="hello"):
    """worker -> coordinator: first message of a worker; ``token`` is the per-run secret."""

    vcpu: int
    pid: int
    token: str


class Config(Msg, tag="config"):
    """coordinator -> worker: the welcome; ``payload`` schema belongs to the vm/ layer."""

    payload: dict[str, Any] = {}


class Start(Msg, tag="start"):
    """coordinator -> worker: start barrier released; ``t0_ns`` is the common time origin."""

    t0_ns: int


class Stop(Msg, tag="stop"):
    """coordinator -> worker: stop running and report a Result."""

    reason: str = ""


# --- telemetry --------------------------------------------------------------------------------


class Heartbeat(Msg, tag="heartbeat"):
    """Either direction (the coordinator uses ``vcpu=-1``); ``ops`` = work done so far."""

    vcpu: int
    seq: int
    ops: int = 0


class Stats(Msg, tag="stats"):
    """worker -> coordinator: snapshot of counters (``t_ns``: when it was taken, optional)."""

    vcpu: int
    counters: dict[str, int]
    t_ns: int = 0


class Warn(Msg, tag="warn"):
    """worker -> coordinator: a WARN event (kind e.g. ``redundant_register``, ``rcu_stall``)."""

    vcpu: int
    kind: str
    message: str = ""
    data: dict[str, Any] = {}


class Result(Msg, tag="result"):
    """worker -> coordinator: final report of a worker."""

    vcpu: int
    ok: bool
    data: dict[str, Any] = {}


class Fault(Msg, tag="fault"):
    """coordinator -> worker: fault injection command (meaning owned by the vm/ layer)."""

    kind: str
    args: dict[str, Any] = {}


# --- scripted mode ----------------------------------------------------------------------------


def _check_arg(value: Any, depth: int) -> bool:
    if isinstance(value, _ARG_SCALARS):
        return True
    if isinstance(value, list) and depth < _MAX_ARG_DEPTH:
        return all(_check_arg(v, depth + 1) for v in value)
    return False


class Command(msgspec.Struct, forbid_unknown_fields=True):
    """One scripted command: ``op`` (e.g. ``"vmrun"``) and arguments whose values are
    int | float | str | bytes | bool | None | list of those."""

    op: str
    args: dict[str, Any] = {}

    def __post_init__(self):
        for v in self.args.values():
            if type(v) not in _ARG_SCALAR_SET:
                self._check_args()
                break

    def _check_args(self):
        for k, v in self.args.items():
            if not _check_arg(v, 0):
                raise TypeError(f"argument {k!r} of {self.op!r} has unsupported type {type(v).__name__}")


class CommandResult(msgspec.Struct, forbid_unknown_fields=True):
    """Outcome of one Command: ``value`` on success, ``error`` (one line) on failure."""

    ok: bool
    value: Any = None
    error: str = ""


class Batch(Msg, tag="batch"):
    """coordinator -> worker: execute ``commands`` in order, answer one BatchAck with the same seq."""

    seq: int
    commands: list[Command]


class BatchAck(Msg, tag="batch_ack"):
    """worker -> coordinator: one result per executed command of Batch ``seq`` (a worker may stop
    at the first failure, so ``len(results) <= len(commands)``)."""

    seq: int
    vcpu: int
    results: list[CommandResult]


Message = Union[Hello, Config, Start, Stop, Heartbeat, Stats, Warn, Result, Fault, Batch, BatchAck]  # noqa: UP007
MESSAGE_TYPES: tuple[type[Msg], ...] = (
    Hello, Config, Start, Stop, Heartbeat, Stats, Warn, Result, Fault, Batch, BatchAck,
)
_TAGS = frozenset(t.__struct_config__.tag for t in MESSAGE_TYPES)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class _Envelope(msgspec.Struct):
    """First pass over a frame: only ``type`` and ``version`` are looked at (other fields are
    skipped), so that a frame of another protocol version is reported as such whatever its body."""

    type: Any = msgspec.UNSET
    version: Any = msgspec.UNSET


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode(msg: Msg) -> bytes:
    """msgpack bytes of ``msg`` (raises TypeError for a non-message or unencodable contents)."""
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"not a message: {type(msg).__name__}")
    return _encoder.encode(msg)


def _field_error(err: msgspec.ValidationError) -> BadFrame:
    text = str(err)
    if text.startswith("Object missing required field"):
        return BadFrame("missing_field", text)
    if text.startswith("Object contains unknown field"):
        return BadFrame("unknown_field", text)
    if text.startswith("Expected"):
        return BadFrame("wrong_type", text)
    return BadFrame("bad_value", text)


def decode(buf: bytes | bytearray | memoryview, max_size: int = MAX_FRAME) -> Message:
    """Decode one frame. Raises :class:`BadFrame` (and nothing else) if ``buf`` is bigger than
    ``max_size``, not msgpack, not a message, of another protocol version (or without one), of an
    unknown type, or has missing / unknown / wrongly typed fields."""
    try:
        n = len(buf)
        # pass 1: envelope (type + version); pass 2: the typed union.
        try:
            if n > max_size:
                raise BadFrame("oversized", f"{n} > {max_size} bytes")
            env = _envelope_decoder.decode(buf)
        except msgspec.ValidationError as e:
            raise BadFrame("not_a_message", str(e)) from None
        version = env.version
        if version is msgspec.UNSET:
            raise BadFrame("missing_field", "Object missing required field `version`")
        if type(version) is not int or version != VERSION:
            raise BadFrame("bad_version", f"{version!r:.32} != {VERSION}")
        tag = env.type
        if tag is msgspec.UNSET:
            raise BadFrame("missing_type", "Object missing required field `type`")
        if type(tag) is not str or tag not in _TAGS:
            raise BadFrame("unknown_type", f"{tag!r:.64}")
        try:
            return _decoder.decode(buf)
        except msgspec.ValidationError as e:
            raise _field_error(e) from None
    except BadFrame:
        raise
    except msgspec.DecodeError as e:
        raise BadFrame("not_msgpack", str(e)) from None
    except RecursionError:
        raise BadFrame("too_deep", "nesting too deep") from None
    except Exception as e:  # noqa: BLE001 - wire input must never crash a process
        raise BadFrame("invalid", f"{type(e).__name__}: {e}"[:200]) from None
