"""A VM with one vCPU in this benchmark's own process (no ZeroMQ, no fork): for loop and
write-path measurements."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from vcpu.vcpu import Vcpu
from vm.kvm import Kvm
from vm.nested import make_design


@contextmanager
def one_vcpu(cfg, tag: str, accounting: bool = True) -> Iterator[tuple]:
    """``(kvm, design, vcpu)`` for vCPU 0 of ``cfg`` (segments named ``<tag><pid>``); the design is
    torn down on a normal exit, every segment is released in any case. ``accounting``: the vCPU
    side of the design (``vcpu_init``: the mirror's per-write call accounting), as a run has it."""
    kvm = Kvm.create(cfg, f"{tag}{os.getpid()}")
    try:
        d = make_design(kvm, cfg)
        d.setup()
        if accounting:
            d.vcpu_init(0)
        yield kvm, d, Vcpu(kvm, d, 0)
        d.teardown()
        d.close()
    finally:
        kvm.close()
