"""Echo server: three services multiplexed over one QUIC connection.

The server accepts QUIC connections and answers the client's open requests:

* ``echo/plain``     returns the bytes unchanged,
* ``echo/uppercase`` returns them in upper case,
* ``echo/reverse``   returns them reversed.

Any other service is rejected with ``UNSUPPORTED_SERVICE``. Run it, then in a second
terminal run ``echo_client.py``::

    python examples/echo_server.py
    python examples/echo_client.py echo/uppercase "Hello World"     # prints HELLO WORLD

Without ``--cert/--key`` the server generates a development certificate at start-up
and writes it to ``--cert-dir`` (a per-user temp dir), where the client looks by
default. The server prints ``listening on HOST:PORT`` once it is ready (``--port 0``
picks a free port) and stops cleanly on Ctrl-C or SIGTERM (exit status 0). It exits
2 if ``--cert/--key`` are missing, unreadable or do not belong together, and 1 if it
cannot listen (the port is taken), with one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from _common import (
    EXIT_OK,
    add_common_arguments,
    add_server_certificate_arguments,
    default_cert_dir,
    listen,
    run,
    server_tls,
    setup_logging,
    shutdown_on_signals,
)

from quic_reverse import Config, Role, Session, Stream
from quic_reverse.transport import Connection

DEFAULT_PORT = 4433
log = logging.getLogger("quic_reverse.examples.echo_server")


def _transform_text(data: bytes, op: str) -> bytes:
    """Apply ``op`` to ``data`` as UTF-8 text when it is text, else byte-wise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.upper() if op == "upper" else data[::-1]
    return (text.upper() if op == "upper" else text[::-1]).encode("utf-8")


async def echo_plain(stream: Stream) -> None:
    """Send every chunk straight back as it arrives, then FIN when the client FINs."""
    async for chunk in stream:
        stream.write(chunk)
        await stream.drain()
    await stream.write_eof()


async def echo_uppercase(stream: Stream) -> None:
    """Read the whole message (to FIN), answer it in upper case."""
    data = await stream.read()
    stream.write(_transform_text(data, "upper"))
    await stream.write_eof()


async def echo_reverse(stream: Stream) -> None:
    """Read the whole message (to FIN), answer it reversed."""
    data = await stream.read()
    stream.write(_transform_text(data, "reverse"))
    await stream.write_eof()


SERVICES = {
    "echo/plain": echo_plain,
    "echo/uppercase": echo_uppercase,
    "echo/reverse": echo_reverse,
}


async def handle_connection(connection: Connection) -> None:
    """One client: negotiate (server role), then route its open requests until it leaves."""
    session = Session(connection, Role.SERVER, Config(agent="echo-server/0.1"))
    async with session.start() as handle:
        log.info("client %s connected (agent %r)", connection.remote_address, handle.remote_agent)
        await handle.serve(SERVICES)
    log.info("client %s done", connection.remote_address)


async def main(args: argparse.Namespace) -> int:
    """Start the QUIC server, print the ready line, serve until Ctrl-C/SIGTERM."""
    tls = server_tls(args)
    stop = asyncio.Event()
    with shutdown_on_signals(stop):
        server = await listen(args, tls, handle_connection)
        async with server:
            host, port = server.address
            print(f"listening on {host}:{port}", flush=True)
            await stop.wait()
            print("shutting down", flush=True)
    return EXIT_OK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, port=DEFAULT_PORT)
    add_server_certificate_arguments(parser, cert_dir=default_cert_dir())
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the server; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
