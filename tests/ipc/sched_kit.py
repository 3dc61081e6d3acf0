"""What the controlled-scheduler tests share (tests/ipc/test_sched.py, test_sched_por.py): the data
region the clients work on and its fixture."""

from __future__ import annotations

import pytest

from ipc.locks import LOCK_WORDS, init_lockstat
from ipc.shm import Layout

DATA = Layout("data", [("w", "i8", (8,)), ("locks", "i8", (2, LOCK_WORDS)), ("stats", "i8", (16,))])


@pytest.fixture
def data(region_factory):
    r = region_factory(DATA)
    r.v["w"][:] = 0
    r.v["locks"][:] = 0
    init_lockstat(r.v["stats"])
    return r
