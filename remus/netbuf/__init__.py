"""Network output buffering for Xen domains: each vif's output held in a kernel plug qdisc per epoch."""
