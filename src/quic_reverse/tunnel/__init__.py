"""The tunnel tool: expose TCP services behind NAT through a relay (``quic-reverse relay``
and ``quic-reverse edge``), built on the public session API only.

Modules: :mod:`.config` (TOML + flags), :mod:`.auth` (tokens, in-protocol auth),
:mod:`.pipe` (TCP <-> stream forwarding), :mod:`.supervisor` (reconnect backoff),
:mod:`.relay`, :mod:`.edge`. The relay/edge modules are imported lazily by the CLI.
"""
