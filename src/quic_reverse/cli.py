"""``quic-reverse`` command line: ``relay``, ``edge`` and ``token``.

Exit status: 0 after a clean stop (SIGINT/SIGTERM), 1 on a runtime failure
(authentication or certificate rejected by the peer, cannot listen), 2 on a usage or
configuration error found before serving (bad flag or config key, wrong type, missing
or unusable file, certificate and key that do not match). Every error is one line on
stderr naming the option or file at fault, never a traceback. SIGHUP is logged and
ignored (configuration reload is not implemented yet). Settings come from flags and/or
a TOML ``--config`` file (flags win); both are driven by the settings tables of
:mod:`quic_reverse.tunnel.config`; see ``docs/TUNNEL.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ConfigError, QuicReverseError

if TYPE_CHECKING:
    from .tunnel.config import Setting

__all__ = ["main"]

log = logging.getLogger("quic_reverse.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _add_settings(p: argparse.ArgumentParser, table: Sequence[Setting]) -> None:
    """One flag per setting of ``table`` (values stay text: the config builder
    converts and checks them, so flag and file errors read the same)."""
    for s in table:
        help_text = s.help + (f" (default: {s.default})" if s.default is not None else "")
        if s.kind == "bool":
            p.add_argument(s.flag, action="store_true", default=None, help=help_text)
        elif s.kind in ("forwards", "expose", "hostports"):
            p.add_argument(s.flag, action="append", metavar=s.metavar, help=help_text)
        elif s.kind == "choice":
            p.add_argument(s.flag, choices=s.choices, help=help_text)
        else:
            metavar = s.metavar or (
                "S" if s.kind == "seconds" else "N" if s.kind == "count" else None
            )
            p.add_argument(s.flag, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from .tunnel.config import EDGE_TABLE, RELAY_TABLE

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
    r.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML config file (flags override it)"
    )
    _add_settings(r, RELAY_TABLE)

    e = sub.add_parser(
        "edge",
        help="NAT side: dial the relay, expose local TCP services",
        description=(
            "Dial the relay, authenticate as --name with the token in --token-file, and serve "
            "only the --expose'd services (the relay cannot choose any other target). "
            "Reconnects with exponential backoff and full jitter."
        ),
    )
    e.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML config file (flags override it)"
    )
    _add_settings(e, EDGE_TABLE)

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


def _install_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.warning(
                "SIGHUP received: configuration reload is not supported yet; still running"
            ),
        )


def _load(args: argparse.Namespace, section: str) -> tuple[dict[str, Any], Path | None]:
    from .tunnel.config import load_config_file

    if args.config is None:
        return {}, None
    return load_config_file(args.config, section)


async def _run_relay(args: argparse.Namespace) -> int:
    from .tunnel.auth import TokenStore
    from .tunnel.config import RELAY_SETTINGS, build_relay_config, check_stack_installed
    from .tunnel.relay import Relay

    table, base = _load(args, "relay")
    config = build_relay_config(table, base, _flags(args, RELAY_SETTINGS))
    check_stack_installed("--stack", config.stack)
    _setup_logging(config.log_level)
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
    from .tunnel.config import (
        EDGE_SETTINGS,
        build_edge_config,
        check_ca_file,
        check_stack_installed,
    )
    from .tunnel.edge import Edge, EdgeExit

    table, base = _load(args, "edge")
    config = build_edge_config(table, base, _flags(args, EDGE_SETTINGS))
    check_stack_installed("--stack", config.stack)
    if config.ca is not None:
        check_ca_file(config.ca)
    _setup_logging(config.log_level)
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
    runner = _run_relay if args.command == "relay" else _run_edge
    try:
        return asyncio.run(runner(args))
    except ConfigError as exc:
        print(f"quic-reverse {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QuicReverseError as exc:
        print(f"quic-reverse {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
