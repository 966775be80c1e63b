"""Golden vectors of the datagram-flow extension (tests/data/flows-v1.json, PROTOCOL.md §9)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from quic_reverse.errors import EncodeError, ProtocolError
from quic_reverse.wire import (
    CloseCode,
    Features,
    FlowClose,
    Hello,
    HelloAck,
    Message,
    Metadata,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    RejectCode,
    decode,
    decode_datagram,
    decode_flow_close,
    encode,
    encode_datagram,
    encode_flow_close,
    encode_frame,
)
from quic_reverse.wire.flows import datagram_header_size, flow_accepted_by_client

VECTORS: list[dict[str, Any]] = json.loads(
    (pathlib.Path(__file__).parents[1] / "data" / "flows-v1.json").read_text("utf-8")
)


def _of(kind: str) -> list[dict[str, Any]]:
    return [v for v in VECTORS if v["kind"] == kind]


# The values behind the "message" vectors, spelled out independently of the file.
MESSAGES: dict[str, Message] = {
    "hello_datagram_flows": Hello(
        protocol_version=1, features=Features.PING_PONG | Features.DATAGRAM_FLOWS, agent=None
    ),
    "hello_ack_datagram_flows": HelloAck(
        selected_version=1, selected_features=Features.DATAGRAM_FLOWS
    ),
    "flow_request_dns": OpenRequest(
        request_id=1, service="dns", metadata=Metadata.EMPTY, flags=OpenFlags.DATAGRAM
    ),
    "flow_request_meta": OpenRequest(
        request_id=7,
        service="wg",
        metadata=Metadata.structured({"client": "127.0.0.1:5353"}),
        flags=OpenFlags.DATAGRAM,
    ),
    "flow_accepted_server": OpenResponse(
        request_id=1, status=OpenStatus.ACCEPTED, logical_stream_id=2
    ),
    "flow_accepted_client": OpenResponse(
        request_id=1, status=OpenStatus.ACCEPTED, logical_stream_id=1
    ),
    "flow_rejected_limit": OpenResponse(
        request_id=3, status=OpenStatus.rejected(RejectCode.LIMIT_EXCEEDED), reason="flows"
    ),
}


def test_vector_file_covers_every_kind() -> None:
    kinds = {v["kind"] for v in VECTORS}
    assert kinds == {
        "message",
        "flow_close",
        "datagram",
        "malformed_datagram",
        "malformed_flow_close",
        "base_decode_rejects",
    }
    assert {v["name"] for v in _of("message")} == set(MESSAGES)


def test_extension_bits_are_outside_the_reference_ones() -> None:
    assert int(Features.DATAGRAM_FLOWS) == 0x0001_0000
    assert int(OpenFlags.DATAGRAM) == 0x80
    assert not int(Features.DATAGRAM_FLOWS) & 0x7  # the Rust crate's three bits
    assert not int(OpenFlags.DATAGRAM) & 0x3


@pytest.mark.parametrize("vec", _of("message"), ids=lambda v: v["name"])
def test_message_vectors(vec: dict[str, Any]) -> None:
    message = MESSAGES[vec["name"]]
    assert encode(message).hex() == vec["payload_hex"]
    assert encode_frame(encode(message)).hex() == vec["frame_hex"]
    assert decode(bytes.fromhex(vec["payload_hex"])) == message


@pytest.mark.parametrize("vec", _of("flow_close"), ids=lambda v: v["name"])
def test_flow_close_vectors(vec: dict[str, Any]) -> None:
    message = FlowClose(flow_id=vec["flow_id"], code=CloseCode[vec["code"]], reason=vec["reason"])
    payload = encode_flow_close(message)
    assert payload.hex() == vec["payload_hex"]
    assert encode_frame(payload).hex() == vec["frame_hex"]
    assert decode_flow_close(payload) == message


def test_flow_close_byte_layout() -> None:
    """PROTOCOL.md §9's worked example, byte by byte."""
    payload = encode_flow_close(FlowClose(flow_id=3, code=CloseCode.TIMEOUT, reason="idle"))
    assert payload == (
        bytes.fromhex("07000000")  # variant 7
        + (3).to_bytes(8, "little")  # flow_id
        + (2).to_bytes(4, "little")  # CloseCode::Timeout
        + b"\x01"
        + (4).to_bytes(8, "little")
        + b"idle"
    )


@pytest.mark.parametrize("vec", _of("datagram"), ids=lambda v: v["name"])
def test_datagram_vectors(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["data_hex"])
    wire = encode_datagram(vec["flow_id"], data)
    assert wire.hex() == vec["datagram_hex"]
    assert decode_datagram(wire) == (vec["flow_id"], data)
    assert len(wire) == datagram_header_size(vec["flow_id"]) + len(data)


@pytest.mark.parametrize("vec", _of("malformed_datagram"), ids=lambda v: v["name"])
def test_malformed_datagrams(vec: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match=vec["error"]):
        decode_datagram(bytes.fromhex(vec["input_hex"]))


@pytest.mark.parametrize("vec", _of("malformed_flow_close"), ids=lambda v: v["name"])
def test_malformed_flow_close(vec: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match=vec["error"]):
        decode_flow_close(bytes.fromhex(vec["input_hex"]))


def test_base_decoder_still_rejects_variant_7() -> None:
    (vec,) = _of("base_decode_rejects")
    with pytest.raises(ProtocolError, match=vec["error"]):
        decode(bytes.fromhex(vec["input_hex"]))


@pytest.mark.parametrize(
    "bad",
    [
        FlowClose(flow_id=0),
        FlowClose(flow_id=2**62),
        FlowClose(flow_id=1, code=7),  # type: ignore[arg-type]
        FlowClose(flow_id=1, reason="\ud800"),
        FlowClose(flow_id=1, reason=b"x"),  # type: ignore[arg-type]
    ],
)
def test_flow_close_encode_errors(bad: FlowClose) -> None:
    with pytest.raises(EncodeError):
        encode_flow_close(bad)


@pytest.mark.parametrize("fid", [0, -1, 2**62, True, "1"])
def test_encode_datagram_rejects_bad_ids(fid: object) -> None:
    with pytest.raises(EncodeError):
        encode_datagram(fid, b"x")  # type: ignore[arg-type]


def test_decoders_take_only_bytes() -> None:
    with pytest.raises(ProtocolError):
        decode_datagram(42)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        decode_flow_close("x")  # type: ignore[arg-type]


def test_parity_names_the_accepting_role() -> None:
    assert flow_accepted_by_client(1) and flow_accepted_by_client(3)
    assert not flow_accepted_by_client(2)
