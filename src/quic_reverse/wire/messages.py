"""Control messages of wire protocol v1 as immutable typed values.

Every message is a frozen, slotted, keyword-only dataclass whose fields are named
exactly as in the protocol description (``docs/PROTOCOL.md``). The values carry no
wire logic: :mod:`quic_reverse.wire.codec` turns them into bytes and back.

Range checks (u16/u32/u64/u8, i64) happen when a message is encoded, not when it
is constructed, so decoding stays cheap; :class:`Metadata` is the exception: it is
validated and pre-encoded once, when it is built, because it is a container whose
contents are otherwise awkward to check.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from ..errors import EncodeError

__all__ = [
    "PROTOCOL_VERSION",
    "CloseCode",
    "Features",
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
    "StreamClose",
]

PROTOCOL_VERSION = 1
"""The only protocol version this implementation speaks."""

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_TAG_STR = _U32.pack(0)
_TAG_INT = _U32.pack(1)
_TAG_BOOL = _U32.pack(2)
_TAG_BYTES = _U32.pack(3)


class Features(enum.IntFlag, boundary=enum.KEEP):
    """Optional protocol features announced in ``Hello`` (u32 on the wire).

    Bits this version does not know are kept, never rejected: ``Features(0xFF)``
    round-trips unchanged.
    """

    STRUCTURED_METADATA = 0x01
    PING_PONG = 0x02
    STREAM_PRIORITY = 0x04
    #: Extension (not in the Rust crate): datagram flows, see docs/PROTOCOL.md §9.
    DATAGRAM_FLOWS = 0x0001_0000


class OpenFlags(enum.IntFlag, boundary=enum.KEEP):
    """Flags of an ``OpenRequest`` (u8 on the wire). Unknown bits are kept."""

    UNIDIRECTIONAL = 0x01
    HIGH_PRIORITY = 0x02
    #: Extension (not in the Rust crate): the request asks for a datagram flow, sent
    #: only when both sides negotiated ``Features.DATAGRAM_FLOWS`` (PROTOCOL.md §9).
    DATAGRAM = 0x80


_NO_FEATURES = Features(0)
_NO_FLAGS = OpenFlags(0)


class RejectCode(enum.IntEnum):
    """Why an open request was rejected. The value is the wire variant index."""

    SERVICE_UNAVAILABLE = 0
    UNSUPPORTED_SERVICE = 1
    LIMIT_EXCEEDED = 2
    UNAUTHORIZED = 3
    INTERNAL_ERROR = 4


class CloseCode(enum.IntEnum):
    """Why a logical stream (or, with id 0, the session) is closed. Wire index, u32."""

    NORMAL = 0
    ERROR = 1
    TIMEOUT = 2
    RESET = 3


@dataclass(frozen=True, slots=True)
class OpenStatus:
    """Outcome of an open request: accepted (``code is None``) or rejected with a code.

    Use :attr:`OpenStatus.ACCEPTED` and :meth:`OpenStatus.rejected` rather than the
    constructor; both return shared instances.
    """

    code: RejectCode | None = None

    ACCEPTED: ClassVar[OpenStatus]

    @property
    def accepted(self) -> bool:
        """True when the peer accepted the open."""
        return self.code is None

    @classmethod
    def rejected(cls, code: RejectCode | int) -> OpenStatus:
        """The status "rejected with ``code``" (an int is converted to :class:`RejectCode`).

        Raises :class:`EncodeError` for a value that is not a reject code.
        """
        try:
            return _REJECTED[code]
        except (KeyError, TypeError):
            raise EncodeError(f"OpenStatus.rejected: {code!r} is not a RejectCode") from None


OpenStatus.ACCEPTED = OpenStatus()
_REJECTED: dict[object, OpenStatus] = {c: OpenStatus(c) for c in RejectCode}


class MetadataKind(enum.Enum):
    """The three shapes of metadata; the value is the wire variant index."""

    EMPTY = 0
    BYTES = 1
    STRUCTURED = 2


MetadataValue: TypeAlias = str | int | bool | bytes
"""A structured metadata value: String, Integer (i64), Boolean or Bytes on the wire.

``bool`` is always encoded as Boolean, never as Integer.
"""

_Entries: TypeAlias = tuple[tuple[str, MetadataValue], ...]


def _value_tag(value: MetadataValue) -> int:
    """Wire variant index of a metadata value (bool checked before int)."""
    if isinstance(value, bool):
        return 2
    if isinstance(value, int):
        return 1
    if isinstance(value, str):
        return 0
    return 3


class Metadata:
    """Metadata attached to an ``OpenRequest``: empty, opaque bytes, or a structured map.

    Build one with :attr:`Metadata.EMPTY`, :meth:`Metadata.from_bytes` or
    :meth:`Metadata.structured`; inspect it with :attr:`kind`, :attr:`data`,
    :attr:`entries`, :meth:`get` and :meth:`as_dict`.

    A structured map keeps the caller's order of entries, which is the order they are
    encoded in; equality and hashing ignore that order (the wire map is unordered), but
    distinguish value types (``True`` is not ``1``). Keys are unique: a duplicate key is
    an :class:`EncodeError` here and a protocol error when decoding. Values are checked
    (i64 range, str/int/bool/bytes only) when the metadata is built, and the wire form is
    computed once then reused for every encode.
    """

    __slots__ = ("_data", "_entries", "_kind", "_wire")

    EMPTY: ClassVar[Metadata]

    _kind: MetadataKind
    _data: bytes | None
    _entries: _Entries
    _wire: bytes

    def __init__(self) -> None:
        raise TypeError(
            "use Metadata.EMPTY, Metadata.from_bytes() or Metadata.structured() to build Metadata"
        )

    @classmethod
    def _make(
        cls, kind: MetadataKind, data: bytes | None, entries: _Entries, wire: bytes
    ) -> Metadata:
        """Internal constructor: no validation (callers have validated and encoded)."""
        self = object.__new__(cls)
        self._kind = kind
        self._data = data
        self._entries = entries
        self._wire = wire
        return self

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Metadata:
        """Opaque metadata bytes (``Metadata::Bytes``). ``b""`` is distinct from EMPTY."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise EncodeError(f"Metadata.from_bytes: expected bytes, got {type(data).__name__}")
        try:
            raw = bytes(data)
        except (TypeError, ValueError, BufferError) as exc:
            raise EncodeError(f"Metadata.from_bytes: unreadable buffer ({exc})") from None
        return cls._make(MetadataKind.BYTES, raw, (), _TAG_BYTES_META + _U64.pack(len(raw)) + raw)

    @classmethod
    def structured(
        cls,
        entries: Mapping[str, MetadataValue] | Iterable[tuple[str, MetadataValue]] = (),
    ) -> Metadata:
        """Structured metadata (``Metadata::Structured``) from a mapping or ``(key, value)`` pairs.

        Values may be ``str``, ``int`` (i64), ``bool`` or bytes-like. Raises
        :class:`EncodeError` for a non-str key, a duplicate key, an integer outside i64,
        a value of another type, or text that cannot be UTF-8 encoded.
        """
        items: Iterable[object]
        if isinstance(entries, Mapping):
            items = entries.items()
        elif isinstance(entries, Iterable) and not isinstance(entries, str):
            items = entries
        else:
            raise EncodeError(
                "Metadata.structured: expected a mapping or (key, value) pairs, "
                f"got {type(entries).__name__}"
            )
        out: list[tuple[str, MetadataValue]] = []
        seen: set[str] = set()
        parts: list[bytes] = []
        for index, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise EncodeError(
                    f"Metadata.structured: entry {index} is not a (key, value) pair: {item!r}"
                )
            key, value = item
            if not isinstance(key, str):
                raise EncodeError(
                    f"Metadata.structured: key of entry {index} must be str, "
                    f"got {type(key).__name__}"
                )
            if key in seen:
                raise EncodeError(f"Metadata.structured: duplicate key {key!r}")
            seen.add(key)
            key_bytes = _encode_text(key, f"Metadata key {key!r}")
            parts.append(_U64.pack(len(key_bytes)))
            parts.append(key_bytes)
            norm: MetadataValue
            if isinstance(value, bool):
                norm = value
                parts.append(_TAG_BOOL + (b"\x01" if value else b"\x00"))
            elif isinstance(value, int):
                if not I64_MIN <= value <= I64_MAX:
                    raise EncodeError(
                        f"Metadata value for {key!r}: integer {value} out of range for i64"
                    )
                norm = int(value)
                parts.append(_TAG_INT + _I64.pack(norm))
            elif isinstance(value, str):
                norm = str(value)
                raw = _encode_text(norm, f"Metadata value for {key!r}")
                parts.append(_TAG_STR + _U64.pack(len(raw)) + raw)
            elif isinstance(value, bytes | bytearray | memoryview):
                norm = bytes(value)
                parts.append(_TAG_BYTES + _U64.pack(len(norm)) + norm)
            else:
                raise EncodeError(
                    f"Metadata value for {key!r}: unsupported type {type(value).__name__} "
                    "(expected str, int, bool or bytes)"
                )
            out.append((key, norm))
        wire = _TAG_STRUCTURED_META + _U64.pack(len(out)) + b"".join(parts)
        return cls._make(MetadataKind.STRUCTURED, None, tuple(out), wire)

    @classmethod
    def of(
        cls,
        value: Metadata
        | bytes
        | bytearray
        | memoryview
        | Mapping[str, MetadataValue]
        | Iterable[tuple[str, MetadataValue]]
        | None,
    ) -> Metadata:
        """Coerce a convenient value.

        ``None`` → EMPTY, bytes-like → BYTES, mapping or pairs → STRUCTURED.
        """
        if isinstance(value, Metadata):
            return value
        if value is None:
            return cls.EMPTY
        if isinstance(value, bytes | bytearray | memoryview):
            return cls.from_bytes(value)
        if isinstance(value, str):
            raise EncodeError("Metadata.of: a str is not metadata (use bytes or a mapping)")
        return cls.structured(value)

    @property
    def kind(self) -> MetadataKind:
        """Which of EMPTY, BYTES, STRUCTURED this is."""
        return self._kind

    @property
    def data(self) -> bytes | None:
        """The opaque bytes of BYTES metadata; ``None`` for the other kinds."""
        return self._data

    @property
    def entries(self) -> _Entries:
        """The structured entries as ``(key, value)`` pairs in encode order; ``()`` otherwise."""
        return self._entries

    @property
    def is_empty(self) -> bool:
        """True for :attr:`EMPTY` (not for empty bytes or an empty map)."""
        return self._kind is MetadataKind.EMPTY

    def get(self, key: str, default: MetadataValue | None = None) -> MetadataValue | None:
        """The structured value for ``key``, or ``default`` (also for non-structured kinds)."""
        for k, v in self._entries:
            if k == key:
                return v
        return default

    def as_dict(self) -> dict[str, MetadataValue]:
        """The structured entries as a new dict (empty for EMPTY and BYTES metadata)."""
        return dict(self._entries)

    def wire_size(self) -> int:
        """Number of bytes this metadata occupies inside an encoded ``OpenRequest``."""
        return len(self._wire)

    def _identity(self) -> tuple[object, ...]:
        if self._kind is MetadataKind.STRUCTURED:
            return (
                self._kind,
                frozenset((k, _value_tag(v), v) for k, v in self._entries),
            )
        return (self._kind, self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Metadata):
            return NotImplemented
        if self is other or self._wire == other._wire:
            return True
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        if self._kind is MetadataKind.EMPTY:
            return "Metadata.EMPTY"
        if self._kind is MetadataKind.BYTES:
            return f"Metadata.from_bytes({self._data!r})"
        return f"Metadata.structured({list(self._entries)!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable although __init__ refuses direct construction.
        if self._kind is MetadataKind.EMPTY:
            return (_metadata_empty, ())
        if self._kind is MetadataKind.BYTES:
            return (Metadata.from_bytes, (self._data,))
        return (Metadata.structured, (self._entries,))


def _metadata_empty() -> Metadata:
    return Metadata.EMPTY


_TAG_EMPTY_META = _U32.pack(0)
_TAG_BYTES_META = _U32.pack(1)
_TAG_STRUCTURED_META = _U32.pack(2)
Metadata.EMPTY = Metadata._make(MetadataKind.EMPTY, None, (), _TAG_EMPTY_META)


def _encode_text(text: str, where: str) -> bytes:
    """UTF-8 encode ``text`` or raise :class:`EncodeError` (lone surrogates)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"{where}: not encodable as UTF-8 ({exc.reason})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """First message of each side: protocol version, offered features, optional agent text."""

    protocol_version: int = PROTOCOL_VERSION
    features: Features = _NO_FEATURES
    agent: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloAck:
    """Second message of each side: the version and features it computed."""

    selected_version: int
    selected_features: Features


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenRequest:
    """Ask the peer to open a reverse stream for ``service``."""

    request_id: int
    service: str
    metadata: Metadata = Metadata.EMPTY
    flags: OpenFlags = _NO_FLAGS


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenResponse:
    """Answer to an ``OpenRequest``: accepted with a logical stream id, or rejected."""

    request_id: int
    status: OpenStatus
    reason: str | None = None
    logical_stream_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamClose:
    """A logical stream is done; ``logical_stream_id == 0`` closes the whole session."""

    logical_stream_id: int
    code: CloseCode
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Keep-alive probe; the peer answers with a ``Pong`` of the same sequence."""

    sequence: int

    def response(self) -> Pong:
        """The ``Pong`` that answers this ping."""
        return Pong(sequence=self.sequence)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """Answer to a ``Ping`` (same sequence number)."""

    sequence: int


Message: TypeAlias = Hello | HelloAck | OpenRequest | OpenResponse | StreamClose | Ping | Pong
"""Any control message of protocol v1."""
