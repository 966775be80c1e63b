"""Extension: datagram flows (``Features.DATAGRAM_FLOWS``), see docs/PROTOCOL.md §9.

Not part of the Rust crate's protocol v1. Nothing here is ever sent to a peer that
did not announce ``Features.DATAGRAM_FLOWS`` in its ``Hello``; :func:`decode` of the
base protocol keeps rejecting variant 7, only :func:`decode_flow_close` reads it.

* :class:`FlowClose`: control message variant **7**, laid out like ``StreamClose``
  (``flow_id`` u64, ``code`` CloseCode, ``reason`` Option<string>);
* :func:`encode_datagram` / :func:`decode_datagram`: a QUIC DATAGRAM frame's payload
  is the flow id as a QUIC variable-length integer (RFC 9000 §16) then the datagram;
* flow ids are chosen by the accepting peer: odd when the client role accepted the
  flow, even when the server role did (so ids of both directions never collide);
  0 is reserved.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import EncodeError, ProtocolError
from .codec import input_bytes
from .messages import CloseCode

__all__ = [
    "FLOW_CLOSE_INDEX",
    "FLOW_CLOSE_TAG",
    "MAX_FLOW_ID",
    "FlowClose",
    "datagram_header_size",
    "decode_datagram",
    "decode_flow_close",
    "encode_datagram",
    "encode_flow_close",
    "flow_accepted_by_client",
]

#: Control message variant index of :class:`FlowClose` (one past ``Pong``).
FLOW_CLOSE_INDEX = 7
#: The first four payload bytes of every FlowClose.
FLOW_CLOSE_TAG = struct.pack("<I", FLOW_CLOSE_INDEX)
#: Largest flow id: the largest QUIC variable-length integer.
MAX_FLOW_ID = (1 << 62) - 1

_HEAD = struct.Struct("<IQI")  # tag, flow_id, close code
_U64 = struct.Struct("<Q")
_CLOSE_CODES = tuple(CloseCode)


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowClose:
    """The datagram flow ``flow_id`` is over (either side may send it, once)."""

    flow_id: int
    code: CloseCode = CloseCode.NORMAL
    reason: str | None = None


def encode_flow_close(message: FlowClose) -> bytes:
    """The payload (without the frame prefix) of a :class:`FlowClose`.

    Raises :class:`EncodeError` for a flow id outside 1..2**62-1, an unknown code or
    a reason that is not UTF-8 encodable text.
    """
    fid = message.flow_id
    if isinstance(fid, bool) or not isinstance(fid, int) or not 0 < fid <= MAX_FLOW_ID:
        raise EncodeError(f"FlowClose.flow_id: expected 1..2**62-1, got {fid!r}")
    code = message.code
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 3:
        raise EncodeError(f"FlowClose.code: {code!r} is not a CloseCode")
    reason = message.reason
    if reason is None:
        tail = b"\x00"
    else:
        if not isinstance(reason, str):
            raise EncodeError(f"FlowClose.reason: expected str, got {type(reason).__name__}")
        try:
            raw = reason.encode("utf-8")
        except UnicodeEncodeError:
            raise EncodeError("FlowClose.reason: not UTF-8 encodable") from None
        tail = b"\x01" + _U64.pack(len(raw)) + raw
    return _HEAD.pack(FLOW_CLOSE_INDEX, fid, int(code)) + tail


def decode_flow_close(payload: bytes | bytearray | memoryview) -> FlowClose:
    """Decode a FlowClose payload; :class:`ProtocolError` for anything malformed
    (wrong variant, truncation, flow id 0 or past 2**62-1, unknown code, bad Option
    tag, invalid UTF-8, trailing bytes). No other exception escapes."""
    buf = input_bytes(payload, "payload")
    n = len(buf)
    if n < 17:
        raise ProtocolError(f"FlowClose: {n} bytes, at least 17 needed")
    index, fid, code = _HEAD.unpack_from(buf, 0)
    if index != FLOW_CLOSE_INDEX:
        raise ProtocolError(f"FlowClose: variant {index} is not {FLOW_CLOSE_INDEX}")
    if not 0 < fid <= MAX_FLOW_ID:
        raise ProtocolError(f"FlowClose.flow_id: {fid} outside 1..2**62-1 at offset 4")
    if code > 3:
        raise ProtocolError(f"FlowClose.code: unknown CloseCode variant {code} at offset 12")
    tag = buf[16]
    reason: str | None = None
    if tag == 0:
        pos = 17
    elif tag == 1:
        if n < 25:
            raise ProtocolError("FlowClose.reason: truncated length at offset 17")
        length = _U64.unpack_from(buf, 17)[0]
        if length > n - 25:
            raise ProtocolError(
                f"FlowClose.reason: length {length} at offset 17 exceeds the {n - 25} bytes left"
            )
        try:
            reason = buf[25 : 25 + length].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("FlowClose.reason: invalid UTF-8 at offset 25") from None
        pos = 25 + length
    else:
        raise ProtocolError(f"FlowClose.reason: invalid Option tag {tag} at offset 16")
    if pos != n:
        raise ProtocolError(f"FlowClose: {n - pos} trailing bytes after a complete message")
    return FlowClose(flow_id=fid, code=_CLOSE_CODES[code], reason=reason)


def datagram_header_size(flow_id: int) -> int:
    """Bytes of the flow-id prefix of a datagram of flow ``flow_id`` (1, 2, 4 or 8)."""
    if flow_id < 0x40:
        return 1
    if flow_id < 0x4000:
        return 2
    if flow_id < 0x4000_0000:
        return 4
    return 8


def _varint(value: int) -> bytes:
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return struct.pack(">H", value | 0x4000)
    if value < 0x4000_0000:
        return struct.pack(">I", value | 0x8000_0000)
    return struct.pack(">Q", value | 0xC000_0000_0000_0000)


def encode_datagram(flow_id: int, data: bytes | bytearray | memoryview) -> bytes:
    """The QUIC DATAGRAM payload carrying ``data`` on flow ``flow_id``.

    Raises :class:`EncodeError` for a flow id outside 1..2**62-1.
    """
    if isinstance(flow_id, bool) or not isinstance(flow_id, int) or not 0 < flow_id <= MAX_FLOW_ID:
        raise EncodeError(f"datagram flow id: expected 1..2**62-1, got {flow_id!r}")
    return _varint(flow_id) + bytes(data)


def decode_datagram(datagram: bytes) -> tuple[int, bytes]:
    """Split a QUIC DATAGRAM payload into ``(flow_id, data)``.

    Raises :class:`ProtocolError` for an empty or truncated prefix or flow id 0
    (the caller drops such a datagram; datagrams never end a session).
    """
    buf = input_bytes(datagram, "datagram")
    if not buf:
        raise ProtocolError("datagram: empty (no flow id)")
    first = buf[0]
    size = 1 << (first >> 6)
    if len(buf) < size:
        raise ProtocolError(f"datagram: flow id needs {size} bytes, {len(buf)} present")
    if size == 1:
        fid = first
    elif size == 2:
        fid = struct.unpack_from(">H", buf)[0] & 0x3FFF
    elif size == 4:
        fid = struct.unpack_from(">I", buf)[0] & 0x3FFF_FFFF
    else:
        fid = struct.unpack_from(">Q", buf)[0] & MAX_FLOW_ID
    if fid == 0:
        raise ProtocolError("datagram: flow id 0 is reserved")
    return fid, buf[size:]


def flow_accepted_by_client(flow_id: int) -> bool:
    """True for odd ids: the client role accepted the flow (and chose the id)."""
    return bool(flow_id & 1)
