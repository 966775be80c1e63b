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

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .._starting import AwaitableContext, exit_context
from ..errors import CertificateError, ConfigError
from ._client import stack_connect
from ._driver import StackConnection
from ._options import TransportOptions
from ._server import StackServer, stack_serve
from ._stack import StackSpec
from .base import Connection
from .tls import (
    certificate_fingerprint,
    load_certificates,
    load_server_credentials,
    normalize_fingerprint,
)

__all__ = ["ClientTLS", "QuicServer", "ServerTLS", "Stack", "TransportOptions", "connect", "serve"]

logger = logging.getLogger("quic_reverse.transport.quic")

Stack = Literal["qh3", "aioquic"]
_STACKS = ("qh3", "aioquic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientTLS:
    """Client TLS settings.

    ``cafile``: trusted CAs, PEM (one or more) or DER (default: the system store);
    checked (read and parsed) here, so a missing or garbled file fails at once.
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
        if self.cafile is not None:
            load_certificates(self.cafile, "CA file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerTLS:
    """Server TLS settings: certificate chain and private key files (PEM or DER).

    Both files are loaded and checked to belong together here, so a wrong pair
    fails when the settings are made (:class:`ConfigError` naming both files), not
    at every client's handshake.
    """

    certfile: str | os.PathLike[str]
    keyfile: str | os.PathLike[str]
    alpn: tuple[str, ...] = ("quic-reverse-example",)

    def __post_init__(self) -> None:
        if isinstance(self.alpn, str) or not self.alpn:
            raise ConfigError("alpn must be a non-empty sequence of protocol names")
        object.__setattr__(self, "alpn", tuple(self.alpn))
        load_server_credentials(self.certfile, self.keyfile)


def _check_stack(stack: str) -> None:
    if stack not in _STACKS:
        raise ConfigError(f"unknown QUIC stack {stack!r} (expected one of {', '.join(_STACKS)})")


def _check_port(port: object, *, allow_zero: bool) -> None:
    """Reject what the OS would wrap or misread (70000 binds 4464 otherwise)."""
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ConfigError(f"port must be an int in {low}..65535, got {port!r}")


def connect(
    host: str,
    port: int,
    *,
    tls: ClientTLS,
    stack: Stack = "qh3",
    idle_timeout: float = 60.0,
    options: TransportOptions | None = None,
) -> AwaitableContext[Connection]:
    """Connect over QUIC and return the connection once the handshake (and pin) passed.

    ``conn = await connect(...)`` (close it yourself: ``conn.close()``, then ``await
    conn.wait_closed()``), or ``async with connect(...) as conn:``, which closes it
    when the block ends.

    Raises:
        ConfigError: unknown stack, port outside 1..65535 or invalid options.
        CertificateError: the server certificate failed verification or the pin.
        ConnectionClosed: the server closed the connection during the handshake.
        TransportError: no route, no answer within the handshake timeout, socket errors.
    """
    coro = _connect(host, port, tls=tls, stack=stack, idle_timeout=idle_timeout, options=options)
    return AwaitableContext(coro, _close_connection)


async def _close_connection(
    conn: Connection,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """End of ``async with connect(...)``: close (code 1 when the block raised), wait."""
    failed = exc is not None and not isinstance(exc, asyncio.CancelledError)
    conn.close(1 if failed else 0, type(exc).__name__.encode() if failed else b"")
    await conn.wait_closed()


async def _connect(
    host: str,
    port: int,
    *,
    tls: ClientTLS,
    stack: Stack,
    idle_timeout: float,
    options: TransportOptions | None,
) -> Connection:
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
    spec = _stack_spec(stack)
    configuration = spec.client_configuration(
        alpn=tls.alpn,
        server_name=tls.server_name,
        cafile=cafile,
        verify=verify,
        idle_timeout=opts.idle_timeout,
        stream_window=opts.stream_window,
        connection_window=opts.connection_window,
    )
    conn = await stack_connect(spec, host, port, configuration, opts)
    if tls.pin_sha256 is not None:
        _check_pin(conn, {tls.pin_sha256}, "the pin")
    elif direct is not None:
        _check_pin(conn, direct, f"a certificate in {tls.cafile}")
    return conn


def _stack_spec(stack: str) -> StackSpec[Any]:
    """The :class:`StackSpec` of ``stack`` (its module is imported on first use: each
    pulls in its QUIC stack, and aioquic is an optional extra).

    Raises:
        ConfigError: the stack is not installed.
    """
    if stack == "qh3":
        from . import qh3

        return qh3.SPEC
    try:
        from . import aioquic
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "aioquic":
            raise
        raise ConfigError(
            "the aioquic QUIC stack is not installed: pip install 'quic-reverse[aioquic]' "
            "(or use the default stack, qh3)"
        ) from None
    return aioquic.SPEC


def _direct_trust(cafile: str | None) -> set[str] | None:
    """Fingerprints of ``cafile`` if it holds only non-CA certificates, else None."""
    if cafile is None:
        return None
    fingerprints: set[str] = set()
    for cert in load_certificates(cafile, "CA file"):
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if is_ca:
            return None
        fingerprints.add(certificate_fingerprint(cert.public_bytes(Encoding.DER)))
    return fingerprints or None


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
        self._closing = asyncio.Event()

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        return self._impl.address

    @property
    def connection_count(self) -> int:
        """Connections currently held (including ones still in their handshake)."""
        return len(self._impl._all)

    def close(self) -> None:
        """Stop accepting, close every connection (handlers see them close)."""
        self._closing.set()
        self._impl.close()

    def is_serving(self) -> bool:
        """True until :meth:`close` is called."""
        return not self._closing.is_set()

    async def wait_closed(self) -> None:
        """Wait (bounded) for handlers and connections to finish, then release the socket."""
        await self._impl.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called (from another task or a signal handler),
        or until this call is cancelled; either way the server is closed and waited for
        before it returns (or re-raises the cancellation), like
        :meth:`asyncio.Server.serve_forever`."""
        try:
            await self._closing.wait()
        finally:
            self.close()
            await self.wait_closed()

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


def serve(
    host: str,
    port: int,
    *,
    tls: ServerTLS,
    on_connection: Callable[[Connection], Awaitable[None]],
    stack: Stack = "qh3",
    idle_timeout: float = 60.0,
    options: TransportOptions | None = None,
) -> AwaitableContext[QuicServer]:
    """Listen for QUIC connections on ``(host, port)``.

    ``on_connection(conn)`` runs as a task per connection after the handshake;
    when it returns, the server closes that connection if still open.

    ``server = await serve(...)``, or ``async with serve(...) as server:`` (closed, and
    waited for, when the block ends); :meth:`QuicServer.serve_forever` runs until the
    server is closed or the task cancelled.

    Raises:
        ConfigError: unknown stack, port outside 0..65535, invalid options, unreadable
            certificate/key.
        TransportError: the address cannot be bound.
    """
    coro = _serve(
        host,
        port,
        tls=tls,
        on_connection=on_connection,
        stack=stack,
        idle_timeout=idle_timeout,
        options=options,
    )
    return AwaitableContext(coro, exit_context)


async def _serve(
    host: str,
    port: int,
    *,
    tls: ServerTLS,
    on_connection: Callable[[Connection], Awaitable[None]],
    stack: Stack,
    idle_timeout: float,
    options: TransportOptions | None,
) -> QuicServer:
    _check_stack(stack)
    _check_port(port, allow_zero=True)
    opts = options or TransportOptions(idle_timeout=idle_timeout)
    spec = _stack_spec(stack)

    def configuration_of(spec: StackSpec[Any]) -> Any:
        # Loaded and checked again: the files may have changed since ServerTLS was made.
        return spec.server_configuration(
            tls.certfile,
            tls.keyfile,
            alpn=tls.alpn,
            idle_timeout=opts.idle_timeout,
            stream_window=opts.stream_window,
            connection_window=opts.connection_window,
        )

    configuration = configuration_of(spec)
    others: dict[str, tuple[StackSpec[Any], Any]] = {}
    if opts.stack_hint:
        # Clients stating another installed stack get a connection of that stack.
        for name in _STACKS:
            if name == stack:
                continue
            try:
                other = _stack_spec(name)
            except ConfigError:
                logger.debug("%s not installed: clients asking for it get %s", name, stack)
                continue
            others[name] = (other, configuration_of(other))
    impl = await stack_serve(spec, host, port, configuration, on_connection, opts, others)
    return QuicServer(impl)
