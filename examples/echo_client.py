"""Echo client: open one service on the echo server, send a message, print the answer.

::

    python examples/echo_client.py echo/uppercase "Hello World"     # prints HELLO WORLD
    python examples/echo_client.py echo/reverse "Hello World"       # prints dlroW olleH
    python examples/echo_client.py nope "x"    # prints the rejection on stderr, exits 1

The client dials the server (QUIC client, session role CLIENT), asks for the service
with an open request, writes the message, half-closes (FIN) and prints everything the
server sends back. By default it trusts the development certificate that
``echo_server.py`` wrote to the per-user temp dir; ``--ca`` names another CA file
(PEM or DER).

Exit status: 0 on success, 1 if the service was rejected or the connection failed,
2 if the CA file is missing or not a certificate, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys

from _common import (
    CERT_NAME,
    EXIT_FAILURE,
    EXIT_OK,
    add_client_arguments,
    add_common_arguments,
    client_tls,
    default_cert_dir,
    dial,
    run,
    setup_logging,
)

from quic_reverse import Config, Metadata, Role, Session, StreamRejected

DEFAULT_PORT = 4433
log = logging.getLogger("quic_reverse.examples.echo_client")


async def main(args: argparse.Namespace) -> int:
    """Connect, open ``args.service``, exchange ``args.message``, print the reply."""
    tls = client_tls(
        args,
        default_ca=default_cert_dir() / CERT_NAME,
        written_by="echo_server.py",
    )
    connection = await dial(args, tls)
    try:
        session = Session(connection, Role.CLIENT, Config(agent="echo-client/0.1"))
        async with session.start() as handle:
            log.info("connected to %r", handle.remote_agent)
            try:
                stream = await handle.open(args.service, Metadata.EMPTY)
            except StreamRejected as exc:
                code = getattr(exc.code, "name", exc.code)
                print(f"rejected: {code}: {exc.reason or 'no reason given'}", file=sys.stderr)
                return EXIT_FAILURE
            async with stream:
                stream.write(args.message.encode("utf-8"))
                await stream.drain()
                await stream.write_eof()
                reply = await stream.read()
            print(reply.decode("utf-8", errors="replace"), flush=True)
            return EXIT_OK
    finally:
        connection.close()
        await connection.wait_closed()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service", help="echo/plain, echo/uppercase or echo/reverse")
    parser.add_argument("message", help="the text to send")
    add_common_arguments(parser, port=DEFAULT_PORT)
    add_client_arguments(
        parser,
        default_ca=default_cert_dir() / CERT_NAME,
        ca_source="written by echo_server.py",
    )
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the client; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
