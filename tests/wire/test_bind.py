"""StreamBind header: 13 raw bytes, "QRBV", version 1, u64 big-endian id."""

from __future__ import annotations

import pytest

from quic_reverse.errors import EncodeError, ProtocolError
from quic_reverse.wire import STREAM_BIND_SIZE, StreamBind


def test_layout() -> None:
    raw = StreamBind(0x0102030405060708).encode()
    assert len(raw) == STREAM_BIND_SIZE == 13
    assert raw == b"QRBV\x01\x01\x02\x03\x04\x05\x06\x07\x08"
    assert StreamBind.decode(bytearray(raw)) == StreamBind(logical_stream_id=0x0102030405060708)
    assert StreamBind.decode(memoryview(raw)).logical_stream_id == 0x0102030405060708


@pytest.mark.parametrize("value", [-1, 2**64, 1.0, "1", None, True])
def test_encode_rejects_non_u64(value: object) -> None:
    with pytest.raises(EncodeError, match=r"StreamBind\.logical_stream_id"):
        StreamBind(value).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "expected 13 bytes, got 0"),
        (b"QRBV\x01" + bytes(7), "expected 13 bytes, got 12"),
        (b"QRBV\x01" + bytes(9), "expected 13 bytes, got 14"),
        (b"qRBV\x01" + bytes(8), "StreamBind.magic"),
        (b"QRBV\x02" + bytes(8), "StreamBind.version: unsupported version 2"),
        ("QRBV\x01" + "\x00" * 8, "bytes-like"),
        (None, "bytes-like"),
    ],
)
def test_decode_rejects(data: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        StreamBind.decode(data)  # type: ignore[arg-type]
