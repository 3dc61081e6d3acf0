"""The final oracle's leak check: a live shadow table that no vCPU holds and whose refcount is 0 was
never freed by its last put (e.g. rcu-list's refcount_dec_and_lock fast path taken for the last
reference: weaken-inc-not-zero@vm/avic/rcu_list.py:RcuListDesign._put)."""

from __future__ import annotations

import pytest
import test_avic

from vm.avic.table import T_REF, TW, V_CUR, VW
from vm.nested import table_gfn

avm = test_avic.avm


@pytest.mark.parametrize("design", ["rcu-list", "mutex-hash"])
def test_a_live_table_nobody_holds_is_a_leak(avm, design):
    kvm, d = avm(design)
    d.nested_vmrun(0, 0)
    d.nested_vmexit(0, 0, False)
    assert d.oracle() == []  # held by vCPU 0, refcount 1
    t = d._cur(0)
    assert t >= 0 and d.amem.load(d.tw0 + t * TW + T_REF) == 1
    d.nested_vmexit(0, 0, True)  # the last put frees it
    assert d.oracle() == []
    d.nested_vmrun(0, 0)
    t = d._cur(0)
    # the bug: the last reference dropped without the free (vCPU 0 lets go, the count reaches 0)
    d.amem.store(d.vw0 + 0 * VW + V_CUR, 0)
    d.amem.store(d.tw0 + t * TW + T_REF, 0)
    assert any("refcount 0" in b and "leak" in b for b in d.oracle()), d.oracle()
    assert table_gfn(d.cfg, 0) >= 0
