"""Typed messages of the ZeroMQ control / telemetry channel (DESIGN.md hard rules 1 and 5).

Every message is a :class:`msgspec.Struct` in one tagged union (:data:`Message`), encoded as a
msgpack map ``{"type": <tag>, ..., "version": VERSION}``. Never pickle. The channel carries control
(config, start barrier, stop, fault injection, scripted command batches) and telemetry (stats
snapshots, WARN events, heartbeats, results); the hot path never goes through it.

This module knows nothing about KVM: a :class:`Command` is a name plus arguments, a :class:`Config`
or :class:`Fault` a dict of named values; the vm/ layer gives them meaning.

:func:`decode` never raises anything but :class:`BadFrame` on wire input, whatever the bytes are.

Every field has a strict type (issue 21): what decodes is what the coordinator can keep, print and
write as JSON. Names (dict keys, WARN and fault kinds) are short printable ASCII (:data:`Name`);
floats are finite (JSON has no NaN or infinity); a Warn's ``data`` and a Fault's ``args`` hold flat
scalars; the free-form values (Config payload, Result data, command arguments and results) may
nest a few levels of lists and named dicts of scalars (and bytes), checked by ``__post_init__``.
A peer's text that is shown (WARN kind / message, a result's strings, a command's error) has its
control characters escaped on arrival (:func:`printable`): no escape sequence reaches a terminal.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Annotated, Any, Union

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
    "Name",
    "FiniteFloat",
    "Scalar",
    "printable",
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
#: Nesting allowed in the free-form values (Config payload, Result data, CommandResult value).
_MAX_VALUE_DEPTH = 6

#: A name: dict keys of every message, WARN and fault kinds (printable ASCII, no space, 1..64).
NAME_PATTERN = r"^[A-Za-z0-9_.:/+-]{1,64}\Z"
_NAME_RE = re.compile(NAME_PATTERN)
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
#: A float JSON can hold: NaN and +-inf are refused on decode.
FiniteFloat = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
#: A value of a Warn's data or a Fault's args.
Scalar = Union[bool, int, FiniteFloat, str]  # noqa: UP007


def _escape_char(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def printable(s: str, multiline: bool = False) -> str:
    """``s`` with every character that is not printable (C0 and C1 controls such as ESC and CSI,
    DEL, bidi and other format characters, line and paragraph separators, unassigned code points)
    written as a ``\\xNN`` / ``\\uNNNN`` escape, so that a peer's text can be shown on a terminal or
    in a report as text and nothing else. ``multiline``: newlines and tabs are kept (a traceback).
    Idempotent; printable text (ASCII, accented letters, ``µs``) is returned unchanged."""
    if s.isprintable():
        return s
    keep = "\n\t" if multiline else ""
    return "".join(c if c.isprintable() or c in keep else _escape_char(c) for c in s)


def _check_value(v: Any, depth: int, where: str) -> None:
    """A free-form value: None, bool, int, finite float, str, bytes, or lists / dicts (keys: names)
    of those, nested at most ``_MAX_VALUE_DEPTH`` deep. Raises TypeError / ValueError (a decode
    turns either into a ValidationError, i.e. a BadFrame)."""
    t = type(v)
    if t is str or t is int or t is bool or t is bytes or v is None:
        return
    if t is float:
        if not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not a finite number")
        return
    if t is not list and t is not dict:
        raise TypeError(f"{where}: unsupported type {t.__name__}")
    if depth >= _MAX_VALUE_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_VALUE_DEPTH}")
    if t is list:
        for i, x in enumerate(v):
            _check_value(x, depth + 1, f"{where}[{i}]")
        return
    for k, x in v.items():
        if type(k) is not str or _NAME_RE.match(k) is None:
            raise ValueError(f"{where}: key {k!r:.40} is not a name")
        _check_value(x, depth + 1, f"{where}.{k}")


def _shown(d: dict) -> dict:
    """``d``, or a copy whose str values have their control characters escaped (they may be shown;
    newlines are kept)."""
    if all(type(v) is not str or v.isprintable() for v in d.values()):
        return d
    return {k: printable(v, multiline=True) if type(v) is str else v for k, v in d.items()}


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

    vcpu: Annotated[int, msgspec.Meta(ge=0)]
    pid: Annotated[int, msgspec.Meta(ge=1)]  # the coordinator compares it with the pid it spawned
    token: str


class Config(Msg, tag="config"):
    """coordinator -> worker: the welcome; ``payload`` schema belongs to the vm/ layer (a free-form
    value: see :func:`_check_value`)."""

    payload: dict[Name, Any] = {}

    def __post_init__(self):
        _check_value(self.payload, 0, "payload")


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
    counters: dict[Name, int]
    t_ns: int = 0


class Warn(Msg, tag="warn"):
    """worker -> coordinator: a WARN event (kind e.g. ``redundant_register``, ``rcu_stall``);
    ``data``: named scalars. ``message`` and str data are shown: their control characters are
    escaped (a data string may keep its newlines, e.g. a traceback)."""

    vcpu: int
    kind: Name
    message: str = ""
    data: dict[Name, Scalar] = {}

    def __post_init__(self):
        if not self.message.isprintable():
            self.message = printable(self.message)
        self.data = _shown(self.data)


#: Result data keys the coordinator reads, and their types (``ok`` is the message's own field).
_RESULT_KEYS = {"error": (str,), "ops": (int,), "line_transfers": (int,)}


class Result(Msg, tag="result"):
    """worker -> coordinator: final report of a worker. ``data`` is free-form (see
    :func:`_check_value`) except for the keys the coordinator reads: ``error`` (str, shown, so its
    control characters are escaped), ``ops`` and ``line_transfers`` (int); no ``ok``."""

    vcpu: int
    ok: bool
    data: dict[Name, Any] = {}

    def __post_init__(self):
        data = self.data
        _check_value(data, 0, "data")
        if "ok" in data:
            raise ValueError("data: key 'ok' is the result's own field")
        for k, types in _RESULT_KEYS.items():
            if k in data and (type(data[k]) not in types):
                raise ValueError(f"data.{k}: expected {types[0].__name__}, got {type(data[k]).__name__}")
        self.data = _shown(data)


class Fault(Msg, tag="fault"):
    """coordinator -> worker: fault injection command (meaning owned by the vm/ layer)."""

    kind: Name
    args: dict[Name, Scalar] = {}


# --- scripted mode ----------------------------------------------------------------------------


def _check_arg(value: Any, depth: int) -> bool:
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, _ARG_SCALARS):
        return True
    if isinstance(value, list) and depth < _MAX_ARG_DEPTH:
        return all(_check_arg(v, depth + 1) for v in value)
    return False


class Command(msgspec.Struct, forbid_unknown_fields=True):
    """One scripted command: ``op`` (e.g. ``"vmrun"``) and arguments whose values are
    int | finite float | str | bytes | bool | None | list of those."""

    op: Name
    args: dict[Name, Any] = {}

    def __post_init__(self):
        for v in self.args.values():
            if type(v) not in _ARG_SCALAR_SET or type(v) is float:
                self._check_args()
                break

    def _check_args(self):
        for k, v in self.args.items():
            if not _check_arg(v, 0):
                raise TypeError(f"argument {k!r} of {self.op!r} has unsupported type {type(v).__name__}")


class CommandResult(msgspec.Struct, forbid_unknown_fields=True):
    """Outcome of one Command: ``value`` on success (free-form: see :func:`_check_value`),
    ``error`` (one line, shown: its control characters are escaped) on failure."""

    ok: bool
    value: Any = None
    error: str = ""

    def __post_init__(self):
        if type(self.value) is not int and self.value is not None:  # the common cases, quickly
            _check_value(self.value, 0, "value")
        if not self.error.isprintable():
            self.error = printable(self.error)


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
