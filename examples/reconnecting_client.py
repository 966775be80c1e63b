"""Reconnecting client: ``reconnecting()`` dials again, with backoff, whenever the
session ends — here because the server closes it, then because the server restarts.

The server (in the same process, for a one-command demo) plays the relay's part: on
every session it opens a ``hello`` stream to the client, prints the answer and closes
the session. After the first session it also goes away for a moment (closes its UDP
socket and listens again on the same port): the client's dials fail meanwhile and it
backs off (capped exponential backoff with full jitter, as the tunnel's edge) until the
server is back. The client serves its handlers on every session with one call::

    async with reconnecting(host, port, tls=tls) as sessions:
        await sessions.serve({"hello": hello})

::

    python examples/reconnecting_client.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from _common import add_common_arguments, run, setup_logging

from quic_reverse import Role, Session, Stream
from quic_reverse.reconnect import reconnecting
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, ServerTLS, TransportOptions, serve
from quic_reverse.transport.tls import write_self_signed

SESSIONS = 3


async def main(args: argparse.Namespace) -> int:
    """Run the server and the reconnecting client until the client had 3 sessions."""
    with tempfile.TemporaryDirectory(prefix="quic-reverse-reconnect-") as tmp:
        cert, key = write_self_signed(Path(tmp))
        server_tls = ServerTLS(certfile=cert, keyfile=key, alpn=(args.alpn,))
        answers: asyncio.Queue[str] = asyncio.Queue()

        async def on_connection(conn: Connection) -> None:
            # Leaving the block closes the session (and the stream): the client dials again.
            async with (
                Session(conn, Role.SERVER).start() as handle,
                await handle.open("hello") as stream,
            ):
                await stream.send(b"hello?")
                await stream.write_eof()
                await answers.put((await stream.read()).decode())

        server = await serve(args.host, args.port, tls=server_tls, on_connection=on_connection)
        host, port = server.address
        print(f"server listening on {host}:{port}")

        async def hello(stream: Stream) -> None:
            question = await stream.read()  # until the server's FIN
            reply = f"{question.decode()} hello from client session {sessions.sessions}"
            await stream.send(reply.encode())

        client_tls = ClientTLS(cafile=cert, alpn=(args.alpn,))
        options = TransportOptions(handshake_timeout=args.handshake_timeout)
        async with reconnecting(
            host, port, tls=client_tls, options=options, backoff_initial=0.1, backoff_cap=0.5
        ) as sessions:
            client = asyncio.create_task(sessions.serve({"hello": hello}))
            async with asyncio.timeout(args.timeout):
                for number in range(1, SESSIONS + 1):
                    print(f"session {number}: the client answered {await answers.get()!r}")
                    if number == 1:
                        print("server restarting: the client's dials fail and back off")
                        server.close()
                        await server.wait_closed()
                        await asyncio.sleep(args.handshake_timeout * 1.5)
                        server = await serve(
                            host, port, tls=server_tls, on_connection=on_connection
                        )
            sessions.stop()
            await client
        print(f"the client made {sessions.sessions} sessions in {sessions.attempts} dials")
        server.close()
        await server.wait_closed()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, port=0)
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="bound on the whole run (default 20 s)"
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=0.5,
        help="a dial with no answer fails after this many seconds (default 0.5)",
    )
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the example; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
