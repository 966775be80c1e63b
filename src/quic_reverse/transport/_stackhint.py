"""A client states its QUIC stack in its first Initial; a server with both stacks
runs the connection on the stack the client chose.

Why: each direction of a QUIC connection is paced by its *sender's* congestion
control. qh3's (native, loss-based, not pluggable) collapses on lossy paths, where
aioquic with this library's delivery-rate controller (:mod:`.congestion`) does not;
qh3 is several times faster on clean, fast paths. The edge is the one that knows its
path (a mobile or IoT edge on a lossy radio link), so the edge picks the stack and
the relay follows for that connection: both directions get the same controller, and
other edges on the same relay keep theirs.

How: the client's first destination connection id (chosen by the client, 8 to 20
bytes, RFC 9000 §7.2) is 20 bytes: :data:`MARK`, one byte naming the stack, and 16
random bytes (the id must be unpredictable: 128 bits are). A server that does not
know the convention (the Rust crate, an older release) sees a random 20-byte id and
uses its own stack; a server that does (:class:`~._server.StackServer` with
``TransportOptions.stack_hint``) reads the stack from the id of a new connection's
first Initial (or from the original id a Retry token carries). Nothing is negotiated
and nothing else on the wire changes: either stack speaks the same QUIC.
"""

from __future__ import annotations

import os

__all__ = ["MARK", "initial_dcid", "stated_stack"]

#: First bytes of a connection id stating a stack ("qr", format 1).
MARK = b"qr\x01"
_IDS = {"qh3": 1, "aioquic": 2}
_NAMES = {v: k for k, v in _IDS.items()}
#: Length of a stating connection id (the longest QUIC v1 allows).
LENGTH = 20


def initial_dcid(stack: str) -> bytes:
    """A client's first destination connection id stating ``stack``.

    Raises:
        ValueError: ``stack`` has no id.
    """
    try:
        ident = _IDS[stack]
    except KeyError:
        raise ValueError(f"no stack id for {stack!r}") from None
    return MARK + bytes((ident,)) + os.urandom(LENGTH - len(MARK) - 1)


def stated_stack(dcid: bytes) -> str | None:
    """The stack a client's first destination connection id states, if any."""
    if len(dcid) != LENGTH or not dcid.startswith(MARK):
        return None
    return _NAMES.get(dcid[len(MARK)])
