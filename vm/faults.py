"""Fault injection (``--inject``) and the diagnosis of what a dead vCPU left behind.

Specs:
- ``kill-vcpu:K@rcu-read``     vCPU K SIGKILLs itself inside an RCU read-side critical section
- ``kill-vcpu:K@srcu-read``    ... inside the page-track SRCU read side (``track_srcu``)
- ``kill-vcpu:K@mmu-lock``     ... while holding ``mmu_lock`` (spinlock)
- ``kill-vcpu:K@tables-lock``  ... while holding ``tables_lock`` (futex mutex)
- ``kill-vcpu:K@random``       the coordinator SIGKILLs vCPU K at a random moment
- ``stall-vcpu:K:MS``          vCPU K stays MS ms inside an RCU read-side critical section while
                               a grace period waits for it (the RCU stall warning must name it)
- ``kill-coordinator``         the coordinator SIGKILLs itself; the vCPUs must exit by themselves
Faults fire at 30 % of the run (or before the first scripted step).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass

from ipc import messages as M
from ipc.errors import UsageError
from ipc.rcu import HDR_DEAD_TAG
from vm import layout as L

KILL_POINTS = ("rcu-read", "srcu-read", "mmu-lock", "tables-lock", "random")
_KILL = re.compile(r"^kill-vcpu:(\d+)@([a-z-]+)$")
_STALL = re.compile(r"^stall-vcpu:(\d+):(\d+)$")
# where a self-kill happens: (domain to enter, lock to take)
POINT_ACTION = {"rcu-read": ("rcu", None), "srcu-read": ("track_srcu", None),
                "mmu-lock": (None, "mmu_lock"), "tables-lock": (None, "tables_lock")}


@dataclass(frozen=True)
class Fault:
    kind: str            # "kill-vcpu" | "stall-vcpu" | "kill-coordinator"
    vcpu: int = -1
    point: str = ""      # kill point
    ms: int = 0          # stall length

    def args(self) -> dict:
        return {"point": self.point, "ms": self.ms}


def parse(spec: str, vcpus: int) -> Fault:
    s = spec.strip()
    if s == "kill-coordinator":
        return Fault("kill-coordinator")
    m = _KILL.match(s)
    if m:
        k, point = int(m.group(1)), m.group(2)
        if point not in KILL_POINTS:
            raise UsageError(f"--inject {spec}: unknown kill point {point!r} (one of {', '.join(KILL_POINTS)})")
        _check_vcpu(spec, k, vcpus)
        return Fault("kill-vcpu", k, point)
    m = _STALL.match(s)
    if m:
        k, ms = int(m.group(1)), int(m.group(2))
        _check_vcpu(spec, k, vcpus)
        if not 1 <= ms <= 600_000:
            raise UsageError(f"--inject {spec}: stall length must be 1..600000 ms")
        return Fault("stall-vcpu", k, ms=ms)
    raise UsageError(f"--inject {spec!r}: expected kill-vcpu:K@POINT, stall-vcpu:K:MS or kill-coordinator")


def _check_vcpu(spec: str, k: int, vcpus: int) -> None:
    if not 0 <= k < vcpus:
        raise UsageError(f"--inject {spec}: no vCPU {k} (vcpus = {vcpus})")


def diagnose_dead(kvm, vcpu: int, exitcode: int | None, pid: int = 0) -> list[str]:
    """What the dead vCPU left behind in shared memory: locks it holds (the vm's locks and the
    grace-period mutex of every RCU/SRCU domain, also one another vCPU has taken over from it since),
    reader slots it occupies. A lock is its if the owner tag says so or, given its ``pid``, if the
    holder pid in the lock word does (the CAS that takes a lock records it before any tag store)."""
    proc = vcpu + 1
    tag = proc + 1
    name = f"vCPU {vcpu}"
    out = []
    v = kvm.vm.v
    locks = v["locks"]
    for i, lname in enumerate(L.LOCKS):
        # lock word 0: 0 = free, else holder pid (high half) | owner tag or futex word (low half)
        held = int(locks[i, 0]) & 0xFFFFFFFF
        owner = int(locks[i, 2]) if L.LOCK_KIND[lname] == "mutex" else held
        if held and (owner == tag or (pid and int(locks[i, 0]) >> 32 == pid)):
            out.append(f"{name} died holding {lname}")
    for prefix, _cls in L.DOMAINS:
        gl = v[f"{prefix}_gplock"]
        hdr = v.get(f"{prefix}_hdr")
        held_by_it = int(gl[0]) & 0xFFFFFFFF and (int(gl[2]) == tag or (pid and int(gl[0]) >> 32 == pid))
        taken_over = hdr is not None and int(hdr[HDR_DEAD_TAG]) == tag
        if held_by_it or taken_over:
            out.append(f"{name} died holding the grace-period lock of {prefix}")
    for prefix, _cls in L.DOMAINS:
        slots = v[f"{prefix}_slots"]
        if int(slots[proc, 0]) & 0xFFFFFFFF:
            out.append(f"grace period of {prefix} blocked by dead reader slot of {name}")
    sig = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    if not out:
        out.append(f"{name} died ({sig})")
    else:
        out[0] += f" ({sig})"
    return out


def fire(co) -> None:
    """Inject coordinator ``co``'s --inject faults, now (the run is under way)."""
    co.fault_fired = True
    rng = random.Random(co.cfg.seed)
    for f in co.faults:
        if co.kvm.tracer is not None:  # an instant in the coordinator's trace ring
            co.kvm.tracer.emit(co.kvm.tracer.instant(f"inject {f.kind}"), f.vcpu, f.ms)
        if f.kind == "kill-coordinator":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.kind == "kill-vcpu" and f.point == "random":
            time.sleep(rng.random() * 0.2 * co.cfg.duration)
            os.kill(co.procs[f.vcpu].pid, signal.SIGKILL)
        elif f.kind == "kill-vcpu":
            co.ch.send(f.vcpu, M.Fault(kind=f.kind, args=f.args()))
        elif f.kind == "stall-vcpu":
            co.ch.send(f.vcpu, M.Fault(kind=f.kind, args=f.args()))
            co.stall_thread = threading.Thread(target=_gp_waiter, args=(co, f.ms), daemon=True)
            co.stall_thread.start()


def _gp_waiter(co, ms: int) -> None:
    """Grace periods on the RCU domain while a stalled reader sits in it: the stall warning comes
    from the ordinary synchronize_rcu machinery."""
    end = time.monotonic() + ms / 1000 + 1.0
    rcu = co.kvm.rcu
    while time.monotonic() < end and not rcu.stalls:
        try:
            rcu.synchronize()
        except Exception as e:  # GracePeriodBlocked: the reader died
            co.reasons.append(str(e))
            return
        time.sleep(0.01)


def notifier_cycle(kvm) -> str:
    """A walk of the page-track notifier list ran longer than the node pool: the list is a cycle, and
    in the kernel ``kvm_page_track_write`` (``hlist_for_each_entry_srcu``) would never finish — a soft
    lockup of that vCPU with the SRCU read lock held. Here the walk stops; this names the node where
    the cycle closes and the registration that closed it (``NH_CYCLE``: mainline's second
    ``hlist_add_head_rcu`` of a node already on the list, see vm/notifier.py). WARNed once per process;
    returns the message. If a re-walk finds no cycle, the list changed since the walker overran
    (WARNed as an overrun, not as a cycle)."""
    mem, h = kvm.mem, kvm.notifier_w
    nmax = kvm.nodes.shape[0]
    seen: set[int] = set()
    n, at = mem.load(h + L.NH_HEAD), -1
    for _ in range(nmax + 1):  # the first node met twice is where the cycle closes
        if not 0 < n <= nmax:
            break
        if n - 1 in seen:
            at = n - 1
            break
        seen.add(n - 1)
        n = mem.load(kvm.nodes_w + (n - 1) * 8 + L.N_NEXT)
    made, by = mem.load(h + L.NH_CYCLE) - 1, mem.load(h + L.NH_CYCLE_BY)
    if made >= 0:
        tag, nreg = by >> 32, by & 0xFFFFFFFF
        who = "the coordinator" if tag == 1 else f"vCPU {tag - 2}"
        how = (f"made by registration #{nreg} (by {who}) of notifier node {made}, which was already on the "
               f"list (mainline: a second hlist_add_head_rcu, no redundant-registration check)")
    else:
        how = "made by no recorded registration (the list was corrupted otherwise)"
    if at < 0:  # the re-walk ended: the list the walker overran is not the list now
        msg = (f"notifier walk ran past the {nmax}-node pool, but the list changed meanwhile: no cycle on "
               f"a re-walk (the walk stopped early; notifiers after that point were not called)")
        kvm.warn("notifier_overrun", msg)
        return msg
    msg = (f"notifier list cycle at node {at}: kvm_page_track_write would never finish (soft lockup); "
           f"the cycle was {how}")
    if not kvm.cycle_warned:
        kvm.cycle_warned = True
        kvm.warn("notifier_cycle", msg, node=at, made_by_node=made)
    return msg
