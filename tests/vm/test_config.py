"""Config loader: property tests — any input is either a valid Config or a one-line UsageError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.errors import UsageError
from vm.config import Config, build, from_dict, load_toml, parse_steps

KEYS = list(Config.__struct_fields__) + ["bogus", "vcpu", ""]
values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                          st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_from_dict_is_valid_or_usage_error(d):
    try:
        cfg = from_dict(d)
    except UsageError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return
    assert isinstance(cfg, Config)
    assert 1 <= cfg.vcpus <= 256 and cfg.tracked_fraction + cfg.mmio_fraction <= 1 + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["vcpu", "op", "l2", "gpa", "data", "x"]), values, max_size=4),
                max_size=4))
def test_parse_steps_is_valid_or_usage_error(steps):
    cfg = from_dict({"vcpus": 2, "l2s": 2})
    try:
        out = parse_steps(steps, cfg)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    for v, op, args in out:
        assert 0 <= v < 2 and isinstance(op, str) and "vcpu" not in args


@pytest.mark.parametrize("d,field", [({"vcpus": 0}, "vcpus"), ({"vcpus": "x"}, "vcpus"), ({"nope": 1}, "nope"),
                                     ({"switch_rate": 1.5}, "switch_rate"), ({"design": "x"}, "design"),
                                     ({"memory_mib": 1, "tracked_pages": 1000}, "tracked_pages"),
                                     ({"page_track": "v5.16"}, "page_track"), ({"mmio_walk": "yes"}, "mmio_walk"),
                                     ({"redundant_registration": "x"}, "redundant_registration"),
                                     ({"split_warn": True}, "split_warn"),
                                     ({"registration": "node-count"}, "registration"),
                                     ({"memslots": 64, "memory_mib": 1, "tracked_pages": 0, "l2s": 1}, None)])
def test_error_names_the_field(d, field):
    if field is None:
        assert from_dict(d).memslots == 64
        return
    with pytest.raises(UsageError, match=field):
        from_dict(d)


def test_cli_overrides_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[config]\nvcpus = 3\nseed = 5\n")
    file_cfg, steps = load_toml(str(f))
    cfg = build(file_cfg, {"vcpus": 4, "seed": None})
    assert cfg.vcpus == 4 and cfg.seed == 5 and steps == []


def test_the_shm_budget_counts_the_design_s_own_regions_and_make_design_checks_it_again(monkeypatch):
    import vm.avic  # noqa: F401  (registers the AVIC designs: they hand the avic region's size to the VM)
    from vm import config as C
    from vm.avic.table import avic_layout
    from vm.nested import make_design

    avic = from_dict({"design": "rcu-list", "vcpus": 4})
    mirror = from_dict({"design": "mirror", "vcpus": 4})
    assert avic.shm_bytes() - mirror.shm_bytes() == avic_layout(avic).nbytes > 0
    # a budget the VM's own layouts fit in but not the avic region: refused when the design is made
    monkeypatch.setattr(C, "SHM_BUDGET_BYTES", mirror.shm_bytes() + avic_layout(avic).nbytes // 2)
    mirror.check_budget()
    with pytest.raises(UsageError, match="over the"):
        make_design(None, avic)
