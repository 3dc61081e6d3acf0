"""The VM coordinator: owns every shm segment of a run, spawns the vCPU processes (forkserver),
runs the ZeroMQ ROUTER in a private run directory, handshake → start barrier → run → stop,
collects WARNs and results, runs the oracle, writes the results document, unlinks everything.

vm/ never imports vcpu/: the composition root (launch.py) passes the vCPU entry point.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from ipc import messages as M
from ipc import vtime
from ipc.channel import AckMismatch, CoordinatorChannel, PeerUnreachable
from ipc.locks import LockdepError
from ipc.proc import forkserver_context, pid_alive, reap
from ipc.procstat import forkserver_alive
from ipc.rundir import make_run_dir, remove_run_dir
from vm import faults, tracepoints
from vm import layout as L
from vm import results as R
from vm.faults import diagnose_dead
from vm.kvm import Kvm
from vm.nested import destroy_vm, make_design

HELLO_TIMEOUT_S = 30.0
RESULT_TIMEOUT_S = 10.0

SAMPLE_MS = 20  # the design's sampling checker runs at least this often
VT_HANG_S = 60.0  # virtual time: no clock moved for this long (wall) = a hang


class RunError(RuntimeError):
    """The run could not be carried out (a vCPU never came up, the channel failed, ...)."""


def new_run_id() -> str:
    return "r" + secrets.token_hex(5)


def _creating(fn: Callable, *args):
    """``fn(*args)``, a step of VM creation (``Kvm.create``, the design's ``setup``: notifier nodes,
    write tracking). A lockdep splat there is the run's verdict, not a crash: a :class:`RunError`
    naming it (launch.py: ``FAILURE: lockdep splat at VM creation: ...``, exit 1)."""
    try:
        return fn(*args)
    except LockdepError as e:
        raise RunError(f"lockdep splat at VM creation: {e}") from None


class Coordinator:
    def __init__(self, cfg, vcpu_entry: Callable, *, preload: tuple[str, ...] = (), hooks=(),
                 console=None, quiet: bool = False, faults=(), results_path: str | None = None):
        self.cfg = cfg
        self.vcpu_entry = vcpu_entry
        self.preload = tuple(preload)
        self.hooks = tuple(sorted(hooks))
        self.console = console
        self.quiet = quiet
        self.run_id = new_run_id()
        self.token = secrets.token_urlsafe(24)
        self.warnings: list[dict] = []
        self.reasons: list[str] = []
        self.worker_results: dict[int, dict] = {}
        self.kvm = self.design = self.ch = self.run_dir = None
        self.procs: list = []
        self.launch_s = 0.0
        self.faults = list(faults)
        self.fault_fired = False
        self.vcpu_died = False  # a vCPU died mid-run: shm may hold its locks; skip teardown/oracle
        self.torn_down = False
        self.lost: list[int] = []  # pids of vCPUs alive but unjoinable (their fork server died)
        self.stall_thread = None
        self.results_path = results_path  # a FAILURE's trace dump goes beside it (vm/tracepoints.py)
        self.trace_snapshot = None  # every process' trace ring at the end of the run (ipc.trace)
        self.vt = None  # the virtual-time turnstile (ipc/vtime.py), under clock = virtual

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Coordinator:
        cfg = self.cfg
        try:
            self.kvm = _creating(Kvm.create, cfg, self.run_id, frozenset(self.hooks))
            self.kvm.on_warn = self._local_warn
            self.design = make_design(self.kvm, cfg)
            _creating(self.design.setup)
            self.run_dir = make_run_dir(self.run_id)
            self.ch = CoordinatorChannel(self.run_dir, self.token)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.procs:
            try:
                if self.kvm is not None and not self.kvm.closed:
                    self.kvm.mem.store(self.kvm.flags_w + L.F_RUN_STATE, L.RUN_STOP)
                if self.ch is not None:
                    self.ch.broadcast(M.Stop(reason="coordinator closing"))
            except Exception:
                pass
            reap(self.procs, timeout=5.0)
            self.procs = []
        self._kill_lost()
        self.teardown()
        if self.design is not None:
            self.design.close()
            self.design = None
        if self.ch is not None:
            self.ch.close()
            self.ch = None
        if self.run_dir is not None:
            remove_run_dir(self.run_dir)
            self.run_dir = None
        for r in (self.kvm, self.vt):
            if r is not None:
                r.close()

    def _kill_lost(self) -> None:
        """vCPUs whose fork server died cannot be joined: stop them by pid (they were told to stop
        and watch this process, so this is the backstop)."""
        deadline = time.monotonic() + 2.0
        while self.lost and time.monotonic() < deadline:
            self.lost = [p for p in self.lost if pid_alive(p)]
            time.sleep(0.02)
        for pid in self.lost:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.lost = []

    def teardown(self) -> list[str]:
        """Undo the kernel state once (the design's teardown, then ``kvm_mmu_uninit_vm``: KVM's own
        node leaves the list, v6.0), vCPUs stopped; skipped after a vCPU died (it may hold locks).
        Returns what went wrong in it -- a failure, a WARN, a lockdep splat: ``finish`` calls it
        after the oracle and folds that into the verdict (it was lost when teardown ran after)."""
        if self.torn_down or self.vcpu_died or self.kvm is None or self.kvm.closed:
            return []
        self.torn_down = True
        w0 = len(self.warnings)  # (a poisoned read WARNs: kvm.poisoned)
        failed = destroy_vm(self.kvm, self.design)
        self.reasons += failed
        return failed + [f"at teardown: {w['message']}" for w in self.warnings[w0:]]

    def _local_warn(self, kind: str, message: str, data: dict) -> None:
        self.warnings.append({"vcpu": -1, "kind": kind, "message": message, "data": data})
        self.kvm.events.clear()

    # -- vCPUs ----------------------------------------------------------------------------------
    def spawn(self, mode: str) -> None:
        ctx = forkserver_context(list(self.preload) or [self.vcpu_entry.__module__])
        t0 = time.monotonic()
        for i in range(self.cfg.vcpus):
            p = ctx.Process(target=self.vcpu_entry, name=f"vcpu{i}",
                            args=(self.run_id, i, self.ch.endpoint, self.token, self.cfg.to_dict(),
                                  self.hooks, mode, os.getpid()), daemon=True)
            try:
                p.start()
            except (EOFError, OSError) as e:  # the fork server died under us
                raise RunError(f"could not start vCPU {i}: the fork server died ({e!r})") from None
            self.procs.append(p)
            self.ch.bind(i, p.pid)  # only this process registers as vCPU i (no receive before the barrier)
        deadline = time.monotonic() + HELLO_TIMEOUT_S + 0.05 * self.cfg.vcpus
        while True:  # in slices, so a vCPU that died before its hello fails the run at once
            try:
                self.ch.wait_for_hellos(self.cfg.vcpus, 0.25, on_message=self._early_message)
                break
            except TimeoutError as e:
                dead = [i for i, p in enumerate(self.procs) if p.exitcode is not None]
                if dead or time.monotonic() >= deadline:
                    self.pump(0)
                    why = "; ".join(w["message"] for w in self.warnings if w["kind"] == "vcpu_error")[:300]
                    fs = "" if forkserver_alive() else "; the fork server died"
                    raise RunError(f"start barrier failed: {e}"
                                   + (f" (dead vCPUs: {dead[:8]}, exit code {self.procs[dead[0]].exitcode})"
                                      if dead else "") + fs + (f": {why}" if why else "")) from None
        self.launch_s = time.monotonic() - t0

    def _early_message(self, vcpu: int, msg) -> None:
        if isinstance(msg, M.Warn):
            self.warnings.append({"vcpu": msg.vcpu, "kind": msg.kind, "message": msg.message, "data": msg.data})

    def pump(self, timeout_ms: int) -> list:
        """Receive telemetry for up to ``timeout_ms``; handle WARNs/results; return other messages."""
        out = []
        got = self.ch.recv(timeout_ms)
        while got is not None:
            vcpu, msg = got
            if isinstance(msg, M.Warn):
                self.warnings.append({"vcpu": msg.vcpu, "kind": msg.kind, "message": msg.message,
                                      "data": msg.data})
            elif isinstance(msg, M.Result):
                self.worker_results[msg.vcpu] = {"ok": msg.ok, **msg.data}
                if not msg.ok:
                    self.reasons.append(f"vCPU {msg.vcpu} failed: {msg.data.get('error', '?')}")
            elif not isinstance(msg, M.Hello):  # a repeated Hello of a registered vCPU: nothing to do
                out.append((vcpu, msg))
            got = self.ch.recv(0)
        return out

    def dead_vcpus(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.exitcode is not None and i not in self.worker_results]

    def check_dead(self) -> bool:
        """A vCPU died mid-run (free or scripted): diagnose what it left in shm, once, and mark the
        run so that neither the oracle nor teardown touches locks it may still hold."""
        if self.vcpu_died:
            return True
        if not self.dead_vcpus():
            return False
        self.pump(50)  # results in flight, and the last WARNs of vCPUs that crashed
        dead = self.dead_vcpus()
        if not dead:
            return False
        self.vcpu_died = True
        fs_dead = not forkserver_alive()
        for v in dead:
            pid, code = self.procs[v].pid, self.procs[v].exitcode
            if pid_alive(pid):  # forkserver reports 255 for every child once it is gone
                self.lost.append(pid)
                self.reasons.append(f"vCPU {v} is alive but its exit status was lost: the fork server died "
                                    f"(vCPU pid {pid})")
            elif code == 0:
                self.reasons.append(f"vCPU {v} exited (code 0) but its result never reached the coordinator")
            else:
                self.reasons.extend(diagnose_dead(self.kvm, v, code, pid))
                if fs_dead and code == 255:
                    self.reasons[-1] += " (exit status lost: the fork server died)"
        return True

    # -- free-running ---------------------------------------------------------------------------
    def run_free(self, progress: Callable[[float, dict], None] | None = None) -> dict[str, Any]:
        cfg, kvm = self.cfg, self.kvm
        if cfg.clock == "virtual":
            return run_virtual(self, progress)
        self.spawn("free")
        t_start = time.monotonic()
        kvm.mem.store(kvm.flags_w + L.F_RUN_STATE, L.RUN_RUNNING)
        self.ch.broadcast(M.Start(t0_ns=time.monotonic_ns()))
        end = t_start + cfg.duration
        next_prog = t_start + 0.5
        fault_at = t_start + 0.3 * cfg.duration
        hb = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if self.faults and not self.fault_fired and now >= fault_at:
                faults.fire(self)
            self.pump(int(min(SAMPLE_MS, max(1, (end - now) * 1000))))
            if self.check_dead():
                break
            self.design.sample()
            if time.monotonic() >= next_prog:
                hb += 1
                self.ch.broadcast(M.Heartbeat(vcpu=-1, seq=hb))
                if progress is not None:
                    progress(time.monotonic() - t_start, self.totals())
                next_prog += 0.5
        elapsed = time.monotonic() - t_start
        self.stop_vcpus()
        return self.finish(elapsed)

    def totals(self) -> dict[str, int]:
        c = self.kvm.vm.v["counters"].sum(axis=0)
        return {name: int(x) for name, x in zip(L.COUNTERS, c, strict=True)}

    def stop_vcpus(self) -> None:
        kvm = self.kvm
        kvm.mem.store(kvm.flags_w + L.F_RUN_STATE, L.RUN_STOP)
        self.ch.broadcast(M.Stop(reason="done"))
        if self.stall_thread is not None:
            self.stall_thread.join(5.0)
        # after a fault, survivors may be stuck behind what the dead vCPU held: do not wait long
        deadline = time.monotonic() + (2.0 if self.reasons else RESULT_TIMEOUT_S)
        while len(self.worker_results) < len(self.procs) and time.monotonic() < deadline:
            self.pump(50)
            if all(p.exitcode is not None for p in self.procs):
                self.pump(0)
                break
        self.check_dead()  # a vCPU that died before its result: its locks may still be held
        missing = [i for i in range(len(self.procs)) if i not in self.worker_results]
        if missing:
            self.reasons.append(f"no result from vCPU(s) {missing[:8]}")
        codes = reap(self.procs, timeout=1.0 if self.reasons else 5.0)
        self.procs = []
        bad = [(i, c) for i, c in enumerate(codes) if c != 0]
        if bad:  # None: still there after SIGKILL (uninterruptible sleep): as dead as a killed one
            i, c = bad[0]
            self.reasons.append(f"vCPU {i} exited with code {c}" if c is not None else f"vCPU {i} did not exit after SIGKILL")
            self.vcpu_died = True  # killed (by reap, or crashed late): it may have left locks held

    def finish(self, elapsed: float, scripted: bool = False) -> dict[str, Any]:
        if self.vcpu_died:  # its locks may still be held: the oracle could block or lie
            oracle = []
            self.reasons.append("oracle skipped: a vCPU died mid-run")
        else:
            oracle = self.design.oracle()
        self.kvm.flush_counts()
        stats = self.design.stats()
        res = R.collect(self.kvm, self.cfg, elapsed, self.warnings, oracle, self.reasons, stats, scripted=scripted)
        res["launch_s"] = round(self.launch_s, 3)
        res["channel"] = dict(self.ch.counters) if hasattr(self.ch, "counters") else {}
        res["run_id"] = self.run_id
        res["interference"] = R.interference(res)
        late = self.teardown()  # after the oracle and the counts, before the verdict is final
        if late:
            res["reasons"] += late
            res["verdict"] = "FAILURE"
            res["warnings"] = self.warnings[:200]
            res["warn_count"] = max(res["warn_count"], len(self.warnings))
        self.trace_snapshot = tracepoints.snapshot(self.kvm, res)
        if res["verdict"] == "FAILURE":  # the last events of every process, beside the results
            tracepoints.save_failure(self.trace_snapshot, res, self.results_path)
        return res


# -- scripted -----------------------------------------------------------------------------------
def run_script(co: Coordinator, steps: list[tuple[int, str, dict]]) -> dict[str, Any]:
    """Execute (vcpu, op, args) steps in order on ``co``'s vCPUs; consecutive steps of one vCPU go
    in one batch. Each step's result is recorded; a failed command is a FAILURE reason."""
    co.spawn("scripted")
    t0 = time.monotonic()
    if co.faults:
        faults.fire(co)
    log = []
    i = 0
    while i < len(steps):
        vcpu = steps[i][0]
        j = i
        while j < len(steps) and steps[j][0] == vcpu:
            j += 1
        cmds = [M.Command(op=op, args=args) for _, op, args in steps[i:j]]
        if not 0 <= vcpu < co.cfg.vcpus:
            co.reasons.append(f"step {i}: no vCPU {vcpu} (vcpus = {co.cfg.vcpus})")
            break
        if co.check_dead():
            break
        try:
            ack = co.ch.call(vcpu, cmds, timeout_s=30.0)
        except (TimeoutError, PeerUnreachable, AckMismatch) as e:
            co.check_dead()
            if isinstance(e, AckMismatch):
                co.reasons.append(f"vCPU {e.vcpu}: protocol error (BatchAck mismatch) during a batch of "
                                  f"{len(cmds)} command(s) to vCPU {vcpu}: {e}")
            else:
                co.reasons.append(f"vCPU {vcpu} did not acknowledge a batch of {len(cmds)} command(s): {e}")
            break
        finally:
            co.pump(0)
        for (v, op, args), r in zip(steps[i:j], ack.results, strict=False):
            log.append({"vcpu": v, "op": op, "args": args, "ok": r.ok, "value": r.value, "error": r.error})
            if not r.ok:
                co.reasons.append(f"vCPU {v} {op}: {r.error}")
        i = j
        if co.check_dead():
            break
    elapsed = time.monotonic() - t0  # wall time of the script: no rates from it (R.collect)
    co.stop_vcpus()
    res = co.finish(elapsed, scripted=True)
    res["steps"] = log
    return res


def run_virtual(co: Coordinator, progress) -> dict[str, Any]:
    """clock = virtual: the vCPUs run until their clocks reach ``duration`` (virtual s); the
    coordinator waits for their results, showing virtual progress, and calls a hang when the lowest
    clock of the running vCPUs has not moved for VT_HANG_S of wall time."""
    kvm = co.kvm
    co.vt = vtime.create(co.run_id, co.cfg.vcpus, co.cfg.seed)  # before the vCPUs: they attach it
    co.spawn("free")
    kvm.reset_stats()  # its set-up ran on the host's clock
    t_start = time.monotonic()
    kvm.mem.store(kvm.flags_w + L.F_RUN_STATE, L.RUN_RUNNING)
    co.ch.broadcast(M.Start(t0_ns=time.monotonic_ns()))
    slots = co.vt.v["slots"]
    next_prog = t_start + 0.5
    last, moved = -1, t_start
    while len(co.worker_results) < len(co.procs):
        co.pump(SAMPLE_MS)
        if co.check_dead() or any(not r["ok"] for r in co.worker_results.values()):
            vtime.abort(co.vt)  # the others may wait for its turn (or its join) forever
            break
        co.design.sample()
        now = time.monotonic()
        live = slots[:, vtime.S_STATE] != vtime.DONE
        low = int(slots[live, vtime.S_CLOCK].min()) if live.any() else -1
        if low != last:
            last, moved = low, now
        elif now - moved > VT_HANG_S:
            co.reasons.append(f"virtual time: the lowest clock of the running vCPUs did not move for "
                              f"{VT_HANG_S:g} s of wall time (hang)")
            vtime.abort(co.vt)
            break
        if progress is not None and now >= next_prog:
            progress(virtual_s(co.vt), co.totals())
            next_prog += 0.5
    wall = time.monotonic() - t_start
    co.stop_vcpus()
    vs = virtual_s(co.vt)
    res = co.finish(vs)  # elapsed_s is virtual: rates are per virtual second
    res.update(virtual_s=round(vs, 9), wall_s=round(wall, 3),
               vtime={**vtime.stats(co.vt), "prices": co.cfg.price_table(),
                      "line_transfers": sum(int(r.get("line_transfers", 0)) for r in co.worker_results.values())})
    return res


def virtual_s(vt) -> float:
    """A virtual-time run's time so far: the lowest clock of the vCPUs still running (the highest
    once all are done), seconds."""
    s = vt.v["slots"]
    live = s[:, vtime.S_STATE] != vtime.DONE
    c = s[live, vtime.S_CLOCK] if live.any() else s[:, vtime.S_CLOCK]
    return float(c.min() if live.any() else c.max()) / 1e9


def _ops(totals: dict) -> int:
    return totals["vmrun"] + totals["write_untracked"] + totals["write_tracked"] + totals["write_mmio"]


def print_progress_line(elapsed: float, totals: dict) -> None:
    print(f"  {elapsed:6.1f}s  vmrun {totals['vmrun']:>10,}  writes tracked {totals['write_tracked']:>9,} "
          f"mmio {totals['write_mmio']:>9,} untracked {totals['write_untracked']:>10,}  "
          f"ops/s {_ops(totals) / max(elapsed, 1e-9):>12,.0f}", file=sys.stderr, flush=True)


class LiveProgress:
    """Live progress for a terminal (rich): elapsed / duration, VMRUN and ops per second."""

    def __init__(self, duration: float):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                          TextColumn("{task.fields[rates]}"), transient=True)
        self.task = self.p.add_task("running", total=duration, rates="")

    def __enter__(self) -> LiveProgress:
        self.p.start()
        return self

    def __exit__(self, *exc) -> None:
        self.p.stop()

    def __call__(self, elapsed: float, totals: dict) -> None:
        e = max(elapsed, 1e-9)
        self.p.update(self.task, completed=elapsed,
                      rates=f"VMRUN/s {totals['vmrun'] / e:,.0f}  ops/s {_ops(totals) / e:,.0f}  "
                            f"WARNs {totals['warns']}")
