"""Length-prefixed framing and the incremental FrameReader."""

from __future__ import annotations

import random

import pytest

from quic_reverse.errors import EncodeError, ProtocolError
from quic_reverse.wire import (
    MAX_FRAME_PAYLOAD,
    FrameReader,
    Ping,
    decode,
    encode_frame,
    encode_message_frame,
)

from . import vectors


def _stream() -> tuple[bytes, list[bytes]]:
    """Every message vector's frame back to back, plus an empty and a maximal frame."""
    payloads = [bytes.fromhex(e["payload_hex"]) for e in vectors.of_kind("message")]
    payloads.insert(3, b"")
    payloads.insert(50, bytes(range(256)) * (MAX_FRAME_PAYLOAD // 256))
    return b"".join(encode_frame(p) for p in payloads), payloads


def test_encode_frame_limits() -> None:
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(memoryview(b"abc")) == b"\x00\x00\x00\x03abc"
    assert len(encode_frame(bytes(MAX_FRAME_PAYLOAD))) == MAX_FRAME_PAYLOAD + 4
    with pytest.raises(EncodeError, match="65537 bytes exceeds the maximum 65536"):
        encode_frame(bytes(MAX_FRAME_PAYLOAD + 1))
    with pytest.raises(EncodeError):
        encode_frame("text")  # type: ignore[arg-type]
    assert encode_message_frame(Ping(sequence=1)) == bytes.fromhex(
        "0000000c050000000100000000000000"
    )


def test_whole_stream_in_one_chunk() -> None:
    data, payloads = _stream()
    reader = FrameReader()
    assert reader.feed(data) == payloads
    assert reader.buffered == 0
    reader.feed_eof()


def test_one_byte_at_a_time() -> None:
    data, payloads = _stream()
    reader = FrameReader()
    out: list[bytes] = []
    view = memoryview(data)
    for i in range(len(data)):
        out.extend(reader.feed(view[i : i + 1]))
    assert out == payloads
    assert reader.buffered == 0


def test_split_at_every_position() -> None:
    """Two chunks, split at every position of a stream of small frames."""
    payloads = [bytes.fromhex(e["payload_hex"]) for e in vectors.of_kind("message")[:30]]
    payloads.insert(5, b"")
    data = b"".join(encode_frame(p) for p in payloads)
    for cut in range(len(data) + 1):
        reader = FrameReader()
        out = reader.feed(data[:cut])
        assert reader.buffered == cut - sum(len(p) + 4 for p in out)
        out += reader.feed(data[cut:])
        assert out == payloads, cut
        assert reader.buffered == 0


def test_random_chunking_matches() -> None:
    data, payloads = _stream()
    rng = random.Random(1234)
    for _ in range(20):
        reader = FrameReader()
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 5, 17, 4096, 70000))
            out.extend(reader.feed(data[pos : pos + step]))
            pos += step
        assert out == payloads


def test_payloads_decode_back() -> None:
    reader = FrameReader()
    frames = reader.feed(b"".join(encode_message_frame(Ping(sequence=i)) for i in range(5)))
    assert [decode(f) for f in frames] == [Ping(sequence=i) for i in range(5)]


def test_oversized_prefix_rejected_before_body() -> None:
    reader = FrameReader()
    assert reader.feed(b"\x00\x01") == []
    with pytest.raises(ProtocolError, match="frame size 65537 exceeds maximum 65536"):
        reader.feed(b"\x00\x01")
    assert reader.buffered == 0
    with pytest.raises(ProtocolError, match="already failed"):
        reader.feed(encode_message_frame(Ping(sequence=1)))


def test_oversized_prefix_after_valid_frames() -> None:
    reader = FrameReader()
    assert reader.feed(encode_message_frame(Ping(sequence=1)) + b"\xff\xff") != []
    with pytest.raises(ProtocolError, match="frame size 4294967295"):
        reader.feed(b"\xff\xff" + b"\xff\xff\xff")


def test_maximal_frame_buffers_at_most_one_frame() -> None:
    reader = FrameReader()
    frame = encode_frame(bytes(MAX_FRAME_PAYLOAD))
    for i in range(0, len(frame) - 1, 1000):
        assert reader.feed(frame[i : min(i + 1000, len(frame) - 1)]) == []
    assert reader.buffered == len(frame) - 1
    assert reader.feed(frame[-1:] + b"\x00") == [bytes(MAX_FRAME_PAYLOAD)]
    assert reader.buffered == 1


def test_feed_eof_inside_frame() -> None:
    reader = FrameReader()
    reader.feed(b"\x00\x00\x00\x05ab")
    with pytest.raises(ProtocolError, match="stream ended inside a frame"):
        reader.feed_eof()


def test_feed_rejects_non_bytes() -> None:
    with pytest.raises(ProtocolError, match="bytes-like"):
        FrameReader().feed("abcd")  # type: ignore[arg-type]
