"""Golden vectors from the Rust reference: exact bytes both ways, and every malformed input.

Our strictness choices (docs/PROTOCOL.md, "Strictness"): trailing bytes after a message
and duplicate structured-metadata keys are rejected although the reference accepts
them; unknown Features/OpenFlags bits are accepted and preserved, like the reference.
"""

from __future__ import annotations

from typing import Any

import pytest

from quic_reverse.errors import ProtocolError
from quic_reverse.wire import (
    MAX_FRAME_PAYLOAD,
    FrameReader,
    StreamBind,
    decode,
    decode_frame,
    encode,
    encode_frame,
    encode_message_frame,
)

from . import vectors

MESSAGES = vectors.of_kind("message")
BINDS = vectors.of_kind("stream_bind")
MALFORMED = vectors.of_kind("malformed")


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["name"] for entry in entries]


def test_vector_file_is_complete() -> None:
    assert (len(MESSAGES), len(BINDS), len(MALFORMED)) == (104, 5, 42)
    assert len(set(_ids(list(vectors.load())))) == len(vectors.load())


@pytest.mark.parametrize("entry", MESSAGES, ids=_ids(MESSAGES))
def test_message_vector(entry: dict[str, Any]) -> None:
    message = vectors.message(entry["message"])
    payload = bytes.fromhex(entry["payload_hex"])
    frame = bytes.fromhex(entry["frame_hex"])
    assert encode(message) == payload
    assert encode_frame(payload) == frame
    assert encode_message_frame(message) == frame
    decoded = decode(payload)
    assert decoded == message
    assert type(decoded) is type(message)
    assert FrameReader().feed(frame) == [payload]


@pytest.mark.parametrize("entry", BINDS, ids=_ids(BINDS))
def test_stream_bind_vector(entry: dict[str, Any]) -> None:
    bind = vectors.stream_bind(entry["message"])
    raw = bytes.fromhex(entry["payload_hex"])
    assert entry["frame_hex"] == entry["payload_hex"]
    assert bind.encode() == raw
    assert StreamBind.decode(raw) == bind


# Malformed codec inputs the reference rejects, with the "where" our error must name.
_CODEC_WHERE = {
    "mal_empty_payload": "variant index",
    "mal_truncated_discriminant": "variant index",
    "mal_truncated_hello_last_byte": "Hello.agent",
    "mal_truncated_hello_in_features": "Hello.features",
    "mal_truncated_hello_before_option": "Hello.agent",
    "mal_truncated_open_request_in_string": "OpenRequest.service",
    "mal_truncated_open_request_no_flags": "OpenRequest.flags",
    "mal_unknown_message_discriminant_7": "unknown variant 7",
    "mal_unknown_message_discriminant_ffffffff": "unknown variant 4294967295",
    "mal_message_discriminant_big_endian_1": "unknown variant 16777216",
    "mal_unknown_reject_code_5": "RejectCode variant 5",
    "mal_unknown_open_status_2": "OpenResponse.status: unknown variant 2",
    "mal_unknown_close_code_4": "StreamClose.code: unknown CloseCode variant 4",
    "mal_unknown_metadata_variant_3": "OpenRequest.metadata: unknown variant 3",
    "mal_unknown_metadata_value_variant_4": "MetadataValue variant 4",
    "mal_bool_value_2": "invalid bool byte 2",
    "mal_option_tag_2": "Hello.agent: invalid Option tag 2",
    "mal_invalid_utf8_service": "OpenRequest.service: invalid UTF-8",
    "mal_invalid_utf8_agent": "Hello.agent: invalid UTF-8",
    "mal_utf8_surrogate_agent": "Hello.agent: invalid UTF-8",
    "mal_huge_string_length": "OpenRequest.service: length 18446744073709551615",
    "mal_huge_bytes_length": "OpenRequest.metadata.Bytes: length",
    "mal_huge_map_count": "map count 18446744073709551615",
    # Accepted by the reference, rejected by our strict decoder:
    "mal_trailing_bytes_after_ping": "Ping: 3 trailing bytes",
    "mal_trailing_message_after_hello": "Hello: 12 trailing bytes",
    "mal_duplicate_map_key": "duplicate key 'k'",
}
# Accepted by the reference and by us (unknown flag bits are preserved).
_CODEC_ACCEPT = {"mal_unknown_feature_bits", "mal_unknown_open_flag_bits"}


def _check_codec(entry: dict[str, Any], data: bytes) -> None:
    name = entry["name"]
    if name in _CODEC_ACCEPT:
        assert entry["result"] == "accept"
        decoded = decode(data)
        assert decoded == vectors.message(entry["decoded"])
        assert encode(decoded) == data  # unknown bits survive the round trip
        return
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert _CODEC_WHERE[name] in str(info.value)
    if entry["result"] == "accept":
        # Reference leniency: what it decoded from the consumed prefix we decode too
        # (for the duplicate key, only the reference's "last value wins" differs).
        consumed = entry["consumed_bytes"]
        if entry["ignored_trailing_bytes"]:
            assert decode(data[:consumed]) == vectors.message(entry["decoded"])
        else:
            assert name == "mal_duplicate_map_key"
    else:
        assert entry["result"] == "reject"


def _check_framing(entry: dict[str, Any], data: bytes) -> None:
    expect = entry["decode_frame"]
    if expect["result"] == "accept":
        payload, consumed = decode_frame(data)
        assert len(payload) == expect["payload_len"]
        assert payload == vectors.unhex(expect["payload_hex"])
        assert consumed == 4 + len(payload)
    else:
        assert expect["result"] == "reject"
        with pytest.raises(ProtocolError) as info:
            decode_frame(data)
        assert str(info.value) == expect["error"]

    expect = entry["frame_reader"]
    reader = FrameReader()
    if expect["result"] == "frame":
        frames = reader.feed(data)
        assert frames[:1] == [vectors.unhex(expect["payload_hex"])]
        assert len(frames[0]) == expect["payload_len"]
        # The reference reads one frame; anything after it stays buffered for later.
        assert sum(len(f) + 4 for f in frames[1:]) + reader.buffered == expect["left_buffered"]
    elif expect["result"] == "need_more_data":
        assert reader.feed(data) == []
        assert reader.buffered == expect["buffered"]
    else:
        assert expect["result"] == "reject"
        # Rejected on the 4-byte prefix alone, before any body byte is buffered.
        with pytest.raises(ProtocolError) as info:
            reader.feed(data[:4])
        assert str(info.value) == expect["error"]
        assert reader.buffered == 0
        with pytest.raises(ProtocolError):
            FrameReader().feed(data)


def _check_bind(entry: dict[str, Any], data: bytes) -> None:
    if entry["result"] == "accept":
        assert StreamBind.decode(data) == vectors.stream_bind(entry["decoded"])
    else:
        assert entry["result"] == "reject (None)"
        with pytest.raises(ProtocolError):
            StreamBind.decode(data)


@pytest.mark.parametrize("entry", MALFORMED, ids=_ids(MALFORMED))
def test_malformed_vector(entry: dict[str, Any]) -> None:
    data = vectors.unhex(entry["input_hex"])
    layer = entry["layer"]
    if layer.startswith("codec."):
        _check_codec(entry, data)
    elif layer.startswith("framing"):
        _check_framing(entry, data)
    elif layer.startswith("StreamBind"):
        _check_bind(entry, data)
    else:
        raise AssertionError(f"unknown layer {layer!r}")


def test_abbreviated_vectors_have_their_stated_size() -> None:
    sizes = {e["name"]: len(vectors.unhex(e["input_hex"])) for e in MALFORMED}
    assert sizes["frame_len_65537"] == 104
    assert sizes["frame_len_65536_complete"] == 4 + MAX_FRAME_PAYLOAD
