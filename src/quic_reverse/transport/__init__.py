"""Transports: the only package that imports a QUIC stack (qh3 by default, or aioquic)."""

from __future__ import annotations

from .base import Connection, RecvStream, SendStream

__all__ = ["Connection", "RecvStream", "SendStream"]
