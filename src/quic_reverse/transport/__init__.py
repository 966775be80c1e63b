"""Transports: the only package that imports a QUIC stack (qh3 by default, or aioquic).

``connect``/``serve`` (with :class:`ClientTLS`/:class:`ServerTLS`) are the
stack-neutral entry points; the stacks themselves are imported lazily, so
``aioquic`` is only needed when ``stack="aioquic"`` is asked for.

Layout (public modules first; each private module has one job):

* ``base`` - the contract (Connection, SendStream, RecvStream; PathStats) every transport meets;
* ``quic`` - connect/serve, ClientTLS/ServerTLS, pinning; ``memory`` - in-process pair;
* ``tls`` - certificates: PEM/DER loading, cert/key check, fingerprints, dev certs;
* ``qh3`` / ``aioquic`` - one stack each: its QuicConnection subclass with the
  ``qr_*`` hooks and its ``SPEC`` (:class:`._stack.StackSpec`);
* ``_stack`` - what a stack provides (the ``QuicStack`` Protocol, StackSpec);
* ``_driver`` - StackConnection: datagrams in/out, timers, event dispatch;
* ``_gate`` - the receive gate (pause/hold/resume by unread bytes);
* ``_streams`` - stream state, receive buffers, the stream halves, the stream table;
* ``_client`` / ``_server`` - handshake on a client socket / routing on a server socket;
* ``_errors`` - StackCall: what an exception from a stack becomes;
* ``_options`` - TransportOptions and defaults; ``_udp`` - batched UDP sockets.
"""

from __future__ import annotations

from .base import Connection, PathStats, RecvStream, SendStream
from .quic import ClientTLS, QuicServer, ServerTLS, Stack, TransportOptions, connect, serve

__all__ = [
    "ClientTLS",
    "Connection",
    "PathStats",
    "QuicServer",
    "RecvStream",
    "SendStream",
    "ServerTLS",
    "Stack",
    "TransportOptions",
    "connect",
    "serve",
]
