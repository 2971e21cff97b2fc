"""remus: continuous checkpointing of a running domain to a backup host.

Importing this package loads nothing but the standard library: the Xen
libraries are opened only when a Xen domain is first used.
"""

__version__ = "0.1.0"
