"""Scheduling strategies of the controlled scheduler (``ipc.sched``): who runs next at each step.

A strategy's ``pick(enabled, step, last)`` chooses among the enabled clients; :class:`Replay` is
driven by ``Scheduler.run`` from a recorded list of (client, point) choices.
"""

from __future__ import annotations

import random

STRATEGIES = ("pct", "random")


class RandomWalk:
    name = "random"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, enabled: list[int], step: int, last: int) -> int:
        return enabled[int(self.rng.random() * len(enabled))]


class Pct:
    """PCT (Burckhardt et al., ASPLOS 2010): random distinct priorities, d-1 change points among
    the first ``k`` steps at which the running client's priority drops below every other; always
    run the highest-priority enabled client."""

    name = "pct"

    def __init__(self, seed: int, n: int, depth: int, k: int):
        rng = random.Random(seed)
        prios = list(range(depth, depth + n))
        rng.shuffle(prios)
        self.prio = prios
        self.change = {s: depth - 1 - i for i, s in enumerate(sorted(rng.sample(range(1, max(k, depth) + 1),
                                                                                depth - 1)))}

    def pick(self, enabled: list[int], step: int, last: int) -> int:
        low = self.change.get(step)
        if low is not None and last >= 0:
            self.prio[last] = low
        return max(enabled, key=self.prio.__getitem__)


class Replay:
    name = "replay"

    def __init__(self, choices: list[tuple[int, int]]):
        self.choices = choices
        self.mismatch: str | None = None

    def pick(self, enabled: list[int], step: int, last: int) -> int:
        raise AssertionError("Replay is driven by Scheduler.run")


def guarantee(n: int, k: int, depth: int) -> float:
    """PCT's per-run lower bound for finding a bug of depth ``depth``: 1 / (n * k^(d-1))."""
    return 1.0 / (n * max(k, 1) ** (depth - 1))
