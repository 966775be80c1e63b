"""Property tests: round trips of every message type, decoder totality, chunking invariance."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from quic_reverse.errors import ProtocolError
from quic_reverse.wire import (
    FrameReader,
    Message,
    StreamBind,
    decode,
    encode,
    encode_frame,
    encode_message_frame,
)

from .strategies import WIRE_SETTINGS, messages, u64


@WIRE_SETTINGS
@given(messages)
def test_round_trip(message: Message) -> None:
    payload = encode(message)
    decoded = decode(payload)
    assert decoded == message
    assert type(decoded) is type(message)
    assert encode(decoded) == payload  # order of structured entries is kept


@WIRE_SETTINGS
@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_frame_stream_chunking(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode_message_frame(m) for m in batch)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10).map(sorted))
    reader = FrameReader()
    payloads: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        payloads.extend(reader.feed(stream[start:end]))
    assert reader.buffered == 0
    assert [decode(p) for p in payloads] == batch


@WIRE_SETTINGS
@given(messages)
def test_every_split_position_and_byte_at_a_time(message: Message) -> None:
    frame = encode_message_frame(message) + encode_frame(b"")
    expected = [encode(message), b""]
    for cut in range(len(frame) + 1):
        reader = FrameReader()
        assert reader.feed(frame[:cut]) + reader.feed(frame[cut:]) == expected
    reader = FrameReader()
    single: list[bytes] = []
    for i in range(len(frame)):
        single.extend(reader.feed(frame[i : i + 1]))
    assert single == expected


def _mutated(payload: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(payload)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[: cut % (len(buf) + 2)])


arbitrary_payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(
        _mutated,
        messages.map(encode),
        st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=4),
        st.integers(0, 10_000),
    ),
)


@WIRE_SETTINGS
@given(arbitrary_payloads)
def test_decode_is_total(payload: bytes) -> None:
    """Any bytes: a message (that re-encodes to the same bytes) or ProtocolError, nothing else."""
    try:
        message = decode(payload)
    except ProtocolError:
        return
    assert encode(message) == payload


@WIRE_SETTINGS
@given(arbitrary_payloads)
def test_frame_reader_and_bind_are_total(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        FrameReader().feed(data)
    try:
        bind = StreamBind.decode(data)
    except ProtocolError:
        return
    assert bind.encode() == data


@WIRE_SETTINGS
@given(u64)
def test_stream_bind_round_trip(lsid: int) -> None:
    raw = StreamBind(lsid).encode()
    assert len(raw) == 13 and raw[:5] == b"QRBV\x01"
    assert StreamBind.decode(raw) == StreamBind(lsid)
