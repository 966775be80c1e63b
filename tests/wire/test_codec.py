"""Codec behaviour beyond the vectors: encode validation, Metadata, decode error reporting."""

from __future__ import annotations

import pickle
import struct

import pytest

from quic_reverse.errors import EncodeError, ProtocolError, QuicReverseError
from quic_reverse.wire import (
    MAX_FRAME_PAYLOAD,
    MESSAGE_TYPES,
    CloseCode,
    Features,
    FrameReader,
    Hello,
    HelloAck,
    Metadata,
    MetadataKind,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    Ping,
    Pong,
    RejectCode,
    StreamBind,
    StreamClose,
    decode,
    decode_frame,
    encode,
    encode_frame,
)

U64_MAX = 2**64 - 1


def test_error_tree() -> None:
    assert issubclass(ProtocolError, QuicReverseError)
    assert issubclass(EncodeError, QuicReverseError)


def test_defaults_and_constants() -> None:
    hello = Hello()
    assert (hello.protocol_version, hello.features, hello.agent) == (1, Features(0), None)
    request = OpenRequest(request_id=1, service="echo")
    assert request.metadata is Metadata.EMPTY
    assert request.flags == OpenFlags(0)
    expected = (Hello, HelloAck, OpenRequest, OpenResponse, StreamClose, Ping, Pong)
    assert expected == MESSAGE_TYPES
    assert Ping(sequence=9).response() == Pong(sequence=9)


def test_messages_are_frozen_and_keyword_only() -> None:
    ping = Ping(sequence=1)
    with pytest.raises(AttributeError):
        ping.sequence = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Ping(1)  # type: ignore[call-arg]
    assert hash(Ping(sequence=1)) == hash(ping)


def test_open_status() -> None:
    assert OpenStatus.ACCEPTED.accepted
    assert OpenStatus.ACCEPTED.code is None
    rejected = OpenStatus.rejected(RejectCode.UNAUTHORIZED)
    assert not rejected.accepted
    assert rejected.code is RejectCode.UNAUTHORIZED
    assert OpenStatus.rejected(2).code is RejectCode.LIMIT_EXCEEDED
    with pytest.raises(EncodeError, match="not a RejectCode"):
        OpenStatus.rejected(9)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Hello(protocol_version=65536), r"Hello\.protocol_version: 65536 out of range for u16"),
        (Hello(protocol_version=-1), r"Hello\.protocol_version: -1 out of range for u16"),
        (Hello(features=Features(2**32)), r"Hello\.features: 4294967296 out of range for u32"),
        (Hello(agent=b"x"), r"Hello\.agent: expected str, got bytes"),  # type: ignore[arg-type]
        (Hello(agent="\ud800"), r"Hello\.agent: not encodable as UTF-8"),
        (
            HelloAck(selected_version=1, selected_features=-1),  # type: ignore[arg-type]
            r"HelloAck\.selected_features: -1 out of range for u32",
        ),
        (
            OpenRequest(request_id=U64_MAX + 1, service="x"),
            r"OpenRequest\.request_id: 18446744073709551616 out of range for u64",
        ),
        (OpenRequest(request_id=-1, service="x"), r"OpenRequest\.request_id: -1 out of range"),
        (
            OpenRequest(request_id=1.5, service="x"),  # type: ignore[arg-type]
            r"OpenRequest\.request_id: expected an integer \(u64\), got float",
        ),
        (
            OpenRequest(request_id=1, service=b"echo"),  # type: ignore[arg-type]
            r"OpenRequest\.service: expected str, got bytes",
        ),
        (
            OpenRequest(request_id=1, service=None),  # type: ignore[arg-type]
            r"OpenRequest\.service: expected str, got NoneType",
        ),
        (
            OpenRequest(request_id=1, service="x", flags=OpenFlags(256)),
            r"OpenRequest\.flags: 256 out of range for u8",
        ),
        (
            OpenRequest(request_id=1, service="x", metadata={"a": 1}),  # type: ignore[arg-type]
            r"OpenRequest\.metadata: expected Metadata, got dict",
        ),
        (
            OpenResponse(request_id=1, status=OpenStatus.ACCEPTED, logical_stream_id=-5),
            r"OpenResponse\.logical_stream_id: -5 out of range for u64",
        ),
        (
            OpenResponse(request_id=1, status=OpenStatus(code=7)),  # type: ignore[arg-type]
            r"OpenResponse\.status: 7 is not a RejectCode",
        ),
        (
            OpenResponse(request_id=1, status=None),  # type: ignore[arg-type]
            r"OpenResponse\.status: expected OpenStatus",
        ),
        (
            OpenResponse(request_id=1, status=OpenStatus.ACCEPTED, reason=3),  # type: ignore[arg-type]
            r"OpenResponse\.reason: expected str, got int",
        ),
        (
            StreamClose(logical_stream_id=1, code=4),  # type: ignore[arg-type]
            r"StreamClose\.code: 4 is not a CloseCode",
        ),
        (
            StreamClose(logical_stream_id=2**64, code=CloseCode.NORMAL),
            r"StreamClose\.logical_stream_id: 18446744073709551616 out of range for u64",
        ),
        (Ping(sequence=-1), r"Ping\.sequence: -1 out of range for u64"),
        (Pong(sequence=2**64), r"Pong\.sequence: 18446744073709551616 out of range for u64"),
        (Ping(sequence="1"), r"Ping\.sequence: expected an integer \(u64\), got str"),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_values_that_do_not_fit(message: object, match: str) -> None:
    with pytest.raises(EncodeError, match=match):
        encode(message)  # type: ignore[arg-type]


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(EncodeError, match="not a protocol message: dict"):
        encode({"type": "Ping"})  # type: ignore[arg-type]


def test_encode_accepts_plain_ints_for_enums_and_flags() -> None:
    close = StreamClose(logical_stream_id=1, code=2)  # type: ignore[arg-type]
    assert decode(encode(close)) == StreamClose(logical_stream_id=1, code=CloseCode.TIMEOUT)
    hello = Hello(features=3)  # type: ignore[arg-type]
    assert decode(encode(hello)) == Hello(features=Features.STRUCTURED_METADATA | 2)


def test_payload_size_limit_on_encode() -> None:
    # OpenRequest overhead: tag 4 + id 8 + len 8 + metadata tag 4 + flags 1 = 25 bytes.
    fits = OpenRequest(request_id=1, service="s" * (MAX_FRAME_PAYLOAD - 25))
    assert len(encode(fits)) == MAX_FRAME_PAYLOAD
    assert decode(encode(fits)) == fits
    too_big = OpenRequest(request_id=1, service="s" * (MAX_FRAME_PAYLOAD - 24))
    with pytest.raises(EncodeError, match="65537 bytes exceeds the maximum frame payload 65536"):
        encode(too_big)


def test_decode_rejects_oversized_payload_and_non_bytes() -> None:
    with pytest.raises(ProtocolError, match="exceeds the maximum frame payload"):
        decode(bytes(MAX_FRAME_PAYLOAD + 1))
    for bad in ("05000000", None, 12, [5, 0, 0, 0]):
        with pytest.raises(ProtocolError, match="bytes-like"):
            decode(bad)  # type: ignore[arg-type]


def test_decode_accepts_any_bytes_like() -> None:
    payload = encode(Ping(sequence=7))
    assert decode(bytearray(payload)) == Ping(sequence=7)
    assert decode(memoryview(b"xx" + payload)[2:]) == Ping(sequence=7)


def test_decode_reports_field_and_offset() -> None:
    accepted = encode(OpenResponse(request_id=1, status=OpenStatus.ACCEPTED, logical_stream_id=3))
    with pytest.raises(ProtocolError, match=r"logical_stream_id: invalid Option tag 7 at offset"):
        decode(accepted[:-9] + b"\x07" + accepted[-8:])
    with pytest.raises(ProtocolError, match=r"OpenResponse\.logical_stream_id: unexpected end"):
        decode(accepted[:-1])
    with pytest.raises(ProtocolError, match=r"Ping\.sequence: unexpected end of payload"):
        decode(encode(Ping(sequence=1))[:7])
    with pytest.raises(ProtocolError, match=r"HelloAck: 1 trailing bytes"):
        decode(encode(HelloAck(selected_version=1, selected_features=Features(0))) + b"\x00")


def test_decode_huge_lengths_fail_fast() -> None:
    """Lengths claiming 2**64-1 bytes are refused by comparison, never allocated."""
    agent = struct.pack("<IHIBQ", 0, 1, 0, 1, U64_MAX) + b"abc"
    with pytest.raises(ProtocolError, match=r"Hello\.agent: length 18446744073709551615"):
        decode(agent)
    head = struct.pack("<IQQ", 2, 1, 1) + b"e"
    with pytest.raises(ProtocolError, match="map count 18446744073709551615"):
        decode(head + struct.pack("<IQ", 2, U64_MAX) + b"\x00" * 40)
    # A count that fits the remaining bytes only nominally still fails on the entries.
    entry_key_huge = struct.pack("<IQQ", 2, 2, U64_MAX)
    with pytest.raises(ProtocolError, match="entry 0 key: length 18446744073709551615"):
        decode(head + entry_key_huge + b"\x00" * 40)


def test_decoded_flags_keep_unknown_bits() -> None:
    hello = decode(bytes.fromhex("000000000100ffffffff00"))
    assert isinstance(hello, Hello)
    assert int(hello.features) == 0xFFFF_FFFF
    assert Features.PING_PONG in hello.features
    request = OpenRequest(request_id=1, service="x", flags=OpenFlags(0xF2))
    decoded = decode(encode(request))
    assert isinstance(decoded, OpenRequest)
    assert int(decoded.flags) == 0xF2 and OpenFlags.HIGH_PRIORITY in decoded.flags


def test_metadata_kinds() -> None:
    assert Metadata.EMPTY.kind is MetadataKind.EMPTY and Metadata.EMPTY.is_empty
    raw = Metadata.from_bytes(bytearray(b"\x00\xff"))
    assert (raw.kind, raw.data, raw.entries) == (MetadataKind.BYTES, b"\x00\xff", ())
    assert raw != Metadata.from_bytes(b"") != Metadata.EMPTY
    assert Metadata.structured({}) != Metadata.EMPTY
    assert Metadata.structured({}).kind is MetadataKind.STRUCTURED
    with pytest.raises(TypeError):
        Metadata()


def test_metadata_structured_keeps_order_and_types() -> None:
    meta = Metadata.structured([("z", 1), ("a", True), ("m", "text"), ("b", b"\x01")])
    assert meta.entries == (("z", 1), ("a", True), ("m", "text"), ("b", b"\x01"))
    assert meta.get("a") is True and meta.get("missing", 5) == 5
    assert meta.as_dict() == {"z": 1, "a": True, "m": "text", "b": b"\x01"}
    assert Metadata.structured({"z": 1, "a": True}).entries == (("z", 1), ("a", True))
    request = OpenRequest(request_id=1, service="s", metadata=meta)
    decoded = decode(encode(request))
    assert isinstance(decoded, OpenRequest)
    assert decoded.metadata.entries == meta.entries  # wire order kept both ways
    assert type(decoded.metadata.get("a")) is bool and type(decoded.metadata.get("z")) is int


def test_metadata_equality_ignores_order_but_not_types() -> None:
    one = Metadata.structured([("a", 1), ("b", "x")])
    other = Metadata.structured([("b", "x"), ("a", 1)])
    assert one == other and hash(one) == hash(other)
    assert encode(OpenRequest(request_id=1, service="", metadata=one)) != encode(
        OpenRequest(request_id=1, service="", metadata=other)
    )
    assert Metadata.structured({"a": True}) != Metadata.structured({"a": 1})
    assert Metadata.structured({"a": b"x"}) != Metadata.structured({"a": "x"})
    assert Metadata.from_bytes(b"x") != Metadata.structured({"x": b""})
    assert len({one, other, Metadata.EMPTY}) == 2


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([("a", 1), ("a", 2)], "duplicate key 'a'"),
        ({"a": 2**63}, "out of range for i64"),
        ({"a": -(2**63) - 1}, "out of range for i64"),
        ({"a": 1.5}, "unsupported type float"),
        ({"a": None}, "unsupported type NoneType"),
        ([(1, "x")], "key of entry 0 must be str"),
        ([("a",)], "entry 0 is not a"),
        ({"\udc80": 1}, "not encodable as UTF-8"),
        ({"a": "\udc80"}, "not encodable as UTF-8"),
    ],
)
def test_metadata_structured_validation(entries: object, match: str) -> None:
    with pytest.raises(EncodeError, match=match):
        Metadata.structured(entries)  # type: ignore[arg-type]


def test_metadata_i64_bounds_round_trip() -> None:
    meta = Metadata.structured({"lo": -(2**63), "hi": 2**63 - 1})
    decoded = decode(encode(OpenRequest(request_id=1, service="s", metadata=meta)))
    assert isinstance(decoded, OpenRequest) and decoded.metadata == meta


def test_metadata_of_and_pickle() -> None:
    assert Metadata.of(None) is Metadata.EMPTY
    assert Metadata.of(b"ab") == Metadata.from_bytes(b"ab")
    assert Metadata.of({"k": 1}) == Metadata.structured({"k": 1})
    meta = Metadata.structured({"k": 1})
    assert Metadata.of(meta) is meta
    with pytest.raises(EncodeError):
        Metadata.of("text")  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        Metadata.from_bytes("text")  # type: ignore[arg-type]
    for value in (Metadata.EMPTY, Metadata.from_bytes(b"\x00"), meta):
        assert pickle.loads(pickle.dumps(value)) == value
    assert repr(meta) == "Metadata.structured([('k', 1)])"


def test_duplicate_key_rejected_on_decode() -> None:
    good = encode(
        OpenRequest(request_id=1, service="e", metadata=Metadata.structured([("k", 1), ("j", 2)]))
    )
    dup = good.replace(b"\x01\x00\x00\x00\x00\x00\x00\x00j", b"\x01\x00\x00\x00\x00\x00\x00\x00k")
    assert dup != good
    with pytest.raises(ProtocolError, match="entry 1 duplicate key 'k'"):
        decode(dup)


def test_unusual_buffers_only_raise_typed_errors() -> None:
    """Released and non-contiguous views: decoders raise ProtocolError, encoders EncodeError."""

    released = memoryview(encode(Ping(sequence=1)))
    released.release()
    decoders = (decode, decode_frame, FrameReader().feed, StreamBind.decode)
    for decoder in decoders:
        with pytest.raises(ProtocolError, match="not a readable byte buffer"):
            decoder(released)
    with pytest.raises(EncodeError, match="not a readable byte buffer"):
        encode_frame(released)
    with pytest.raises(EncodeError, match="unreadable buffer"):
        Metadata.from_bytes(released)
    strided = memoryview(b"x".join(bytes([b]) for b in encode(Ping(sequence=3))))[::2]
    assert decode(strided) == Ping(sequence=3)
    assert FrameReader().feed(memoryview(encode_frame(b"ab") * 2)[::1]) == [b"ab", b"ab"]


_HEAD = struct.pack("<IQQ", 2, 1, 1) + b"e" + struct.pack("<IQ", 2, 1)  # 1-entry map


def _key(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (struct.pack("<Q", 50) + bytes(10), r"entry 0 key: length 50 at offset 33 exceeds"),
        (_key(b"\xff") + struct.pack("<I", 1) + bytes(9), r"entry 0 key: invalid UTF-8 at byte 0"),
        (_key(b"k") + struct.pack("<I", 1) + bytes(3) + bytes(2), r"entry 0 value\.Integer: unex"),
        (
            _key(b"k") + struct.pack("<IQ", 0, 2**64 - 1) + bytes(4),
            r"entry 0 value\.String: length 1844",
        ),
        (
            _key(b"k") + struct.pack("<IQ", 0, 1) + b"\xc3\x00",
            r"entry 0 value\.String: invalid UTF-8",
        ),
        (_key(b"k") + struct.pack("<I", 2), r"entry 0 value\.Boolean: unexpected end"),
        (
            _key(b"k") + struct.pack("<IQ", 3, 99) + bytes(3),
            r"entry 0 value\.Bytes: length 99 at offset",
        ),
        (
            _key(b"k") + struct.pack("<I", 9) + bytes(3),
            r"entry 0 value: unknown MetadataValue variant 9",
        ),
    ],
)
def test_structured_metadata_errors_name_the_entry(tail: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=r"OpenRequest\.metadata\.Structured " + match):
        decode(_HEAD + tail)
