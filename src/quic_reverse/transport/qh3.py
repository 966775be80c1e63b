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
  datagrams whatever the path carries, and its native core can lower a path's size
  later but never raise it. The server here keeps 1280 (safe on every path); why a
  bigger blind start was tried and taken out is in docs/ARCHITECTURE.md ("Datagram
  size");
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
