"""Disk replication: a guest's writable disks follow its checkpoints (see docs/disk.md).

``nbd`` (the protocol, sans I/O), ``server`` (the threaded server and its
pread/pwrite data path), ``kernel`` (/dev/nbdN by netlink), ``epochs`` (which
write belongs to which checkpoint, on the primary), ``device`` and
``control`` (the engine's devices), ``daemon`` (the per-disk server process
block-remus starts), ``replica`` (the backup's copies), ``xen`` (which of a
Xen domain's disks are replicated, and the refusal rule).  Importing this
package loads none of them.
"""
