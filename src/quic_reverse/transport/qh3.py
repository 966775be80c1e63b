"""The qh3 adapter (default QUIC stack).

:func:`connect` and :func:`serve` take qh3's own
:class:`qh3.quic.configuration.QuicConfiguration`, so the caller keeps full control
of TLS (ALPN, CA file, server name, certificates); :func:`client_configuration`
and :func:`server_configuration` build one with this library's tuned defaults
(large flow-control windows, 1024 concurrent streams).

Both sides run on a batching UDP transport (:mod:`._udp`): the server hands each
connection the whole burst of its packets in one ``receive_many_datagrams`` call
instead of qh3's one-packet-per-syscall ``serve()`` path.

qh3 traps handled here (see ``QUIC-STACKS.md``):

* ``create_stream()`` past the peer's stream limit desynchronises qh3's stream
  ids: :meth:`Qh3Connection.open_bi` waits for a slot instead;
* qh3 hard-codes a limit of 100 concurrent bidirectional streams in its transport
  parameters; this adapter raises it (``max_streams``) by patching the advertised
  value and the native core's limit consistently;
* path MTU discovery runs on the client only: a qh3 server sends 1280-byte
  datagrams whatever the path carries. The server here starts at what its route to
  the client carries (up to :data:`MAX_SERVER_DATAGRAM_SIZE`) and falls back to 1280
  bytes if big datagrams vanish (:meth:`_LimitedQuicConnection.qr_path_check`);
* the native core grants flow-control credit as data is delivered, so the
  receive gate (:class:`~._gate.ReceiveGate`) stops feeding the core past the
  high-water mark;
* qh3 logs every CONNECTION_CLOSE it receives, including the graceful close that
  ends every session, as a *warning* on its ``quic`` logger: :class:`_PeerCloseIsDebug`
  demotes that one message to debug; its "Native protocol error" warning (a peer
  can trigger one per connection) is throttled by :class:`_PeerErrorsThrottled`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import qh3.quic.connection as _qh3_connection_module
import qh3.quic.tls_bridge as _qh3_tls_bridge_module
import qh3.tls as _qh3_tls_module
from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3.quic import events as qh3_events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import (
    PACKET_MAX_SIZE,
    QuicErrorCode,
    QuicPacketType,
    encode_quic_version_negotiation,
)

from ._driver import StackConnection
from ._server import StackServer
from ._stack import Header, QuicStack, StackEvents, StackHooks, StackSpec
from ._udp import route_max_udp_payload
from .base import PathStats
from .tls import ServerCredentials

__all__ = [
    "Qh3Connection",
    "Qh3Server",
    "client_configuration",
    "connect",
    "serve",
    "server_configuration",
]

logger = logging.getLogger("quic_reverse.transport.qh3")


class _PeerCloseIsDebug(logging.Filter):
    """Demote qh3's "Native peer close" warning to debug.

    A peer closing the connection is normal lifecycle, not a problem; the adapter
    reports it as :class:`~quic_reverse.errors.ConnectionClosed` with the peer's code
    and reason. The record is dropped unless the ``quic`` logger is enabled for debug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.msg != "Native peer close: %r":
            return True
        if not _qh3_logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return True


class _PeerErrorsThrottled(logging.Filter):
    """Throttle qh3's "Native protocol error" warning (one per connection a peer
    breaks, so any peer can trigger it at will): one warning per minute, saying how
    many were demoted to debug in between."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.msg != "Native protocol error: %r":
            return True
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.INTERVAL
            if self._suppressed:
                record.msg += " (%d more in the last %.0f s, logged at debug)"
                record.args = (*(record.args or ()), self._suppressed, self.INTERVAL)
                self._suppressed = 0
            return True
        self._suppressed += 1
        if not _qh3_logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return True


_qh3_logger = logging.getLogger("quic")
if not any(isinstance(f, _PeerCloseIsDebug) for f in _qh3_logger.filters):
    _qh3_logger.addFilter(_PeerCloseIsDebug())
if not any(isinstance(f, _PeerErrorsThrottled) for f in _qh3_logger.filters):
    _qh3_logger.addFilter(_PeerErrorsThrottled())


# qh3 2.1 hard-codes the concurrent-stream limits it advertises (100 bidi, 103 uni)
# in two places: the native core's constructor and the TLS transport parameters.
# Both are patched consistently, for the duration of the call that uses them.
_CORE_LOCAL_MAX_STREAMS_BIDI_ARG = 21
_CORE_MAX_DATAGRAM_SIZE_ARG = 8
_QUIC_TRANSPORT_PARAMETERS = _qh3_tls_module.ExtensionType.QUIC_TRANSPORT_PARAMETERS

#: Cap on the datagram size a qh3 client may discover (path MTU discovery probes up
#: to min(route limit, this)). Bigger packets mean fewer per-packet costs (header
#: protection, AEAD set-up, syscalls): on loopback (64 KiB MTU) one-stream upload goes
#: ~1.7x faster with 4 KiB datagrams than with 1.4 KiB ones. Not more: qh3's pacer
#: spaces *every* packet by a full datagram's worth of send budget, so past ~4 KiB
#: small request/response exchanges start to wait on it (1-byte echo p90 0.2 -> 1.3 ms
#: at 6 KiB).
MAX_DISCOVERED_DATAGRAM_SIZE = 4096

#: Cap on the datagram size a qh3 server (the relay) sends: an Ethernet MTU's UDP
#: payload, the common path. Bigger server datagrams cost CPU on every small exchange
#: in qh3's core (loopback, sequential stream open + 1-byte echo: 157 us of CPU per
#: open at 1472 bytes, 167 at 2048, 192 at 3000, 214 at 4096), more than they save in
#: bulk sends.
MAX_SERVER_DATAGRAM_SIZE = 1472

#: Server black-hole detection (see :meth:`_LimitedQuicConnection.qr_path_check`):
#: consecutive probe timeouts with big datagrams in flight, while the peer kept
#: sending, after which the server falls back to :data:`PACKET_MAX_SIZE` datagrams.
BLACK_HOLE_PTOS = 3
#: ... or this many whatever the peer does (a pure bulk sender's peer may have
#: nothing to say; a run this long outlasts any CPU starvation: the probe timeout
#: doubles each time, 31 timeouts' worth in all).
BLACK_HOLE_SILENT_PTOS = 5
#: ... or the share of (big) datagrams declared lost over a window of at least
#: :data:`BLACK_HOLE_WINDOW` datagrams (random loss and congestion stay far below).
BLACK_HOLE_LOSS_SHARE = 0.75
BLACK_HOLE_WINDOW = 48


@contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class _LimitedQuicConnection(StackHooks, QuicConnection):
    """qh3 QuicConnection advertising ``max_streams`` concurrent bidirectional streams,
    with the driver's ``qr_*`` hooks (:class:`~._stack.QuicStack`)."""

    def __init__(self, *, max_streams: int, **kwargs: Any) -> None:
        self._qr_max_streams = max_streams
        #: Upper bound for path MTU discovery replacing the configuration's, if set.
        self._qr_max_datagram_size: int | None = None
        #: Server: the stateless reset token to announce (see qr_set_reset_token).
        self._qr_reset_token: bytes | None = None
        #: Server: black-hole detection armed (big datagrams in use, see qr_path_check),
        #: the (bytes sent, packets lost) at the start of its loss window, and the
        #: core's loss count at the last check (nothing to do while it stays put).
        self._qr_hole_armed = False
        self._qr_hole_sent = 0
        self._qr_hole_lost = 0
        self._qr_hole_seen = 0
        #: Bytes received on the path when the current run of probe timeouts began
        #: (-1: no run).
        self._qr_hole_rx = -1
        super().__init__(**kwargs)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """qh3's ``datagrams_to_send`` without its per-packet logging work.

        qh3 re-parses every outgoing packet header for its qlog hooks even when no
        ``quic_logger`` is configured (about a fifth of a sender's CPU time). With
        no logger there is nothing to log, so poll the native core directly.
        """
        core = self._core
        if self._quic_logger is not None or core is None:
            return list(super().datagrams_to_send(now))
        poll = core.poll_transmit
        out: list[tuple[bytes, Any]] = []
        try:
            while (transmit := poll(now)) is not None:
                out.append((transmit[0], transmit[1]))
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return out

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        real = getattr(_qh3_connection_module, "QuicConnectionCore")  # noqa: B009
        limit = self._qr_max_streams
        if not self._is_client:
            self._qr_server_datagram_size(remote_addr)
        datagram_limit = self._qr_max_datagram_size

        def core_factory(*args: Any) -> Any:
            patched = list(args)
            patched[_CORE_LOCAL_MAX_STREAMS_BIDI_ARG] = limit
            if datagram_limit is not None:
                patched[_CORE_MAX_DATAGRAM_SIZE_ARG] = datagram_limit
            return real(*patched)

        with _swapped(_qh3_connection_module, "QuicConnectionCore", core_factory):
            super()._create_core(remote_addr, initial_dcid, now)

    def _create_tls(self, remote_source_cid: bytes | None) -> Any:
        real = getattr(_qh3_tls_bridge_module, "QuicTransportParameters")  # noqa: B009
        limit = self._qr_max_streams

        def parameters_factory(*args: Any, **kwargs: Any) -> Any:
            if "initial_max_streams_bidi" in kwargs:
                kwargs["initial_max_streams_bidi"] = limit
            return real(*args, **kwargs)

        with _swapped(_qh3_tls_bridge_module, "QuicTransportParameters", parameters_factory):
            bridge = super()._create_tls(remote_source_cid)
        original_serialize = bridge.serialize_transport_parameters

        def serialize() -> bytes:
            with _swapped(_qh3_tls_bridge_module, "QuicTransportParameters", parameters_factory):
                return bytes(original_serialize())

        bridge.serialize_transport_parameters = serialize  # type: ignore[method-assign]
        if self._qr_reset_token is not None:
            # The bridge serialises its transport parameters when it is created.
            bridge.stateless_reset_token = self._qr_reset_token
            bridge.tls.handshake_extensions = [
                (_QUIC_TRANSPORT_PARAMETERS, serialize()),
            ]
        return bridge

    def _qr_server_datagram_size(self, remote_addr: Any) -> None:
        """Server: send datagrams as big as the route to the client carries.

        qh3's path MTU discovery runs on the client only; a qh3 server sends at most
        the configured ``max_datagram_size`` (qh3's default: 1280 bytes), and from its
        first packet after the handshake uses min(that, the client's
        ``max_udp_payload_size``) without probing. The native core cannot raise the
        size of a path later, only lower it (re-applying the peer's transport
        parameters takes the minimum). So the server starts at the size its own route
        to the client allows (capped at :data:`MAX_SERVER_DATAGRAM_SIZE`, and by what
        the client says it accepts: 1472 for a qh3 client) and :meth:`qr_path_check`
        falls back to :data:`PACKET_MAX_SIZE` if big datagrams turn out not to get
        through.
        """
        configuration = self._configuration
        if (
            int(configuration.max_datagram_size) != PACKET_MAX_SIZE
            or not configuration.probe_datagram_size
        ):
            return
        host = remote_addr[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        route = route_max_udp_payload(family, (host, remote_addr[1]))
        if route is None:
            return
        size = min(route, MAX_SERVER_DATAGRAM_SIZE)
        if size > PACKET_MAX_SIZE:
            self._qr_max_datagram_size = size
            self._qr_hole_armed = True
            logger.debug("qh3: server datagrams up to %d bytes to %s", size, host)

    def qr_path_check(self) -> None:
        """Server black-hole detection: fall back to :data:`PACKET_MAX_SIZE`
        datagrams when big ones do not get through (a path narrower than the route).

        Cheap unless something was lost. The evidence, either of:

        * :data:`BLACK_HOLE_PTOS` probe timeouts in a row with data in flight while
          datagrams from the peer kept arriving (it is alive, yet acknowledges none of
          our packets: every big one, probes included, vanishes — a bulk sender on a
          black hole), or :data:`BLACK_HOLE_SILENT_PTOS` in a row in any case. A
          shorter run with a silent peer is not evidence (an outage, a peer starved
          of CPU, a NAT rebinding), and falling back on a false alarm is not free
          (see below);
        * at least :data:`BLACK_HOLE_LOSS_SHARE` of the datagrams sent in a window of
          :data:`BLACK_HOLE_WINDOW` or more declared lost (small packets get through
          and are acknowledged, the big ones are lost).

        Falling back is for the rest of the connection (the core cannot raise a
        path's datagram size again). qh3 2.1's core does not always survive the
        change: with hundreds of streams in flight it was seen to fail with "packet
        builder capacity exhausted" and stall; on a real black hole the connection
        is lost without it anyway, hence the strict evidence.
        """
        core = self._core
        if core is None:
            return
        pto = core.pto_count
        lost = core.loss_total
        if not pto:
            self._qr_hole_rx = -1
            if lost == self._qr_hole_seen:
                return
        self._qr_hole_seen = lost
        path = core.active_path
        size = int(path[5])
        if size <= PACKET_MAX_SIZE:
            self._qr_hole_armed = False
            return
        if pto and self._qr_hole_rx < 0:
            self._qr_hole_rx = int(path[4])  # a run of probe timeouts begins
        sent_bytes = int(path[3])
        if (
            pto >= BLACK_HOLE_PTOS
            and core.bytes_in_flight > 0
            and (pto >= BLACK_HOLE_SILENT_PTOS or int(path[4]) > self._qr_hole_rx)
        ):
            self._qr_fall_back(size, f"{pto} probe timeouts in a row")
            return
        sent = (sent_bytes - self._qr_hole_sent) // size
        if sent < BLACK_HOLE_WINDOW:
            return
        window_lost = lost - self._qr_hole_lost
        if window_lost >= BLACK_HOLE_LOSS_SHARE * sent:
            self._qr_fall_back(size, f"{window_lost} of ~{sent} datagrams lost")
            return
        self._qr_hole_sent = sent_bytes
        self._qr_hole_lost = lost

    def _qr_fall_back(self, size: int, evidence: str) -> None:
        self._qr_hole_armed = False
        parameters = self._applied_transport_parameters
        core = self._core
        if parameters is None or core is None:
            return
        logger.info(
            "qh3: %d-byte datagrams do not get through to %s (%s): falling back to %d bytes",
            size,
            _where(core.active_path[2]),
            evidence,
            PACKET_MAX_SIZE,
        )
        # The same values qh3 applied after the handshake (QuicConnection's
        # _drain_tls_events), with the smaller datagram size: the core keeps the
        # minimum of the path's size and the peer's max_udp_payload_size.
        self._call_core(
            core.apply_peer_transport_parameters,
            parameters.initial_max_data or 0,
            parameters.initial_max_stream_data_bidi_local or 0,
            parameters.initial_max_stream_data_bidi_remote or 0,
            parameters.initial_max_stream_data_uni or 0,
            parameters.initial_max_streams_bidi or 0,
            parameters.initial_max_streams_uni or 0,
            3 if parameters.ack_delay_exponent is None else parameters.ack_delay_exponent,
            0.025 if parameters.max_ack_delay is None else parameters.max_ack_delay / 1000,
            None if not parameters.max_idle_timeout else parameters.max_idle_timeout / 1000,
            parameters.max_datagram_frame_size,
            parameters.stateless_reset_token,
            parameters.active_connection_id_limit or 2,
            bool(parameters.disable_active_migration),
            PACKET_MAX_SIZE,
        )

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        if self._qr_hole_armed:
            self.qr_path_check()

    # -- driver hooks ------------------------------------------------------------

    def qr_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        # Once the handshake is done, even a single datagram goes through the batch
        # entry point: qh3's one-datagram path re-parses every packet header in Python
        # (version negotiation, retry, coalesced packets, connection-id learning),
        # which only matters during the handshake; the batch path hands the datagram
        # straight to the native core (and itself falls back before the handshake).
        # After the handshake, without a qlog logger, the core is called directly:
        # qh3's receive_many_datagrams only adds a per-datagram logging call then.
        core = self._core
        if core is not None and self._handshake_complete and self._quic_logger is None:
            if datagrams:
                self._call_core(
                    core.receive_many_datagrams, datagrams, self._normalize_address(addr), now
                )
                self._drain_core()
        elif len(datagrams) == 1 and not self._handshake_complete:
            self.receive_datagram(datagrams[0], addr, now)
        else:
            self.receive_many_datagrams(datagrams, addr, now)
        if self._qr_hole_armed:
            self.qr_path_check()

    def qr_send_queue_size(self, stream_id: int) -> int:
        try:
            return int(self.get_send_buffer_size(stream_id))
        except Exception:  # unknown/finished stream: nothing queued
            return 0

    def qr_bidi_slot_available(self) -> bool:
        core = self._core
        if core is None:
            return False
        peer_limit = core.stream_limits[0]
        return bool(self.get_next_available_stream_id() // 4 < peer_limit)

    def qr_allocate_bidi(self) -> int:
        return int(self._open_stream())

    def qr_route_known(self, max_udp_payload: int | None) -> None:
        """Let qh3's path MTU discovery probe up to what the local route carries.

        Only when the configuration keeps qh3's conservative default (1280); an
        explicit ``max_datagram_size`` is the caller's choice. qh3 (client side)
        starts small and uses a bigger size only once a probe of it was acknowledged,
        so a path narrower than the local route costs only lost probes.
        """
        if max_udp_payload is None:
            return
        configured = int(self._configuration.max_datagram_size)
        if configured != PACKET_MAX_SIZE or not self._configuration.probe_datagram_size:
            return
        limit = min(max_udp_payload, MAX_DISCOVERED_DATAGRAM_SIZE)
        if limit > configured:
            self._qr_max_datagram_size = limit
            logger.debug("qh3: path MTU discovery up to %d-byte datagrams", limit)

    def qr_peer_certificate(self) -> bytes | None:
        cert = self.get_peercert()
        return None if cert is None else bytes(cert.public_bytes())

    def qr_retried(self, retry_source_cid: bytes) -> None:
        # Read when the first datagram creates the TLS state (transport parameters).
        self._retry_source_connection_id = retry_source_cid

    def qr_set_reset_token(self, token: bytes) -> None:
        # qh3 draws the token at random when it creates the TLS bridge (first datagram).
        self._qr_reset_token = token

    def qr_set_initial_dcid(self, cid: bytes) -> None:
        # qh3 draws it in __init__ and derives the Initial keys from it in connect().
        self._original_destination_connection_id = cid

    def qr_peer_reset_token(self) -> bytes | None:
        parameters = self._applied_transport_parameters
        token = None if parameters is None else parameters.stateless_reset_token
        return None if token is None else bytes(token)

    # -- path statistics (diagnostics; read on demand, never per packet) ---------

    #: qh3's congestion control: native (Rust) and loss-based (a Reno-like window
    #: that halves on a loss), not replaceable from Python.
    QR_CONGESTION_CONTROL = "qh3-reno"

    def qr_path_stats(self) -> PathStats:
        core = self._core
        if core is None:  # before the first datagram
            return PathStats(congestion_control=self.QR_CONGESTION_CONTROL)
        # active_path: (path id, local address, remote address, bytes sent, bytes
        # received, datagram size in use). qh3 counts no packets sent: the driver does.
        path = core.active_path
        smoothed, latest = core.smoothed_rtt, core.latest_rtt
        return PathStats(
            smoothed_rtt=None if smoothed is None else float(smoothed),
            latest_rtt=None if latest is None else float(latest),
            congestion_window=int(core.congestion_window),
            bytes_in_flight=int(core.bytes_in_flight),
            bytes_sent=int(path[3]),
            packets_lost=int(core.loss_total),
            pto_count=int(core.pto_total),
            max_datagram_size=int(path[5]),
            congestion_control=self.QR_CONGESTION_CONTROL,
        )


class Qh3Connection(StackConnection):
    """A qh3 :class:`QuicConnection` behind the transport contract."""


class Qh3Server(StackServer):
    """Server dispatcher creating :class:`Qh3Connection` objects."""


def _create(
    configuration: QuicConfiguration, max_streams: int, original_dcid: bytes | None
) -> QuicStack:
    if original_dcid is None:
        return _LimitedQuicConnection(max_streams=max_streams, configuration=configuration)
    from ._rebinding import FollowingQuicConnection  # subclass of _LimitedQuicConnection

    return FollowingQuicConnection(
        max_streams=max_streams,
        configuration=configuration,
        original_destination_connection_id=original_dcid,
    )


def _where(addr: Any) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return repr(addr)


def _parse_header(data: bytes, cid_length: int) -> Header | None:
    try:
        header = _pull_quic_header(data, 0, cid_length)
    except ValueError:
        return None
    version, packet_type, _, dcid, scid = header[:5]
    return version, packet_type == int(QuicPacketType.INITIAL), dcid, scid


def _load_credentials(configuration: QuicConfiguration, credentials: ServerCredentials) -> None:
    # qh3 takes PEM bytes in place of file names (so DER files work too).
    configuration.load_cert_chain(credentials.chain_pem(), credentials.key_pem())


#: The qh3 stack, as the shared driver, client and server see it.
SPEC: StackSpec[QuicConfiguration] = StackSpec(
    name="qh3",
    events=StackEvents(
        stream_data=qh3_events.StreamDataReceived,
        stream_reset=qh3_events.StreamReset,
        stop_sending=qh3_events.StopSendingReceived,
        connection_id_issued=qh3_events.ConnectionIdIssued,
        connection_id_retired=qh3_events.ConnectionIdRetired,
        handshake_completed=qh3_events.HandshakeCompleted,
        connection_terminated=qh3_events.ConnectionTerminated,
        datagram_frame_received=qh3_events.DatagramFrameReceived,
    ),
    configuration_class=QuicConfiguration,
    create=_create,
    parse_header=_parse_header,
    encode_version_negotiation=encode_quic_version_negotiation,
    load_credentials=_load_credentials,
    connection_class=Qh3Connection,
    server_class=Qh3Server,
    receive_gate=True,
)

#: A client :class:`QuicConfiguration` with this library's tuned defaults (see
#: :meth:`StackSpec.client_configuration <._stack.StackSpec.client_configuration>`).
client_configuration = SPEC.client_configuration
#: A server :class:`QuicConfiguration` with this library's tuned defaults.
server_configuration = SPEC.server_configuration
#: Connect with qh3 and wait for the handshake (see :meth:`._stack.StackSpec.connect`).
connect = SPEC.connect
#: Serve QUIC with qh3 on a batching UDP transport (see :meth:`._stack.StackSpec.serve`).
serve = SPEC.serve
