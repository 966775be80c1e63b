"""What a QUIC stack must provide, and :class:`StackSpec`, the description of one.

qh3 and aioquic share one driver (:mod:`._driver`), client (:mod:`._client`) and
server (:mod:`._server`). A stack module (:mod:`.qh3`, :mod:`.aioquic`) supplies:

* a subclass of its ``QuicConnection`` that also implements the ``qr_*`` hooks of
  :class:`QuicStack` (feeding datagrams, send-queue size, stream-slot accounting,
  receive credit, peer certificate, path statistics); :class:`StackHooks` has the
  defaults;
* a :class:`StackSpec`: its name, event classes, configuration class, header parser,
  version-negotiation encoder and credential loader. The spec's methods
  (:meth:`StackSpec.connect`, :meth:`StackSpec.serve`, the configuration builders)
  are the stack module's public entry points, written once here.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import ConfigError, TransportError
from ._errors import stack_call
from ._options import (
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_SEND_BUFFER,
    DEFAULT_STREAM_WINDOW,
    TransportOptions,
)
from ._reset import remember_static_key
from ._udp import DEFAULT_SOCKET_BUFFER
from .base import PathStats
from .tls import ServerCredentials, load_certificates, load_server_credentials

if TYPE_CHECKING:
    from ._driver import StackConnection
    from ._server import StackServer

__all__ = [
    "Header",
    "QuicConfigurationLike",
    "QuicStack",
    "StackEvents",
    "StackHooks",
    "StackSpec",
]

#: The ``max_datagram_frame_size`` transport parameter our configurations announce
#: (RFC 9221: we accept DATAGRAM frames up to this size; a peer may send them).
DATAGRAM_FRAME_LIMIT = 65535

#: ``(version, is_initial, destination_cid, source_cid)`` of a packet header.
Header = tuple[int | None, bool, bytes, bytes]


class QuicStack(Protocol):
    """The stack's connection object as the driver uses it: the sans-IO API both
    qh3 and aioquic implement, plus the ``qr_*`` hooks a stack module adds."""

    qr_unread: Callable[[], int]

    @property
    def host_cid(self) -> bytes: ...

    def connect(self, addr: Any, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> object | None: ...
    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def close(
        self, error_code: int = ..., frame_type: int | None = None, reason_phrase: str = ""
    ) -> None: ...

    # hooks (see StackHooks)
    def qr_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None: ...
    def qr_send_queue_size(self, stream_id: int) -> int: ...
    def qr_bidi_slot_available(self) -> bool: ...
    def qr_allocate_bidi(self) -> int: ...
    def qr_peer_certificate(self) -> bytes | None: ...
    def qr_route_known(self, max_udp_payload: int | None) -> None: ...
    def qr_consumed(self, stream_id: int, nbytes: int) -> bool: ...
    def qr_forget(self, stream_id: int) -> None: ...
    def qr_flush_needed(self) -> bool: ...
    def qr_set_reset_token(self, token: bytes) -> None: ...
    def qr_retried(self, retry_source_cid: bytes) -> None: ...
    def qr_peer_reset_token(self) -> bytes | None: ...
    def qr_set_initial_dcid(self, cid: bytes) -> None: ...
    def qr_path_stats(self) -> PathStats: ...


class StackHooks:
    """Defaults of the optional ``qr_*`` hooks (mixed into a stack's connection class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Bytes delivered to the application and not yet read (set by the driver).
        self.qr_unread: Callable[[], int] = _zero

    def qr_route_known(self, max_udp_payload: int | None) -> None:
        """Client, before the handshake: the largest UDP payload the local route to
        the server carries (None if unknown). Stacks with path MTU discovery use it
        as the upper bound of their probing."""

    def qr_consumed(self, stream_id: int, nbytes: int) -> bool:
        """The application read ``nbytes`` of the stream; True asks for a transmit
        (new credit to announce)."""
        return False

    def qr_forget(self, stream_id: int) -> None:
        """The stream is finished in both directions (forget per-stream state)."""

    def qr_flush_needed(self) -> bool:
        """After a transmit: True if building packets produced more to send at once."""
        return False

    # -- address validation and stateless resets (see ._retry, ._reset) ----------

    def qr_set_reset_token(self, token: bytes) -> None:
        """Server, before the first datagram: the stateless reset token to announce
        for the handshake connection id (``host_cid``)."""

    def qr_retried(self, retry_source_cid: bytes) -> None:
        """Server, before the first datagram: the client's address was validated with
        a Retry whose source connection id was ``retry_source_cid`` (to announce in
        the transport parameters). A stack that cannot must not be run with Retry."""
        raise NotImplementedError("this stack does not support Retry")

    def qr_peer_reset_token(self) -> bytes | None:
        """Client, after the handshake: the server's stateless reset token for the
        connection id in use (None if unknown)."""
        return None

    def qr_set_initial_dcid(self, cid: bytes) -> None:
        """Client, before ``connect()``: use ``cid`` as the first destination
        connection id (:mod:`._stackhint`). A stack that cannot keeps its random one."""

    # -- diagnostics ------------------------------------------------------------

    def qr_path_stats(self) -> PathStats:
        """What the stack knows about the path (RTT, window, packets sent and lost;
        see :class:`~.base.PathStats`). Read on demand, never per packet. The driver
        fills ``packets_sent`` with the datagrams it sent when the stack leaves it None.
        """
        return PathStats()


def _zero() -> int:
    return 0


class QuicConfigurationLike(Protocol):
    """The attributes of a stack's ``QuicConfiguration`` the driver reads."""

    @property
    def is_client(self) -> bool: ...
    @property
    def connection_id_length(self) -> int: ...
    @property
    def supported_versions(self) -> list[int]: ...
    @property
    def max_data(self) -> int: ...
    @property
    def certificate(self) -> object: ...
    @property
    def private_key(self) -> object: ...


C = TypeVar("C", bound=QuicConfigurationLike)


@dataclasses.dataclass(frozen=True)
class StackEvents:
    """The stack's event classes the driver reacts to (dispatched by exact type)."""

    stream_data: type
    stream_reset: type
    stop_sending: type
    connection_id_issued: type
    connection_id_retired: type
    handshake_completed: type
    connection_terminated: type
    #: RFC 9221 DATAGRAM frame received (None: the stack has no datagrams).
    datagram_frame_received: type | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class StackSpec(Generic[C]):
    """Everything stack-specific except the connection hooks; see the module docstring."""

    #: Stack name for logs ("qh3", "aioquic").
    name: str
    events: StackEvents
    #: The stack's ``QuicConfiguration`` class.
    configuration_class: Callable[..., C]
    #: ``create(configuration, max_streams, original_dcid)``: a client connection
    #: object, or a server one when ``original_dcid`` is given.
    create: Callable[[C, int, bytes | None], QuicStack]
    #: ``parse_header(datagram, host_cid_length)``: the header of a packet, None if
    #: it cannot be parsed (the datagram is then dropped).
    parse_header: Callable[[bytes, int], Header | None]
    #: ``encode_version_negotiation(source_cid=, destination_cid=, supported_versions=)``.
    encode_version_negotiation: Callable[..., bytes]
    #: Put a certificate chain and key (already checked) into a server configuration.
    load_credentials: Callable[[C, ServerCredentials], None]
    #: Driver class (the stack's public connection class, e.g. ``Qh3Connection``).
    connection_class: type[StackConnection]
    #: Server class (the stack's public server class, e.g. ``Qh3Server``).
    server_class: type[StackServer]
    #: True if the stack grants receive credit on delivery, so the receive gate must
    #: pause feeding it (qh3); False if it holds credit back per stream (aioquic).
    receive_gate: bool

    def __repr__(self) -> str:
        return f"<StackSpec {self.name}>"

    # -- configurations ------------------------------------------------------

    def client_configuration(
        self,
        *,
        alpn: Sequence[str] = ("quic-reverse-example",),
        server_name: str | None = "localhost",
        cafile: str | os.PathLike[str] | None = None,
        verify: bool = True,
        idle_timeout: float = 60.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
    ) -> C:
        """A client configuration with this library's tuned defaults.

        ``cafile`` (PEM or DER, one or more certificates) replaces the system store.

        Raises:
            ConfigError: ``cafile`` is missing or holds no certificate.
        """
        extra: dict[str, Any] = {}
        if cafile is not None:
            certs = load_certificates(cafile, "CA file")
            extra["cadata"] = b"".join(c.public_bytes(Encoding.PEM) for c in certs)
        if not verify:
            extra["verify_mode"] = ssl.CERT_NONE
        return self.configuration_class(
            is_client=True,
            alpn_protocols=list(alpn),
            server_name=server_name,
            idle_timeout=idle_timeout,
            max_data=connection_window,
            max_stream_data=stream_window,
            max_datagram_frame_size=DATAGRAM_FRAME_LIMIT,
            **extra,
        )

    def server_configuration(
        self,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str],
        *,
        alpn: Sequence[str] = ("quic-reverse-example",),
        idle_timeout: float = 60.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
    ) -> C:
        """A server configuration with this library's tuned defaults.

        Raises:
            ConfigError: the certificate or key cannot be loaded (PEM or DER), or they
                do not belong together.
        """
        credentials = load_server_credentials(certfile, keyfile)
        config = self.configuration_class(
            is_client=False,
            alpn_protocols=list(alpn),
            idle_timeout=idle_timeout,
            max_data=connection_window,
            max_stream_data=stream_window,
            max_datagram_frame_size=DATAGRAM_FRAME_LIMIT,
        )
        try:
            with stack_call(f"{self.name} cannot use certificate {os.fspath(certfile)}"):
                self.load_credentials(config, credentials)
        except TransportError as exc:
            raise ConfigError(str(exc)) from exc
        remember_static_key(config, credentials.key)  # stateless resets survive restarts
        return config

    # -- entry points --------------------------------------------------------

    async def connect(
        self,
        host: str,
        port: int,
        *,
        configuration: C,
        handshake_timeout: float = 10.0,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        socket_buffer: int = DEFAULT_SOCKET_BUFFER,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> StackConnection:
        """Connect to a QUIC server with this stack and wait for the handshake.

        Raises:
            ConfigError: ``configuration`` is a server one, or invalid options.
            CertificateError: the server's certificate was rejected.
            ConnectionClosed: the server closed the connection during the handshake.
            TransportError: no handshake within ``handshake_timeout`` seconds, or the
                address cannot be resolved, or the socket cannot be opened.
        """
        from ._client import stack_connect  # (the client imports the driver, which needs us)

        options = TransportOptions(
            handshake_timeout=handshake_timeout,
            send_buffer=send_buffer,
            socket_buffer=socket_buffer,
            max_streams=max_streams,
        )
        return await stack_connect(self, host, port, configuration, options)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        configuration: C,
        on_connection: Callable[[Any], Awaitable[None]],
        send_buffer: int = DEFAULT_SEND_BUFFER,
        socket_buffer: int = DEFAULT_SOCKET_BUFFER,
        max_streams: int = DEFAULT_MAX_STREAMS,
        handshake_timeout: float = 10.0,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    ) -> StackServer:
        """Serve QUIC with this stack on ``(host, port)`` on a batching UDP transport.

        ``on_connection(conn)`` runs as a task per connection once its handshake
        completed; when it returns, the connection is closed if still open. A
        connection whose handshake does not complete within ``handshake_timeout``
        seconds is dropped; at most ``max_handshakes`` handshakes run at once.

        Raises:
            ConfigError: ``configuration`` is not a server one, or invalid options.
            TransportError: the address cannot be bound (the message names it).
        """
        from ._server import stack_serve  # (the server imports the driver, which needs us)

        options = TransportOptions(
            handshake_timeout=handshake_timeout,
            send_buffer=send_buffer,
            socket_buffer=socket_buffer,
            max_streams=max_streams,
            max_handshakes=max_handshakes,
        )
        return await stack_serve(self, host, port, configuration, on_connection, options)
