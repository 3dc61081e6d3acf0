"""Grace periods with one bug each, for the torture self-tests (``--inject gp-*``, rcu and srcu).

rcutorture's ``rcu_busted_ops`` ("Don't even think about trying any of these in real life!!!")
checks that the test reports a grace period that does not wait at all (here ``--inject
broken-gp``, the domain's own ``broken`` flag). The bugs below are subtler: each lets a reader
escape exactly one grace period, which a pipe count that started at 0 on removal would not see
(see ``rcutorture`` for the pipe rule that does).

Each bug is a subclass of the flavor's domain that keeps ``RcuDomain._synchronize`` as it is
(gp lock and its takeover, the gp_state numbering, cookies, barriers, stall and dead-reader
diagnosis, fuzz points) and changes one step of it, so the injected grace period stays the real
one but for that step. :class:`GpSteps` names the steps: ``_synchronize`` calls
``_wait_readers(t0, warned)`` twice per grace period it runs -- before the phase flip (readers of
the old phase) and after it (readers of the phase that was current at the call) -- with one
``warned`` set per grace period, which tells the two calls apart.

- ``gp-single-flip``    (:class:`GpSingleFlip`) waits for the readers of the old phase, flips
  the phase bit and ends the grace period without the wait after the flip (liburcu's
  single-flip bug class: the readers that matter are only waited for by the *next* grace
  period).
- ``gp-skip-alternate`` (:class:`GpSkipAlternate`) every second grace period this process runs
  is counted (gp_state, gp_seq, under the gp lock) without waiting for any reader.
- ``gp-share-early``    (:class:`GpShareEarly`) synchronize's snapshot accepts a grace period
  that was already running when the caller arrived (``(s + 2) & ~1`` instead of
  ``rcu_seq_snap``'s ``(s + 3) & ~1``): the caller shares it and returns, although that grace
  period may have scanned the readers before the caller's update.
- ``gp-no-wait-before-flip`` (:class:`GpNoWaitBeforeFlip`) flips and waits after the flip only:
  liburcu's wait before the flip is for a reader that loaded the phase before a flip and stored
  it after the scan (preempted inside ``_prims.RcuReader.lock``, at the C preemption point
  ``rcu.read_lock.after_ctr_load``: torture readers delay there, ``fuzz.torture_points``); such
  a stale reader escapes the next grace period. Without that window the bug is a few
  instructions wide.

Only the update side is wrong; readers use the real domain. :func:`gp_bug_domain` builds
``<Bug><Domain>`` for a flavor's domain class (RcuDomain, SrcuDomain, ...).
"""

from __future__ import annotations

from ipc import _prims
from ipc.rcu import HDR_GP_STATE, RcuDomain


class GpSteps(RcuDomain):
    """The domain's grace period, its reader waits told apart: ``_wait(after_flip)`` decides
    whether each of the two waits of a grace period happens (both, here: the real algorithm)."""

    _gp_warned: set[int] | None = None
    gps_started = 0  # grace periods this process began to wait for (first _wait_readers call)

    def _wait(self, after_flip: bool) -> bool:
        return True

    def _wait_readers(self, t0: int, warned: set[int]) -> None:
        after_flip = warned is self._gp_warned  # the second call of this grace period
        if not after_flip:
            self._gp_warned = warned
            self.gps_started += 1
        if self._wait(after_flip):
            super()._wait_readers(t0, warned)


class GpSingleFlip(GpSteps):
    """``gp-single-flip``: no wait after the phase flip."""

    def _wait(self, after_flip: bool) -> bool:
        return not after_flip  # BUG: the readers of the phase current at the call are not waited for


class GpSkipAlternate(GpSteps):
    """``gp-skip-alternate``: every second grace period of this process is counted, not waited."""

    def _wait(self, after_flip: bool) -> bool:
        return self.gps_started & 1 == 1  # BUG: the 2nd, 4th, ... grace period waits for nobody


class GpShareEarly(GpSteps):
    """``gp-share-early``: a caller shares a grace period that started before its call."""

    def _snap(self) -> int:
        _prims.smp_mb()
        s = self.mem.load(self.hdr_w + HDR_GP_STATE)
        return (s + 2) & ~1  # BUG: (s + 3) & ~1 -- a running GP (odd s) must not count

    def synchronize(self) -> None:
        self._synchronize(self._snap())


class GpNoWaitBeforeFlip(GpSteps):
    """``gp-no-wait-before-flip``: no wait for the readers of the old phase before the flip (the
    flip and the wait after it stay). Only a reader that loaded the phase before a flip and
    published it after the scan (preempted at ``rcu.read_lock.after_ctr_load`` inside
    ``_prims.RcuReader.lock``) escapes the next grace period: the window that liburcu's first
    wait is for."""

    def _wait(self, after_flip: bool) -> bool:
        return after_flip  # BUG: a reader that published a phase read before the last flip escapes


GP_BUGS: dict[str, type[GpSteps]] = {
    "gp-single-flip": GpSingleFlip,
    "gp-skip-alternate": GpSkipAlternate,
    "gp-share-early": GpShareEarly,
    "gp-no-wait-before-flip": GpNoWaitBeforeFlip,
}


def gp_bug_domain(domain: type[RcuDomain], inject: str) -> type[RcuDomain]:
    """``domain`` (RcuDomain or a subclass) with the update side of ``GP_BUGS[inject]``."""
    bug = GP_BUGS[inject]
    # the flavor's aliases (synchronize_rcu, synchronize_srcu) name the buggy synchronize too
    aliases = {a: bug.synchronize for a in dir(domain) if a.startswith("synchronize_")}
    return type(f"{bug.__name__}{domain.__name__}", (bug, domain), aliases)
