"""Control-stream framing: a u32 big-endian length, then that many payload bytes.

:func:`encode_frame` adds the prefix; :class:`FrameReader` turns arbitrary chunks of
a byte stream back into whole payloads. A length prefix above
:data:`MAX_FRAME_PAYLOAD` is rejected as soon as its four bytes are in, before any of
the body is buffered, so a peer cannot make us hold more than one maximal frame.
Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import logging
import struct

from ..errors import EncodeError, ProtocolError
from .codec import MAX_FRAME_PAYLOAD, encode, input_bytes
from .messages import Message, Metadata, OpenFlags, OpenRequest, OpenResponse, OpenStatus

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_FRAME_PAYLOAD",
    "FrameReader",
    "decode_frame",
    "encode_frame",
    "encode_message_frame",
    "open_request_frame",
    "open_response_accepted_frame",
]

logger = logging.getLogger("quic_reverse.wire")

FRAME_HEADER_SIZE = 4
"""Size of the length prefix in bytes."""

_LEN = struct.Struct(">I")
_len_pack = _LEN.pack
_len_unpack = _LEN.unpack_from


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """Prefix ``payload`` with its u32 big-endian length.

    Raises :class:`EncodeError` if the payload is longer than :data:`MAX_FRAME_PAYLOAD`.
    """
    if type(payload) is not bytes:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise EncodeError(f"frame payload must be bytes-like, got {type(payload).__name__}")
        try:
            payload = bytes(payload)
        except (TypeError, ValueError, BufferError) as exc:
            raise EncodeError(f"frame payload is not a readable byte buffer ({exc})") from None
    size = len(payload)
    if size > MAX_FRAME_PAYLOAD:
        raise EncodeError(f"frame payload of {size} bytes exceeds the maximum {MAX_FRAME_PAYLOAD}")
    return _len_pack(size) + payload


def encode_message_frame(message: Message) -> bytes:
    """``encode_frame(encode(message))``: a message ready to write on the control stream."""
    payload = encode(message)  # already checked against MAX_FRAME_PAYLOAD
    return _len_pack(len(payload)) + payload


# The two frames of every open, built in one step (the hot path of the session core).
# Same bytes as encode_message_frame() of the message; a value that does not fit is
# handed to it, which raises the precise EncodeError.
_ACCEPTED_PAYLOAD_SIZE = 26  # tag, request_id, status, reason None, Some, lsid
# The frame's big-endian length prefix, packed as the little-endian u32 it reads as.
_ACCEPTED = struct.Struct("<IIQIBBQ")
_ACCEPTED_PREFIX = int.from_bytes(_len_pack(_ACCEPTED_PAYLOAD_SIZE), "little")


def open_request_frame(
    request_id: int, service: str, metadata: Metadata, flags: OpenFlags
) -> bytes:
    """``encode_message_frame(OpenRequest(...))`` without building the message.

    Everything after the request id is the same for every open of one service, so the
    last one is kept (one entry, compared by value; the metadata by identity).
    """
    global _last_open
    last = _last_open
    if last is None or last[0] != service or last[1] is not metadata or last[2] != flags:
        last = _open_request_parts(service, metadata, flags)
        if last is None:  # a value that does not fit: the precise error
            return encode_message_frame(
                OpenRequest(request_id=request_id, service=service, metadata=metadata, flags=flags)
            )
        _last_open = last
    if not 0 <= request_id <= 0xFFFF_FFFF_FFFF_FFFF:
        return encode_message_frame(
            OpenRequest(request_id=request_id, service=service, metadata=metadata, flags=flags)
        )
    return last[3] + _u64_pack(request_id) + last[4]


# (service, metadata, flags, frame prefix up to the request id, the rest)
_OpenParts = tuple[str, Metadata, int, bytes, bytes]
_last_open: _OpenParts | None = None
_u64_pack = struct.Struct("<Q").pack


def _open_request_parts(service: str, metadata: Metadata, flags: OpenFlags) -> _OpenParts | None:
    if (
        type(service) is not str
        or type(metadata) is not Metadata
        or not isinstance(flags, int)
        or not 0 <= flags <= 0xFF
    ):
        return None
    try:
        raw = service.encode("utf-8")
    except UnicodeEncodeError:
        return None
    rest = b"".join((_u64_pack(len(raw)), raw, metadata._wire, bytes((flags,))))
    size = 12 + len(rest)  # tag, request_id, rest
    if size > MAX_FRAME_PAYLOAD:
        return None
    return service, metadata, int(flags), _len_pack(size) + b"\x02\x00\x00\x00", rest


def open_response_accepted_frame(request_id: int, logical_stream_id: int) -> bytes:
    """``encode_message_frame(OpenResponse(request_id, ACCEPTED, None, lsid))``, fast."""
    try:
        return _ACCEPTED.pack(_ACCEPTED_PREFIX, 3, request_id, 0, 0, 1, logical_stream_id)
    except struct.error:
        return encode_message_frame(
            OpenResponse(
                request_id=request_id,
                status=OpenStatus.ACCEPTED,
                logical_stream_id=logical_stream_id,
            )
        )


def _too_large(length: int) -> ProtocolError:
    return ProtocolError(f"frame size {length} exceeds maximum {MAX_FRAME_PAYLOAD}")


def decode_frame(data: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """Parse exactly one frame at the start of ``data``.

    Returns ``(payload, consumed)``; bytes after the frame are left to the caller.
    Raises :class:`ProtocolError` for an oversized length prefix or an incomplete frame.
    """
    buf = data if type(data) is bytes else input_bytes(data, "frame data")
    n = len(buf)
    if n < FRAME_HEADER_SIZE:
        raise ProtocolError(f"unexpected end of input: expected 4 bytes, got {n}")
    length: int = _len_unpack(buf, 0)[0]
    if length > MAX_FRAME_PAYLOAD:
        raise _too_large(length)
    end = FRAME_HEADER_SIZE + length
    if end > n:
        raise ProtocolError(f"unexpected end of input: expected {end} bytes, got {n}")
    return buf[FRAME_HEADER_SIZE:end], end


class FrameReader:
    """Incremental frame parser: :meth:`feed` chunks of any size, get whole payloads.

    Holds at most one incomplete frame (≤ 4 + 65536 bytes) plus the unparsed tail of
    the latest chunk. Work is linear in the bytes fed: complete frames in a chunk are
    sliced out without copying the buffer per frame, and consumed bytes are dropped
    once per :meth:`feed`.

    After a :class:`ProtocolError` the reader is broken (the stream position is lost)
    and every later :meth:`feed` raises again; payloads completed earlier in the same
    failing chunk are not returned.
    """

    __slots__ = ("_buf", "_error", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: str | None = None
        # Bytes the buffer must hold before anything new can be parsed: 4 while the
        # next prefix is incomplete, else 4 + the pending frame's (validated) length.
        # Lets a small chunk into a large pending frame return without re-parsing.
        self._need = FRAME_HEADER_SIZE

    @property
    def buffered(self) -> int:
        """Number of bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data`` and return every payload completed by it, in stream order.

        Raises :class:`ProtocolError` when a length prefix exceeds
        :data:`MAX_FRAME_PAYLOAD` (as soon as its 4 bytes are in) or if the reader
        already failed.
        """
        if self._error is not None:
            raise ProtocolError(f"frame reader already failed: {self._error}")
        buf = self._buf
        frames: list[bytes] = []
        if not buf:
            # Fast path: parse straight from the caller's chunk, buffer only the tail.
            src = data if type(data) is bytes else input_bytes(data, "frame data")
            n = len(src)
            pos = 0
            need = FRAME_HEADER_SIZE
            while n - pos >= FRAME_HEADER_SIZE:
                length: int = _len_unpack(src, pos)[0]
                if length > MAX_FRAME_PAYLOAD:
                    self._fail(length)
                end = pos + FRAME_HEADER_SIZE + length
                if end > n:
                    need = end - pos
                    break
                frames.append(src[pos + FRAME_HEADER_SIZE : end])
                pos = end
            if pos < n:
                buf += memoryview(src)[pos:]
            self._need = need
            return frames
        if type(data) is bytes or isinstance(data, bytearray):
            buf += data
        else:  # memoryviews of any shape, and anything else: checked, converted
            buf += input_bytes(data, "frame data")
        n = len(buf)
        if n < self._need:
            return frames
        pos = 0
        need = FRAME_HEADER_SIZE
        with memoryview(buf) as view:
            while n - pos >= FRAME_HEADER_SIZE:
                length = _len_unpack(view, pos)[0]
                if length > MAX_FRAME_PAYLOAD:
                    self._fail(length)
                end = pos + FRAME_HEADER_SIZE + length
                if end > n:
                    need = end - pos
                    break
                frames.append(view[pos + FRAME_HEADER_SIZE : end].tobytes())
                pos = end
        if pos:
            del buf[:pos]
        self._need = need
        return frames

    def feed_eof(self) -> None:
        """Signal the end of the stream: raises :class:`ProtocolError` if a frame is incomplete."""
        if self._buf:
            raise ProtocolError(
                f"stream ended inside a frame ({len(self._buf)} bytes of an incomplete frame)"
            )

    def _fail(self, length: int) -> None:
        error = _too_large(length)
        self._error = str(error)
        self._buf = bytearray()  # a broken reader holds nothing
        self._need = FRAME_HEADER_SIZE
        logger.debug("frame reader: %s", error)
        raise error
