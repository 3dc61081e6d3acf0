"""locktorture (after kernel/locking/locktorture.c): ``--kind spinlock`` / ``mutex``.

``--procs`` writer processes take the lock, check-and-set a held flag (already set:
n_lock_fail++), increment a shared counter non-atomically (lost updates = a second witness of
broken mutual exclusion), hold a short delay (1 in 2000 a long one, to force contention),
clear the flag and unlock. ``Writes:  Total: N  Max/Min: a/b  Fail: f`` (``???`` = unfair,
max/2 > min; ``!!!`` = failures). FAILURE: n_lock_fail > 0, lost updates, a dead worker.

What differs between the locks is a :class:`LockTortureOps` (locktorture's ``lock_torture_ops``):
``spin_lock_ops`` and ``mutex_lock_ops`` below. ``--inject busted-lock`` uses a lock that does not
lock (locktorture's ``lock_busted``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ipc import _prims
from ipc.errors import UsageError
from ipc.locks import LOCK_WORDS, STAT_WORDS, init_lockstat, merge_lockstat, new_lock
from ipc.torture.base import (
    CTL_STOP,
    DELAY_TABLE,
    TortureType,
    lock_stat_line,
    rng,
    wait_for_go,
)

if TYPE_CHECKING:
    from ipc.shm import Region

# lock writer stat row
L_ACQ, L_FAIL, L_LONG = 0, 1, 2
# critical-section words of the lock torture
CS_HELD, CS_COUNTER = 0, 1

LOCK_LONG_HOLD_NS = 100_000
LOCK_SHORT_HOLD_NS = 2_000


@dataclass(frozen=True)
class LockTortureOps:
    """One lock type (locktorture's ``struct lock_torture_ops``)."""

    name: str  # torture_type (--kind)
    lock: str  # the ipc.locks.new_lock kind: 'spin' (SpinLock) or 'mutex' (futex Mutex)


spin_lock_ops = LockTortureOps(name="spinlock", lock="spin")
mutex_lock_ops = LockTortureOps(name="mutex", lock="mutex")


# ------------------------------------------------------------------------------------ workers

def _lock_delays(seed: int, w: int, nwriters: int) -> list[int]:
    rg = rng(seed, 3, w)
    u = rg.random(DELAY_TABLE)
    d = np.zeros(DELAY_TABLE, dtype=np.int64)
    d[u < 1.0 / (4 * nwriters)] = LOCK_SHORT_HOLD_NS
    d[u < 1.0 / 2000] = LOCK_LONG_HOLD_NS
    return d.tolist()


def lock_torture_writer(ops: LockTortureOps, region: Region, cfg: dict, w: int) -> None:
    mem = region.mem
    load, store, xchg = mem.load, mem.store, mem.xchg
    tag = w + 1
    lk = new_lock(ops.lock, mem, region.word("lock"), region.word("lockstat", w, 0),
                  tag=tag, busted=cfg["inject"] == "busted-lock")
    lock, unlock = lk.lock, lk.unlock
    spin = _prims.spin_ns
    ctl_w = region.word("ctl")
    stop_w = ctl_w + CTL_STOP
    held_w = region.word("cs") + CS_HELD
    cnt_w = region.word("cs") + CS_COUNTER
    st_w = region.word("wstat", w)
    delays = _lock_delays(cfg["seed"], w, cfg["nwriters"])
    mask = len(delays) - 1

    wait_for_go(mem, ctl_w)
    n = fail = longh = 0
    try:
        while True:
            if not n & 255:
                store(st_w + L_FAIL, fail)
                store(st_w + L_LONG, longh)
                store(st_w + L_ACQ, n)
                if load(stop_w):
                    break
            d = delays[n & mask]
            lock()
            if xchg(held_w, tag):
                fail += 1  # someone else is inside: n_lock_fail
            c = load(cnt_w)
            if d:
                if d >= LOCK_LONG_HOLD_NS:
                    longh += 1
                spin(d)
            store(cnt_w, c + 1)  # non-atomic increment: lost updates if exclusion is broken
            store(held_w, 0)
            unlock()
            n += 1
    finally:
        if lk.is_held() and not cfg["inject"]:
            unlock()
        store(st_w + L_FAIL, fail)
        store(st_w + L_LONG, longh)
        store(st_w + L_ACQ, n)


ROLES = {"lockwriter": lock_torture_writer}


# ------------------------------------------------------------------------------------ stats

def lock_snapshot(region: Region) -> dict:
    ws = region.v["wstat"]
    acq = [int(x) for x in ws[:, L_ACQ]]
    return {
        "writes": sum(acq),
        "max": max(acq),
        "min": min(acq),
        "n_lock_fail": int(ws[:, L_FAIL].sum()),
        "long_holds": int(ws[:, L_LONG].sum()),
        "counter": int(region.v["cs"][CS_COUNTER]),
        "per_writer": acq,
    }


def writes_line(tag: str, s: dict) -> str:
    line = (f"{tag}: Writes:  Total: {s['writes']}  Max/Min: {s['max']}/{s['min']}  "
            f"Fail: {s['n_lock_fail']}")
    if s["max"] // 2 > s["min"]:
        line += " ???"
    if s["n_lock_fail"]:
        line += " !!!"
    return line


def lock_report(region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
                warnings: list[str], tag: str, emit) -> dict:
    s = lock_snapshot(region)
    lock_stat = merge_lockstat(np.array(region.v["lockstat"]), [f"{cfg['kind']}_torture_lock"])
    lost = s["writes"] - s["counter"]
    if s["n_lock_fail"]:
        reasons.append(f"n_lock_fail={s['n_lock_fail']} (two writers inside the lock)")
    if lost:
        reasons.append(f"{lost} lost updates of the lock-protected counter")
    if started and not reasons and s["writes"] == 0:
        (reasons if elapsed >= 1.0 else warnings).append("the writers made no progress (no acquisition)")
    if s["max"] // 2 > s["min"]:
        warnings.append(f"unfair: Max/Min {s['max']}/{s['min']} (max/2 > min)")
    rates = {"writes_per_s": round(s["writes"] / elapsed, 1)}
    emit(writes_line(tag, s))
    emit(f"{tag}: rates: writes/s={rates['writes_per_s']:.0f} over {elapsed:.2f} s")
    for cls, st in lock_stat.items():
        emit(lock_stat_line(tag, cls, st))
    return {
        "counts": {"writes": s["writes"], "max": s["max"], "min": s["min"],
                   "n_lock_fail": s["n_lock_fail"], "lost_updates": lost, "long_holds": s["long_holds"]},
        "rates": rates,
        "histograms": {"writes_per_writer": s["per_writer"]},
        "per_process": [{"writer": i, "acquisitions": a} for i, a in enumerate(s["per_writer"])],
        "lock_stat": lock_stat,
    }


# ------------------------------------------------------------------------------------ torture type

class LockTorture(TortureType):
    """locktorture on one lock type: the writer above, driven by ``ops``."""

    injects = ("busted-lock",)

    def __init__(self, ops: LockTortureOps):
        self.ops = ops
        self.name = ops.name

    def check_inject(self, procs: int, inject: str) -> None:
        if procs < 2:
            raise UsageError("torture: --inject busted-lock needs --procs >= 2 "
                             "(a single writer cannot overlap itself)")

    def params(self, procs: int, nfakewriters: int) -> dict[str, Any]:
        return {"nwriters": procs, "long_hold_ns": LOCK_LONG_HOLD_NS, "short_hold_ns": LOCK_SHORT_HOLD_NS}

    def who(self, cfg: dict) -> str:
        return f"nwriters_stress={cfg['nwriters']}"

    def fields(self, cfg: dict) -> list:
        nw = cfg["nwriters"]
        return [
            ("lock", "i8", (LOCK_WORDS,)),
            ("cs", "i8", (8,)),
            ("wstat", "i8", (nw, 8)),
            ("lockstat", "i8", (nw, 1, STAT_WORDS)),
        ]

    def init(self, region: Region, cfg: dict) -> None:
        init_lockstat(region.v["lockstat"])

    def workers(self, cfg: dict) -> list[tuple[str, str, int]]:
        return [(f"writer {i}", "lockwriter", i) for i in range(cfg["nwriters"])]

    def run(self, role: str, region: Region, cfg: dict, index: int) -> None:
        ROLES[role](self.ops, region, cfg, index)

    def interval(self, region: Region, cfg: dict, tag: str, emit, warnings: list[str], t_s: float,
                 intervals: list[dict]) -> dict:
        s = lock_snapshot(region)
        emit(writes_line(tag, s))
        return {"t_s": t_s, "writes": s["writes"], "n_lock_fail": s["n_lock_fail"]}

    def report(self, region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
               warnings: list[str], tag: str, emit) -> dict:
        return lock_report(region, cfg, started, elapsed, reasons, warnings, tag, emit)
