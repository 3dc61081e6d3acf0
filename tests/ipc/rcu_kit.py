"""Shared pieces of the RCU tests (tests/ipc/test_rcu*.py): the region layout, reader processes
driven by commands (forkserver children import this module by name), writer threads, fixtures."""


from __future__ import annotations

import threading
import time

import pytest
from conftest import wait_until

from ipc import _prims
from ipc.locks import LOCK_WORDS
from ipc.rcu import RcuDomain
from ipc.shm import Layout, Region

NSLOTS = 8
K = 1 << 12  # element ring of the update/read checker
# ctl lines
C_PTR, C_NEXT, C_GO, C_STOP, C_READY, C_ERR, C_READS, C_DONE = range(8)
# reader commands
ENTER, EXIT, QUIT = 1, 2, 3


def layout() -> Layout:
    return Layout("rcu", [
        *RcuDomain.fields("rcu", NSLOTS),
        ("cmd", "i8", (NSLOTS, 8)),
        ("ack", "i8", (NSLOTS, 8)),
        ("ctl", "i8", (16, 8)),
        ("res", "i8", (NSLOTS, 8)),
        ("elem", "i8", (K,)),
        ("wlock", "i8", (LOCK_WORDS,)),
    ])


@pytest.fixture
def region(region_factory):
    r = region_factory(layout())
    RcuDomain.init(r, "rcu")
    return r


def slot_name(i: int) -> str:
    return f"vcpu{i}"


# -- a reader process driven by commands -----------------------------------------------------------
def reader_worker(run_id: str, slot: int):
    """Registers ``slot``; executes ENTER (read_lock) / EXIT (read_unlock) / QUIT commands, each
    acknowledged with its sequence number."""
    region = Region.attach(run_id, layout())
    try:
        dom = RcuDomain(region, "rcu", slot, tag=slot + 1)
        dom.register()
        mem = region.mem
        cmd, ack = region.word("cmd", slot), region.word("ack", slot)
        seen = 0
        while True:
            c = mem.load(cmd)
            seq, op = c >> 8, c & 0xFF
            if seq == seen:
                time.sleep(0.0005)
                continue
            seen = seq
            if op == ENTER:
                dom.read_lock()
            elif op == EXIT:
                dom.read_unlock()
            mem.store(ack, seq)
            if op == QUIT:
                break
        dom.unregister()
    finally:
        region.close()


class Readers:
    def __init__(self, ctx, procs, region, run_id):
        self.ctx, self.procs, self.region, self.run_id = ctx, procs, region, run_id
        self.seq = {}
        self.p = {}

    def start(self, slot: int):
        self.region.v["cmd"][slot] = 0
        self.region.v["ack"][slot] = 0
        p = self.ctx.Process(target=reader_worker, args=(self.run_id, slot))
        self.procs.append(p)
        p.start()
        self.p[slot] = p
        self.seq[slot] = 0
        wait_until(lambda: int(self.region.v["rcu_slots"][slot, 2]) == p.pid, 30, what="reader registered")
        return p

    def send(self, slot: int, op: int, wait: bool = True):
        self.seq[slot] += 1
        s = self.seq[slot]
        self.region.mem.store(self.region.word("cmd", slot), (s << 8) | op)
        if wait:
            wait_until(lambda: self.region.mem.load(self.region.word("ack", slot)) == s, 30,
                       what=f"reader {slot} op {op}")

    def quit_all(self):
        for slot, p in self.p.items():
            if p.is_alive():
                self.send(slot, QUIT)
                p.join(10)


@pytest.fixture
def readers(ctx, procs, region, run_id):
    r = Readers(ctx, procs, region, run_id)
    yield r
    r.quit_all()


class Sync(threading.Thread):
    """synchronize() in a thread of this process, so that the test can watch it block.

    The snapshot is taken (``started`` set) before the wait begins."""

    def __init__(self, dom):
        super().__init__(daemon=True)
        self.dom = dom
        self.started = threading.Event()
        self.done = threading.Event()
        self.exc = None

    def run(self):
        try:
            cookie = self.dom.get_state()
            self.started.set()
            self.dom.cond_synchronize(cookie)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.exc = e
        finally:
            self.started.set()
            self.done.set()


def _start_sync(dom) -> Sync:
    t = Sync(dom)
    t.start()
    assert t.started.wait(10)
    return t


def _gp_running(region) -> bool:
    return int(region.v["rcu_hdr"][3]) & 1 == 1


def rw_writer(run_id: str, slot: int, n: int, broken: bool):
    """n times: publish a new element, synchronize, poison the old one."""
    region = Region.attach(run_id, layout())
    try:
        dom = RcuDomain(region, "rcu", slot, tag=slot + 1, broken=broken)
        dom.register()
        mem, w = region.mem, region.word
        ptr, nxt, elem = w("ctl", C_PTR), w("ctl", C_NEXT), w("elem")
        mem.fetch_add(w("ctl", C_READY), 1)
        while not mem.load(w("ctl", C_GO)):
            time.sleep(0.0005)
        for _ in range(n):
            v = mem.fetch_add(nxt, 1)
            mem.store(elem + v % K, v)
            old = mem.xchg(ptr, v)  # publish (full barrier)
            dom.synchronize()
            mem.store(elem + old % K, -1)  # free: poison
            if broken:
                _prims.spin_ns(20_000)
        res = w("res", slot)
        mem.store(res, dom.gps)
        mem.store(res + 1, dom.shared_gps)
        dom.unregister()
        mem.fetch_add(w("ctl", C_DONE), 1)
    finally:
        region.close()


def rw_reader(run_id: str, slot: int, hold_ns: int, nap: bool = False):
    """Until told to stop: inside a read-side critical section, dereference the current element
    and check it stays valid (not poisoned, not reused) while held. ``nap``: hold by sleeping, not
    spinning (a reader that only has to keep grace periods waiting need not take a core)."""
    region = Region.attach(run_id, layout())
    try:
        dom = RcuDomain(region, "rcu", slot, tag=slot + 1)
        dom.register()
        mem, w = region.mem, region.word
        ld, lock, unlock = mem.load, dom.read_lock, dom.read_unlock
        spin = (lambda ns: time.sleep(ns * 1e-9)) if nap else _prims.spin_ns
        ptr, elem, stop = w("ctl", C_PTR), w("elem"), w("ctl", C_STOP)
        errs = reads = 0
        mem.fetch_add(w("ctl", C_READY), 1)
        while not ld(stop):
            lock()
            v = ld(ptr)
            x = ld(elem + v % K)
            spin(hold_ns)
            y = ld(elem + v % K)
            unlock()
            reads += 1
            if x != v or y != v:
                errs += 1
        mem.fetch_add(w("ctl", C_ERR), errs)
        mem.fetch_add(w("ctl", C_READS), reads)
        dom.unregister()
    finally:
        region.close()
