"""The vCPU worker process: attach the VM's shared memory, say hello, then run free or obey
scripted command batches. Telemetry (heartbeats, WARNs, stats, result) goes over ZeroMQ at tick
rate; the work itself never does. Exits by itself when the coordinator is gone.
"""

from __future__ import annotations

import os
import signal
import traceback

import vm.avic  # noqa: F401  (registers the nested AVIC designs in vm.nested.DESIGNS)
from ipc import _prims, trace, vtime
from ipc import messages as M
from ipc.proc import die_with_parent, pid_alive, sigterm_to_exit
from ipc.shm import Region
from ipc.worker_channel import WorkerChannel
from vcpu.vcpu import Vcpu, serve_kick, vcpu_seed
from vm.config import SCRIPT_OPS, from_dict
from vm.faults import POINT_ACTION
from vm.kvm import Kvm
from vm.nested import make_design

_COORDINATOR_PID = 0


class CoordinatorGone(Exception):
    pass


def vcpu_main(run_id: str, vcpu: int, endpoint: str, token: str, cfg_dict: dict, hooks: tuple,
              mode: str, coordinator_pid: int) -> None:
    """Process entry point (module-level, so forkserver children import it)."""
    global _COORDINATOR_PID
    _COORDINATOR_PID = coordinator_pid
    die_with_parent()
    sigterm_to_exit()
    ch = WorkerChannel(endpoint, vcpu, token)
    kvm = None
    try:
        ch.hello()
        cfg = from_dict(cfg_dict)
        if cfg.clock == "virtual" and mode == "free":  # before the VM: its locks are made wrapped
            _prims.vt_seed((vcpu_seed(cfg.seed, vcpu) >> 1) | 1)
            vtime.install(Region.attach(run_id, vtime.layout(cfg.vcpus)), vcpu, cfg.price_table(), cfg.fuzz, cfg.seed)
        kvm = Kvm.attach(cfg, run_id, vcpu + 1, frozenset(hooks))
        design = make_design(kvm, cfg)
        design.vcpu_init(vcpu)
        v = Vcpu(kvm, design, vcpu)
        Worker(ch, kvm, v, mode).serve()
    except (CoordinatorGone, vtime.VirtualTimeAborted):
        pass
    except SystemExit:
        raise
    except BaseException as e:  # report, never die silently
        try:
            ch.send(M.Warn(vcpu=vcpu, kind="vcpu_error", message=f"vCPU {vcpu} crashed: {e!r}",
                           data={"traceback": traceback.format_exc()[-4000:]}))
            ch.send(M.Result(vcpu=vcpu, ok=False, data={"error": repr(e)}))
        except Exception:
            pass
    finally:
        if kvm is not None:
            kvm.close()
        ch.close()


WARN_SEND_PER_KIND = 50
VT_TICK_NS = 1_000_000  # virtual time: counters flushed and telemetry sent every virtual ms


class Worker:
    def __init__(self, ch, kvm, v: Vcpu, mode: str):
        self.ch = ch
        self.kvm = kvm
        self.v = v
        self.mode = mode
        self.seq = 0
        self.sent_warns: dict[str, int] = {}
        kvm.on_warn = None

    # -- telemetry ------------------------------------------------------------------------------
    def drain_warns(self) -> None:
        """Send the WARNs raised since the last call: the first ``WARN_SEND_PER_KIND`` of each kind
        (like printk's rate limit: a WARN storm must not flood the channel and push the result out
        of the send queue); every WARN is counted in shm regardless."""
        ev, self.kvm.events = self.kvm.events, []
        for kind, message, data in ev:
            n = self.sent_warns.get(kind, 0)
            self.sent_warns[kind] = n + 1
            if n < WARN_SEND_PER_KIND:
                self.ch.send(M.Warn(vcpu=self.v.id, kind=kind, message=message, data=_plain(data)))
            elif n == WARN_SEND_PER_KIND:
                self.ch.send(M.Warn(vcpu=self.v.id, kind=kind, message=f"WARN vCPU {self.v.id}: further "
                                    f"{kind} WARNs are counted, not sent", data={"suppressed": True}))

    def heartbeat(self) -> None:
        self.seq += 1
        self.drain_warns()
        self.ch.send(M.Heartbeat(vcpu=self.v.id, seq=self.seq, ops=self.v.ops()))
        self.check_coordinator()

    def check_coordinator(self) -> None:
        """Free-running: a non-blocking look at the inbox (Stop, Fault, heartbeats); detect a dead
        coordinator."""
        while True:
            msg = self.ch.recv(0)
            if msg is None:
                break
            self.handle(msg)
        self.check_alive()

    def check_alive(self) -> None:
        """Raise CoordinatorGone if the coordinator died."""
        # under forkserver our parent is the fork server, which outlives the coordinator (every
        # child holds its "alive" pipe): watch the coordinator's pid itself
        if not pid_alive(_COORDINATOR_PID) or os.getppid() == 1:
            raise CoordinatorGone()

    def handle(self, msg) -> None:
        if isinstance(msg, M.Stop):
            self.stop = True
        elif isinstance(msg, M.Fault):
            self.fault(msg.kind, msg.args)

    def fault(self, kind: str, args: dict) -> None:
        """Injected faults (vm/faults.py): die inside a critical section, or stall a reader."""
        kvm = self.kvm
        if kind == "kill-vcpu":
            domain, lock = POINT_ACTION.get(args.get("point", ""), (None, None))
            self.v.flush()  # the results up to the fault stay in shm
            if domain is not None:
                kvm.domains[domain].read_lock()
            if lock is not None:
                kvm.locks[lock].lock()
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "stall-vcpu":
            ms = int(args.get("ms", 0))
            kvm.rcu.read_lock()
            try:
                _prims.spin_ns(ms * 1_000_000)
            finally:
                kvm.rcu.read_unlock()

    # -- modes ----------------------------------------------------------------------------------
    def serve(self) -> None:
        self.stop = False
        # wait for the start barrier (or scripted batches)
        while not self.stop:
            # while in L2 between scripted commands, a reload request's kick is taken within ~5 ms
            msg = self.ch.recv(5 if self.v.in_l2 else 200)
            if msg is None:
                if serve_kick(self.v):
                    self.drain_warns()
                self.check_alive()  # (not check_coordinator: its inbox drain would drop a Batch)
                continue
            if isinstance(msg, M.Start) and self.mode == "free":
                self.run_free()
                return
            if isinstance(msg, M.Batch):
                self.ch.send(self.batch(msg))
                self.drain_warns()
                continue
            self.handle(msg)
        self.finish(ok=True)

    def run_free(self) -> None:
        cfg = self.kvm.cfg
        vc = vtime.ACTIVE
        if vc is not None:
            self.run_virtual(vc)
            return
        deadline = _prims.now_ns() + int(cfg.duration * 1e9) + 5_000_000_000  # coordinator stops us
        try:
            self.v.run(deadline, self.heartbeat, cfg.heartbeat_ms * 1_000_000)
        finally:
            self.drain_warns()
        self.finish(ok=True)

    def run_virtual(self, vc) -> None:
        """clock = virtual: run until this vCPU's clock reaches ``duration``; telemetry every
        VT_TICK_NS of virtual time, unpriced (it is not the model's)."""
        cfg = self.kvm.cfg

        def tick() -> None:
            was = _prims.vt_enable(False)
            try:
                self.heartbeat()
            finally:
                _prims.vt_enable(was)

        ok, data = True, {}
        try:
            self.kvm.reset_stats()
            vc.join()
            self.v.run(int(cfg.duration * 1e9), tick, VT_TICK_NS)
        except vtime.VirtualDeadlock as e:
            ok, data = False, {"error": str(e)}
            self.kvm.warn("virtual_deadlock", str(e), vcpu=self.v.id)
        except vtime.VirtualTimeAborted as e:
            ok, data = False, {"error": f"aborted: {e}"}
        finally:
            data["line_transfers"] = _prims.vt_transfers()
            try:
                vc.done()
            except (vtime.VirtualDeadlock, vtime.VirtualTimeAborted) as e:  # every other vCPU is blocked
                ok, data["error"] = False, str(e)
                self.kvm.warn("virtual_deadlock", str(e), vcpu=self.v.id)
            self.drain_warns()
        self.finish(ok=ok, extra=data)

    def finish(self, ok: bool, extra: dict | None = None) -> None:
        self.v.flush()
        self.drain_warns()
        self.ch.send(M.Result(vcpu=self.v.id, ok=ok, data={"ops": self.v.ops(), **self.v.n, **(extra or {})}))

    def batch(self, b) -> M.BatchAck:
        results = []
        tr = trace.ACTIVE
        for cmd in b.commands:
            # one slice per scripted command (only known ops are interned: the name table is finite)
            codes = tr.pair(f"cmd {cmd.op}") if tr and cmd.op in SCRIPT_OPS else None
            if codes:
                tr.emit(codes[0])
            try:
                value = self.v.execute(cmd.op, dict(cmd.args))
                results.append(M.CommandResult(ok=True, value=_plain(value)))
            except (ValueError, RuntimeError, AssertionError) as e:
                results.append(M.CommandResult(ok=False, error=f"{cmd.op}: {e}"))
            finally:
                if codes:
                    tr.emit(codes[1])
        return M.BatchAck(seq=b.seq, vcpu=self.v.id, results=results)


def _plain(x):
    """numpy scalars etc. -> msgpack-able Python values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x
