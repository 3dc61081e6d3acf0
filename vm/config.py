"""Run configuration: one typed, validated record; from CLI flags and/or a TOML scenario file.

Every field is checked (type, range, unknown keys); a bad value raises ``UsageError`` naming the
field, which the CLI prints as one line and exits 2 — before anything is started.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ipc.errors import UsageError
from ipc.inputs import read_toml

PAGE_SIZE = 4096
MAX_VCPUS = 256
SHM_BUDGET_BYTES = 2 << 30  # all segments of one run together

Design = Literal["mirror", "mutex-hash", "rcu-list", "per-table-notifier"]
Registration = Literal["refcount", "bool", "naive", "split", "node-refcount"]
PageTrack = Literal["v6.0", "v6.6"]
RedundantRegistration = Literal["warn", "mainline"]
OnOff = Literal["on", "off"]
Policy = Literal["sticky", "round-robin", "random"]
FuzzLevel = Literal["off", "light", "heavy"]
VmrunLock = Literal["change", "every"]
IndirectShadowPages = Literal["auto", "0"]
EntryUpdate = Literal["reread", "gentry"]
Clock = Literal["real", "virtual"]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A run. Durations in seconds, times in microseconds, fractions in [0, 1]."""

    vcpus: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS)] = 2
    duration: Annotated[float, msgspec.Meta(ge=0.001, le=86400)] = 2.0  # virtual seconds under clock "virtual"
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 1
    memory_mib: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    memslots: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    design: Design = "mirror"
    registration: Registration = "refcount"
    l2s: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    switch_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    policy: Policy = "random"
    guest_time_us: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 20.0
    writes_per_exit: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 8
    tracked_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.25
    mmio_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    preempt_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.01
    churn_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    tracked_pages: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 8
    notifiers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1
    max_nodes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 128
    stats: bool = True
    # hot-path latency histograms (nested VMRUN, emulated write, notifier walk) time one operation
    # in about this many, at random intervals; their counts stay exact. 1 = time every operation.
    # 32: the timing costs <= ~5 % of the tracked write (16: ~9 %, on a loaded 2-core host); a 2 s
    # run of 2 vCPUs still gets ~9k write and ~3k VMRUN samples (p99.9 from the top few: longer
    # runs or a smaller value for a sharp p99.9 of VMRUN)
    latency_sample: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 32
    stall_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 1000
    heartbeat_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 200
    progress: bool = True
    fuzz: FuzzLevel = "light"  # race widening at named preemption points (ipc/fuzz.py); measure with off
    # page-track fidelity (issue 11): MMIO writes walk the notifiers (Maxim's line; x86.c does not),
    # the page-track API's era (v6.0: KVM's own kvm_mmu_pte_write node on the list from VM creation),
    # a redundant registration WARNed and refused (Sean's check) or done as mainline does it (a cycle),
    # and the split variant's registration-time WARN
    mmio_walk: bool = False
    page_track: PageTrack = "v6.0"
    redundant_registration: RedundantRegistration = "warn"
    split_warn: OnOff = "on"
    # nested AVIC / MMU fidelity (issue 18, docs/fidelity.md): mutex-hash's nested VMRUN takes
    # tables_lock only on a table change or sync (RFC v3) or on every VMRUN; KVM's own write handler
    # takes mmu_lock for write on every emulated RAM write once L2 has run (indirect shadow pages,
    # nested NPT) or never ("0": a VM without them); a table entry update re-reads guest memory or
    # builds on the cached gentry + the written bytes (RFC v3: see docs/fidelity.md for the race)
    # share of L1's physid table writes that change an entry's backing page or Valid bit (and so erase
    # the table); the rest rewrite IsRunning / the host APIC id (vm/workloads.py: where it comes from)
    table_invalidate_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.001
    avic_vmrun_lock: VmrunLock = "change"
    indirect_shadow_pages: IndirectShadowPages = "auto"
    entry_update: EntryUpdate = "reread"
    trace_events: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 4096  # per-process trace ring; 0 = off
    # L1 writes to its physical APIC ID tables per nested VMRUN (the seed's "how often is the code
    # executed"); set, it decides tracked_fraction = table_writes_per_vmrun / writes_per_exit
    table_writes_per_vmrun: Annotated[float, msgspec.Meta(ge=0, le=10000)] | None = None
    # time dilation (lab/dilation.py): guest time and the modelled real-time delays are this many
    # times longer, so that (time in the code under study) / (guest time) is the kernel's
    dilate: Annotated[float, msgspec.Meta(ge=1, le=10000)] = 1.0
    # the clock contention is measured on (ipc/vtime.py, docs/virtual-time.md): "real" (host time; what
    # finds races) or "virtual" (one vCPU process runs at a time, clocks advanced by the prices of what
    # each one does; the same numbers on any host); prices: overrides of ipc.vtime.PRICES, ns
    clock: Clock = "real"
    prices: dict[str, Annotated[int, msgspec.Meta(ge=0, le=10**10)]] | None = None

    def __post_init__(self) -> None:
        if self.table_writes_per_vmrun is not None:
            self._resolve_table_writes()
        if self.tracked_fraction + self.mmio_fraction > 1.0 + 1e-9:
            raise UsageError(
                f"tracked_fraction + mmio_fraction = {self.tracked_fraction + self.mmio_fraction:g} > 1")
        pages = self.memory_pages
        if self.memslots > pages:
            raise UsageError(f"memslots = {self.memslots} exceeds the {pages} pages of memory_mib")
        if self.tracked_pages > pages:
            raise UsageError(f"tracked_pages = {self.tracked_pages} exceeds the {pages} guest pages")
        if self.l2s * 1 > pages - self.tracked_pages:
            raise UsageError(f"l2s = {self.l2s} physid tables do not fit beside tracked_pages in memory")
        kvm_own = " + KVM's own node (page_track v6.0)" if self.page_track == "v6.0" else ""
        need = self.notifiers + bool(kvm_own)  # the mirror's nodes + kvm_mmu_init_vm's (v6.0)
        if self.max_nodes < need:
            raise UsageError(f"max_nodes = {self.max_nodes} is too small: notifiers = {self.notifiers}{kvm_own} "
                             f"need {need} notifier nodes")
        if self.trace_events == 1:
            raise UsageError("trace_events = 1: a ring keeps at least 2 events (0 = off)")
        if self.clock == "virtual" and self.dilate != 1.0:
            raise UsageError("dilate: under clock = virtual the code is priced at kernel C costs already "
                             "(docs/virtual-time.md); dilation is for clock = real")
        if self.prices:
            from ipc.vtime import PRICES

            bad = sorted(set(self.prices) - set(PRICES))
            if bad:
                raise UsageError(f"prices: unknown price {bad[0]!r} (known: {', '.join(PRICES)})")
        if self.duration < 0.05 and self.clock == "real":
            raise UsageError(f"duration = {self.duration:g}: at least 0.05 s on the real clock")

    def _resolve_table_writes(self) -> None:
        twv, w = self.table_writes_per_vmrun, self.writes_per_exit
        if twv > w:
            raise UsageError(f"table_writes_per_vmrun = {twv:g} needs writes_per_exit >= {twv:g} "
                             f"(L1 writes between VMRUNs; got {w})")
        self.tracked_fraction = twv / w if w else 0.0

    # -- dilated times: what the hot loops read, computed from the config once per run ----------------
    @property
    def guest_ns(self) -> int:
        """L2 run time per nested VMRUN in ns, dilated."""
        return int(self.guest_time_us * 1000 * self.dilate)

    def dilated_ns(self, ns: float) -> int:
        """A modelled real-time delay (widening, preemption, scripted sleep) in ns, dilated."""
        return int(ns * self.dilate)

    def shm_bytes(self) -> int:
        """Bytes of every shm segment this run creates: the VM layouts + the regions of its design
        (``NestedDesign.region_layouts``; a design whose wing is not imported yet adds none here,
        and ``make_design`` checks again once it is)."""
        from vm.layout import guest_layout, mirror_layout, trace_layout, vm_layout
        from vm.nested import DESIGNS

        cls = DESIGNS.get(self.design)
        regions = cls.region_layouts(self) if cls is not None else ()
        return sum(lay.nbytes for lay in (vm_layout(self), guest_layout(self), mirror_layout(self),
                                          trace_layout(self), *regions))

    def check_budget(self) -> None:
        need = self.shm_bytes()
        if need > SHM_BUDGET_BYTES:
            raise UsageError(f"vcpus / memory_mib: the run needs {need >> 20} MiB of shared memory, "
                             f"over the {SHM_BUDGET_BYTES >> 20} MiB budget")

    def price_table(self) -> dict[str, int]:
        """ipc.vtime.PRICES with this run's overrides."""
        from ipc.vtime import PRICES

        return {**PRICES, **(self.prices or {})}

    @property
    def memory_pages(self) -> int:
        return self.memory_mib * (1 << 20) // PAGE_SIZE

    @property
    def nprocs(self) -> int:
        """Processes with reader slots and lock-stat blocks: the coordinator (0) + one per vCPU."""
        return self.vcpus + 1

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


def _field_error(e: msgspec.ValidationError) -> UsageError:
    msg = str(e)
    # msgspec: "Expected `int` >= 1 - at `$.vcpus`" -> "vcpus: expected `int` >= 1"
    if " - at `$." in msg:
        what, where = msg.rsplit(" - at `$.", 1)
        return UsageError(f"{where.rstrip('`')}: {what[0].lower()}{what[1:]}")
    if msg.startswith("Object contains unknown field"):
        return UsageError(msg.replace("Object contains unknown field", "unknown key"))
    return UsageError(msg)


def clock_values(clock: str | None, prices_path: str | None) -> dict[str, Any]:
    """``--clock`` / ``--prices FILE`` as Config values (the file read and checked: UsageError)."""
    out: dict[str, Any] = {}
    if clock is not None:
        out["clock"] = clock
    if prices_path:
        from ipc import vtime

        try:
            out["prices"] = vtime.load_prices(prices_path)
        except ValueError as e:
            raise UsageError(f"--prices: {e}") from None
    return out


def from_dict(d: dict[str, Any]) -> Config:
    try:
        cfg = msgspec.convert(d, Config, strict=True)
    except msgspec.ValidationError as e:
        raise _field_error(e) from None
    cfg.check_budget()
    return cfg


def load_toml(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a scenario file: ``[config]`` table (Config keys) and optional ``[[step]]`` list
    (scripted commands). Returns (config dict, steps). Unknown top-level keys are errors."""
    doc = read_toml(path, f"scenario file {path}")
    unknown = set(doc) - {"config", "step"}
    if unknown:
        raise UsageError(f"scenario file {path}: unknown key {sorted(unknown)[0]!r} (expected [config], [[step]])")
    cfg = doc.get("config", {})
    steps = doc.get("step", [])
    if not isinstance(cfg, dict):
        raise UsageError(f"scenario file {path}: config must be a table")
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise UsageError(f"scenario file {path}: step must be an array of tables ([[step]])")
    return cfg, steps


def build(file_values: dict[str, Any], cli_values: dict[str, Any]) -> Config:
    """File values, overridden by explicitly given CLI values (None = not given)."""
    merged = dict(file_values)
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    return from_dict(merged)


# --dilate with --clock virtual (launch.py run, compare, compare --map)
DILATE_VIRTUAL = ("--dilate: under --clock virtual the code is priced at kernel C costs already "
                  "(docs/virtual-time.md); dilation is for --clock real")

# Config keys that `launch.py run` takes as flags (--key-with-dashes); the others only from TOML
CLI_KEYS = ("vcpus", "duration", "seed", "design", "registration", "l2s", "switch_rate", "policy",
            "guest_time_us", "writes_per_exit", "tracked_fraction", "mmio_fraction", "tracked_pages",
            "notifiers", "memory_mib", "memslots", "preempt_rate", "stall_ms", "fuzz",
            "mmio_walk", "page_track", "redundant_registration", "split_warn", "trace_events",
            "table_writes_per_vmrun", "dilate", "table_invalidate_fraction", "avic_vmrun_lock", "indirect_shadow_pages", "entry_update",
            "clock")

# scripted commands a vCPU understands (vcpu/vcpu.py executes them)
SCRIPT_OPS = ("vmrun", "vmexit", "write", "l1_write", "write_entry", "read", "register", "reregister", "unregister",
              "track", "untrack", "enable_tracking", "delete_slot", "churn", "load", "put", "sleep", "counters")


def _step_fields(cfg: Config) -> dict[str, dict[str, tuple]]:
    """The fields of each scripted command (vcpu/vcpu.py ``Vcpu.execute``): name -> (kind, lo, hi,
    required); kind "int" (lo..hi), "bool" or "data" (an int, or a hex string of 1..4096 bytes)."""
    l2 = ("int", 0, cfg.l2s - 1)
    node = ("int", 0, cfg.max_nodes - 1, True)
    gfn = {"gfn": ("int", 0, cfg.memory_pages - 1, True)}
    return {
        "vmrun": {"l2": (*l2, True)},
        "vmexit": {"l2": (*l2, False), "leaving": ("bool", 0, 0, False)},
        "write": {"gpa": ("int", 0, (1 << 52) - 1, True), "data": ("data", -(1 << 63), (1 << 64) - 1, True)},
        "l1_write": {},
        "write_entry": {"l2": (*l2, True), "entry": ("int", 0, 511, True), "apic": ("int", 0, 255, True),
                        "running": ("bool", 0, 0, False)},
        "read": {"gpa": ("int", 0, cfg.memory_pages * PAGE_SIZE - 8, True)},
        "register": {"kind": ("int", 1, 1 << 16, False), "owner": ("int", 0, 1 << 30, False)},
        "reregister": {"node": node},
        "unregister": {"node": node, "free": ("bool", 0, 0, False)},
        "delete_slot": {"slot": ("int", 0, cfg.memslots - 1, True)}, "churn": {},
        "track": gfn,
        "untrack": gfn,
        "enable_tracking": {}, "load": {}, "put": {}, "counters": {},
        "sleep": {"us": ("int", 0, 10_000_000, True)},
    }


def _got(v: Any) -> str:
    """A step value, described in a few words (one line, bounded)."""
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, int):
        if abs(v) < 10**20:
            return str(v)
        return f"an integer of {len(str(abs(v)))} digits" if v.bit_length() < 14000 else "a huge integer"
    if isinstance(v, str):
        return f"a string ({v!r:.48})"
    if isinstance(v, list):
        return f"an array ({len(v)} item(s))"
    if isinstance(v, dict):
        return "a table"
    if hasattr(v, "isoformat"):
        return f"a date/time ({v.isoformat()})"
    return f"a {type(v).__name__} ({v!r:.48})"


def _step_int(v: Any, lo: int, hi: int, where: str, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:  # exactly an int: no bool, float, date, array
        raise UsageError(f"{where}: expected {what} in {lo}..{hi}, got {_got(v)}")
    return v


def parse_steps(steps: list[dict[str, Any]], cfg: Config) -> list[tuple[int, str, dict[str, Any]]]:
    """``[[step]]`` tables -> (vcpu, op, args), every field checked before anything starts (issue
    21): each step has ``vcpu`` (an existing vCPU) and ``op`` (a command of SCRIPT_OPS); the other
    keys are that command's fields (``_step_fields``), each of its exact type and in its range (an
    integer is an integer: not a boolean, float, date or array), required ones present, no other.
    A bad step is a UsageError of one line naming the step and the field."""
    table = _step_fields(cfg)
    out = []
    for i, st in enumerate(steps):
        where = f"step[{i}]"
        if not isinstance(st, dict):
            raise UsageError(f"{where}: expected a table ([[step]]), got {_got(st)}")
        if "vcpu" not in st:
            raise UsageError(f"{where}.vcpu: missing (the vCPU that runs the step)")
        v = st["vcpu"]
        if type(v) is not int:
            raise UsageError(f"{where}.vcpu: expected an integer, got {_got(v)}")
        if not 0 <= v < cfg.vcpus:
            raise UsageError(f"{where}.vcpu: no vCPU {_got(v)} (vcpus = {cfg.vcpus})")
        op = st.get("op")
        if type(op) is not str or op not in SCRIPT_OPS:
            what = ("missing" if "op" not in st else f"unknown command {op!r:.48}" if type(op) is str
                    else f"expected a command name, got {_got(op)}")
            raise UsageError(f"{where}.op: {what} (one of {', '.join(SCRIPT_OPS)})")
        fields = table[op]
        args = {k: val for k, val in st.items() if k not in ("vcpu", "op")}
        for k, val in args.items():
            if k not in fields:
                known = ", ".join(fields) or "none"
                name = k if k.isidentifier() else repr(k)[:40]
                raise UsageError(f"{where}.{name}: unknown field for {op} (its fields: {known})")
            kind, lo, hi, _ = fields[k]
            at = f"{where}.{k}"
            if kind == "bool":
                if type(val) is not bool:
                    raise UsageError(f"{at}: expected a boolean (true / false), got {_got(val)}")
            elif k == "l2" and (type(val) is not int or not lo <= val <= hi):
                raise UsageError(f"{at}: no L2 {_got(val)} (l2s = {cfg.l2s})")
            elif kind == "int":
                _step_int(val, lo, hi, at, "an integer")
            elif type(val) is str:  # data: hex bytes
                try:
                    args[k] = bytes.fromhex(val.removeprefix("0x"))
                except ValueError:
                    raise UsageError(f"{at}: not a hex string: {_got(val)}") from None
                if not 1 <= len(args[k]) <= 4096:
                    raise UsageError(f"{at}: expected 1..4096 bytes, got {len(args[k])}")
            else:
                _step_int(val, lo, hi, at, "a hex string or an integer")
        missing = [k for k, f in fields.items() if f[3] and k not in args]
        if missing:
            raise UsageError(f"{where}.{missing[0]}: missing ({op} needs {', '.join(k for k, f in fields.items() if f[3])})")
        if op == "write":
            gpa, data = args["gpa"], args["data"]
            size = 8 if type(data) is int else len(data)
            if (gpa >> 12) < cfg.memory_pages and (gpa & 0xFFF) + size > PAGE_SIZE:
                raise UsageError(f"{where}.data: {size} byte(s) at gpa {gpa:#x} cross a page boundary")
        out.append((v, op, args))
    return out
