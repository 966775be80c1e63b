"""The aioquic adapter (second supported QUIC stack).

Same shape as :mod:`quic_reverse.transport.qh3` and the same driver
(:class:`~._driver.StackConnection`); only the stack-specific hooks live here.
:func:`connect` and :func:`serve` take aioquic's own
:class:`aioquic.quic.configuration.QuicConfiguration`.

aioquic specifics handled here:

* receive credit: aioquic doubles a stream's window (and the connection's) as
  soon as the peer has used half of it, whether or not anybody reads. This
  adapter replaces that rule: the window advertised is *bytes the application
  consumed + the configured window*, so a reader that never reads holds at most
  one window per stream (and one connection window overall);
* send backpressure counts the bytes of a stream not yet sent (as qh3's queue does);
  bytes sent and not yet acknowledged are bounded by the peer's stream window;
* the concurrent-stream limit (hard-coded 128) is set from ``max_streams``;
* aioquic is an optional extra: :func:`quic_reverse.transport.quic.connect` /
  ``serve`` with ``stack="aioquic"`` raise a ConfigError naming
  ``pip install 'quic-reverse[aioquic]'`` when it is missing;
* congestion control: configurations made here (:func:`client_configuration`,
  :func:`server_configuration`, hence ``quic.connect``/``serve`` and the tunnel with
  ``--stack aioquic``) use the delivery-rate based controller of
  :mod:`.congestion` (``quic-reverse-bbr``) instead of aioquic's default NewReno, which
  collapses on lossy paths; a ``QuicConfiguration`` the caller builds keeps its own
  ``congestion_control_algorithm``;
* path statistics: aioquic keeps no totals of lost packets or probe timeouts, so its
  loss recovery object is given a subclass that counts them (same object, same
  behaviour; :meth:`_CreditQuicConnection.qr_path_stats`);
* aioquic's ``QuicConnectionProtocol.wait_connected()`` can hang when called after
  the handshake finished: this adapter does not use that protocol class; the
  handshake is awaited through our own future, set from the
  ``HandshakeCompleted`` event, so there is nothing to miss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
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
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace
from cryptography.hazmat.primitives.serialization import Encoding

from . import congestion
from ._driver import StackConnection
from ._server import StackServer
from ._stack import Header, QuicStack, StackEvents, StackHooks, StackSpec
from .base import PathStats
from .tls import ServerCredentials

__all__ = [
    "DEFAULT_CONGESTION_CONTROL",
    "AioquicConnection",
    "AioquicServer",
    "client_configuration",
    "connect",
    "serve",
    "server_configuration",
]

logger = logging.getLogger("quic_reverse.transport.aioquic")

#: Congestion control of the configurations this module builds (see the docstring).
DEFAULT_CONGESTION_CONTROL = congestion.NAME


def _configuration(**kwargs: Any) -> QuicConfiguration:
    kwargs.setdefault("congestion_control_algorithm", DEFAULT_CONGESTION_CONTROL)
    return QuicConfiguration(**kwargs)


class _CountingRecovery(QuicPacketRecovery):
    """aioquic's loss recovery, also counting lost packets and probe timeouts (aioquic
    keeps no totals; :meth:`_CreditQuicConnection.qr_path_stats` reports them)."""

    #: Packets declared lost by loss detection (congestion events; not the packets a
    #: probe timeout retransmits early, which are counted in ``qr_ptos``).
    qr_lost = 0
    #: Probe timeouts.
    qr_ptos = 0

    def on_loss_detection_timeout(self, *, now: float) -> None:
        ptos = self._pto_count
        super().on_loss_detection_timeout(now=now)
        if self._pto_count > ptos:
            self.qr_ptos += 1

    def _on_packets_lost(
        self,
        *,
        congestion_event: bool = True,
        now: float,
        packets: Iterable[QuicSentPacket],
        persistent_congestion: bool = False,
        space: QuicPacketSpace,
    ) -> None:
        if congestion_event:
            if not isinstance(packets, list | tuple):
                packets = list(packets)
            self.qr_lost += len(packets)
        super()._on_packets_lost(
            congestion_event=congestion_event,
            now=now,
            packets=packets,
            persistent_congestion=persistent_congestion,
            space=space,
        )


class _CreditQuicConnection(StackHooks, QuicConnection):
    """aioquic QuicConnection whose receive windows follow what the application read,
    with the driver's ``qr_*`` hooks (:class:`~._stack.QuicStack`)."""

    def __init__(self, *, max_streams: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local_max_streams_bidi.value = max_streams
        self._local_max_streams_bidi.sent = max_streams
        self._qr_stream_window = self._local_max_stream_data_bidi_remote
        self._qr_connection_window = self._local_max_data.value
        self._qr_consumed: dict[int, int] = {}
        self._loss.__class__ = _CountingRecovery  # same object, plus loss/PTO totals

    # -- driver hooks ------------------------------------------------------------

    def qr_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        receive = self.receive_datagram
        for data in datagrams:
            receive(data, addr, now)

    def qr_send_queue_size(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        # Bytes written but never sent yet. Sent-but-unacknowledged bytes do not
        # count: on a long lossy path they include everything behind a lost packet
        # until its retransmission is acknowledged (one RTT and more), which capped a
        # stream at send_buffer / RTT (1 MiB per 50 ms). They stay bounded by the
        # peer's stream window.
        sender = stream.sender
        return max(int(sender._buffer_stop - sender.highest_offset), 0)

    def qr_bidi_slot_available(self) -> bool:
        return bool(self._local_next_stream_id_bidi // 4 < self._remote_max_streams_bidi)

    def qr_allocate_bidi(self) -> int:
        stream_id = int(self.get_next_available_stream_id())
        self._get_or_create_stream_for_send(stream_id)
        return stream_id

    def qr_consumed(self, stream_id: int, nbytes: int) -> bool:
        # Credit follows reads: announce it (transmit) once the limits moved enough.
        self._qr_consumed[stream_id] = self._qr_consumed.get(stream_id, 0) + nbytes
        return True

    def qr_forget(self, stream_id: int) -> None:
        self._qr_consumed.pop(stream_id, None)

    def qr_flush_needed(self) -> bool:
        # aioquic discards finished streams (raising MAX_STREAMS) while building a
        # packet, after it already wrote the connection limits into that packet;
        # with nothing else to send the new limit would wait for unrelated traffic
        # and a peer waiting for a stream slot would stall. Send it at once.
        limit = self._local_max_streams_bidi
        return limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent

    def qr_peer_certificate(self) -> bytes | None:
        cert = self.tls._peer_certificate
        return None if cert is None else bytes(cert.public_bytes(Encoding.DER))

    def qr_retried(self, retry_source_cid: bytes) -> None:
        # Read when the first datagram creates the TLS state (transport parameters).
        self._retry_source_connection_id = retry_source_cid

    def qr_set_initial_dcid(self, cid: bytes) -> None:
        # aioquic draws it in __init__ and derives the Initial keys from it in connect().
        self._peer_cid.cid = cid
        self._original_destination_connection_id = cid

    def qr_set_reset_token(self, token: bytes) -> None:
        # Announced in the transport parameters for the handshake connection id.
        self._host_cids[0].stateless_reset_token = token

    def qr_peer_reset_token(self) -> bytes | None:
        # aioquic stores the server's token but never checks datagrams against it.
        token = self._peer_cid.stateless_reset_token
        return bytes(token) if token else None

    def qr_path_stats(self) -> PathStats:
        loss = self._loss
        sampled = loss._rtt_initialized
        paths = self._network_paths
        return PathStats(
            smoothed_rtt=loss._rtt_smoothed if sampled else None,
            latest_rtt=loss._rtt_latest if sampled else None,
            min_rtt=loss._rtt_min if sampled else None,
            congestion_window=int(loss.congestion_window),
            bytes_in_flight=int(loss.bytes_in_flight),
            bytes_sent=paths[0].bytes_sent if paths else 0,
            # aioquic numbers packets with one counter across all packet spaces.
            packets_sent=int(self._packet_number),
            packets_lost=getattr(loss, "qr_lost", None),
            pto_count=getattr(loss, "qr_ptos", None),
            max_datagram_size=int(self._max_datagram_size),
            congestion_control=str(self._configuration.congestion_control_algorithm),
        )

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


class AioquicServer(StackServer):
    """Server dispatcher creating :class:`AioquicConnection` objects."""


def _create(
    configuration: QuicConfiguration, max_streams: int, original_dcid: bytes | None
) -> QuicStack:
    return _CreditQuicConnection(
        max_streams=max_streams,
        configuration=configuration,
        original_destination_connection_id=original_dcid,
    )


def _parse_header(data: bytes, cid_length: int) -> Header | None:
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
    except ValueError:
        return None
    return (
        header.version,
        header.packet_type == QuicPacketType.INITIAL,
        header.destination_cid,
        header.source_cid,
    )


def _load_credentials(configuration: QuicConfiguration, credentials: ServerCredentials) -> None:
    # aioquic takes cryptography objects (so DER files work too).
    configuration.certificate = credentials.chain[0]
    configuration.certificate_chain = list(credentials.chain[1:])
    configuration.private_key = credentials.key


#: The aioquic stack, as the shared driver, client and server see it.
SPEC: StackSpec[QuicConfiguration] = StackSpec(
    name="aioquic",
    events=StackEvents(
        stream_data=aioquic_events.StreamDataReceived,
        stream_reset=aioquic_events.StreamReset,
        stop_sending=aioquic_events.StopSendingReceived,
        connection_id_issued=aioquic_events.ConnectionIdIssued,
        connection_id_retired=aioquic_events.ConnectionIdRetired,
        handshake_completed=aioquic_events.HandshakeCompleted,
        connection_terminated=aioquic_events.ConnectionTerminated,
        datagram_frame_received=aioquic_events.DatagramFrameReceived,
    ),
    configuration_class=_configuration,
    create=_create,
    parse_header=_parse_header,
    encode_version_negotiation=encode_quic_version_negotiation,
    load_credentials=_load_credentials,
    connection_class=AioquicConnection,
    server_class=AioquicServer,
    receive_gate=False,
)

#: A client :class:`QuicConfiguration` with this library's tuned defaults.
client_configuration = SPEC.client_configuration
#: A server :class:`QuicConfiguration` with this library's tuned defaults.
server_configuration = SPEC.server_configuration
#: Connect with aioquic and wait for the handshake (see :meth:`._stack.StackSpec.connect`).
connect = SPEC.connect
#: Serve QUIC with aioquic on a batching UDP transport (see :meth:`._stack.StackSpec.serve`).
serve = SPEC.serve
