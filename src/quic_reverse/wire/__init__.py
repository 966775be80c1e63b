"""Wire protocol v1, sans-IO: messages, bincode codec, framing and StreamBind.

Byte-compatible with the Rust crate ``quic-reverse`` 0.1.x (see ``docs/PROTOCOL.md``).
Nothing here does I/O, uses asyncio or reads a clock.

* :func:`encode` / :func:`decode`: one message ↔ its payload bytes;
* :func:`encode_frame`, :func:`encode_message_frame`, :class:`FrameReader`: the u32
  big-endian length framing of the control stream;
* :class:`StreamBind`: the 13-byte header of every data stream.
* extension (``Features.DATAGRAM_FLOWS``, not in the Rust crate): :class:`FlowClose`
  and the datagram flow-id prefix (:mod:`quic_reverse.wire.flows`).

Decoding problems raise :class:`quic_reverse.errors.ProtocolError`; values that cannot
be encoded raise :class:`quic_reverse.errors.EncodeError`.
"""

from __future__ import annotations

from .bind import STREAM_BIND_MAGIC, STREAM_BIND_SIZE, STREAM_BIND_VERSION, StreamBind
from .codec import MAX_FRAME_PAYLOAD, MESSAGE_TYPES, decode, encode
from .flows import (
    MAX_FLOW_ID,
    FlowClose,
    decode_datagram,
    decode_flow_close,
    encode_datagram,
    encode_flow_close,
)
from .framing import (
    FRAME_HEADER_SIZE,
    FrameReader,
    decode_frame,
    encode_frame,
    encode_message_frame,
)
from .messages import (
    PROTOCOL_VERSION,
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

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_FLOW_ID",
    "MAX_FRAME_PAYLOAD",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "STREAM_BIND_MAGIC",
    "STREAM_BIND_SIZE",
    "STREAM_BIND_VERSION",
    "CloseCode",
    "Features",
    "FlowClose",
    "FrameReader",
    "Hello",
    "HelloAck",
    "Message",
    "Metadata",
    "MetadataKind",
    "MetadataValue",
    "OpenFlags",
    "OpenRequest",
    "OpenResponse",
    "OpenStatus",
    "Ping",
    "Pong",
    "RejectCode",
    "StreamBind",
    "StreamClose",
    "decode",
    "decode_datagram",
    "decode_flow_close",
    "decode_frame",
    "encode",
    "encode_datagram",
    "encode_flow_close",
    "encode_frame",
    "encode_message_frame",
]
