"""Transports: the only package that imports a QUIC stack (qh3 by default, or aioquic).

``connect``/``serve`` (with :class:`ClientTLS`/:class:`ServerTLS`) are the
stack-neutral entry points; the stacks themselves are imported lazily, so
``aioquic`` is only needed when ``stack="aioquic"`` is asked for.
"""

from __future__ import annotations

from .base import Connection, RecvStream, SendStream
from .quic import ClientTLS, QuicServer, ServerTLS, Stack, TransportOptions, connect, serve

__all__ = [
    "ClientTLS",
    "Connection",
    "QuicServer",
    "RecvStream",
    "SendStream",
    "ServerTLS",
    "Stack",
    "TransportOptions",
    "connect",
    "serve",
]
