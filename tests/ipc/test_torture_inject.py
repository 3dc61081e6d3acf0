"""The rcutorture pipe rule and the grace-period bugs it must catch (ipc/torture/gpbugs.py).

In-process: each injected grace period shows its one bug against a reader slot of this process
(a thread runs synchronize, so the test can watch it return or block). Multiprocess: every
``--inject gp-*`` ends in FAILURE within 5 s on 2 readers, with Reader Pipe counts at index >= 2
(the count starts at 1 on removal, so a reader that escapes one grace period is seen); the real
domains stay SUCCESS and their writer pipe follows the kernel's accounting.
"""

from __future__ import annotations

import argparse
import io
import threading

import pytest

from ipc import torture
from ipc.rcu import HDR_GP_STATE, RcuDomain, SrcuDomain
from ipc.shm import Layout
from ipc.torture.gpbugs import GP_BUGS, GpShareEarly, GpSingleFlip, GpSkipAlternate, GpSteps, gp_bug_domain
from ipc.torture.rcutorture import W_COOKIE, W_WORDS, do_rtws_sync
from ipc.torture.readdelay import D_LONG, D_PREEMPT, D_SHORT, D_SLEEP, ReadDelay, srcu_read_delay_probs

GP_INJECTS = sorted(GP_BUGS)
BLOCK_S = 0.3  # a synchronize still running after this long waits for the reader


# ------------------------------------------------------------------------------------ in-process

@pytest.fixture
def region(region_factory):
    r = region_factory(Layout("gpbug", [*RcuDomain.fields("rcu", 4)]))
    RcuDomain.init(r, "rcu")
    return r


@pytest.fixture
def reader(region):
    dom = RcuDomain(region, "rcu", 0, 1)
    dom.register()
    yield dom
    while dom.reader.nesting():
        dom.read_unlock()
    dom.unregister()


def _sync_blocks(dom) -> threading.Thread | None:
    """Run dom.synchronize() in a thread: None if it returned within BLOCK_S, else the thread."""
    t = threading.Thread(target=dom.synchronize, daemon=True)
    t.start()
    t.join(BLOCK_S)
    return t if t.is_alive() else None


def _writer(cls, region):
    return cls(region, "rcu", None, 100)


def test_steps_without_a_bug_wait_for_the_reader(region, reader):
    w = _writer(GpSteps, region)
    assert _sync_blocks(w) is None  # no reader: a grace period completes
    reader.read_lock()
    t = _sync_blocks(w)
    assert t is not None, "the unbugged steps must wait for a reader that began before the call"
    reader.read_unlock()
    t.join(5)
    assert not t.is_alive() and w.gp_seq == 2


def test_single_flip_returns_with_a_current_reader_inside(region, reader):
    w = _writer(GpSingleFlip, region)
    reader.read_lock()
    assert _sync_blocks(w) is None  # BUG: the reader of the current phase is not waited for
    assert w.gp_seq == 1 and reader.reader.nesting() == 1
    t = _sync_blocks(w)  # the next grace period waits for it (before its flip): one GP escaped
    assert t is not None
    reader.read_unlock()
    t.join(5)
    assert not t.is_alive() and w.gp_seq == 2


def test_skip_alternate_skips_every_second_grace_period(region, reader):
    w = _writer(GpSkipAlternate, region)
    assert _sync_blocks(w) is None  # 1st: real, no reader
    reader.read_lock()
    assert _sync_blocks(w) is None  # 2nd: BUG, counted without waiting
    assert w.gp_seq == 2 and w.gps == 2
    t = _sync_blocks(w)  # 3rd: real, waits
    assert t is not None
    reader.read_unlock()
    t.join(5)
    assert not t.is_alive() and w.gp_seq == 3


@pytest.mark.parametrize("state,real,bug", [(4, 6, 6), (5, 8, 6)])
def test_share_early_snapshot_accepts_a_running_grace_period(region, state, real, bug):
    region.v["rcu_hdr"][HDR_GP_STATE] = state
    assert _writer(RcuDomain, region).get_state() == real  # rcu_seq_snap: (s + 3) & ~1
    assert _writer(GpShareEarly, region)._snap() == bug  # (s + 2) & ~1: the running GP counts


def test_share_early_returns_on_a_grace_period_that_started_before_the_call(region, reader):
    """A grace period is running (gp_state odd; its holder stands in for another writer), the reader
    enters, then the caller arrives: it must not be satisfied by that grace period's end."""
    region.v["rcu_hdr"][HDR_GP_STATE] = 5
    reader.read_lock()
    bug, real = _writer(GpShareEarly, region), _writer(RcuDomain, region)
    bug_target, real_target = bug._snap(), real.get_state()
    region.v["rcu_hdr"][HDR_GP_STATE] = 6  # the earlier grace period ends
    bug._synchronize(bug_target)  # BUG: shares it, returns at once
    assert bug.shared_gps == 1 and bug.gps == 0 and reader.reader.nesting() == 1
    t = threading.Thread(target=real._synchronize, args=(real_target,), daemon=True)
    t.start()
    t.join(BLOCK_S)
    assert t.is_alive(), "the real snapshot must run a grace period of its own, and wait"
    reader.read_unlock()
    t.join(5)
    assert not t.is_alive() and real.gps == 1 and real.shared_gps == 0


class _EndsTheRunningGp:
    """A domain's synchronize stand-in: another writer's running grace period ends (gp_state 5 -> 6),
    then the buggy / real synchronize runs."""

    def __init__(self, dom, region):
        self.dom, self.region = dom, region

    def get_state(self):
        return self.dom.get_state()

    def poll_state(self, cookie):
        return self.dom.poll_state(cookie)

    def synchronize(self):
        target = self.dom._snap() if isinstance(self.dom, GpShareEarly) else self.dom.get_state()
        self.region.v["rcu_hdr"][HDR_GP_STATE] = 6
        self.dom._synchronize(target)


@pytest.mark.parametrize("cls,fails", [(GpShareEarly, 1), (RcuDomain, 0)])
def test_cookie_check_3_sees_a_synchronize_that_shared_a_running_grace_period(region, cls, fails):
    """rcutorture's do_rtws_sync(): a cookie taken before synchronize must have completed when it
    returns. With a grace period already running at the call, the buggy snapshot shares it."""
    region.v["rcu_hdr"][HDR_GP_STATE] = 5
    counters = [0] * W_WORDS
    do_rtws_sync(_EndsTheRunningGp(_writer(cls, region), region), True, counters)
    assert counters[W_COOKIE] == fails
    do_rtws_sync(_writer(cls, region), False, counters)  # no cookie taken: nothing checked
    assert counters[W_COOKIE] == fails


def test_cookie_check_2_sees_a_grace_period_end_inside_a_reader(region, reader):
    """rcu_torture_one_read's cookie check: a cookie taken inside the section cannot complete before
    it ends -- unless the grace period skipped the reader (gp-single-flip)."""
    reader.read_lock()
    cookie = reader.get_state()
    assert _sync_blocks(_writer(GpSingleFlip, region)) is None
    assert reader.poll_state(cookie), "a buggy grace period that ends inside the reader completes its cookie"
    reader.read_unlock()
    region.v["rcu_hdr"][HDR_GP_STATE] = 0
    reader.read_lock()
    cookie = reader.get_state()
    t = _sync_blocks(_writer(GpSteps, region))
    assert t is not None and not reader.poll_state(cookie)  # the real one waits: check 2 holds
    reader.read_unlock()
    t.join(5)
    assert not t.is_alive() and reader.poll_state(cookie)


@pytest.mark.parametrize("domain", [RcuDomain, SrcuDomain])
@pytest.mark.parametrize("inject", GP_INJECTS)
def test_gp_bug_domain_keeps_the_flavor(domain, inject):
    cls = gp_bug_domain(domain, inject)
    assert issubclass(cls, GP_BUGS[inject]) and issubclass(cls, domain)
    assert cls.kind == domain.kind
    for alias in (a for a in dir(domain) if a.startswith("synchronize_")):
        assert getattr(cls, alias) is cls.synchronize  # synchronize_srcu is the buggy one too


def test_read_delay_plan_is_seeded_and_follows_the_kernel_rates():
    probs = srcu_read_delay_probs(2)
    plans = [ReadDelay(probs, 7, 0, spin=lambda ns: None, sleep=lambda s: None, preempt=lambda: None)
             for _ in range(2)]
    n_reads = 2_000_000
    seen = []
    for rd in plans:
        n, hits = 0, []
        while rd.next < n_reads:
            n = rd.next
            hits.append((n, tuple(rd.due(n))))
        seen.append(hits)
    assert seen[0] == seen[1]  # same seed and reader, same plan
    other, firsts = ReadDelay(probs, 7, 1), []
    for _ in range(5):
        firsts.append(other.next)
        other.due(other.next)
    assert firsts != [n for n, _ in seen[0][:5]]  # another reader, another plan
    counts = {k: sum(k in ks for _, ks in seen[0]) for k in (D_SHORT, D_LONG, D_PREEMPT, D_SLEEP)}
    for k, c in counts.items():  # within 5 sigma of n * p
        mean = n_reads * probs[k]
        assert abs(c - mean) <= 5 * mean ** 0.5 + 1, (k, c, mean)


# ------------------------------------------------------------------------------------ multiprocess

def _run(kind, duration, **kw):
    buf = io.StringIO()
    doc = torture.run_torture(kind, 2, duration, out=buf, **kw)
    return doc, buf.getvalue()


@pytest.mark.parametrize("kind", ["rcu", "srcu"])
@pytest.mark.parametrize("inject", GP_INJECTS)
def test_gp_bug_fails_within_5s(kind, inject):
    # measured (2 readers, 2 CPUs, 20 seeds): single-flip and skip-alternate fail in the first
    # 0.1 s; share-early needs two overlapping reader delays, median 0.4 s, worst seen 2.0 s
    doc, out = _run(kind, 5.0 if inject == "gp-share-early" else 3.0, inject=inject, stat_interval=0.25)
    assert doc["verdict"] == "FAILURE", out
    pipe = doc["histograms"]["reader_pipe"]
    assert sum(pipe[2:]) > 0, pipe  # a reader held an element across a full grace period
    assert any("Reader Pipe index >= 2" in r for r in doc["reasons"])
    assert "!!! Reader Pipe:" in out
    first = next(iv["t_s"] for iv in doc["intervals"] if iv["errors"])
    assert first <= 5.0
    assert out.splitlines()[-1].startswith(f"{kind}-torture:--- End of test: FAILURE")
    assert f"inject={inject}" in out.splitlines()[-1]


@pytest.mark.parametrize("kind", ["rcu", "srcu"])
def test_real_domain_success_with_kernel_pipe_accounting(kind):
    doc, out = _run(kind, 3.0)
    assert doc["verdict"] == "SUCCESS", (doc["reasons"], out)
    c, h = doc["counts"], doc["histograms"]
    pipe, wpipe = h["reader_pipe"], h["writer_pipe"]
    assert sum(pipe[2:]) == 0 and c["mberror_reads"] == c["poisoned_reads"] == c["reused_reads"] == 0
    assert pipe[1] > 0  # readers do hold removed elements: the window the pipe watches is exercised
    # rcu_torture_wcount: [0] every removal (one per new version), then one step per grace period,
    # freed after PIPE_LEN - 1 of them; nothing goes past the end
    assert wpipe == h["free_block_circulation"]
    assert wpipe[0] == c["versions"] and wpipe[torture.PIPE_LEN - 1] == c["frees"]
    assert wpipe[torture.PIPE_LEN] == 0
    assert all(a >= b for a, b in zip(wpipe[:-1], wpipe[1:], strict=True))
    assert c["short_delays"] > 0 and c["preempt_delays"] > 0  # rcu_read_delay ran
    assert c["reader_cookie_errors"] == c["sync_cookie_errors"] == 0  # rcutorture's cookie checks hold
    assert "pipe_rule" in doc and "Free-Block Circulation:" in out


def test_main_takes_the_new_injects():
    """``launch.py torture`` calls ``torture.main``: a gp-* inject there exits 1 (FAILURE)."""
    args = argparse.Namespace(kind="rcu", procs=2, duration=2.0, seed=3, inject="gp-single-flip",
                              stat_interval=1.0, json=None)
    assert torture.main(args) == 1
    assert set(GP_BUGS) <= set(torture.INJECTS) and torture.INJECTS["gp-share-early"] == ("rcu", "srcu")


# ------------------------------------------------------------------------------------ 1-second self-tests

@pytest.mark.parametrize("kind", ["rcu", "srcu"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_wait_before_flip_fails_in_one_second_through_the_c_preemption_point(kind, seed):
    """Issue 23 items 2-3: the grace period without its wait before the flip is caught only through
    the reader preempted inside ``RcuReader.lock`` (``rcu.read_lock.after_ctr_load``,
    ``fuzz.torture_points``): FAILURE in a 1-second run at default --procs on every seed tried."""
    buf = io.StringIO()
    doc = torture.run_torture(kind, 4, 1.0, seed=seed, inject="gp-no-wait-before-flip", out=buf)
    assert doc["verdict"] == "FAILURE", buf.getvalue()
    # seen by the readers: the pipe rule, or a grace period that ended inside one (cookie check 2)
    assert sum(doc["histograms"]["reader_pipe"][2:]) + doc["counts"]["reader_cookie_errors"] > 0


@pytest.mark.parametrize("kind", ["rcu", "srcu"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_share_early_fails_in_one_second_by_the_cookie_check(kind, seed):
    """Issue 23 item 3: the writer and fake writers check a polled cookie around a quarter of their
    synchronize calls (rcutorture's do_rtws_sync): every shared running grace period is a
    "Cookie check 3" failure, whatever the readers were doing."""
    buf = io.StringIO()
    doc = torture.run_torture(kind, 4, 1.0, seed=seed, inject="gp-share-early", out=buf)
    assert doc["verdict"] == "FAILURE", buf.getvalue()
    assert doc["counts"]["sync_cookie_errors"] > 0 and any("Cookie check 3" in r for r in doc["reasons"])
