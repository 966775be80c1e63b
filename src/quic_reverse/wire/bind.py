"""StreamBind: the 13-byte header that opens every reverse data stream.

Layout: magic ``b"QRBV"``, version byte ``1``, logical stream id as u64 big-endian.
It is written raw as the first bytes of the QUIC stream (no frame prefix, no bincode).
Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from ..errors import EncodeError, ProtocolError
from .codec import input_bytes

__all__ = [
    "STREAM_BIND_MAGIC",
    "STREAM_BIND_SIZE",
    "STREAM_BIND_VERSION",
    "StreamBind",
    "bind_header",
    "bind_id",
]

STREAM_BIND_MAGIC = b"QRBV"
STREAM_BIND_VERSION = 1
STREAM_BIND_SIZE = 13

_BIND = struct.Struct(">4sBQ")
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class StreamBind:
    """Binds a freshly opened QUIC stream to the logical stream id of an accepted open."""

    logical_stream_id: int

    SIZE: ClassVar[int] = STREAM_BIND_SIZE

    def encode(self) -> bytes:
        """The 13 header bytes. Raises :class:`EncodeError` if the id is not a u64."""
        return bind_header(self.logical_stream_id)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> StreamBind:
        """Parse exactly :data:`STREAM_BIND_SIZE` bytes.

        Raises :class:`ProtocolError` for a wrong length, magic or version; no other
        exception escapes for any input.
        """
        return cls(bind_id(data))


def bind_header(logical_stream_id: int) -> bytes:
    """``StreamBind(logical_stream_id).encode()`` without the object."""
    lsid = logical_stream_id
    if type(lsid) is not int and (isinstance(lsid, bool) or not isinstance(lsid, int)):
        raise EncodeError(f"StreamBind.logical_stream_id: {lsid!r} is not a u64")
    if not 0 <= lsid <= _U64_MAX:
        raise EncodeError(f"StreamBind.logical_stream_id: {lsid!r} is not a u64")
    return _BIND.pack(STREAM_BIND_MAGIC, STREAM_BIND_VERSION, lsid)


def bind_id(data: bytes | bytearray | memoryview) -> int:
    """The logical stream id of a StreamBind header (``StreamBind.decode(data).logical_stream_id``).

    Raises :class:`ProtocolError` as :meth:`StreamBind.decode` does.
    """
    raw = data if type(data) is bytes else input_bytes(data, "StreamBind")
    if len(raw) != STREAM_BIND_SIZE:
        raise ProtocolError(f"StreamBind: expected {STREAM_BIND_SIZE} bytes, got {len(raw)}")
    magic, version, lsid = _BIND.unpack(raw)
    if magic != STREAM_BIND_MAGIC:
        raise ProtocolError(f"StreamBind.magic: expected b'QRBV', got {magic!r}")
    if version != STREAM_BIND_VERSION:
        raise ProtocolError(
            f"StreamBind.version: unsupported version {version} (expected {STREAM_BIND_VERSION})"
        )
    lsid_int: int = lsid
    return lsid_int
