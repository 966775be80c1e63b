"""Edge: the side behind NAT that dials out and *serves* streams the relay opens.

The edge is the QUIC *client* (session ``Role.CLIENT``): it makes the only outbound
connection, then waits for the relay's open requests and serves two services:

* ``echo`` sends back everything it receives, until the relay half-closes;
* ``time`` writes the current Unix timestamp (seconds) and finishes.

Anything else (the relay's ``foobar`` probe) is rejected with
``UNSUPPORTED_SERVICE``. The edge exits 0 once the relay ends the session normally:
with the session's close, or by closing the QUIC connection with code 0 (no error)
without it, as the Rust relay example may do; either is logged at INFO. It exits 1
if the session fails (another close code, a lost connection) or nobody answers, and
2 if the CA file is missing or not a certificate.

::

    python examples/relay.py            # terminal 1
    python examples/edge.py             # terminal 2

By default the edge trusts the certificate at ``$TMPDIR/quic-reverse-relay.der``,
which both this project's ``relay.py`` and the Rust crate's relay example write, so
it works against either with no flags (ALPN ``quic-reverse-example``, server name
``localhost``, both changeable). ``--ca`` names another CA file (PEM or DER);
``--insecure`` skips verification (development only: the library logs a warning).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time

from _common import (
    EXIT_OK,
    RUST_RELAY_CERT,
    add_client_arguments,
    add_common_arguments,
    client_tls,
    dial,
    peer_ended_normally,
    run,
    setup_logging,
)

from quic_reverse import Config, QuicReverseError, Role, Session, Stream
from quic_reverse.transport.quic import ClientTLS

DEFAULT_PORT = 4434
#: How long ``time`` waits for the relay to half-close after answering.
REQUEST_DRAIN_TIMEOUT = 10.0
log = logging.getLogger("quic_reverse.examples.edge")


async def echo(stream: Stream) -> None:
    """Send every chunk back as it arrives; FIN once the relay has FINed."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        stream.write(chunk)
        await stream.drain()
    await stream.write_eof()
    print(f"echo: echoed {total} bytes", flush=True)


async def unix_time(stream: Stream) -> None:
    """Write the current Unix time in whole seconds, as text, and finish.

    The request body is ignored, but read to its end (bounded), so that the relay's
    FIN is always accepted: returning earlier would make the stream ask the relay to
    stop sending (STOP_SENDING), and a relay that half-closes only after it got the
    stream (as the Rust example does) would see that as an error.
    """
    timestamp = str(int(time.time()))
    stream.write(timestamp.encode("ascii"))
    await stream.write_eof()
    print(f"time: sent {timestamp}", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REQUEST_DRAIN_TIMEOUT):
            await stream.read()


SERVICES = {"echo": echo, "time": unix_time}


async def main(args: argparse.Namespace) -> int:
    """Dial the relay, serve ``echo`` and ``time`` until the relay ends the session."""
    if args.insecure:
        tls = ClientTLS(alpn=(args.alpn,), server_name=args.server_name, verify=False)
    else:
        tls = client_tls(
            args,
            default_ca=RUST_RELAY_CERT,
            written_by="relay.py",
        )
    print(f"connecting to relay {args.host}:{args.port} ...", flush=True)
    connection = await dial(args, tls)
    try:
        session = Session(connection, Role.CLIENT, Config(agent="edge/0.1"))
        async with session.start() as handle:
            print(
                f"connected to relay {args.host}:{args.port} (agent {handle.remote_agent!r}); "
                f"exposing {', '.join(SERVICES)}",
                flush=True,
            )
            try:
                await handle.serve(SERVICES)
            except QuicReverseError as exc:
                if not peer_ended_normally(exc):
                    raise
                # The relay closed the connection with code 0 (no error) without the
                # session's close first: a normal end, not a failure.
                log.info("relay closed the connection without closing the session first (%s)", exc)
            else:
                log.info("relay closed the session")
        print("relay closed the session", flush=True)
        return EXIT_OK
    finally:
        connection.close()
        await connection.wait_closed()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, port=DEFAULT_PORT)
    add_client_arguments(
        parser, default_ca=RUST_RELAY_CERT, ca_source="written by relay.py or the Rust relay"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the relay's certificate (development only)",
    )
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the edge; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
