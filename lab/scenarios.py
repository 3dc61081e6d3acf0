"""The scenarios ``launch.py explore`` searches: one program per vCPU (no global order between
vCPUs), each a list of the scripted commands of ``run --scenario`` (``[[step]]`` ops, executed by
vcpu/vcpu.py ``Vcpu.execute``: the same executor and L1 write path as ``run`` and ``scenario``). A
built-in is a scripted run under the controlled scheduler, nothing else.

Built-ins, and the paths each is there to reach (``explore --coverage`` measures it):
- ``kaboom``      the seed's "X registers, Y registers, X unregisters" (``--registration`` picks the
  variant: register / unregister of the shared node, each variant's own path)
- ``flood-drop``  an L1 writer floods a table while its owner enters L2 (flood, drop, reload
  request, kick; ``--hook flood-drop-race`` removes the kick)
- ``tlb-flush``   an L1 store through a writable mapping while the table page is write-protected
  (table sync, update; ``--hook no-tlb-flush``)
- ``invalidate``  L1 rewrites entries of a shadowed table: apic id / IsRunning (update), a new
  backing page, a cleared Valid bit and a 16-byte store across two entries (invalidate), while the
  table's owner goes in and out of L2 and ends in it (an erase then kicks it: reload request)
- ``memslot``     a memslot holding a shadowed table goes away (``delete_slot``: every notifier's
  ``track_remove_region``, the table erased, its user kicked) while L1 writes it
- ``gp-share``    three processes: two updaters each dropping the last use of a table (list del,
  ``synchronize_rcu``, free) on ``rcu-list`` and a reader (L1 stores to both tables: their
  track_write looks the tables up under ``rcu_read_lock``); two grace periods overlap, so one
  caller may share the other's (``--hook gp-share-early``: shares one that began before its call)
- ``notifier``    three processes: a page-track user registering and unregistering a notifier
  twice (the free-running loop's churn: ``synchronize_srcu``, free) while a table comes and goes
  (the AVIC node's register / unregister) and an L1 writer walks the list (an SRCU reader)
- ``share``       two vCPUs each run both L2s, in opposite orders: get and put of one table race
  (the last put's unlink and free against a lookup taking a reference), and an L2 switch after a
  VMEXIT drops the old table (the VMRUN fast path must check it is the new L2's)
- ``running``     vCPU 0 is put and loaded again and again (IsRunning flips) while vCPU 1 shadows
  a table, drops it and shadows it again; the table's entry 1 (vCPU 1's own, checked at its VMRUN)
  names vCPU 0, running: a sync translates it from vCPU 0's loaded state, and a flip must not
  skip a table being synced
- ``reader``      an L1 writer that holds another table (the shared node stays registered: only
  ``synchronize_rcu`` guards the free) writes a table whose last user leaves (``rcu-list``)
- ``free``        each vCPU runs a short seeded op stream of the workload generator (``--seed``)
"""

from __future__ import annotations

import os

from ipc.errors import UsageError
from lab.schedrun import Scenario

BUILTINS = ("kaboom", "flood-drop", "tlb-flush", "invalidate", "memslot", "gp-share", "notifier", "share", "running", "reader", "free")
# a schedule's VM is made fresh: 1 MiB of guest memory (256 pages: the tracked pages, two physid
# tables, room for backing pages) instead of the default 16 MiB, whose two 16 MiB segments (guest,
# mirror) were most of a small schedule's cost (reserving and unlinking them: ~60 ms)
SMALL = {"memory_mib": 1}
FREE = {**SMALL, "vcpus": 2, "l2s": 2, "switch_rate": 0.5, "writes_per_exit": 2, "tracked_fraction": 0.5}
FREE_ITERATIONS = 3
EXECUTOR = "vcpu"  # vcpu/vcpu.py Vcpu.execute: the only executor (saved files name it)

Program = list[tuple[str, dict]]


def _entry(backing_gfn: int, apic: int, running: bool, valid: bool = True) -> str:
    """A guest physid entry as the ``data`` of a ``write`` step: 8 bytes, little-endian, in hex (a
    TOML integer cannot hold bit 63, Valid)."""
    from vm.avic.table import make_entry

    return make_entry(backing_gfn << 12, apic, running, valid).to_bytes(8, "little").hex()


def _gpa(cfg, l2: int, entry: int) -> int:
    from vm.nested import table_gfn

    return (table_gfn(cfg, l2) << 12) + entry * 8


def _cfg(d: dict):
    from vm import config

    return config.from_dict({**d, "fuzz": "off"})


def builtin(name: str, registration: str | None, design: str | None, hooks: tuple[str, ...]) -> Scenario:
    hooks = tuple(sorted(set(hooks)))
    if name == "free":
        return free(registration, design, hooks)
    reg = registration or "refcount"
    if name == "kaboom":
        from vm.avic.kaboom import kaboom_steps

        des = design or "mutex-hash"
        progs: list[Program] = [[], []]
        for v, op, args in kaboom_steps(reg, des):
            progs[v].append((op, args))
        return Scenario(name, {**SMALL, "vcpus": 2, "l2s": 2, "design": des, "registration": reg}, hooks, progs, EXECUTOR)
    # flood-drop: the lock-free design (mutex-hash serializes track_write and VMRUN by tables_lock)
    des = design or ("rcu-list" if name in ("flood-drop", "gp-share", "reader") else "mutex-hash")
    cfg = {**SMALL, "vcpus": 2, "l2s": 2, "design": des, "registration": reg}
    if name == "flood-drop":
        # vCPU 1 runs L2 0 once and keeps its table; back in L1 it rewrites its own entry while
        # the table is unused: the third such write floods it (avic-flood-often: a drop after 2
        # unused writes) -- maybe while vCPU 0 enters L2 0 for good (the sampling checker, run
        # between every two steps, then sees vCPU 0 in L2 on an unshadowed table unless kicked)
        owner = [("vmrun", {"l2": 0})]
        writer = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0})] + [
            ("write_entry", {"l2": 0, "entry": 1, "apic": 1, "running": r}) for r in (False, True, False)]
        return Scenario(name, cfg, tuple(sorted({*hooks, "avic-flood-often"})), [owner, writer], EXECUTOR)
    if name == "tlb-flush":
        # vCPU 1 (L1) stores into L2 0's table while vCPU 0 creates and write-protects it
        owner = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0}), ("vmrun", {"l2": 0}), ("vmexit", {"l2": 0})]
        writer = [("write_entry", {"l2": 0, "entry": 1, "apic": 1, "running": True})]
        return Scenario(name, cfg, hooks, [owner, writer], EXECUTOR)
    if name == "invalidate":
        c = _cfg(cfg)
        # the owner's program ends in L2: an erase then requests a reload and kicks it (its idle turn)
        owner = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0}), ("vmrun", {"l2": 0})]
        g1, g0 = _gpa(c, 0, 1), _gpa(c, 0, 0)
        lo = 1 + c.tracked_pages  # a backing page in ordinary memory
        writer = [
            ("write", {"gpa": g1, "data": _entry(lo, 1, False)}),  # a valid entry, new backing: erase
            ("write_entry", {"l2": 0, "entry": 1, "apic": 0, "running": True}),  # apic id / IsRunning: update
            ("write", {"gpa": g1, "data": _entry(lo + 1, 0, True)}),  # another backing page: erase
            ("write", {"gpa": g0, "data": "00" * 16}),  # 16 bytes over entries 0 and 1: erase
            ("write", {"gpa": g1, "data": _entry(lo, 1, True)}),  # valid again: erase
            ("write", {"gpa": g1, "data": _entry(lo, 1, True, valid=False)}),  # Valid cleared: erase
        ]
        return Scenario(name, cfg, hooks, [owner, writer], EXECUTOR)
    if name == "memslot":
        c = _cfg(cfg)
        owner = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0}), ("vmrun", {"l2": 0})]  # (ends in L2: kicked)
        writer = [("write", {"gpa": _gpa(c, 0, 1), "data": _entry(1 + c.tracked_pages, 1, True)}),
                  ("delete_slot", {"slot": c.memslots - 1}),  # the last slot holds the table pages
                  ("write_entry", {"l2": 0, "entry": 1, "apic": 1, "running": False})]
        return Scenario(name, cfg, hooks, [owner, writer], EXECUTOR)
    if name == "gp-share":
        cfg = {**cfg, "vcpus": 3, "l2s": 2}
        up0 = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0, "leaving": True})]
        up1 = [("vmrun", {"l2": 1}), ("vmexit", {"l2": 1, "leaving": True})]
        reader = [("write_entry", {"l2": 1, "entry": 2, "apic": 2, "running": True}),
                  ("write_entry", {"l2": 0, "entry": 2, "apic": 2, "running": True})]
        return Scenario(name, cfg, hooks, [up0, up1, reader], EXECUTOR)
    if name == "notifier":
        cfg = {**cfg, "vcpus": 3}
        user = [("churn", {}), ("churn", {})]  # the free-running loop's notifier churn
        owner = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0, "leaving": True})]
        writer = [("write_entry", {"l2": 0, "entry": 2, "apic": 2, "running": r}) for r in (True, False)]
        return Scenario(name, cfg, hooks, [user, owner, writer], EXECUTOR)
    if name == "share":
        # both vCPUs use both tables, in opposite orders: each L2 switch drops the old table (maybe
        # its last reference: unlink, grace period, free) while the other vCPU looks it up and takes
        # a reference, and each VMRUN after an exit either keeps its table (the fast path: same L2)
        # or must switch (another L2's table)
        def prog(a: int, b: int) -> Program:
            return [("vmrun", {"l2": a}), ("vmexit", {"l2": a}), ("vmrun", {"l2": b}),
                    ("vmexit", {"l2": b, "leaving": True})]

        return Scenario(name, cfg, hooks, [prog(0, 1), prog(1, 0)], EXECUTOR)
    if name == "running":
        # vCPU 1's guest table 0 says entry 1 is L1 vCPU 0, running (entry 0 names vCPU 1: no other
        # entry counts a reference to vCPU 0): each sync of that table translates it from vCPU 0's
        # loaded state, and vCPU 1's own VMRUN check (I2: its entry, 1) compares it with the
        # translation right after; vCPU 1 shadows the table, drops it (leaving) and shadows it
        # again, while vCPU 0 is put and loaded again and again (each IsRunning flip visits the
        # tables whose entries name it: a flip must not skip a table being synced) and ends in L2 1,
        # loaded (a flip lost while it was never run before shows at vCPU 1's check)
        flipper: Program = [("put", {}), ("load", {})] * 2 + [("vmrun", {"l2": 1})]
        syncer: Program = [("write_entry", {"l2": 0, "entry": 0, "apic": 1, "running": False}),  # (names vCPU 1)
                           ("write_entry", {"l2": 0, "entry": 1, "apic": 0, "running": True}),
                           ("vmrun", {"l2": 0}), ("vmexit", {"l2": 0, "leaving": True}), ("vmrun", {"l2": 0})]
        return Scenario(name, cfg, hooks, [flipper, syncer], EXECUTOR)
    if name == "reader":
        # vCPU 1 holds L2 1's table (the shared notifier node stays registered: the last put of
        # L2 0's table unregisters nothing, so no synchronize_srcu waits for a notifier walk, only
        # synchronize_rcu guards the free) and, as L1, writes L2 0's table three times while vCPU 0
        # runs L2 0 once and leaves it: a track_write's table lookup races the last put's free
        up = [("vmrun", {"l2": 0}), ("vmexit", {"l2": 0, "leaving": True})]
        writer = [("vmrun", {"l2": 1}), ("vmexit", {"l2": 1})] + [
            ("write_entry", {"l2": 0, "entry": e, "apic": e, "running": r}) for e, r in ((0, False), (1, False), (0, True))]
        return Scenario(name, cfg, hooks, [up, writer], EXECUTOR)
    raise UsageError(f"explore: unknown scenario {name!r} (built-ins: {', '.join(BUILTINS)}, or a .toml file)")


def free(registration: str | None, design: str | None, hooks: tuple[str, ...], seed: int = 1,
         iterations: int = FREE_ITERATIONS) -> Scenario:
    """The small free-running configuration: each vCPU runs a short seeded op stream of the normal
    workload generator (vcpu.vcpu.op_stream: tracked L1 writes, nested VMRUN / VMEXIT, L2
    switches) instead of a hand-written program."""
    from vcpu.vcpu import op_stream

    cfg = {**FREE, "seed": seed, "design": design or "mutex-hash", "registration": registration or "refcount"}
    c = _cfg(cfg)
    return Scenario("free", cfg, hooks, [op_stream(c, v, iterations) for v in range(c.vcpus)], EXECUTOR)


def from_toml(path: str, registration: str | None, design: str | None, hooks: tuple[str, ...]) -> Scenario:
    from vm import config

    file_cfg, steps = config.load_toml(path)
    cli = {"registration": registration, "design": design}
    cfg = config.build(file_cfg, cli)
    if not steps:
        raise UsageError(f"scenario file {path}: explore needs [[step]] tables (per-vCPU programs)")
    config.parse_steps(steps, cfg)  # every step checked (one line naming it); the file's values are kept
    progs: list[Program] = [[] for _ in range(cfg.vcpus)]
    for st in steps:
        progs[st["vcpu"]].append((st["op"], {k: v for k, v in st.items() if k not in ("vcpu", "op")}))
    merged = {**file_cfg, **{k: v for k, v in cli.items() if v is not None}}
    return Scenario(os.path.basename(path), merged, tuple(sorted(set(hooks))), progs, EXECUTOR)


def check(sc: Scenario, what: str = "explore") -> None:
    """The scenario's configuration and every program step, checked as ``run --scenario`` checks a
    file's (vm/config.py ``parse_steps``): a UsageError of one line, before anything starts."""
    from vm import config

    try:
        cfg = config.from_dict({**sc.cfg, "fuzz": "off"})
    except (UsageError, ValueError) as e:
        raise UsageError(f"{what}: {e}") from None
    if cfg.vcpus != sc.n:
        raise UsageError(f"{what}: config vcpus = {cfg.vcpus} but {sc.n} vCPU programs")
    try:
        config.parse_steps([{"vcpu": v, "op": op, **args} for v, p in enumerate(sc.programs) for op, args in p], cfg)
    except UsageError as e:
        raise UsageError(f"{what}: program {e}") from None


def title(sc: Scenario) -> str:
    hooks = f" hooks={','.join(sc.hooks)}" if sc.hooks else ""
    return f"pagetrack-sim schedule of {sc.name} ({sc.cfg.get('design')}, {sc.cfg.get('registration')}{hooks})"
