"""Load the reference vectors (tests/data/reference-v1.json) and rebuild their values.

The vector file was produced by the Rust reference implementation (crate
``quic-reverse`` 0.1.x) and copied unchanged from the shared specification folder;
see ``tests/data/README.md``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from quic_reverse.wire import (
    CloseCode,
    Features,
    Hello,
    HelloAck,
    Message,
    Metadata,
    MetadataValue,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    Ping,
    Pong,
    RejectCode,
    StreamBind,
    StreamClose,
)

VECTOR_FILE = Path(__file__).resolve().parent.parent / "data" / "reference-v1.json"

_ABBREVIATED = re.compile(r"^([0-9a-f]*)\.\.\.\((\d+) bytes total\)$")

_REJECT = {
    "ServiceUnavailable": RejectCode.SERVICE_UNAVAILABLE,
    "UnsupportedService": RejectCode.UNSUPPORTED_SERVICE,
    "LimitExceeded": RejectCode.LIMIT_EXCEEDED,
    "Unauthorized": RejectCode.UNAUTHORIZED,
    "InternalError": RejectCode.INTERNAL_ERROR,
}
_CLOSE = {"Normal": CloseCode.NORMAL, "Error": CloseCode.ERROR}
_CLOSE.update({"Timeout": CloseCode.TIMEOUT, "Reset": CloseCode.RESET})


@cache
def load() -> tuple[dict[str, Any], ...]:
    """All vector entries, in file order."""
    entries = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
    assert isinstance(entries, list)
    return tuple(entries)


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [entry for entry in load() if entry["kind"] == kind]


def unhex(text: str) -> bytes:
    """Hex to bytes; abbreviated inputs ("<hex>...(N bytes total)") are zero-padded to N.

    The two abbreviated vectors are a length prefix followed by zero bytes, so the
    visible hex is the start of the input and the rest is zeros.
    """
    match = _ABBREVIATED.match(text)
    if match is None:
        return bytes.fromhex(text)
    head = bytes.fromhex(match.group(1))
    total = int(match.group(2))
    return head + bytes(total - len(head))


def _metadata_value(desc: dict[str, Any]) -> MetadataValue:
    kind = desc["type"]
    if kind == "Bytes":
        return bytes.fromhex(desc["hex"])
    value = desc["value"]
    expected = {"String": str, "Integer": int, "Boolean": bool}[kind]
    assert type(value) is expected, desc
    assert isinstance(value, str | int | bytes)
    return value


def metadata(desc: dict[str, Any]) -> Metadata:
    kind = desc["type"]
    if kind == "Empty":
        return Metadata.EMPTY
    if kind == "Bytes":
        return Metadata.from_bytes(bytes.fromhex(desc["hex"]))
    assert kind == "Structured", desc
    return Metadata.structured([(e["key"], _metadata_value(e["value"])) for e in desc["entries"]])


def message(desc: dict[str, Any]) -> Message:
    """Build the message a vector's neutral description stands for."""
    kind = desc["type"]
    if kind == "Hello":
        return Hello(
            protocol_version=desc["protocol_version"],
            features=Features(desc["features"]),
            agent=desc["agent"],
        )
    if kind == "HelloAck":
        return HelloAck(
            selected_version=desc["selected_version"],
            selected_features=Features(desc["selected_features"]),
        )
    if kind == "OpenRequest":
        return OpenRequest(
            request_id=desc["request_id"],
            service=desc["service"],
            metadata=metadata(desc["metadata"]),
            flags=OpenFlags(desc["flags"]),
        )
    if kind == "OpenResponse":
        status_desc = desc["status"]
        status = (
            OpenStatus.ACCEPTED
            if status_desc["type"] == "Accepted"
            else OpenStatus.rejected(_REJECT[status_desc["code"]])
        )
        return OpenResponse(
            request_id=desc["request_id"],
            status=status,
            reason=desc["reason"],
            logical_stream_id=desc["logical_stream_id"],
        )
    if kind == "StreamClose":
        return StreamClose(
            logical_stream_id=desc["logical_stream_id"],
            code=_CLOSE[desc["code"]],
            reason=desc["reason"],
        )
    if kind == "Ping":
        return Ping(sequence=desc["sequence"])
    if kind == "Pong":
        return Pong(sequence=desc["sequence"])
    raise AssertionError(f"unknown message type in vector: {kind}")


def stream_bind(desc: dict[str, Any]) -> StreamBind:
    assert desc["type"] == "StreamBind"
    return StreamBind(desc["logical_stream_id"])
