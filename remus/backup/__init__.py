"""The backup host's side of remus: everything ``remus-receiver`` runs.

- ``session``: one replication session, sans I/O (records in, acks and events out);
- ``image``: the last committed checkpoint of the protected domain;
- ``server``: the TCP server that authenticates primaries and feeds their sessions;
- ``activation``: the one place that decides how a domain of each kind is kept
  ready and activated;
- ``control``: the local control socket (``remus-receiver status`` / ``activate``);
- ``cli``: the ``remus-receiver`` command.

The primary's side lives in ``remus.engine``, ``remus.transport`` and ``remus.run``.
"""
