"""rcutorture's statistics and verdict (``rcu_torture_stats_print``), and the torture type that
drives the pipeline of ``ipc/torture/rcutorture.py`` for one flavor (``--kind rcu`` / ``srcu``).

FAILURE: any Reader Pipe count at index >= 2, any mbtest failure, any failed cookie check (2: a
reader saw the grace period of a polled cookie taken inside its critical section complete before
it left; 3: a synchronize returned before the grace period of a cookie taken before it completed),
a worker that died, or no progress.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ipc import hist as _hist
from ipc.locks import STAT_WORDS, init_lockstat, merge_lockstat
from ipc.torture.base import ROW, STALL_NS, TortureType, lock_stat_line
from ipc.torture.rcutorture import (
    EL_GEN,
    EL_MB,
    EL_STATE,
    EL_WORDS,
    IDX_BITS,
    IDX_MASK,
    INJECTS,
    NPOOL,
    PIPE_LEN,
    PIPE_RULE,
    PIPE_SLOTS,
    R_COOKIE,
    R_LONG,
    R_MBERR,
    R_POISON,
    R_PREEMPT,
    R_READS,
    R_REUSE,
    R_SHORT,
    R_SLEEP,
    R_WORDS,
    ROLES,
    ST_CURRENT,
    W_ALLOC_FAIL,
    W_ALLOCS,
    W_ASYNC,
    W_BARRIER,
    W_COND,
    W_COOKIE,
    W_FREES,
    W_GPS,
    W_POLL,
    W_SHARED,
    W_STALLS,
    W_VERSIONS,
    W_WORDS,
    RcuTortureOps,
)

if TYPE_CHECKING:
    from ipc.shm import Region


# ------------------------------------------------------------------------------------ stats

def rcu_snapshot(region: Region, kind: str) -> dict:
    v = region.v
    rs, ws = v["rstat"], v["wstat"]
    return {
        "versions": int(ws[0, W_VERSIONS]),
        "allocs": int(ws[0, W_ALLOCS]),
        "alloc_fail": int(ws[0, W_ALLOC_FAIL]),
        "frees": int(ws[0, W_FREES]),
        "async_retires": int(ws[0, W_ASYNC]),
        "cond_retires": int(ws[0, W_COND]),
        "poll_retires": int(ws[0, W_POLL]),
        "writer_synchronize": int(ws[0, W_GPS]),
        "fake_synchronize": int(ws[1:, W_GPS].sum()),
        "shared_gps": int(ws[:, W_SHARED].sum()),
        "stalls": int(ws[:, W_STALLS].sum()),
        "reader_cookie_errors": int(rs[:, R_COOKIE].sum()),
        "sync_cookie_errors": int(ws[:, W_COOKIE].sum()),
        "barrier_errors": int(ws[:, W_BARRIER].sum()),
        "gp_seq": int(v[f"{kind}_hdr"][1]),
        "reads": int(rs[:, R_READS].sum()),
        "mberror_reads": int(rs[:, R_MBERR].sum()),
        "poisoned_reads": int(rs[:, R_POISON].sum()),
        "reused_reads": int(rs[:, R_REUSE].sum()),
        "long_holds": int(rs[:, R_LONG].sum()),
        "short_delays": int(rs[:, R_SHORT].sum()),
        "preempt_delays": int(rs[:, R_PREEMPT].sum()),
        "sleep_delays": int(rs[:, R_SLEEP].sum()),
        "reader_pipe": [int(x) for x in v["rpipe"][:, :PIPE_SLOTS].sum(axis=0)],
        "reader_batch": [int(x) for x in v["rbatch"][:, :PIPE_SLOTS].sum(axis=0)],
        "free_block_circulation": [int(x) for x in v["wcount"][:PIPE_SLOTS]],
        "current": int(v["cur"][0]),
    }


def mb_errors(s: dict) -> int:
    """mbtest failures: a freed element reached through the current pointer, or freed (and
    perhaps reused) while a reader held it."""
    return s["mberror_reads"] + s["poisoned_reads"] + s["reused_reads"]


def rcu_lines(tag: str, s: dict) -> list[str]:
    """rcu_torture_stats_print: "!!! " before Reader Pipe on an mbtest error or a read at index
    >= 2. The writer's pipe (rcu_torture_wcount) is the kernel's "Free-Block Circulation"."""
    bad = rcu_errors(s)
    return [
        f"{tag}: rtc: {s['current'] & IDX_MASK} ver: {s['versions']} rta: {s['allocs']} "
        f"rtaf: {s['alloc_fail']} rtf: {s['frees']} "
        f"rtmbe: {mb_errors(s)} nt: {s['reads']} gp_seq: {s['gp_seq']} "
        f"sync: {s['writer_synchronize']}+{s['fake_synchronize']} shared: {s['shared_gps']} "
        f"async/cond/poll: {s['async_retires']}/{s['cond_retires']}/{s['poll_retires']} "
        f"stalls: {s['stalls']} delays short/long/preempt: {s['short_delays']}/{s['long_holds']}/"
        f"{s['preempt_delays']} cookie errors reader/sync: {s['reader_cookie_errors']}/"
        f"{s['sync_cookie_errors']}",
        f"{tag}: {'!!! ' if bad else ''}Reader Pipe:  " + " ".join(map(str, s["reader_pipe"])),
        f"{tag}: Reader Batch:  " + " ".join(map(str, s["reader_batch"])),
        f"{tag}: Free-Block Circulation:  " + " ".join(map(str, s["free_block_circulation"])),
    ]


def cookie_errors(s: dict) -> int:
    """Failed cookie checks: 2 (inside a reader) and 3 (after a synchronize)."""
    return s["reader_cookie_errors"] + s["sync_cookie_errors"]


def rcu_errors(s: dict) -> int:
    return sum(s["reader_pipe"][2:]) + mb_errors(s) + cookie_errors(s) + s["barrier_errors"]


def rcu_report(region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
               warnings: list[str], tag: str, emit) -> dict:
    s = rcu_snapshot(region, cfg["kind"])
    gh = region.v["gphist"]
    gp_all = _hist.summary(_hist.merge(gh))
    gp_writer = _hist.summary(_hist.merge(gh[0:1]))
    lock_stat = merge_lockstat(np.array(region.v["lockstat"]), [f"{cfg['kind']}_gp_lock"])
    rstat, rpipe = region.v["rstat"], region.v["rpipe"]
    per = [{"reader": i, "reads": int(rstat[i, R_READS]),
            "errors": int(rstat[i, R_MBERR] + rstat[i, R_POISON] + rstat[i, R_REUSE]),
            "pipe_ge2": int(rpipe[i, 2:PIPE_SLOTS].sum())}
           for i in range(cfg["nreaders"])]
    bad_pipe = sum(s["reader_pipe"][2:])
    if bad_pipe:
        reasons.append(f"{bad_pipe} reads saw Reader Pipe index >= 2 (a reader held an element "
                       f"across a full grace period)")
    if mb_errors(s):
        reasons.append(f"{mb_errors(s)} mbtest errors: {s['mberror_reads']} reads reached a freed "
                       f"element through the current pointer, {s['poisoned_reads']} held an element "
                       f"that was freed (poisoned), {s['reused_reads']} one that was reallocated")
    if s["reader_cookie_errors"]:
        reasons.append(f"{s['reader_cookie_errors']} reads failed Cookie check 2 (the grace period of a "
                       f"polled cookie taken inside the read-side critical section completed before it ended)")
    if s["sync_cookie_errors"]:
        reasons.append(f"{s['sync_cookie_errors']} synchronize calls failed Cookie check 3 (returned before "
                       f"the grace period of a polled cookie taken before the call completed)")
    if s["barrier_errors"]:
        reasons.append("rcu_barrier returned before every pending call_rcu callback was invoked "
                       "(rcu_torture_barrier_error)")
    if started and not reasons:
        stuck = [w for w, n in (("writer", s["versions"]), ("readers", s["reads"])) if n == 0]
        for w in stuck:  # a stall; too short a run to tell for sure is only a warning
            (reasons if elapsed >= 1.0 else warnings).append(f"the {w} made no progress")
    if s["stalls"]:
        warnings.append(f"{s['stalls']} reader stall warnings (read-side critical section > "
                        f"{STALL_NS // 1_000_000} ms)")
    rates = {"reads_per_s": round(s["reads"] / elapsed, 1),
             "gps_per_s": round(s["gp_seq"] / elapsed, 1),
             "versions_per_s": round(s["versions"] / elapsed, 1)}
    for line in rcu_lines(tag, s):
        emit(line)
    emit(f"{tag}: rates: reads/s={rates['reads_per_s']:.0f} GPs/s={rates['gps_per_s']:.0f} "
         f"versions/s={rates['versions_per_s']:.0f} over {elapsed:.2f} s")
    if gp_all["count"]:
        emit(f"{tag}: synchronize latency: n={gp_all['count']} p50={gp_all['p50_ns'] / 1e3:.1f}us "
             f"p99={gp_all['p99_ns'] / 1e3:.1f}us max={gp_all['max_ns'] / 1e3:.1f}us")
    for cls, st in lock_stat.items():
        emit(lock_stat_line(tag, cls, st))
    return {
        "counts": {k: s[k] for k in (
            "versions", "allocs", "alloc_fail", "frees", "async_retires", "cond_retires",
            "poll_retires", "writer_synchronize",
            "fake_synchronize", "shared_gps", "stalls", "gp_seq", "reads", "poisoned_reads",
            "reused_reads", "long_holds", "mberror_reads", "short_delays", "preempt_delays",
            "sleep_delays", "reader_cookie_errors", "sync_cookie_errors", "barrier_errors")},
        "rates": rates,
        "pipe_rule": PIPE_RULE,
        "histograms": {"reader_pipe": s["reader_pipe"], "reader_batch": s["reader_batch"],
                       "free_block_circulation": s["free_block_circulation"],
                       "writer_pipe": s["free_block_circulation"],
                       "gp_latency_ns": gp_all, "writer_gp_latency_ns": gp_writer},
        "per_process": per,
        "lock_stat": lock_stat,
    }


# ------------------------------------------------------------------------------------ torture type

class RcuTorture(TortureType):
    """rcutorture on one flavor: the pipeline above, driven by ``ops``."""

    injects = INJECTS

    def __init__(self, ops: RcuTortureOps):
        self.ops = ops
        self.name = ops.name

    def params(self, procs: int, nfakewriters: int) -> dict[str, Any]:
        return {"nreaders": procs, "nfakewriters": nfakewriters, "pipe_len": PIPE_LEN, "npool": NPOOL}

    def who(self, cfg: dict) -> str:
        return f"nreaders={cfg['nreaders']} nfakewriters={cfg['nfakewriters']}"

    def fields(self, cfg: dict) -> list:
        nr, nw = cfg["nreaders"], 1 + cfg["nfakewriters"]
        return [
            *self.ops.domain.fields(self.ops.name, nr),
            ("cur", "i8", (8,)),
            ("pool", "i8", (NPOOL, EL_WORDS)),
            ("rstat", "i8", (nr, R_WORDS)),
            ("rpipe", "i8", (nr, ROW)),
            ("rbatch", "i8", (nr, ROW)),
            ("wstat", "i8", (nw, W_WORDS)),
            ("wcount", "i8", (ROW,)),
            ("gphist", "i8", (nw, _hist.HIST_WORDS)),
            ("lockstat", "i8", (nw, 1, STAT_WORDS)),
        ]

    def init(self, region: Region, cfg: dict) -> None:
        v = region.v
        self.ops.domain.init(region, self.ops.name)
        _hist.init(v["gphist"])
        init_lockstat(v["lockstat"])
        # element 0 is the initial current element, generation 1
        v["pool"][0, EL_MB] = 1
        v["pool"][0, EL_GEN] = 1
        v["pool"][0, EL_STATE] = ST_CURRENT
        v["cur"][0] = (1 << IDX_BITS) | 0

    def workers(self, cfg: dict) -> list[tuple[str, str, int]]:
        out = [("writer", "writer", 0)]
        out += [(f"fakewriter {i}", "fakewriter", i) for i in range(1, 1 + cfg["nfakewriters"])]
        out += [(f"reader {i}", "reader", i) for i in range(cfg["nreaders"])]
        return out

    def run(self, role: str, region: Region, cfg: dict, index: int) -> None:
        ROLES[role](self.ops, region, cfg, index)

    def interval(self, region: Region, cfg: dict, tag: str, emit, warnings: list[str], t_s: float,
                 intervals: list[dict]) -> dict:
        last_versions = intervals[-1]["versions"] if intervals else 0
        s = rcu_snapshot(region, cfg["kind"])
        for line in rcu_lines(tag, s):
            emit(line)
        if s["versions"] == last_versions:
            w = (f"rcu_torture_writer stall: ver {s['versions']} unchanged for "
                 f"{cfg['stat_interval']:g} s")
            warnings.append(w)
            emit(f"{tag}: {w}")
        return {"t_s": t_s, "versions": s["versions"], "gp_seq": s["gp_seq"],
                "reads": s["reads"], "errors": rcu_errors(s)}

    def report(self, region: Region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
               warnings: list[str], tag: str, emit) -> dict:
        return rcu_report(region, cfg, started, elapsed, reasons, warnings, tag, emit)
