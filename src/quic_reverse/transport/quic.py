"""Stack-neutral QUIC entry points: :func:`connect` and :func:`serve`.

Code outside :mod:`quic_reverse.transport` uses these (never qh3/aioquic
directly). TLS settings are plain dataclasses, :class:`ClientTLS` and
:class:`ServerTLS`; ``stack`` picks the QUIC implementation, ``"qh3"`` (default,
fast) or ``"aioquic"``. Both are tuned by default: 4 MiB socket buffers, large
flow-control windows, 1024 concurrent bidirectional streams, batched UDP I/O.

A ``cafile`` holding only self-signed end-entity certificates (what
:func:`~quic_reverse.transport.tls.generate_self_signed` makes, and what the Rust
examples use) cannot serve as a trust anchor for qh3's verifier, so such a file is
treated as a list of directly trusted certificates: the server must present one
of them exactly (checked after the handshake, like a pin). A file with CA
certificates is verified by the stack as usual.

Certificate pinning (``ClientTLS.pin_sha256``) turns chain verification off and
instead compares the SHA-256 of the server's end-entity certificate (DER) with
the pin before the connection is returned; a mismatch closes the connection and
raises :class:`~quic_reverse.errors.CertificateError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import os
from collections.abc import Awaitable, Callable
from types import ModuleType, TracebackType
from typing import Any, Literal

from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import CertificateError, ConfigError, TransportError
from ._common import (
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_SEND_BUFFER,
    DEFAULT_STREAM_WINDOW,
    StackConnection,
    StackServer,
)
from ._udp import DEFAULT_SOCKET_BUFFER
from .base import Connection
from .tls import certificate_fingerprint, normalize_fingerprint

__all__ = ["ClientTLS", "QuicServer", "ServerTLS", "Stack", "TransportOptions", "connect", "serve"]

logger = logging.getLogger("quic_reverse.transport.quic")

Stack = Literal["qh3", "aioquic"]
_STACKS = ("qh3", "aioquic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientTLS:
    """Client TLS settings.

    ``cafile``: PEM bundle of trusted CAs (default: the system store).
    ``verify=False`` disables chain and name verification (logs a loud warning
    unless ``pin_sha256`` is set). ``pin_sha256``: the server certificate's
    SHA-256 fingerprint (hex, colons allowed); when set, the chain is not
    verified but the end-entity certificate must match the pin.
    """

    alpn: tuple[str, ...] = ("quic-reverse-example",)
    server_name: str | None = "localhost"
    cafile: str | os.PathLike[str] | None = None
    verify: bool = True
    pin_sha256: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpn, str) or not self.alpn:
            raise ConfigError("alpn must be a non-empty sequence of protocol names")
        object.__setattr__(self, "alpn", tuple(self.alpn))
        if self.pin_sha256 is not None:
            object.__setattr__(self, "pin_sha256", normalize_fingerprint(self.pin_sha256))
        if self.cafile is not None and not os.path.isfile(self.cafile):
            raise ConfigError(f"cafile not found: {self.cafile}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerTLS:
    """Server TLS settings: PEM certificate chain and private key files."""

    certfile: str | os.PathLike[str]
    keyfile: str | os.PathLike[str]
    alpn: tuple[str, ...] = ("quic-reverse-example",)

    def __post_init__(self) -> None:
        if isinstance(self.alpn, str) or not self.alpn:
            raise ConfigError("alpn must be a non-empty sequence of protocol names")
        object.__setattr__(self, "alpn", tuple(self.alpn))
        for name in ("certfile", "keyfile"):
            path = getattr(self, name)
            if not os.path.isfile(path):
                raise ConfigError(f"{name} not found: {path}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """Tuning knobs shared by both stacks (defaults are the tuned values).

    ``max_streams``: concurrent bidirectional streams the peer may open.
    ``stream_window`` / ``connection_window``: receive flow-control windows.
    ``send_buffer``: bytes per stream ``write`` may queue in the stack before it waits.
    ``max_handshakes`` (servers): connections in their handshake at once; Initials
    beyond it are dropped until one finishes or times out (``handshake_timeout``).

    How a receiver that does not read is bounded differs by stack:

    * aioquic: credit is granted per stream as the application reads, so one
      unread stream holds at most ``stream_window`` and others keep flowing;
    * qh3: its native core grants credit as soon as data is delivered to Python,
      so the adapter stops feeding the connection's (large) incoming packets once
      unread bytes over all streams pass ``connection_window`` and resumes when a
      quarter was read. Small packets (ACKs, close, short messages) still get
      through, but bulk data on *every* stream of that connection waits until the
      slow reader catches up.
    """

    idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    send_buffer: int = DEFAULT_SEND_BUFFER
    socket_buffer: int = DEFAULT_SOCKET_BUFFER
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ConfigError(f"{name} must be a finite number of seconds, got {value!r}")
        for name in (
            "max_streams",
            "stream_window",
            "connection_window",
            "send_buffer",
            "socket_buffer",
            "max_handshakes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.idle_timeout <= 0 or self.handshake_timeout <= 0:
            raise ConfigError("timeouts must be > 0")
        if not 1 <= self.max_streams <= 1 << 20:
            raise ConfigError("max_streams must be in 1..2**20")
        if self.max_handshakes < 1:
            raise ConfigError("max_handshakes must be >= 1")
        for name in ("stream_window", "connection_window", "send_buffer", "socket_buffer"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be >= 1024")


def _check_stack(stack: str) -> None:
    if stack not in _STACKS:
        raise ConfigError(f"unknown QUIC stack {stack!r} (expected one of {', '.join(_STACKS)})")


def _check_port(port: object, *, allow_zero: bool) -> None:
    """Reject what the OS would wrap or misread (70000 binds 4464 otherwise)."""
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ConfigError(f"port must be an int in {low}..65535, got {port!r}")


async def connect(
    host: str,
    port: int,
    *,
    tls: ClientTLS,
    stack: Stack = "qh3",
    idle_timeout: float = 60.0,
    options: TransportOptions | None = None,
) -> Connection:
    """Connect over QUIC and return the connection once the handshake (and pin) passed.

    Raises:
        ConfigError: unknown stack, port outside 1..65535 or invalid options.
        CertificateError: the server certificate failed verification or the pin.
        ConnectionClosed: the server closed the connection during the handshake.
        TransportError: no route, no answer within the handshake timeout, socket errors.
    """
    _check_stack(stack)
    _check_port(port, allow_zero=False)
    opts = options or TransportOptions(idle_timeout=idle_timeout)
    if options is not None and idle_timeout != 60.0:
        opts = dataclasses.replace(options, idle_timeout=idle_timeout)
    cafile = None if tls.cafile is None else os.fspath(tls.cafile)
    direct = _direct_trust(cafile) if tls.verify and tls.pin_sha256 is None else None
    verify = tls.verify and tls.pin_sha256 is None and direct is None
    if not tls.verify and tls.pin_sha256 is None:
        logger.warning(
            "TLS certificate verification is DISABLED for %s:%d: anyone on the path can "
            "impersonate the server. Use cafile= or pin_sha256= instead.",
            host,
            port,
        )
    if direct is not None:
        cafile = None
    mod = _stack_module(stack)
    conn: Any = await mod.connect(
        host,
        port,
        configuration=mod.client_configuration(
            alpn=tls.alpn,
            server_name=tls.server_name,
            cafile=cafile,
            verify=verify,
            idle_timeout=opts.idle_timeout,
            stream_window=opts.stream_window,
            connection_window=opts.connection_window,
        ),
        handshake_timeout=opts.handshake_timeout,
        send_buffer=opts.send_buffer,
        socket_buffer=opts.socket_buffer,
        max_streams=opts.max_streams,
    )
    if tls.pin_sha256 is not None:
        _check_pin(conn, {tls.pin_sha256}, "the pin")
    elif direct is not None:
        _check_pin(conn, direct, f"a certificate in {tls.cafile}")
    assert isinstance(conn, Connection)
    return conn


def _stack_module(stack: str) -> ModuleType:
    """The adapter module of ``stack`` (imported on first use: each pulls in its stack)."""
    if stack == "qh3":
        from . import qh3

        return qh3
    from . import aioquic

    return aioquic


def _direct_trust(cafile: str | None) -> set[str] | None:
    """Fingerprints of ``cafile`` if it holds only non-CA certificates, else None."""
    if cafile is None:
        return None
    from cryptography import x509

    try:
        with open(cafile, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read cafile {cafile}: {exc}") from exc
    fingerprints: set[str] = set()
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if is_ca:
            return None
        fingerprints.add(certificate_fingerprint(cert.public_bytes(Encoding.DER)))
    return fingerprints or None


def _check_certificate_files(certfile: str, keyfile: str) -> None:
    """Parse the server certificate and key with ``cryptography`` before a stack sees
    them: qh3 panics (instead of raising) on some malformed keys.

    Raises:
        ConfigError: unreadable files, no certificate, or a key that is not a PEM key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        with open(certfile, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
        with open(keyfile, "rb") as fh:
            key_pem = fh.read()
        load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load certificate/key ({certfile}, {keyfile}): {exc}") from exc
    if not certs:
        raise ConfigError(f"no certificate in {certfile}")


def _check_pin(conn: Connection, accepted: set[str], what: str) -> None:
    der = conn.peer_certificate
    actual = hashlib.sha256(der).hexdigest() if der is not None else ""
    if not any(hmac.compare_digest(actual, fp) for fp in accepted):
        conn.close(0x1, b"certificate not trusted")
        if isinstance(conn, StackConnection):
            conn.abort()  # release the socket now: the caller never sees this connection
        raise CertificateError(
            f"server certificate SHA-256 {actual or '(none)'} does not match {what}"
        )
    logger.debug("server certificate %s matches %s", actual, what)


class QuicServer:
    """A listening QUIC server (either stack). Use as ``async with``.

    ``address`` is the bound ``(host, port)`` (the real port when 0 was asked).
    """

    def __init__(self, impl: StackServer) -> None:
        self._impl = impl

    @property
    def address(self) -> tuple[str, int]:
        return self._impl.address

    @property
    def connection_count(self) -> int:
        """Connections currently held (including ones still in their handshake)."""
        return len(self._impl._all)

    def close(self) -> None:
        """Stop accepting, close every connection (handlers see them close)."""
        self._impl.close()

    async def wait_closed(self) -> None:
        """Wait (bounded) for handlers and connections to finish, then release the socket."""
        await self._impl.wait_closed()

    async def __aenter__(self) -> QuicServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    host: str,
    port: int,
    *,
    tls: ServerTLS,
    on_connection: Callable[[Connection], Awaitable[None]],
    stack: Stack = "qh3",
    idle_timeout: float = 60.0,
    options: TransportOptions | None = None,
) -> QuicServer:
    """Listen for QUIC connections on ``(host, port)``.

    ``on_connection(conn)`` runs as a task per connection after the handshake;
    when it returns, the server closes that connection if still open.

    Raises:
        ConfigError: unknown stack, port outside 0..65535, invalid options, unreadable
            certificate/key.
        TransportError: the address cannot be bound.
    """
    _check_stack(stack)
    _check_port(port, allow_zero=True)
    opts = options or TransportOptions(idle_timeout=idle_timeout)
    certfile, keyfile = os.fspath(tls.certfile), os.fspath(tls.keyfile)
    _check_certificate_files(certfile, keyfile)
    mod = _stack_module(stack)
    try:
        config: Any = mod.server_configuration(
            certfile,
            keyfile,
            alpn=tls.alpn,
            idle_timeout=opts.idle_timeout,
            stream_window=opts.stream_window,
            connection_window=opts.connection_window,
        )
    except TransportError as exc:
        raise ConfigError(f"cannot load certificate/key: {exc}") from exc
    impl: StackServer = await mod.serve(
        host,
        port,
        configuration=config,
        on_connection=on_connection,
        send_buffer=opts.send_buffer,
        socket_buffer=opts.socket_buffer,
        max_streams=opts.max_streams,
        handshake_timeout=opts.handshake_timeout,
        max_handshakes=opts.max_handshakes,
    )
    return QuicServer(impl)
