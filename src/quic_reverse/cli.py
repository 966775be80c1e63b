"""``quic-reverse`` command line: ``relay``, ``edge`` and ``token``.

Exit status: 0 after a clean stop (SIGINT/SIGTERM), 1 on a runtime failure
(authentication or certificate rejected, cannot listen), 2 on a usage or
configuration error. Settings come from flags and/or a TOML ``--config`` file
(flags win); see ``docs/TUNNEL.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, QuicReverseError

__all__ = ["main"]

log = logging.getLogger("quic_reverse.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML config file (flags override it)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity on stderr (default: info)",
    )
    p.add_argument("--alpn", help="ALPN protocol id (default: quic-reverse-tunnel/1)")
    p.add_argument("--stack", choices=("qh3", "aioquic"), help="QUIC stack (default: qh3)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="quic-reverse",
        description=(
            "Reach TCP services behind NAT through a relay, over QUIC reverse streams. "
            "Run `relay` on a public host and `edge` next to the services."
        ),
        epilog="Full guide: docs/TUNNEL.md. Exit status: 0 ok, 1 failure, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"quic-reverse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "relay",
        help="public side: accept edges, publish TCP forwards",
        description=(
            "Accept edges over QUIC, authenticate them with per-edge tokens, and for each "
            "--forward listen on TCP; every TCP connection becomes a reverse stream to that "
            "edge's service."
        ),
    )
    _common(r)
    r.add_argument(
        "--listen", metavar="HOST:PORT", help="UDP address for edges (default: 0.0.0.0:4433)"
    )
    r.add_argument("--cert", metavar="FILE", help="TLS certificate (PEM)")
    r.add_argument("--key", metavar="FILE", help="TLS private key (PEM)")
    r.add_argument(
        "--self-signed",
        action="store_true",
        default=None,
        help="development: generate (once) a certificate in --state-dir and print its "
        "SHA-256 fingerprint for the edge's --fingerprint",
    )
    r.add_argument(
        "--state-dir", metavar="DIR", help="where --self-signed keeps it (default: .quic-reverse)"
    )
    r.add_argument(
        "--tokens", metavar="FILE", help='TOML file of edge tokens: one  name = "token"  per line'
    )
    r.add_argument(
        "--forward",
        action="append",
        metavar="[HOST:]PORT=EDGE/SERVICE",
        help="TCP listener mapped to an edge's service; HOST defaults to 127.0.0.1 "
        "(repeatable; port 0 picks a free port, logged at start)",
    )
    r.add_argument(
        "--auth-timeout", type=_seconds, metavar="S", help="close unauthenticated edges (10)"
    )
    r.add_argument("--open-timeout", type=_seconds, metavar="S", help="edge answer deadline (10)")
    r.add_argument("--grace", type=_seconds, metavar="S", help="shutdown grace for streams (10)")
    r.add_argument("--ping-interval", type=_seconds, metavar="S", help="keep-alive ping (10)")
    r.add_argument("--ping-timeout", type=_seconds, metavar="S", help="dead after no pong (10)")

    e = sub.add_parser(
        "edge",
        help="NAT side: dial the relay, expose local TCP services",
        description=(
            "Dial the relay, authenticate as --name with the token in --token-file, and serve "
            "only the --expose'd services (the relay cannot choose any other target). "
            "Reconnects with exponential backoff and full jitter."
        ),
    )
    _common(e)
    e.add_argument("--relay", metavar="HOST:PORT", help="the relay's QUIC address")
    e.add_argument("--name", help="this edge's name (as in the relay's tokens file)")
    e.add_argument("--token-file", metavar="FILE", help="file holding this edge's token")
    e.add_argument(
        "--expose",
        action="append",
        metavar="SERVICE=HOST:PORT",
        help="allow-listed local service (repeatable)",
    )
    e.add_argument("--ca", metavar="FILE", help="CA/certificate file to verify the relay")
    e.add_argument(
        "--fingerprint", metavar="SHA256", help="pin the relay certificate's SHA-256 (hex)"
    )
    e.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="DO NOT verify the relay certificate (development only; logged loudly)",
    )
    e.add_argument("--server-name", help="TLS server name to verify (default: localhost)")
    e.add_argument("--ping-interval", type=_seconds, metavar="S", help="keep-alive ping (5)")
    e.add_argument("--ping-timeout", type=_seconds, metavar="S", help="relay dead after (5)")
    e.add_argument("--idle-timeout", type=_seconds, metavar="S", help="QUIC idle timeout (30)")
    e.add_argument(
        "--connect-timeout", type=_seconds, metavar="S", help="connect+handshake deadline (10)"
    )
    e.add_argument(
        "--backoff-initial", type=_seconds, metavar="S", help="first reconnect delay cap (0.5)"
    )
    e.add_argument("--backoff-cap", type=_seconds, metavar="S", help="max reconnect delay (10)")
    e.add_argument(
        "--auth-retry",
        action="store_true",
        default=None,
        help="on a rejected token keep retrying every 60 s instead of exiting with status 1",
    )

    sub.add_parser("token", help="print a new random token for the tokens/token files")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _install_signals(stop: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


async def _run_relay(args: argparse.Namespace) -> int:
    from .tunnel.auth import TokenStore
    from .tunnel.config import RELAY_SETTINGS, build_relay_config, load_config_file
    from .tunnel.relay import Relay

    table: dict[str, Any] = {}
    base: Path | None = None
    if args.config is not None:
        table, base = load_config_file(args.config, "relay")
    config = build_relay_config(table, base, _flags(args, RELAY_SETTINGS))
    assert config.tokens is not None
    tokens = TokenStore.from_file(config.tokens)
    relay = Relay(config, tokens)
    stop = asyncio.Event()
    _install_signals(stop.set)
    try:
        await relay.start()
    except ConfigError:
        await relay.shutdown()
        raise
    except (OSError, QuicReverseError) as exc:
        log.error("cannot start the relay: %s", exc)
        await relay.shutdown()
        return EXIT_FAILURE
    if config.self_signed and relay.fingerprint:
        print(f"relay certificate sha256 fingerprint: {relay.fingerprint}", flush=True)
    await stop.wait()
    log.info("signal received")
    await relay.shutdown()
    return EXIT_OK


async def _run_edge(args: argparse.Namespace) -> int:
    from .tunnel.config import EDGE_SETTINGS, build_edge_config, load_config_file
    from .tunnel.edge import Edge, EdgeExit

    table: dict[str, Any] = {}
    base: Path | None = None
    if args.config is not None:
        table, base = load_config_file(args.config, "edge")
    config = build_edge_config(table, base, _flags(args, EDGE_SETTINGS))
    edge = Edge(config)
    _install_signals(edge.stop)
    outcome = await edge.run()
    return EXIT_OK if outcome is EdgeExit.STOPPED else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``quic-reverse`` and ``python -m quic_reverse``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "token":
        from .tunnel.auth import generate_token

        print(generate_token())
        return EXIT_OK
    _setup_logging(args.log_level)
    runner = _run_relay if args.command == "relay" else _run_edge
    try:
        return asyncio.run(runner(args))
    except ConfigError as exc:
        print(f"quic-reverse {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QuicReverseError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
