"""bincode-1.x codec for protocol v1 control messages: :func:`encode` and :func:`decode`.

The encoding is little-endian and fixed-width (see ``docs/PROTOCOL.md``): a u32
variant index, then the fields back to back. This module is pure: no I/O, no
clock, no asyncio.

Decoding is strict where the Rust reference is lenient, and the reference never
produces what we reject:

* bytes after a complete message are a :class:`ProtocolError` (the reference ignores them);
* a structured-metadata key that appears twice is a :class:`ProtocolError` (the
  reference keeps the last value);
* a payload longer than :data:`MAX_FRAME_PAYLOAD` is a :class:`ProtocolError` (it could not
  have arrived in one frame).

Unknown ``Features`` / ``OpenFlags`` bits are accepted and preserved, like the reference.

Every malformed input raises :class:`ProtocolError` whose message names the field and
offset; no other exception escapes :func:`decode`, and a length prefix is checked
against the bytes actually present before anything is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NoReturn

from ..errors import EncodeError, ProtocolError
from .messages import (
    I64_MAX,
    I64_MIN,
    CloseCode,
    Features,
    Hello,
    HelloAck,
    Message,
    Metadata,
    MetadataKind,
    MetadataValue,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    Ping,
    Pong,
    RejectCode,
    StreamClose,
)

__all__ = ["MAX_FRAME_PAYLOAD", "MESSAGE_TYPES", "decode", "encode"]

MAX_FRAME_PAYLOAD = 65536
"""Largest payload one control frame may carry (exactly 65536 is allowed)."""

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    HelloAck,
    OpenRequest,
    OpenResponse,
    StreamClose,
    Ping,
    Pong,
)
"""Message classes in wire variant-index order."""

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_HELLO = struct.Struct("<IHI")  # tag, protocol_version, features (also HelloAck)
_OPEN_REQ = struct.Struct("<IQQ")  # tag, request_id, service length
_ID_TAG = struct.Struct("<IQI")  # tag, u64 id, u32 enum index (OpenResponse, StreamClose)
_SEQ = struct.Struct("<IQ")  # tag, sequence (Ping, Pong)

_NONE = b"\x00"
_SOME = b"\x01"
_FLAG_BYTE = struct.Struct("<B")

_u32_unpack = _U32.unpack_from
_u64_unpack = _U64.unpack_from
_i64_unpack = _I64.unpack_from
_u64_pack = _U64.pack

# Decoded flag values, shared (known combinations are precomputed; unknown bits still work).
_FEATURES = tuple(Features(v) for v in range(8))
_OPEN_FLAGS = tuple(OpenFlags(v) for v in range(256))
_CLOSE_CODES = tuple(CloseCode)
_REJECTED = tuple(OpenStatus(code=c) for c in RejectCode)
_ACCEPTED = OpenStatus.ACCEPTED

# ---------------------------------------------------------------------------
# encoding


def _text(value: object, where: str) -> bytes:
    """u64 length + UTF-8 bytes of a str field, or :class:`EncodeError`."""
    if not isinstance(value, str):
        raise EncodeError(f"{where}: expected str, got {type(value).__name__}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"{where}: not encodable as UTF-8 ({exc.reason})") from None
    return _u64_pack(len(raw)) + raw


def _opt_text(value: object, where: str) -> bytes:
    if value is None:
        return _NONE
    return _SOME + _text(value, where)


_RANGES = {
    "u8": (0, 0xFF),
    "u16": (0, 0xFFFF),
    "u32": (0, 0xFFFF_FFFF),
    "u64": (0, 0xFFFF_FFFF_FFFF_FFFF),
    "i64": (I64_MIN, I64_MAX),
}

# Integer fields per message type, used to explain a struct.error precisely.
_INT_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {
    Hello: (("protocol_version", "u16"), ("features", "u32")),
    HelloAck: (("selected_version", "u16"), ("selected_features", "u32")),
    OpenRequest: (("request_id", "u64"), ("flags", "u8")),
    OpenResponse: (("request_id", "u64"), ("logical_stream_id", "u64")),
    StreamClose: (("logical_stream_id", "u64"),),
    Ping: (("sequence", "u64"),),
    Pong: (("sequence", "u64"),),
}


def _int_error(message: object, exc: Exception) -> EncodeError:
    """Turn a low-level packing failure into an EncodeError naming the field."""
    cls = type(message)
    for field, kind in _INT_FIELDS.get(cls, ()):
        value = getattr(message, field)
        if value is None and field == "logical_stream_id" and cls is OpenResponse:
            continue
        if not isinstance(value, int):
            return EncodeError(
                f"{cls.__name__}.{field}: expected an integer ({kind}), got {type(value).__name__}"
            )
        low, high = _RANGES[kind]
        if not low <= value <= high:
            return EncodeError(f"{cls.__name__}.{field}: {int(value)} out of range for {kind}")
    return EncodeError(f"{cls.__name__}: cannot encode ({exc})")


def _enc_hello(m: Hello) -> bytes:
    return _HELLO.pack(0, m.protocol_version, m.features) + _opt_text(m.agent, "Hello.agent")


def _enc_hello_ack(m: HelloAck) -> bytes:
    return _HELLO.pack(1, m.selected_version, m.selected_features)


def _enc_open_request(m: OpenRequest) -> bytes:
    service = m.service
    if not isinstance(service, str):
        raise EncodeError(f"OpenRequest.service: expected str, got {type(service).__name__}")
    try:
        raw = service.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"OpenRequest.service: not encodable as UTF-8 ({exc.reason})") from None
    metadata = m.metadata
    if not isinstance(metadata, Metadata):
        raise EncodeError(
            f"OpenRequest.metadata: expected Metadata, got {type(metadata).__name__} "
            "(use Metadata.of(...))"
        )
    return (
        _OPEN_REQ.pack(2, m.request_id, len(raw)) + raw + metadata._wire + _FLAG_BYTE.pack(m.flags)
    )


def _enc_open_response(m: OpenResponse) -> bytes:
    status = m.status
    if not isinstance(status, OpenStatus):
        raise EncodeError(f"OpenResponse.status: expected OpenStatus, got {type(status).__name__}")
    code = status.code
    if code is None:
        head = _ID_TAG.pack(3, m.request_id, 0)
    else:
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 4:
            raise EncodeError(f"OpenResponse.status: {code!r} is not a RejectCode")
        head = _ID_TAG.pack(3, m.request_id, 1) + _U32.pack(code)
    lsid = m.logical_stream_id
    tail = _NONE if lsid is None else _SOME + _u64_pack(lsid)
    return head + _opt_text(m.reason, "OpenResponse.reason") + tail


def _enc_stream_close(m: StreamClose) -> bytes:
    code = m.code
    if type(code) is not CloseCode and (
        isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 3
    ):
        raise EncodeError(f"StreamClose.code: {code!r} is not a CloseCode")
    return _ID_TAG.pack(4, m.logical_stream_id, code) + _opt_text(m.reason, "StreamClose.reason")


def _enc_ping(m: Ping) -> bytes:
    return _SEQ.pack(5, m.sequence)


def _enc_pong(m: Pong) -> bytes:
    return _SEQ.pack(6, m.sequence)


_ENCODERS: dict[type, Callable[[object], bytes]] = {
    Hello: _enc_hello,  # type: ignore[dict-item]
    HelloAck: _enc_hello_ack,  # type: ignore[dict-item]
    OpenRequest: _enc_open_request,  # type: ignore[dict-item]
    OpenResponse: _enc_open_response,  # type: ignore[dict-item]
    StreamClose: _enc_stream_close,  # type: ignore[dict-item]
    Ping: _enc_ping,  # type: ignore[dict-item]
    Pong: _enc_pong,  # type: ignore[dict-item]
}


def encode(message: Message) -> bytes:
    """Encode one control message to its bincode payload (without the frame prefix).

    Raises :class:`EncodeError` (before producing anything) for a value that does not
    fit the wire: an integer out of range for its field, a non-str text field, text
    that is not UTF-8 encodable, an unknown enum value, or a payload larger than
    :data:`MAX_FRAME_PAYLOAD`.
    """
    encoder = _ENCODERS.get(type(message))
    if encoder is None:
        for cls, candidate in _ENCODERS.items():
            if isinstance(message, cls):
                encoder = candidate
                break
        else:
            raise EncodeError(f"not a protocol message: {type(message).__name__}")
    try:
        payload = encoder(message)
    except (struct.error, TypeError, OverflowError) as exc:
        raise _int_error(message, exc) from None
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise EncodeError(
            f"{type(message).__name__}: encoded payload of {len(payload)} bytes exceeds "
            f"the maximum frame payload {MAX_FRAME_PAYLOAD}"
        )
    return payload


# ---------------------------------------------------------------------------
# decoding


def input_bytes(data: object, what: str) -> bytes:
    """``data`` as ``bytes`` for a decoder, or :class:`ProtocolError`.

    Accepts bytes, bytearray and memoryview (any shape); a released view or a non-bytes
    object is reported as a ProtocolError so that nothing else escapes the decoders.
    """
    if type(data) is bytes:
        return data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what} must be bytes-like, got {type(data).__name__}")
    try:
        return bytes(data)
    except (TypeError, ValueError, BufferError) as exc:
        raise ProtocolError(f"{what} is not a readable byte buffer ({exc})") from None


def _eof(where: str, pos: int, need: int, total: int) -> ProtocolError:
    have = max(total - pos, 0)
    return ProtocolError(
        f"{where}: unexpected end of payload at offset {pos} (need {need} bytes, {have} left)"
    )


def _read_u32(buf: bytes, pos: int, n: int, where: str) -> int:
    if pos + 4 > n:
        raise _eof(where, pos, 4, n)
    value: int = _u32_unpack(buf, pos)[0]
    return value


def _read_raw(buf: bytes, pos: int, n: int, where: str) -> tuple[bytes, int]:
    """A u64-length-prefixed byte string; length checked before slicing."""
    if pos + 8 > n:
        raise _eof(f"{where} length", pos, 8, n)
    length: int = _u64_unpack(buf, pos)[0]
    pos += 8
    end = pos + length
    if end > n:
        raise ProtocolError(
            f"{where}: length {length} at offset {pos - 8} exceeds the {n - pos} bytes left"
        )
    return buf[pos:end], end


def _read_str(buf: bytes, pos: int, n: int, where: str) -> tuple[str, int]:
    raw, end = _read_raw(buf, pos, n, where)
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"{where}: invalid UTF-8 at byte {exc.start} of the string (offset {end - len(raw)})"
        ) from None


def _read_opt_str(buf: bytes, pos: int, n: int, where: str) -> tuple[str | None, int]:
    if pos >= n:
        raise _eof(f"{where} option tag", pos, 1, n)
    tag = buf[pos]
    if tag == 0:
        return None, pos + 1
    if tag != 1:
        raise ProtocolError(f"{where}: invalid Option tag {tag} at offset {pos}")
    return _read_str(buf, pos + 1, n, where)


def _trailing(name: str, pos: int, n: int) -> ProtocolError:
    return ProtocolError(
        f"{name}: {n - pos} trailing bytes after a complete message (offset {pos}); "
        "trailing bytes are rejected"
    )


def _fixed_eof(name: str, fields: tuple[tuple[str, int], ...], n: int) -> ProtocolError:
    """Name the fixed-width field a too-short payload ends in."""
    pos = 0
    for field, size in fields:
        if pos + size > n:
            return _eof(f"{name}.{field}", pos, size, n)
        pos += size
    return _eof(name, pos, 1, n)  # pragma: no cover - callers only call when short


def _features(value: int) -> Features:
    return _FEATURES[value] if value < 8 else Features(value)


def _dec_hello(buf: bytes, n: int) -> Hello:
    if n < 10:
        raise _fixed_eof("Hello", (("tag", 4), ("protocol_version", 2), ("features", 4)), n)
    _, version, features = _HELLO.unpack_from(buf, 0)
    agent, pos = _read_opt_str(buf, 10, n, "Hello.agent")
    if pos != n:
        raise _trailing("Hello", pos, n)
    return Hello(protocol_version=version, features=_features(features), agent=agent)


def _dec_hello_ack(buf: bytes, n: int) -> HelloAck:
    if n != 10:
        if n < 10:
            raise _fixed_eof(
                "HelloAck", (("tag", 4), ("selected_version", 2), ("selected_features", 4)), n
            )
        raise _trailing("HelloAck", 10, n)
    _, version, features = _HELLO.unpack_from(buf, 0)
    return HelloAck(selected_version=version, selected_features=_features(features))


class _Malformed(Exception):
    """Internal: the fast structured-metadata loop met bad input; diagnose precisely."""


def _dec_metadata(buf: bytes, pos: int, n: int) -> tuple[Metadata, int]:
    start = pos
    kind = _read_u32(buf, pos, n, "OpenRequest.metadata")
    pos += 4
    if kind == 0:
        return Metadata.EMPTY, pos
    if kind == 1:
        data, pos = _read_raw(buf, pos, n, "OpenRequest.metadata.Bytes")
        return Metadata._make(MetadataKind.BYTES, data, (), buf[start:pos]), pos
    if kind != 2:
        raise ProtocolError(f"OpenRequest.metadata: unknown variant {kind} at offset {start}")
    if pos + 8 > n:
        raise _eof("OpenRequest.metadata.Structured count", pos, 8, n)
    count: int = _u64_unpack(buf, pos)[0]
    pos += 8
    # Every entry takes at least 13 bytes (key length 8, value tag 4, a bool 1):
    # a count the remaining bytes cannot hold fails now, before any work.
    if count * 13 > n - pos:
        raise ProtocolError(
            f"OpenRequest.metadata.Structured: map count {count} cannot fit in the "
            f"{n - pos} bytes left (offset {pos - 8})"
        )
    # Fast loop: bounds are enforced by struct/indexing errors and explicit length
    # checks; any failure is handed to the precise (slower) diagnosis below.
    entries: list[tuple[str, MetadataValue]] = []
    append = entries.append
    u32 = _u32_unpack
    u64 = _u64_unpack
    value: MetadataValue
    try:
        for _ in range(count):
            end = pos + 8 + u64(buf, pos)[0]
            if end > n:
                raise _Malformed
            key = buf[pos + 8 : end].decode("utf-8")
            tag = u32(buf, end)[0]
            pos = end + 4
            if tag == 0:
                end = pos + 8 + u64(buf, pos)[0]
                if end > n:
                    raise _Malformed
                value = buf[pos + 8 : end].decode("utf-8")
                pos = end
            elif tag == 1:
                value = _i64_unpack(buf, pos)[0]
                pos += 8
            elif tag == 2:
                byte = buf[pos]
                if byte > 1:
                    raise _Malformed
                value = byte == 1
                pos += 1
            elif tag == 3:
                end = pos + 8 + u64(buf, pos)[0]
                if end > n:
                    raise _Malformed
                value = buf[pos + 8 : end]
                pos = end
            else:
                raise _Malformed
            append((key, value))
    except (_Malformed, struct.error, IndexError, UnicodeDecodeError):
        _diagnose_structured(buf, start + 12, n, count)
    if len({key for key, _ in entries}) != count:
        _diagnose_structured(buf, start + 12, n, count)
    return Metadata._make(MetadataKind.STRUCTURED, None, tuple(entries), buf[start:pos]), pos


def _diagnose_structured(buf: bytes, pos: int, n: int, count: int) -> NoReturn:
    """Re-read structured entries with a check at every step; raise the precise error."""
    seen: set[str] = set()
    for index in range(count):
        try:
            key, pos = _read_str(buf, pos, n, "key")
            if key in seen:
                raise ProtocolError(f"duplicate key {key!r}; duplicate keys are rejected")
            seen.add(key)
            tag = _read_u32(buf, pos, n, "value")
            pos += 4
            if tag == 0:
                _, pos = _read_str(buf, pos, n, "value.String")
            elif tag == 1:
                if pos + 8 > n:
                    raise _eof("value.Integer", pos, 8, n)
                pos += 8
            elif tag == 2:
                if pos >= n:
                    raise _eof("value.Boolean", pos, 1, n)
                byte = buf[pos]
                if byte > 1:
                    raise ProtocolError(
                        f"value.Boolean: invalid bool byte {byte} at offset {pos} (expected 0 or 1)"
                    )
                pos += 1
            elif tag == 3:
                _, pos = _read_raw(buf, pos, n, "value.Bytes")
            else:
                raise ProtocolError(f"value: unknown MetadataValue variant {tag}")
        except ProtocolError as exc:
            raise ProtocolError(f"OpenRequest.metadata.Structured entry {index} {exc}") from None
    raise ProtocolError("OpenRequest.metadata.Structured: malformed entries")  # unreachable


def _dec_open_request(buf: bytes, n: int) -> OpenRequest:
    if n < 20:
        raise _fixed_eof("OpenRequest", (("tag", 4), ("request_id", 8), ("service length", 8)), n)
    _, request_id, length = _OPEN_REQ.unpack_from(buf, 0)
    end = 20 + length
    if end > n:
        raise ProtocolError(
            f"OpenRequest.service: length {length} at offset 12 exceeds the {n - 20} bytes left"
        )
    try:
        service = buf[20:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"OpenRequest.service: invalid UTF-8 at byte {exc.start} of the string (offset 20)"
        ) from None
    metadata, pos = _dec_metadata(buf, end, n)
    if pos >= n:
        raise _eof("OpenRequest.flags", pos, 1, n)
    flags = _OPEN_FLAGS[buf[pos]]
    pos += 1
    if pos != n:
        raise _trailing("OpenRequest", pos, n)
    return OpenRequest(request_id=request_id, service=service, metadata=metadata, flags=flags)


_ACCEPTED_LAYOUT = struct.Struct("<IQIBBQ")  # tag, request_id, Accepted, None, Some, lsid


def _dec_open_response(buf: bytes, n: int) -> OpenResponse:
    if n == 26 and buf[12:18] == b"\x00\x00\x00\x00\x00\x01":  # every accepted open
        _, request_id, _, _, _, accepted_id = _ACCEPTED_LAYOUT.unpack(buf)
        return OpenResponse(request_id=request_id, status=_ACCEPTED, logical_stream_id=accepted_id)
    if n < 16:
        raise _fixed_eof("OpenResponse", (("tag", 4), ("request_id", 8), ("status", 4)), n)
    _, request_id, status_index = _ID_TAG.unpack_from(buf, 0)
    pos = 16
    status: OpenStatus
    if status_index == 0:
        status = _ACCEPTED
    elif status_index == 1:
        code = _read_u32(buf, pos, n, "OpenResponse.status.Rejected code")
        if code > 4:
            raise ProtocolError(
                f"OpenResponse.status.Rejected: unknown RejectCode variant {code} at offset {pos}"
            )
        status = _REJECTED[code]
        pos += 4
    else:
        raise ProtocolError(f"OpenResponse.status: unknown variant {status_index} at offset 12")
    reason, pos = _read_opt_str(buf, pos, n, "OpenResponse.reason")
    if pos >= n:
        raise _eof("OpenResponse.logical_stream_id option tag", pos, 1, n)
    tag = buf[pos]
    lsid: int | None
    if tag == 0:
        lsid = None
        pos += 1
    elif tag == 1:
        if pos + 9 > n:
            raise _eof("OpenResponse.logical_stream_id", pos + 1, 8, n)
        lsid = _u64_unpack(buf, pos + 1)[0]
        pos += 9
    else:
        raise ProtocolError(
            f"OpenResponse.logical_stream_id: invalid Option tag {tag} at offset {pos}"
        )
    if pos != n:
        raise _trailing("OpenResponse", pos, n)
    return OpenResponse(request_id=request_id, status=status, reason=reason, logical_stream_id=lsid)


def _dec_stream_close(buf: bytes, n: int) -> StreamClose:
    if n < 16:
        raise _fixed_eof("StreamClose", (("tag", 4), ("logical_stream_id", 8), ("code", 4)), n)
    _, lsid, code = _ID_TAG.unpack_from(buf, 0)
    if code > 3:
        raise ProtocolError(f"StreamClose.code: unknown CloseCode variant {code} at offset 12")
    reason, pos = _read_opt_str(buf, 16, n, "StreamClose.reason")
    if pos != n:
        raise _trailing("StreamClose", pos, n)
    return StreamClose(logical_stream_id=lsid, code=_CLOSE_CODES[code], reason=reason)


def _dec_ping(buf: bytes, n: int) -> Ping:
    if n != 12:
        if n < 12:
            raise _fixed_eof("Ping", (("tag", 4), ("sequence", 8)), n)
        raise _trailing("Ping", 12, n)
    return Ping(sequence=_SEQ.unpack_from(buf, 0)[1])


def _dec_pong(buf: bytes, n: int) -> Pong:
    if n != 12:
        if n < 12:
            raise _fixed_eof("Pong", (("tag", 4), ("sequence", 8)), n)
        raise _trailing("Pong", 12, n)
    return Pong(sequence=_SEQ.unpack_from(buf, 0)[1])


_DECODERS: tuple[Callable[[bytes, int], Message], ...] = (
    _dec_hello,
    _dec_hello_ack,
    _dec_open_request,
    _dec_open_response,
    _dec_stream_close,
    _dec_ping,
    _dec_pong,
)


def decode(payload: bytes | bytearray | memoryview) -> Message:
    """Decode one control-message payload (the bytes inside a frame).

    The payload must hold exactly one message. Raises :class:`ProtocolError` naming
    the field and offset for anything malformed: truncation, unknown variant index,
    bad Option tag or bool byte, invalid UTF-8, a length larger than the remaining
    bytes, duplicate structured keys, trailing bytes, or a payload over
    :data:`MAX_FRAME_PAYLOAD`. No other exception type escapes, for any input.
    """
    buf = payload if type(payload) is bytes else input_bytes(payload, "payload")
    n = len(buf)
    if n > MAX_FRAME_PAYLOAD:
        raise ProtocolError(
            f"payload of {n} bytes exceeds the maximum frame payload {MAX_FRAME_PAYLOAD}"
        )
    if n < 4:
        raise _eof("message variant index", 0, 4, n)
    index: int = _u32_unpack(buf, 0)[0]
    if index > 6:
        raise ProtocolError(
            f"message: unknown variant {index} (expected 0..6: Hello, HelloAck, OpenRequest, "
            "OpenResponse, StreamClose, Ping, Pong)"
        )
    return _DECODERS[index](buf, n)
