"""The authenticated, encrypted link between a primary and its backup.

- ``remus.link.keys``: the shared key file (``/etc/remus/authkey``): load and make it.
- ``remus.link.handshake``: mutual authentication and key agreement, sans I/O
  (``Initiator`` on the primary, ``Responder`` on the backup).
- ``remus.link.seal``: ChaCha20-Poly1305 frames with counter nonces, sans I/O
  (``Sealer``, ``Opener``).
- ``remus.link.blocking``: the handshake over a blocking socket and
  ``SealedLink``, which sends and opens frames.
- ``remus.link.keygen``: the ``remus-keygen`` command.

Importing this package imports nothing: ``remus.link.keys`` and
``remus.link.keygen`` work without the ``cryptography`` package, the other
modules need it.  See docs/security.md for the threat model and the design.
"""
