"""The tunnel tool: expose TCP services behind NAT through a relay (``quic-reverse relay``
and ``quic-reverse edge``), built on the public session API only.

Modules: :mod:`.config` (the settings tables, TOML + flags -> validated configs, file
checks), :mod:`.auth` (tokens, both sides of the in-protocol auth step, instance ids),
:mod:`.pipe` (the TCP leg and TCP <-> stream forwarding), :mod:`.registry` (the relay's
pools of edge replicas), :mod:`.supervisor` (reconnect backoff), :mod:`.relay`,
:mod:`.edge`. The relay/edge modules are imported lazily by the CLI.
"""
