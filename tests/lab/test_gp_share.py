"""The three-process grace-period scenario (issue 22 item 2): two updaters, each dropping the last
use of a table on rcu-list (list del, synchronize_rcu, free), and a reader whose L1 stores look the
tables up under rcu_read_lock. With hook ``gp-share-early`` (torture's grace-period bug on the VM's
own domains: synchronize shares a grace period that began before the call) the interleaving below
frees a table under the reader; with the correct grace period the same choices stay SUCCESS."""

from __future__ import annotations

import pytest

from ipc.sched import S_POINT, point_id
from lab.scenarios import builtin
from lab.schedrun import Runner

A, B, R = 0, 1, 2
# (vCPU, run it until it stands at this point for the n-th time (None: until it blocks or ends), n)
PHASES = [
    (B, "op vmexit l2=1 leaving=True", 1),  # B has made T1 (its VMRUN) and is about to drop it
    (A, "rcu.gp.after_flip", 1),  # A, making T0, is inside synchronize_rcu: its GP has flipped the phase
    (R, "avic.rcu.track_write_lookup_to_write", 1),  # R's store to T1 faults; track_write found T1 under RCU
    (B, None, 0),  # B unlinks T1 and calls synchronize_rcu: waits for A's gp_lock
    (A, "guest_mode.gp_lock: lock", 1),  # A's grace period ends (R entered after its flip), gp_lock free
    (B, "op vcpu_put", 1),  # B: its grace period (shared, or its own) and the free of T1
]


class Directed:
    """Runs the phases above (reading each vCPU's next point from the turnstile), then whoever ran
    last while it can."""

    name = "directed"

    def __init__(self, region):
        self.mem, self.region = region.mem, region
        self.phase, self.seen = 0, 0

    def _at(self, v: int) -> int:
        return self.mem.load(self.region.word("slots", v) + S_POINT)

    def pick(self, enabled, step, last, locs=None):
        while self.phase < len(PHASES):
            v, stop, nth = PHASES[self.phase]
            if stop is not None and v in enabled and self._at(v) == point_id(stop):
                self.seen += 1
                if self.seen == nth:
                    self.phase, self.seen = self.phase + 1, 0
                    continue
            if v in enabled:
                return v
            self.phase, self.seen = self.phase + 1, 0
        return last if last in enabled else min(enabled)


def _run(hooks):
    sc = builtin("gp-share", None, None, hooks)
    with Runner(sc) as r:
        strat = Directed(r._pool().region)
        o = r.run(strat, 20_000)
    return o, strat


@pytest.mark.parametrize("hooks,bad", [(("gp-share-early",), True), ((), False)], ids=["gp-share-early", "correct"])
def test_gp_share_early_frees_a_table_under_the_reader(hooks, bad):
    o, strat = _run(hooks)
    assert strat.phase == len(PHASES), strat.phase  # every phase was reached
    if bad:
        assert o.verdict == "FAILURE", o.reasons[:3]
        assert any("poisoned" in r and "freed" in r and "track_write reader" in r for r in o.reasons), o.reasons[:3]
    else:
        assert o.verdict == "SUCCESS", o.reasons[:3]
