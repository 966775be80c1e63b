"""The aioquic adapter (second supported QUIC stack).

Same shape as :mod:`quic_reverse.transport.qh3` and the same driver
(:class:`~._common.StackConnection`); only the stack-specific hooks live here.
:func:`connect` and :func:`serve` take aioquic's own
:class:`aioquic.quic.configuration.QuicConfiguration`.

aioquic specifics handled here:

* receive credit: aioquic doubles a stream's window (and the connection's) as
  soon as the peer has used half of it, whether or not anybody reads. This
  adapter replaces that rule: the window advertised is *bytes the application
  consumed + the configured window*, so a reader that never reads holds at most
  one window per stream (and one connection window overall);
* send backpressure uses the stream sender's buffer (bytes not yet acknowledged);
* the concurrent-stream limit (hard-coded 128) is set from ``max_streams``;
* aioquic's ``QuicConnectionProtocol.wait_connected()`` can hang when called after
  the handshake finished: this adapter does not use that protocol class; the
  handshake is awaited through our own future, set from the
  ``HandshakeCompleted`` event, so there is nothing to miss.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic import events as aioquic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
)
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from cryptography.hazmat.primitives.serialization import Encoding

from ._common import (
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_SEND_BUFFER,
    DEFAULT_STREAM_WINDOW,
    StackConnection,
    StackServer,
    _StreamState,
    build_client_configuration,
    build_server_configuration,
    stack_connect,
    stack_serve,
)
from ._udp import DEFAULT_SOCKET_BUFFER

__all__ = [
    "AioquicConnection",
    "AioquicServer",
    "client_configuration",
    "connect",
    "serve",
    "server_configuration",
]

logger = logging.getLogger("quic_reverse.transport.aioquic")


def client_configuration(
    *,
    alpn: list[str] | tuple[str, ...] = ("quic-reverse-example",),
    server_name: str | None = "localhost",
    cafile: str | None = None,
    verify: bool = True,
    idle_timeout: float = 60.0,
    stream_window: int = DEFAULT_STREAM_WINDOW,
    connection_window: int = DEFAULT_CONNECTION_WINDOW,
) -> QuicConfiguration:
    """A client :class:`QuicConfiguration` with this library's tuned defaults.

    Raises:
        TransportError: ``cafile`` cannot be loaded.
    """
    return build_client_configuration(
        QuicConfiguration,
        alpn=alpn,
        server_name=server_name,
        cafile=cafile,
        verify=verify,
        idle_timeout=idle_timeout,
        stream_window=stream_window,
        connection_window=connection_window,
    )


def server_configuration(
    certfile: str,
    keyfile: str,
    *,
    alpn: list[str] | tuple[str, ...] = ("quic-reverse-example",),
    idle_timeout: float = 60.0,
    stream_window: int = DEFAULT_STREAM_WINDOW,
    connection_window: int = DEFAULT_CONNECTION_WINDOW,
) -> QuicConfiguration:
    """A server :class:`QuicConfiguration` with this library's tuned defaults.

    Raises:
        TransportError: the certificate or key cannot be loaded.
    """
    return build_server_configuration(
        QuicConfiguration,
        certfile,
        keyfile,
        alpn=alpn,
        idle_timeout=idle_timeout,
        stream_window=stream_window,
        connection_window=connection_window,
    )


class _CreditQuicConnection(QuicConnection):
    """aioquic QuicConnection whose receive windows follow what the application read."""

    def __init__(self, *, max_streams: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local_max_streams_bidi.value = max_streams
        self._local_max_streams_bidi.sent = max_streams
        self._qr_stream_window = self._local_max_stream_data_bidi_remote
        self._qr_connection_window = self._local_max_data.value
        self._qr_consumed: dict[int, int] = {}
        # Bytes delivered to the adapter and not yet read (set by the adapter).
        self.qr_unread: Callable[[], int] = lambda: 0

    def qr_consumed(self, stream_id: int, nbytes: int) -> None:
        self._qr_consumed[stream_id] = self._qr_consumed.get(stream_id, 0) + nbytes

    def qr_forget(self, stream_id: int) -> None:
        self._qr_consumed.pop(stream_id, None)

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        max_data = self._local_max_data
        # Everything the peer used counts as consumed except what sits unread in the
        # adapter: data of stopped, reset or forgotten streams frees its credit too.
        target = max_data.used - self.qr_unread() + self._qr_connection_window
        # Re-announce only after half a window was consumed (fewer MAX_DATA frames).
        if target - max_data.value >= self._qr_connection_window // 2:
            max_data.value = target
        for limit in (max_data, self._local_max_streams_bidi, self._local_max_streams_uni):
            if limit is not max_data and (limit.sent - limit.used >= limit.value - limit.sent):
                continue
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type,
                    capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                    handler=self._on_connection_limit_delivery,
                    handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if not stream.max_stream_data_local:
            return
        window = self._qr_stream_window
        target = self._qr_consumed.get(stream.stream_id, 0) + window
        if target - stream.max_stream_data_local >= window // 2:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class AioquicConnection(StackConnection):
    """An aioquic :class:`QuicConnection` behind the transport contract."""

    events = aioquic_events
    stack_name = "aioquic"
    quic_class = _CreditQuicConnection

    def __init__(self, quic: _CreditQuicConnection, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        quic.qr_unread = lambda: self._recv_buffered_total

    def _stack_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        receive = self._quic.receive_datagram
        for data in datagrams:
            receive(data, addr, now)

    def _send_queue_size(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _bidi_slot_available(self) -> bool:
        quic = self._quic
        return bool(quic._local_next_stream_id_bidi // 4 < quic._remote_max_streams_bidi)

    def _allocate_bidi(self) -> int:
        quic = self._quic
        stream_id = int(quic.get_next_available_stream_id())
        quic._get_or_create_stream_for_send(stream_id)
        return stream_id

    def _receive_paused(self) -> bool:
        # Credit is held back per stream (see _CreditQuicConnection): never pause.
        return False

    def _on_consumed(self, state: _StreamState, nbytes: int) -> None:
        self._quic.qr_consumed(state.stream_id, nbytes)
        self._transmit_soon()

    def _maybe_forget(self, state: _StreamState) -> None:
        super()._maybe_forget(state)
        if state.stream_id not in self._streams:
            self._quic.qr_forget(state.stream_id)

    def _transmit(self) -> None:
        super()._transmit()
        # aioquic discards finished streams (raising MAX_STREAMS) while building a
        # packet, after it already wrote the connection limits into that packet;
        # with nothing else to send the new limit would wait for unrelated traffic
        # and a peer waiting for a stream slot would stall. Flush it now.
        limit = self._quic._local_max_streams_bidi
        if limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent:
            super()._transmit()

    def _peer_certificate_der(self) -> bytes | None:
        cert = self._quic.tls._peer_certificate
        return None if cert is None else bytes(cert.public_bytes(Encoding.DER))


class AioquicServer(StackServer):
    """Server dispatcher creating :class:`AioquicConnection` objects."""

    connection_class = AioquicConnection
    encode_version_negotiation = staticmethod(encode_quic_version_negotiation)

    def _parse_header(self, data: bytes) -> tuple[int | None, bool, bytes, bytes] | None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._cid_length)
        except ValueError:
            return None
        return (
            header.version,
            header.packet_type == QuicPacketType.INITIAL,
            header.destination_cid,
            header.source_cid,
        )


async def connect(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    handshake_timeout: float = 10.0,
    send_buffer: int = DEFAULT_SEND_BUFFER,
    socket_buffer: int = DEFAULT_SOCKET_BUFFER,
    max_streams: int = DEFAULT_MAX_STREAMS,
) -> AioquicConnection:
    """Connect to a QUIC server with aioquic and wait for the handshake.

    Raises:
        CertificateError: the server's certificate was rejected.
        ConnectionClosed: the server closed the connection during the handshake.
        TransportError: resolution/socket failure or no handshake within the timeout.
    """
    return await stack_connect(
        AioquicConnection,
        host,
        port,
        configuration=configuration,
        handshake_timeout=handshake_timeout,
        send_buffer=send_buffer,
        socket_buffer=socket_buffer,
        max_streams=max_streams,
    )


async def serve(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    on_connection: Callable[[AioquicConnection], Awaitable[None]],
    send_buffer: int = DEFAULT_SEND_BUFFER,
    socket_buffer: int = DEFAULT_SOCKET_BUFFER,
    max_streams: int = DEFAULT_MAX_STREAMS,
    handshake_timeout: float = 10.0,
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
) -> AioquicServer:
    """Serve QUIC with aioquic on ``(host, port)`` on a batching UDP transport.

    ``on_connection(conn)`` runs as a task per connection once its handshake
    completed; when it returns, the connection is closed if still open. A
    connection whose handshake does not complete within ``handshake_timeout``
    seconds is dropped; at most ``max_handshakes`` handshakes run at once.

    Raises:
        TransportError: the address cannot be bound or the configuration is unusable.
    """
    return await stack_serve(
        AioquicServer,
        host,
        port,
        configuration=configuration,
        on_connection=on_connection,
        send_buffer=send_buffer,
        socket_buffer=socket_buffer,
        max_streams=max_streams,
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
    )
