"""The test hooks a run, scenario or explore takes (``--hook``; ``kvm.hooks``): bugs break the
kernel code on purpose, widenings widen a race window. One list, for the CLI's choices and for
``launch.py replay``'s check of a saved schedule's hooks."""

HOOKS = {
    "no-synchronize-srcu": "bug: unregister frees notifier nodes without waiting for SRCU readers",
    "no-synchronize-rcu": "bug: rcu-list frees tables without waiting for RCU readers (with avic-reader-delay's widening)",
    "busted-lock": "bug: every lock of the VM does not lock",
    "avic-reader-delay": "widening, not a bug (a correct design still ends in SUCCESS): AVIC RCU readers "
                         "stay 100 µs in their read-side section",
    "avic-flood-often": "widening, not a bug (a correct design still ends in SUCCESS): AVIC tables are "
                        "flood-dropped after 2 unused writes, each drop steered onto a vCPU entering L2",
    "flood-drop-race": "bug: avic-flood-often, and the drop does not kick the vCPUs in L2 on the table (the unfixed race)",
    "no-tlb-flush": "bug: write-protecting a page does not flush remote TLBs (no wait for vCPUs in guest mode)",
    "gp-share-early": "bug: synchronize_rcu / synchronize_srcu / the TLB flush of the VM share a grace period that "
                      "began before the call (torture's --inject gp-share-early, on the VM's own domains)",
}
