"""Issue 21 items 4 and 6 end to end: a vCPU process that holds the run's token misbehaves (claims
indices it was not spawned as, sends WARNs the strict message types refuse, and one whose text
would clear the screen and print a fake SUCCESS). The run ends normally: the refusals and bad
frames are counted, the summary holds no escape byte, the results JSON is valid and complete."""

from __future__ import annotations

import io
import json
import os

import msgspec
from rich.console import Console

from ipc.worker_channel import WorkerChannel
from vm import results
from vm.config import from_dict
from vm.coordinator import Coordinator, run_script

EVIL = "\x1b[2J\x1b[H\x1b[1;32mSUCCESS\x1b[0m: oracle clean [bold green]SUCCESS[/]"
BAD_DATA = [{1: 2}, {"a": [1, [2]]}, {"a": {"b": 1}}, {"a": float("nan")}]


def _raw_warn(vcpu: int, message: str, data: dict) -> bytes:
    return msgspec.msgpack.encode({"type": "warn", "version": 1, "vcpu": vcpu, "kind": "evil",
                                   "message": message, "data": data})


class _EvilChannel(WorkerChannel):
    """vCPU 0's own channel, which after its Hello also sends what the message types refuse."""

    def hello(self) -> bool:
        ok = super().hello()
        if self.vcpu == 0:
            for data in BAD_DATA:
                self._sock.send(_raw_warn(0, "bad data", data))
            self._sock.send(_raw_warn(0, EVIL, {"n": 1}))
        return ok


def evil_vcpu_main(run_id, vcpu, endpoint, token, cfg_dict, hooks, mode, coordinator_pid):
    """vcpu/worker.vcpu_main, but vCPU 0 first tries to register as vCPU 100 (never spawned) and as
    vCPU 1 (spawned, another pid), each sending a fake WARN, then misbehaves on its own channel."""
    import vcpu.worker as worker

    if vcpu == 0:
        for idx in (100, 1):
            fake = WorkerChannel(endpoint, idx, token)
            fake.hello()
            fake.send(worker.M.Warn(vcpu=idx, kind="fake", message="fake WARN"))
            fake.close()  # lingers until both are delivered
        worker.WorkerChannel = _EvilChannel
    worker.vcpu_main(run_id, vcpu, endpoint, token, cfg_dict, hooks, mode, coordinator_pid)


def test_misbehaving_peer_is_counted_and_the_run_ends_normally(tmp_path):
    cfg = from_dict({"vcpus": 2, "duration": 1.0, "memory_mib": 4, "notifiers": 0, "tracked_pages": 4, "l2s": 2})
    with Coordinator(cfg, evil_vcpu_main, preload=("vcpu.worker",)) as co:
        res = run_script(co, [(0, "read", {"gpa": 0}), (1, "read", {"gpa": 8})])
        refused = dict(co.ch.rejected_reasons)
    # item 6: the claims of an index never spawned / of another process's index were refused
    assert refused == {"not_spawned": 1, "wrong_pid": 1}, refused
    assert res["channel"]["rejected_peers"] == 2 and res["channel"]["unknown_peer"] >= 2
    assert not any(w["kind"] == "fake" or w["vcpu"] not in (-1, 0, 1) for w in res["warnings"])
    # item 4: the WARNs JSON cannot hold are bad frames; the run went on and finished its steps
    assert res["channel"]["bad_frames"] == len(BAD_DATA)
    assert [s["ok"] for s in res["steps"]] == [True, True]
    (evil,) = [w for w in res["warnings"] if w["kind"] == "evil"]
    assert "\x1b" not in evil["message"] and evil["data"] == {"n": 1}
    assert res["verdict"] == "FAILURE"  # a WARN is a kernel bug report, whoever sent it
    out = tmp_path / "r.json"
    results.write_json(str(out), res)
    doc = json.loads(out.read_text())
    assert doc["channel"]["bad_frames"] == len(BAD_DATA) and doc["steps"] == res["steps"]
    assert os.listdir(tmp_path) == ["r.json"]  # no .tmp left
    # item 6: the summary shows the text, escaped: no ESC byte, no markup taken from a peer
    buf = io.StringIO()
    results.render(res, console=Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert "\x1b" not in text and "\\x1b[2J" in text
    assert "[bold green]SUCCESS[/]" in text  # printed as text, not as a style
    assert not any(line.startswith("SUCCESS") for line in text.splitlines())


def test_results_writer_cannot_fail_on_content(tmp_path):
    """Whatever a results document holds, write_json writes strict JSON: NaN / inf -> null, keys JSON
    cannot hold -> str, numpy values -> Python, a container inside itself -> a short text."""
    import numpy as np

    doc = {"verdict": "FAILURE", "nan": float("nan"), "inf": [float("-inf"), np.float64("inf")],
           "keys": {(1, 2): "tuple", b"\x01": "bytes", 3: "int", None: "none", 1.5: "float"},
           "np": {"i": np.int64(7), "a": np.arange(3), "b": np.bool_(True)}, "set": {1}, "obj": object()}
    doc["self"] = doc
    out = tmp_path / "r.json"
    results.write_json(str(out), doc)
    back = json.loads(out.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert back["nan"] is None and back["inf"] == [None, None]
    assert back["keys"] == {"[1, 2]": "tuple", "01": "bytes", "3": "int", "null": "none", "1.5": "float"}
    assert back["np"] == {"i": 7, "a": [0, 1, 2], "b": True} and back["set"] == [1]
    assert back["self"].startswith("<dict") and back["obj"].startswith("<object")
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_warn_counted_but_never_received_is_still_a_failure():
    from vm.results import failure_reasons

    assert failure_reasons(None, [], 0, 0, [], 0) == []
    assert failure_reasons(None, [], 0, 0, [], 2) == ["2 WARN(s) counted in shared memory, none received over the channel"]
    got = failure_reasons(["x"], [], 0, 0, [{"message": "WARN vCPU 0: boom"}], 5)
    assert got == ["x", "1 WARN(s); first: WARN vCPU 0: boom"]
