"""Helpers shared by the example scripts: options, logging, certificates, shutdown.

This module is part of the examples, not of the library. It keeps the scripts short
and makes them behave the same way: every example takes ``--host``/``--port``, ``-v``
for debug logging, exits 0 on success, and stops cleanly on Ctrl-C (servers also on
SIGTERM) without a traceback.

Certificates: the servers generate a *development* certificate (end-entity, SAN
``localhost`` + ``127.0.0.1``) at start-up and write it where the matching client looks
by default, so the two-terminal demos need no flags. Real deployments pass
``--cert/--key`` (server) and ``--ca`` (client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import signal
import ssl
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

from quic_reverse import QuicReverseError
from quic_reverse.transport import Connection
from quic_reverse.transport.quic import ClientTLS, connect
from quic_reverse.transport.tls import generate_self_signed

DEFAULT_HOST = "127.0.0.1"
#: ALPN and TLS server name of the Rust crate's examples: keep them so both interoperate.
DEFAULT_ALPN = "quic-reverse-example"
DEFAULT_SERVER_NAME = "localhost"
#: Where the Rust relay example writes its certificate (DER) and the Rust edge reads it.
#: The Python relay writes the same file, so either edge finds either relay.
RUST_RELAY_CERT = Path(tempfile.gettempdir()) / "quic-reverse-relay.der"

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"

log = logging.getLogger("quic_reverse.examples")


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


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server-name`` (the TLS name to verify) and ``--timeout`` (connect deadline)."""
    parser.add_argument(
        "--server-name",
        default=DEFAULT_SERVER_NAME,
        help=f"TLS server name to verify (default {DEFAULT_SERVER_NAME})",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="connect timeout in seconds (default 10)"
    )


async def dial(args: argparse.Namespace, tls: ClientTLS) -> Connection | None:
    """Connect to ``args.host:args.port`` within ``args.timeout``; on failure print why
    and return ``None``."""
    try:
        async with asyncio.timeout(args.timeout):
            return await connect(args.host, args.port, tls=tls, stack=args.stack)
    except (QuicReverseError, TimeoutError) as exc:
        print(f"error: cannot connect to {args.host}:{args.port}: {exc!r}", file=sys.stderr)
        return None


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


def server_certificate(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """The ``(cert, key)`` paths the options ask for, generating a development
    certificate unless ``--cert/--key`` were given; ``None`` (after printing why) if
    only one of the two was given."""
    if (args.cert is None) != (args.key is None):
        print("error: --cert and --key go together", file=sys.stderr)
        return None
    if args.cert is not None:
        return args.cert, args.key
    cert_path, key_path = write_dev_certificate(args.cert_dir)
    print(f"development certificate: {cert_path}", flush=True)
    return cert_path, key_path


def write_der_copy(cert_pem_path: Path, der_path: Path) -> None:
    """Write the PEM certificate at ``cert_pem_path`` as DER to ``der_path`` (Rust examples)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem_path.read_text("ascii"))
    _write_atomic(der_path, der, 0o644)


def pem_ca_file(path: Path, scratch_dir: Path) -> Path:
    """Return a PEM file for the CA certificate at ``path``, which may be PEM or DER.

    The Rust examples write DER; the QUIC stacks want PEM, so a DER file is converted
    into ``scratch_dir``.
    """
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return path
    pem = ssl.DER_cert_to_PEM_cert(data)
    scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = scratch_dir / f"{path.stem}.pem"
    _write_atomic(out, pem.encode("ascii"), 0o644)
    return out


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
    """Run an example's ``main`` coroutine and turn Ctrl-C into exit status 130, no traceback."""
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
