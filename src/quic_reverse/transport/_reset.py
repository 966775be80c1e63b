"""Stateless resets (RFC 9000 §10.3) and the server's static key.

A server that lost a connection's state (it was restarted after ``kill -9``) still
receives the peer's packets. Without a stateless reset it drops them, and the peer
finds out only after its idle or ping timeout. With one, the server answers such a
packet with a datagram that looks like a short-header packet and ends in the
*stateless reset token* the server announced for that connection id in the
handshake; the peer recognises it and ends the connection at once.

The token must be computable without the connection's state, so it is derived from
a static key and the connection id: ``HMAC-SHA256(reset key, cid)[:16]``. The static
key must survive restarts, so it is derived from the server's TLS private key
(:func:`remember_static_key`, called by the stacks' ``server_configuration``): the
relay keeps that key stable and secret anyway (clients pin its certificate), no new
setting or file is needed, a one-way HMAC of it reveals nothing about it, and
servers sharing a key (HA behind one address) compute the same tokens. A
configuration built elsewhere falls back to the key object's bytes when it is a
``cryptography`` key (aioquic), else to a random per-process key (resets then only
work within one process lifetime; logged at info).

The Retry token key (:mod:`._retry`) is derived from the same static key with
another label.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from typing import Any

from cryptography.hazmat.primitives import serialization

__all__ = [
    "RESET_TOKEN_SIZE",
    "MIN_RESET_SIZE",
    "RateLimit",
    "StaticKeys",
    "encode_stateless_reset",
    "is_stateless_reset",
    "remember_static_key",
    "static_keys",
]

logger = logging.getLogger("quic_reverse.transport")

RESET_TOKEN_SIZE = 16
#: The smallest stateless reset (RFC 9000 §10.3: 5 unpredictable bytes + token).
MIN_RESET_SIZE = 21
#: Size of a reset answering a large packet (RFC 9000 §10.3 recommends >= 41 bytes so
#: it is indistinguishable from a short-header packet; smaller than the trigger).
_RESET_SIZE = 43

_ATTRIBUTE = "qr_static_key"


def _derive(material: bytes) -> bytes:
    return hmac.digest(b"quic-reverse static key v1", material, hashlib.sha256)


def remember_static_key(configuration: object, private_key: Any) -> None:
    """Attach the static key derived from ``private_key`` (a ``cryptography`` private
    key) to a server ``configuration``; see the module docstring."""
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    setattr(configuration, _ATTRIBUTE, _derive(der))


class StaticKeys:
    """The per-purpose keys of one server, derived from its static key."""

    def __init__(self, static_key: bytes, *, persistent: bool) -> None:
        self.reset_key = hmac.digest(static_key, b"stateless reset", hashlib.sha256)
        self.retry_key = hmac.digest(static_key, b"retry token", hashlib.sha256)
        #: False for a random per-process key (resets do not survive a restart).
        self.persistent = persistent

    def reset_token(self, cid: bytes) -> bytes:
        """The stateless reset token announced for (and answering) connection id ``cid``."""
        return hmac.digest(self.reset_key, cid, hashlib.sha256)[:RESET_TOKEN_SIZE]


def static_keys(configuration: object) -> StaticKeys:
    """The :class:`StaticKeys` of a server ``configuration`` (see the module docstring)."""
    key = getattr(configuration, _ATTRIBUTE, None)
    if isinstance(key, bytes):
        return StaticKeys(key, persistent=True)
    private_key = getattr(configuration, "private_key", None)
    if hasattr(private_key, "private_bytes"):
        remember_static_key(configuration, private_key)
        return StaticKeys(getattr(configuration, _ATTRIBUTE), persistent=True)
    logger.info(
        "server: no static key in the configuration (not made by server_configuration()): "
        "stateless resets will not survive a restart"
    )
    return StaticKeys(os.urandom(32), persistent=False)


def encode_stateless_reset(token: bytes, trigger_size: int) -> bytes | None:
    """A stateless reset answering a ``trigger_size``-byte packet: always smaller than
    the trigger (so two endpoints cannot loop), None if that would be below
    :data:`MIN_RESET_SIZE`."""
    size = min(_RESET_SIZE, trigger_size - 1)
    if size < MIN_RESET_SIZE:
        return None
    head = bytearray(os.urandom(size - RESET_TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)  # short header form, fixed bit set
    return bytes(head) + token


def is_stateless_reset(data: bytes, token: bytes | None) -> bool:
    """True if ``data`` (a datagram from the peer) is a stateless reset for ``token``."""
    if token is None or len(data) < MIN_RESET_SIZE or data[0] & 0x80:
        return False
    return hmac.compare_digest(data[-RESET_TOKEN_SIZE:], token)


class RateLimit:
    """Token bucket: at most ``rate`` events per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
