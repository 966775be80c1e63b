"""Embedded tunnel: a relay and an edge started from Python, no CLI.

One process plays all four parts, so it runs anywhere with one command:

1. a local TCP echo service (what an edge exposes, e.g. an SSH server),
2. a :class:`~quic_reverse.tunnel.api.Relay` listening for edges on UDP and forwarding
   a TCP port to the edge's ``echo`` service,
3. an :class:`~quic_reverse.tunnel.api.Edge` that dials the relay, authenticates with
   its token and exposes the echo service (reconnecting with backoff if it must),
4. a TCP client that connects to the relay's forward and is answered by the echo
   service behind the edge.

::

    python examples/embedded_tunnel.py

The settings are the keyword arguments of the CLI's ``[relay]``/``[edge]`` tables
(``quic-reverse relay --forward ...`` is ``Relay(forward=[...])``). The relay uses a
development certificate (``self_signed=True``) and the edge pins its fingerprint.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from _common import add_common_arguments, run, setup_logging

from quic_reverse.tunnel.api import Edge, Relay
from quic_reverse.tunnel.auth import generate_token


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The local service the edge exposes."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def write_tokens(directory: Path, edge: str) -> tuple[Path, Path]:
    """The relay's tokens file and the edge's token file (private: mode 600)."""
    token = generate_token()
    tokens = directory / "tokens.toml"
    tokens.write_text(f'{edge} = "{token}"\n')
    token_file = directory / f"{edge}.token"
    token_file.write_text(token + "\n")
    for path in (tokens, token_file):
        path.chmod(0o600)
    return tokens, token_file


async def main(args: argparse.Namespace) -> int:
    """Start service, relay and edge; send one message through the tunnel."""
    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="quic-reverse-embedded-") as tmp:
        tokens, token_file = write_tokens(Path(tmp), "office")
        relay = Relay(
            listen=f"{args.host}:{args.port}",
            self_signed=True,
            state_dir=Path(tmp) / "state",
            tokens=tokens,
            forward=["127.0.0.1:0=office/echo"],
            alpn=args.alpn,
            stack=args.stack,
        )
        async with relay:
            print("relay listening on {}:{}".format(*relay.address))
            edge = Edge(
                relay="{}:{}".format(*relay.address),
                name="office",
                token_file=token_file,
                fingerprint=relay.fingerprint,
                expose=[f"echo=127.0.0.1:{service_port}"],
                alpn=args.alpn,
                stack=args.stack,
            )
            async with edge:
                async with asyncio.timeout(args.timeout):
                    await relay.wait_for_edge("office")
                print("edge 'office' connected; exposes echo")
                host, port = relay.forward_address("office", "echo")
                async with asyncio.timeout(args.timeout):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(args.message.encode())
                    writer.write_eof()
                    reply = await reader.read()
                    writer.close()
                    await writer.wait_closed()
                print(f"tcp {host}:{port} -> relay -> edge -> echo: {reply.decode()!r}")
            print(f"edge stopped: {(await edge.wait()).name}")
        print("relay stopped")
    service.close()
    await service.wait_closed()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, port=0)
    parser.add_argument("--message", default="Hello through the tunnel", help="what to send")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each step (default 10)"
    )
    args = parser.parse_args(argv)
    if args.alpn == parser.get_default("alpn"):
        args.alpn = "quic-reverse-tunnel/1"  # the tunnel's own ALPN, as the CLI
    return args


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the example; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
