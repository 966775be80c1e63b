"""Echo client: open one service on the echo server, send a message, print the answer.

::

    python examples/echo_client.py echo/uppercase "Hello World"     # prints HELLO WORLD
    python examples/echo_client.py echo/reverse "Hello World"       # prints dlroW olleH
    python examples/echo_client.py nope "x"    # prints the rejection on stderr, exits 1

The client dials the server (QUIC client, session role CLIENT), asks for the service
with an open request, writes the message, half-closes (FIN) and prints everything the
server sends back. By default it trusts the development certificate that
``echo_server.py`` wrote to the per-user temp dir; ``--ca`` names another CA file.

Exit status: 0 on success, 1 if the service was rejected or the connection failed,
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from _common import (
    CERT_NAME,
    add_client_arguments,
    add_common_arguments,
    default_cert_dir,
    dial,
    run,
    setup_logging,
)

from quic_reverse import Config, Metadata, QuicReverseError, Role, Session, StreamRejected
from quic_reverse.transport.quic import ClientTLS

DEFAULT_PORT = 4433
log = logging.getLogger("quic_reverse.examples.echo_client")


async def main(args: argparse.Namespace, tls: ClientTLS) -> int:
    """Connect, open ``args.service``, exchange ``args.message``, print the reply."""
    connection = await dial(args, tls)
    if connection is None:
        return 1

    try:
        session = Session(connection, Role.CLIENT, Config(agent="echo-client/0.1"))
        async with await session.start() as handle:
            log.info("connected to %r", handle.remote_agent)
            try:
                stream = await handle.open(args.service, Metadata.EMPTY)
            except StreamRejected as exc:
                code = getattr(exc.code, "name", exc.code)
                print(f"rejected: {code}: {exc.reason or 'no reason given'}", file=sys.stderr)
                return 1
            async with stream:
                stream.write(args.message.encode("utf-8"))
                await stream.drain()
                await stream.write_eof()
                reply = await stream.read()
            print(reply.decode("utf-8", errors="replace"), flush=True)
            return 0
    except QuicReverseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
        await connection.wait_closed()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service", help="echo/plain, echo/uppercase or echo/reverse")
    parser.add_argument("message", help="the text to send")
    add_common_arguments(parser, port=DEFAULT_PORT)
    parser.add_argument(
        "--ca",
        type=Path,
        help="CA certificate to trust (default: the dev certificate echo_server.py wrote)",
    )
    add_client_arguments(parser)
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options, check the CA file, run the client; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    ca: Path = args.ca if args.ca is not None else default_cert_dir() / CERT_NAME
    if not ca.is_file():
        print(f"error: CA certificate {ca} not found (is echo_server.py running?)", file=sys.stderr)
        return 1
    tls = ClientTLS(alpn=(args.alpn,), server_name=args.server_name, cafile=str(ca))
    return run(main(args, tls))


if __name__ == "__main__":
    sys.exit(cli())
