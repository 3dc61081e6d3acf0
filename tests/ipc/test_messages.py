"""ipc.messages: typed, versioned msgpack messages; decode() raises only BadFrame on any input."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipc import messages as M
from ipc.messages import (
    MAX_FRAME,
    MESSAGE_TYPES,
    VERSION,
    BadFrame,
    Batch,
    BatchAck,
    Command,
    CommandResult,
    Config,
    Fault,
    Heartbeat,
    Hello,
    Result,
    Start,
    Stats,
    Stop,
    Warn,
    decode,
    encode,
    printable,
)

HSET = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

EXAMPLES = [
    Hello(vcpu=3, pid=12345, token="0123456789abcdef"),
    Config(payload={"design": "rcu-list", "n_l2": 4, "ratios": [0.5, 0.25], "blob": b"\x00\xff", "nested": {"a": None}}),
    Config(),
    Start(t0_ns=1_700_000_000_123_456_789),
    Stop(reason="duration elapsed"),
    Stop(),
    Heartbeat(vcpu=-1, seq=7),
    Heartbeat(vcpu=2, seq=8, ops=1 << 40),
    Stats(vcpu=1, counters={"vmrun": 10, "writes": 2**63 - 1, "neg": -5}, t_ns=99),
    Warn(vcpu=0, kind="redundant_register", message="kvm_page_track_register_notifier: node live", data={"node": 4}),
    Result(vcpu=5, ok=False, data={"error": "oracle: stale entry", "gfn": 0x1234}),
    Fault(kind="broken_gp", args={"domain": "srcu", "p": 0.5}),
    Batch(seq=1, commands=[
        Command("vmrun", {"l2": 3}),
        Command("write", {"gpa": 0xFEE0_0000, "data": b"\x01\x02", "size": 2}),
        Command("nop"),
        Command("mixed", {"f": 1.5, "b": True, "n": None, "s": "x", "l": [1, "a", b"b", [2.0, None]]}),
    ]),
    Batch(seq=2**40, commands=[]),
    BatchAck(seq=1, vcpu=3, results=[CommandResult(True, 42), CommandResult(False, None, "no such L2"),
                                    CommandResult(True, {"entries": [1, 2]})]),
]


def test_examples_cover_every_type():
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES)
    assert len(MESSAGE_TYPES) == len(M._TAGS)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_every_type(msg):
    buf = encode(msg)
    assert isinstance(buf, bytes)
    out = decode(buf)
    assert type(out) is type(msg)
    assert out == msg
    assert out.version == VERSION
    # the version and the type tag are on the wire, as plain msgpack
    raw = msgspec.msgpack.decode(buf)
    assert raw["version"] == VERSION
    assert raw["type"] == type(msg).__struct_config__.tag


def test_never_pickle():
    for msg in EXAMPLES:
        buf = encode(msg)
        assert not buf.startswith(b"\x80")  # pickle protocol >= 2 header


def _raw(**fields):
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize(
    "buf, reason",
    [
        (b"", "not_msgpack"),
        (b"\xc1", "not_msgpack"),
        (b"hello world", "not_a_message"),  # 'h' is a positive fixint
        (b"\xc1hello", "not_msgpack"),
        (encode(Stop("x")) + b"\x00", "not_msgpack"),  # trailing bytes
        (encode(Stop("x"))[:-1], "not_msgpack"),  # truncated
        (msgspec.msgpack.encode([1, 2, 3]), "not_a_message"),
        (msgspec.msgpack.encode(7), "not_a_message"),
        (_raw(version=VERSION), "missing_type"),
        (_raw(type="nope", version=VERSION), "unknown_type"),
        (_raw(type=5, version=VERSION), "unknown_type"),
        (_raw(type="stop"), "missing_field"),  # no version field at all
        (_raw(type="stop", version=VERSION + 1), "bad_version"),
        (_raw(type="stop", version="1"), "bad_version"),
        (_raw(type="stop", version=True), "bad_version"),
        # a future version with another body is reported as a version problem, not a field problem
        (_raw(type="hello", version=VERSION + 1, who="x"), "bad_version"),
        (_raw(type="hello", version=VERSION, vcpu=1, pid=2), "missing_field"),
        (_raw(type="hello", version=VERSION, vcpu="1", pid=2, token="t"), "wrong_type"),
        (_raw(type="hello", version=VERSION, vcpu=1.0, pid=2, token="t"), "wrong_type"),
        (_raw(type="hello", version=VERSION, vcpu=True, pid=2, token="t"), "wrong_type"),
        (_raw(type="hello", version=VERSION, vcpu=1, pid=2, token="t", extra=1), "unknown_field"),
        (_raw(type="stats", version=VERSION, vcpu=1, counters={"a": "b"}), "wrong_type"),
        (_raw(type="batch", version=VERSION, seq=1, commands=[{"op": "x", "args": {"a": {"b": 1}}}]), "bad_value"),
        (_raw(type="batch", version=VERSION, seq=1, commands=[{"args": {}}]), "missing_field"),
        (_raw(type="batch_ack", version=VERSION, seq=1, vcpu=0, results=[{"ok": 1}]), "wrong_type"),
        (b"\x91" * 200_000 + b"\x01", "not_a_message"),
        (b"\x81\xa4type" + b"\x91" * 200_000 + b"\x01", "too_deep"),
        (b"\xdf\xff\xff\xff\xff", "not_msgpack"),  # map claiming 4G entries
        (b"\xdd\xff\xff\xff\xff", "not_a_message"),  # array claiming 4G elements
    ],
)
def test_bad_frames_have_reasons(buf, reason):
    with pytest.raises(BadFrame) as ei:
        decode(buf)
    assert ei.value.reason == reason, str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_size_limit():
    msg = Config(payload={"blob": b"x" * 1000})
    buf = encode(msg)
    assert decode(buf, max_size=len(buf)) == msg
    with pytest.raises(BadFrame) as ei:
        decode(buf, max_size=len(buf) - 1)
    assert ei.value.reason == "oversized"
    assert MAX_FRAME == 1 << 20
    with pytest.raises(BadFrame, match="oversized"):
        decode(b"\x00" * (MAX_FRAME + 1))


def test_decode_accepts_buffers_and_rejects_non_buffers():
    buf = encode(Stop("x"))
    assert decode(bytearray(buf)) == Stop("x")
    assert decode(memoryview(buf)) == Stop("x")
    for junk in (None, 5, "text", object()):
        with pytest.raises(BadFrame):
            decode(junk)


def test_encode_rejects_non_messages():
    with pytest.raises(TypeError):
        encode({"type": "stop", "version": VERSION})
    with pytest.raises(TypeError):
        encode(Command("x"))


def test_command_args_checked_on_both_sides():
    with pytest.raises(TypeError):
        Command("write", {"bad": {"nested": "dict"}})
    with pytest.raises(TypeError):
        Command("write", {"bad": [1, {2: 3}]})
    with pytest.raises(TypeError):
        Command("write", {"bad": [[[[[[1]]]]]]})  # lists nest at most 4 deep
    assert Command("write", {"ok": [[1, 2], "a", b"b", None, True, 1.5]}).args["ok"][0] == [1, 2]


# --------------------------------------------------------------------------------------------
# hypothesis
# --------------------------------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
small_ints = st.integers(min_value=-(2**31), max_value=2**31)
indices = st.integers(min_value=0, max_value=2**31)
floats = st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither: refused on decode
names = st.from_regex(M.NAME_PATTERN, fullmatch=True)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20), st.binary(max_size=20))
flat = st.one_of(st.booleans(), ints, floats, st.text(max_size=20))  # a Warn's data, a Fault's args
anys = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(names, kids, max_size=4)),
    max_leaves=8,
)
any_dicts = st.dictionaries(names, anys, max_size=4)
result_data = any_dicts.filter(lambda d: "ok" not in d and all(k not in d for k in M._RESULT_KEYS))
arg_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3), max_leaves=6).filter(
    lambda v: M._check_arg(v, 0)
)
commands = st.builds(Command, names, st.dictionaries(names, arg_values, max_size=4))
results = st.builds(CommandResult, st.booleans(), anys, st.text(max_size=30))

messages = st.one_of(
    st.builds(Hello, indices, st.integers(min_value=1, max_value=2**31), st.text(max_size=40)),
    st.builds(Config, any_dicts),
    st.builds(Start, ints),
    st.builds(Stop, st.text(max_size=30)),
    st.builds(Heartbeat, small_ints, ints, ints),
    st.builds(Stats, small_ints, st.dictionaries(names, ints, max_size=8), ints),
    st.builds(Warn, small_ints, names, st.text(max_size=30), st.dictionaries(names, flat, max_size=4)),
    st.builds(Result, small_ints, st.booleans(), result_data),
    st.builds(Fault, names, st.dictionaries(names, flat, max_size=4)),
    st.builds(Batch, ints, st.lists(commands, max_size=6)),
    st.builds(BatchAck, ints, small_ints, st.lists(results, max_size=6)),
)


def _check_outcome(buf):
    """decode() either returns a valid message or raises BadFrame - nothing else."""
    try:
        out = decode(buf)
    except BadFrame as e:
        assert isinstance(e.reason, str) and e.reason
        return None
    assert isinstance(out, MESSAGE_TYPES)
    assert out.version == VERSION
    return out


def _same(a, b):
    """Equality that also treats -0.0/0.0 and float round trips as msgpack does."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@HSET
@given(messages)
def test_encode_decode_identity(msg):
    out = decode(encode(msg))
    assert type(out) is type(msg)
    assert _same(out, msg)
    assert encode(out) == encode(msg)


@HSET
@given(st.binary(max_size=512))
def test_random_bytes_only_badframe(buf):
    _check_outcome(buf)


@HSET
@given(messages, st.data())
def test_truncated_frames_are_badframes(msg, data):
    buf = encode(msg)
    cut = data.draw(st.integers(min_value=0, max_value=len(buf) - 1))
    with pytest.raises(BadFrame):
        decode(buf[:cut])


@HSET
@given(messages, st.data())
def test_mutated_frames_only_badframe(msg, data):
    buf = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = data.draw(st.integers(min_value=0, max_value=max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif op == "set" and buf:
            buf[i] = data.draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[i:i + data.draw(st.integers(min_value=1, max_value=4))]
    _check_outcome(bytes(buf))


field_names = st.sampled_from(
    ["type", "version", "vcpu", "pid", "token", "payload", "t0_ns", "reason", "seq", "ops", "counters",
     "t_ns", "kind", "message", "data", "ok", "args", "commands", "results", "op", "value", "error", "zz"]
)
tag_values = st.one_of(st.sampled_from(sorted(M._TAGS)), anys)
version_values = st.one_of(st.just(VERSION), anys)


@HSET
@given(
    tag_values,
    version_values,
    st.dictionaries(field_names, st.one_of(scalars, anys, st.lists(st.dictionaries(field_names, scalars, max_size=3),
                                                                      max_size=3)), max_size=6),
)
def test_structured_garbage_only_badframe(tag, version, fields):
    """Well-formed msgpack maps with plausible keys and random values: still only BadFrame."""
    fields = dict(fields)
    fields["type"] = tag
    fields["version"] = version
    try:
        buf = msgspec.msgpack.encode(fields)
    except (OverflowError, TypeError):
        assume(False)
    out = _check_outcome(buf)
    if out is not None:
        assert fields["version"] == VERSION and fields["type"] in M._TAGS
        _writable_and_printable(out)


def _writable_and_printable(msg) -> None:
    """What decodes can be written as strict JSON, and its shown text holds no control character."""
    json.dumps(msgspec.to_builtins(msg), allow_nan=False)
    if type(msg) is Warn:
        assert msg.message.isprintable() and msg.kind.isprintable()
        assert all(printable(v, multiline=True) == v for v in msg.data.values() if type(v) is str)
    if type(msg) is Result and "error" in msg.data:
        assert msg.data["error"] == printable(msg.data["error"], multiline=True)


# --------------------------------------------------------------------------------------------
# issue 21: strict field types (a bad message is a BadFrame, never a crash later) and printable text
# --------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("fields", [
    dict(type="warn", vcpu=0, kind="k", data={1: 2}),                 # a non-string key
    dict(type="warn", vcpu=0, kind="k", data={"a": {1: 2}}),          # nested (a table)
    dict(type="warn", vcpu=0, kind="k", data={"a": [1, [2]]}),        # nested list
    dict(type="warn", vcpu=0, kind="k", data={"a": {b"k": 1}}),       # bytes key JSON cannot hold
    dict(type="warn", vcpu=0, kind="k", data={"a": NAN}),             # NaN / inf: not JSON
    dict(type="warn", vcpu=0, kind="k", data={"a": -INF}),
    dict(type="warn", vcpu=0, kind="k", data={"a": None}),
    dict(type="warn", vcpu=0, kind="k", data={"a": b"raw"}),
    dict(type="warn", vcpu=0, kind="k", data={"a b": 1}),             # a key that is no name
    dict(type="warn", vcpu=0, kind="k", data={"": 1}),
    dict(type="warn", vcpu=0, kind="\x1b[2J", message="x"),            # a kind is a name
    dict(type="warn", vcpu=0, kind="ok\n"),
    dict(type="result", vcpu=0, ok=True, data={"x": {"y": NAN}}),
    dict(type="result", vcpu=0, ok=True, data={"x": [[[[[[[1]]]]]]]}),  # deeper than 6
    dict(type="result", vcpu=0, ok=True, data={"ok": False}),         # would shadow the field
    dict(type="result", vcpu=0, ok=False, data={"error": ["not", "a", "str"]}),
    dict(type="result", vcpu=0, ok=True, data={"line_transfers": "many"}),
    dict(type="result", vcpu=0, ok=True, data={"ops": True}),
    dict(type="result", vcpu=0, ok=True, data={"x": {(1, 2): 3}}),     # a tuple key (msgpack array)
    dict(type="batch_ack", vcpu=0, seq=1, results=[{"ok": True, "value": INF}]),
    dict(type="batch_ack", vcpu=0, seq=1, results=[{"ok": True, "value": {"a b": 1}}]),
    dict(type="fault", kind="kill-vcpu", args={"point": ["x"]}),
    dict(type="stats", vcpu=0, counters={"a\x1b": 1}),
    dict(type="config", payload={"x": NAN}),
    dict(type="batch", seq=1, commands=[{"op": "write", "args": {"gpa": INF}}]),
    dict(type="batch", seq=1, commands=[{"op": "bad op", "args": {}}]),
    dict(type="hello", vcpu=-1, pid=5, token="t"),
    dict(type="hello", vcpu=1, pid=0, token="t"),
], ids=lambda f: f"{f['type']}-" + ",".join(f"{k}={v!r:.20}" for k, v in f.items() if k != "type"))
def test_values_json_cannot_hold_are_bad_frames(fields):
    buf = msgspec.msgpack.encode({**fields, "version": VERSION})
    with pytest.raises(BadFrame) as ei:
        decode(buf)
    assert ei.value.reason in ("wrong_type", "bad_value"), str(ei.value)


def test_every_decoded_value_is_json_writable():
    ok = [
        dict(type="warn", vcpu=0, kind="rcu_stall", message="m", data={"ms": 3, "f": 1.5, "s": "x", "b": True}),
        dict(type="result", vcpu=0, ok=True, data={"ops": 3, "nested": {"a": [1, 2.5, None, b"\x00"]}}),
        dict(type="batch_ack", vcpu=0, seq=1, results=[{"ok": True, "value": {"nodes": [1, 2]}}]),
    ]
    for f in ok:
        _writable_and_printable(decode(msgspec.msgpack.encode({**f, "version": VERSION})))


def test_shown_text_has_its_control_characters_escaped_on_arrival():
    evil = "\x1b[2J\x1b[H\x9b31mSUCCESS\u202e\x07"
    raw = msgspec.msgpack.encode({"type": "warn", "version": VERSION, "vcpu": 0, "kind": "k", "message": evil,
                                  "data": {"traceback": "line 1\n\tline 2\x1b]0;title\x07"}})
    w = decode(raw)
    assert "\x1b" not in w.message and "\x9b" not in w.message and "\u202e" not in w.message
    assert w.message == "\\x1b[2J\\x1b[H\\x9b31mSUCCESS\\u202e\\x07"
    assert w.data["traceback"] == "line 1\n\tline 2\\x1b]0;title\\x07"  # a traceback keeps its lines
    r = decode(msgspec.msgpack.encode({"type": "result", "version": VERSION, "vcpu": 0, "ok": False,
                                       "data": {"error": "boom\x1b[2J"}}))
    assert r.data["error"] == "boom\\x1b[2J"
    a = decode(msgspec.msgpack.encode({"type": "batch_ack", "version": VERSION, "vcpu": 0, "seq": 1,
                                       "results": [{"ok": False, "error": "x\rSUCCESS"}]}))
    assert a.results[0].error == "x\\x0dSUCCESS"


def test_printable():
    assert printable("WARN vCPU 1: 12.5µs, naïve — ok") == "WARN vCPU 1: 12.5µs, naïve — ok"
    assert printable("a\nb\tc") == "a\\x0ab\\x09c"
    assert printable("a\nb\tc\x00", multiline=True) == "a\nb\tc\\x00"
    assert printable("\x7f\x85\u2028\U000e0001") == "\\x7f\\x85\\u2028\\U000e0001"
    for s in ("\x1b[2J\x1b[HSUCCESS", "\x9b2J", "plain"):
        once = printable(s)
        assert once.isprintable() and printable(once) == once


def test_a_sender_cannot_build_what_a_receiver_refuses():
    """Locally made free-form values are checked at construction, like Command's arguments."""
    with pytest.raises(ValueError):
        Result(0, True, {"x": NAN})
    with pytest.raises(ValueError):
        Result(0, True, {"ok": 1})
    with pytest.raises(TypeError):
        CommandResult(True, {"x": (1, 2)})
    with pytest.raises(ValueError):
        Config({"x": {3: 1}})
    assert not M._check_arg(INF, 0)
