"""ipc.procstat: what a stall warning says about the reader's process (preempted, stuck, gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ipc import procstat


@pytest.fixture
def child():
    procs = []

    def start(code: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code])
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def _wait_started(p):
    for _ in range(200):  # until the interpreter is past start-up (its CPU time is then its loop's)
        s = procstat.sample(p.pid)
        if s is not None and s.cpu_ticks > 5:
            return
        time.sleep(0.01)


def test_sample_reads_this_process():
    s = procstat.sample(os.getpid())
    assert s is not None and s.state == "R" and s.start > 0


def test_spinning_reader_is_preempted_and_names_the_ratio(child):
    p = child("while True: pass")
    _wait_started(p)
    kind, why = procstat.classify_stall(p.pid, per_cpu=128.0, interval_s=0.2)
    assert kind == "preempted", why
    assert "CPU time advancing" in why and "128 vCPU processes per CPU" in why and "oversubscribed" in why


def _wait_asleep(p):
    """Until the process sleeps and its CPU time has stopped moving (start-up over, even on a loaded
    host where start-up takes long)."""
    last = None
    for _ in range(500):
        s = procstat.sample(p.pid)
        if s is not None and s.state == "S" and last is not None and s.cpu_ticks == last:
            return
        last = s.cpu_ticks if s is not None else None
        time.sleep(0.02)


def test_sleeping_reader_is_stuck(child):
    p = child("import time; time.sleep(60)")
    _wait_asleep(p)
    kind, why = procstat.classify_stall(p.pid, per_cpu=0.5, interval_s=0.2)
    assert kind == "stuck" and "not runnable" in why, why


def test_stopped_reader_is_stuck(child):
    p = child("while True: pass")
    _wait_started(p)
    os.kill(p.pid, signal.SIGSTOP)
    try:
        kind, why = procstat.classify_stall(p.pid, per_cpu=1.0, interval_s=0.1)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    assert kind == "stuck" and "stopped" in why, why


def test_dead_reader_is_gone(child):
    p = child("pass")
    p.wait(10)
    assert procstat.classify_stall(p.pid, per_cpu=1.0, interval_s=0.01)[0] == "gone"


def test_summary_warns_when_oversubscribed_more_than_4x():
    from vm.results import host_note

    assert host_note(8, 2) is None
    note = host_note(256, 2)
    assert note is not None and "128 per CPU" in note and "> 4x" in note
