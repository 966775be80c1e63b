"""Helpers shared by the example scripts: options, logging, certificates, shutdown.

This module is part of the examples, not of the library. It keeps the scripts short
and makes them behave the same way: every example takes ``--host``/``--port``, ``-v``
for debug logging, and stops cleanly on Ctrl-C (servers also on SIGTERM) without a
traceback.

Exit statuses, the same in every example (and as ``quic-reverse``): 0 success; 2 bad
configuration or files, found before anything is served or dialled (a missing or
unreadable certificate, a certificate that does not match its key, ``--cert`` without
``--key``); 1 a failure at run time (the port is taken, nobody answers, the peer
refused or failed); 130 Ctrl-C. A failure is one line on stderr, ``error: ...``, in
words, never a traceback: raise :class:`ExampleError` (or let a library
:class:`~quic_reverse.QuicReverseError` escape) and :func:`run` prints it.

Certificates: the servers generate a *development* certificate (end-entity, SAN
``localhost`` + ``127.0.0.1``) at start-up and write it where the matching client looks
by default, so the two-terminal demos need no flags. Real deployments pass
``--cert/--key`` (server) and ``--ca`` (client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import getpass
import importlib
import logging
import os
import signal
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from quic_reverse import (
    CloseCode,
    ConfigError,
    ConnectionClosed,
    QuicReverseError,
    SessionClosed,
)
from quic_reverse.errors import CertificateError
from quic_reverse.transport import Connection, QuicServer
from quic_reverse.transport.quic import ClientTLS, ServerTLS, TransportOptions, connect, serve
from quic_reverse.transport.tls import generate_self_signed, load_certificates

DEFAULT_HOST = "127.0.0.1"
#: ALPN and TLS server name of the Rust crate's examples: keep them so both interoperate.
DEFAULT_ALPN = "quic-reverse-example"
DEFAULT_SERVER_NAME = "localhost"
#: Where the Rust relay example writes its certificate (DER) and the Rust edge reads it.
#: The Python relay writes the same file, so either edge finds either relay.
RUST_RELAY_CERT = Path(tempfile.gettempdir()) / "quic-reverse-relay.der"

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"

#: Exit statuses (the module docstring says when each applies).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("quic_reverse.examples")


class ExampleError(Exception):
    """An expected failure: :func:`run` prints ``error: <message>`` and exits ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def usage_error(message: str) -> ExampleError:
    """A configuration or file problem (exit status 2); name the option at fault."""
    return ExampleError(message, EXIT_USAGE)


def default_cert_dir() -> Path:
    """A per-user directory in the temp dir where example servers write their dev certificate."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"quic-reverse-example-{user}"


def add_common_arguments(parser: argparse.ArgumentParser, *, port: int) -> None:
    """Add the options every example shares: address, ALPN, QUIC stack, verbosity."""
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on / dial (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=port,
        help=f"UDP port (default {port}; a server given 0 picks a free port and prints it)",
    )
    parser.add_argument(
        "--alpn", default=DEFAULT_ALPN, help=f"TLS ALPN protocol (default {DEFAULT_ALPN})"
    )
    parser.add_argument(
        "--stack",
        choices=("qh3", "aioquic"),
        default="qh3",
        help="QUIC implementation (default qh3; aioquic needs the [aioquic] extra)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def setup_logging(verbose: bool) -> None:
    """Log to stderr: warnings by default, everything (the protocol steps) with ``-v``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file + rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_dev_certificate(directory: Path) -> tuple[Path, Path]:
    """Generate a fresh development certificate and key into ``directory``.

    Returns ``(cert_path, key_path)``. The key file is readable by the owner only.
    """
    cert_pem, key_pem = generate_self_signed()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = directory / CERT_NAME
    key_path = directory / KEY_NAME
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def positive_seconds(text: str) -> float:
    """``argparse`` type: a duration in seconds, greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def add_client_arguments(
    parser: argparse.ArgumentParser, *, default_ca: Path, ca_source: str
) -> None:
    """``--ca`` (the certificate to trust, PEM or DER), ``--server-name`` (the TLS name
    to verify) and ``--timeout`` (connect deadline)."""
    parser.add_argument(
        "--ca",
        type=Path,
        help=f"CA certificate to trust, PEM or DER (default {default_ca}, {ca_source})",
    )
    parser.add_argument(
        "--server-name",
        default=DEFAULT_SERVER_NAME,
        help=f"TLS server name to verify (default {DEFAULT_SERVER_NAME})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=10.0,
        help="connect timeout in seconds (default 10)",
    )


def ca_file(path: Path, *, option: str = "--ca") -> Path:
    """Check that ``path`` holds a certificate (PEM or DER) before anything is dialled.

    The library's one loader (``transport.tls.load_certificates``) parses it, and
    ``ClientTLS`` accepts either format, so a DER file written by the Rust examples is
    used as it is.

    Raises:
        ExampleError: (status 2) the file is missing, unreadable or not a certificate.
    """
    try:
        path.read_bytes()
    except FileNotFoundError:
        raise usage_error(f"{option} {path}: no such file") from None
    except OSError as exc:
        raise usage_error(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        load_certificates(path, "CA file")
    except ConfigError:
        raise usage_error(f"{option} {path}: not a PEM or DER certificate") from None
    return path


def client_tls(args: argparse.Namespace, *, default_ca: Path, written_by: str) -> ClientTLS:
    """The client TLS settings the options ask for: trust ``--ca`` (PEM or DER), or
    ``default_ca``, which the server ``written_by`` writes, when it was not given.

    Raises:
        ExampleError: (status 2) the CA file is missing or not a certificate.
    """
    if args.ca is None and not default_ca.exists():
        raise usage_error(
            f"no --ca given and {default_ca} does not exist: "
            f"start {written_by} first, or pass --ca FILE"
        )
    option = "--ca" if args.ca is not None else "--ca (default)"
    ca: Path = args.ca if args.ca is not None else default_ca
    cafile = ca_file(ca, option=option)
    return ClientTLS(alpn=(args.alpn,), server_name=args.server_name, cafile=str(cafile))


def _is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (or its direct cause) is a deadline that passed."""
    return isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError)


def _closed_words(exc: ConnectionClosed) -> str:
    """A peer's CONNECTION_CLOSE in words: its reason, its code, a hint where one helps."""
    reason = exc.reason or "no reason given"
    hint = " (do both sides use the same --alpn?)" if "alpn" in reason.lower() else ""
    return f"{reason}{hint} [QUIC error code {exc.error_code:#x}]"


def _find_closed(exc: BaseException) -> ConnectionClosed | None:
    """The :class:`ConnectionClosed` behind ``exc`` (itself or a cause), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConnectionClosed):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def describe(exc: BaseException) -> str:
    """``exc`` in words for an ``error:`` line: never a repr, never a traceback."""
    closed = _find_closed(exc)
    if closed is not None:
        return f"the peer closed the connection: {_closed_words(closed)}"
    return str(exc) or type(exc).__name__


def require_stack(stack: str) -> None:
    """Check that the QUIC stack ``--stack`` names can be used.

    Raises:
        ExampleError: (status 2) it is not installed (aioquic is an optional extra).
    """
    try:
        importlib.import_module(f"quic_reverse.transport.{stack}")
    except ImportError:
        raise usage_error(
            f"--stack {stack}: {stack} is not installed (pip install 'quic-reverse[{stack}]')"
        ) from None


async def dial(args: argparse.Namespace, tls: ClientTLS) -> Connection:
    """Connect to ``args.host:args.port`` within ``args.timeout`` seconds.

    Raises:
        ExampleError: (status 1) nobody answered, the certificate is not trusted, or
            the server refused the connection; the message says which, in words.
    """
    require_stack(args.stack)
    address = f"{args.host}:{args.port}"
    # One deadline: the handshake's own bound and ours are the same --timeout.
    options = TransportOptions(handshake_timeout=args.timeout)
    try:
        async with asyncio.timeout(args.timeout):
            return await connect(args.host, args.port, tls=tls, stack=args.stack, options=options)
    except ConfigError:
        raise
    except (QuicReverseError, TimeoutError) as exc:
        if _is_timeout(exc):
            message = (
                f"no answer from {address} within {args.timeout:g} s: "
                "is the server running, is UDP blocked?"
            )
        elif isinstance(exc, CertificateError):
            message = f"{address} is not the server we trust: {exc} (check --ca, --server-name)"
        elif isinstance(exc, ConnectionClosed):
            message = f"{address} refused the connection: {_closed_words(exc)}"
        else:
            message = f"cannot connect to {address}: {exc}"
        raise ExampleError(message) from exc


def peer_ended_normally(exc: BaseException) -> bool:
    """Whether a session that ended with ``exc`` in fact ended normally.

    A peer may close the QUIC connection with code 0 (no error) without sending the
    session's StreamClose first, as the Rust relay example does when it drops its
    connection right after ``close()``; the session reports that as a closed session
    or as a lost connection whose cause is a :class:`ConnectionClosed` with code 0.
    Both are a normal end. A close with any other code, or a lost connection (an idle
    timeout or a stateless reset, which also come with code 0: ``ConnectionClosed.lost``),
    is not.
    """
    if isinstance(exc, SessionClosed):  # a peer's StreamClose(0) has code NORMAL
        return exc.code is None or exc.code == CloseCode.NORMAL
    closed = _find_closed(exc)
    return closed is not None and closed.error_code == 0 and not closed.lost


def add_server_certificate_arguments(parser: argparse.ArgumentParser, *, cert_dir: Path) -> None:
    """``--cert/--key`` (your own PEM pair) or ``--cert-dir`` (where a generated
    development certificate is written, the default)."""
    parser.add_argument("--cert", type=Path, help="certificate chain (PEM); needs --key")
    parser.add_argument("--key", type=Path, help="private key (PEM); needs --cert")
    parser.add_argument(
        "--cert-dir",
        type=Path,
        default=cert_dir,
        help="where to write the generated development certificate (default %(default)s)",
    )


def _readable(path: Path, option: str) -> None:
    """Raise a status-2 :class:`ExampleError` naming ``option`` unless ``path`` can be read."""
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise usage_error(f"{option} {path}: no such file") from None
    except OSError as exc:
        raise usage_error(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    """An encrypted key must fail to load, not prompt on the terminal."""
    raise ValueError("encrypted private keys are not supported")


def check_certificate_pair(cert: Path, key: Path) -> None:
    """Check that ``cert`` and ``key`` are readable PEM files and belong together.

    Raises:
        ExampleError: (status 2) naming ``--cert`` or ``--key`` and what is wrong.
    """
    _readable(cert, "--cert")
    _readable(key, "--key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        raise usage_error(f"--cert {cert}: not a PEM certificate") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            str(cert), str(key), password=_no_password
        )
    except (ssl.SSLError, ValueError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise usage_error(f"--key {key} is not the private key of --cert {cert}") from None
        raise usage_error(
            f"--key {key}: not an unencrypted PEM private key for --cert {cert}"
        ) from None


def server_tls(args: argparse.Namespace) -> ServerTLS:
    """The server TLS settings the options ask for: ``--cert/--key``, checked, or a
    freshly generated development certificate in ``--cert-dir``.

    Raises:
        ExampleError: (status 2) only one of ``--cert``/``--key``, or a bad pair.
    """
    if args.cert is None and args.key is None:
        cert_path, key_path = write_dev_certificate(args.cert_dir)
        print(f"development certificate: {cert_path}", flush=True)
    elif args.key is None:
        raise usage_error("--cert needs --key (the certificate's private key)")
    elif args.cert is None:
        raise usage_error("--key needs --cert (the certificate it belongs to)")
    else:
        cert_path, key_path = args.cert, args.key
        check_certificate_pair(cert_path, key_path)
    return ServerTLS(certfile=str(cert_path), keyfile=str(key_path), alpn=(args.alpn,))


async def listen(
    args: argparse.Namespace,
    tls: ServerTLS,
    on_connection: Callable[[Connection], Awaitable[None]],
) -> QuicServer:
    """Start the QUIC server on ``args.host:args.port`` (0 = a free port).

    Raises:
        ExampleError: (status 1) the address cannot be bound, e.g. the port is taken.
    """
    require_stack(args.stack)
    address = f"{args.host}:{args.port}"
    try:
        return await serve(
            args.host, args.port, tls=tls, on_connection=on_connection, stack=args.stack
        )
    except ConfigError:
        raise
    except QuicReverseError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            message = (
                f"cannot listen on UDP {address}: the port is already in use "
                "(another server? --port 0 picks a free port)"
            )
        elif isinstance(cause, OSError):
            message = f"cannot listen on UDP {address}: {cause.strerror or cause}"
        else:
            message = f"cannot listen on UDP {address}: {exc}"
        raise ExampleError(message) from exc


def write_der_copy(cert_pem_path: Path, der_path: Path) -> None:
    """Write the PEM certificate at ``cert_pem_path`` as DER to ``der_path`` (Rust examples)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem_path.read_text("ascii"))
    try:
        _write_atomic(der_path, der, 0o644)
    except OSError as exc:
        raise usage_error(
            f"--cert-out {der_path}: cannot write it: {exc.strerror or exc}"
        ) from None


@contextlib.contextmanager
def shutdown_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside the block (servers: graceful Ctrl-C)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run an example's ``main`` coroutine; return its exit status.

    Expected failures end with one ``error: ...`` line on stderr and no traceback:
    :class:`ExampleError` with its status, a library :class:`ConfigError` with 2, any
    other :class:`QuicReverseError` with 1; Ctrl-C with 130.
    """
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ExampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QuicReverseError as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return EXIT_FAILURE
