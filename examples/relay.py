"""Relay: the public side of the reverse pattern.

The relay listens for QUIC connections from edges (it is the QUIC *server* and the
session's ``Role.SERVER``), yet it is the relay that opens streams, to services that
live on the edge behind NAT. For every edge that connects, the relay:

1. opens ``time`` and prints the edge's Unix timestamp,
2. opens ``echo``, sends a message and prints the echo,
3. tries ``foobar``, which the edge does not expose, and prints the rejection,
4. closes the session gracefully.

::

    python examples/relay.py            # terminal 1
    python examples/edge.py             # terminal 2

It mirrors the Rust crate's ``relay`` example (same ALPN ``quic-reverse-example``,
server name ``localhost``, certificate written as DER to
``$TMPDIR/quic-reverse-relay.der``), so the Rust edge can dial this relay and the
Python edge can dial the Rust relay. The relay prints ``listening on HOST:PORT`` when
ready and runs until Ctrl-C/SIGTERM, or, with ``--once``, until the first edge's demo
is done (exit 0 if every step behaved as expected, else 1). Bad ``--cert/--key``
exit 2, a port that is taken 1, each with one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from _common import (
    EXIT_FAILURE,
    EXIT_OK,
    RUST_RELAY_CERT,
    add_common_arguments,
    add_server_certificate_arguments,
    default_cert_dir,
    describe,
    listen,
    run,
    server_tls,
    setup_logging,
    shutdown_on_signals,
    write_der_copy,
)

from quic_reverse import (
    CloseCode,
    Config,
    Metadata,
    QuicReverseError,
    Role,
    Session,
    StreamRejected,
)
from quic_reverse.transport import Connection

DEFAULT_PORT = 4434
ECHO_MESSAGE = "Hello from the relay!"
log = logging.getLogger("quic_reverse.examples.relay")


async def run_demo(connection: Connection) -> bool:
    """Drive the reverse opens against one connected edge; True if all went as expected."""
    peer = "{}:{}".format(*connection.remote_address)
    ok = True
    session = Session(connection, Role.SERVER, Config(agent="relay/0.1"))
    async with session.start() as handle:
        print(f"edge connected from {peer} (agent {handle.remote_agent!r})", flush=True)

        # 1. time: the edge writes its clock and FINs. Our request is empty: read the
        #    answer first, and let leaving the block send our FIN (a graceful close
        #    that tolerates an edge, like the Rust one, that stops reading at once).
        try:
            async with await handle.open("time", Metadata.EMPTY) as stream:
                timestamp = (await stream.read()).decode("utf-8", errors="replace")
            print(f"time: {timestamp}", flush=True)
        except QuicReverseError as exc:
            print(f"time: failed: {describe(exc)}", flush=True)
            ok = False

        # 2. echo: send a message, FIN, read the echo to the end.
        try:
            async with await handle.open("echo", Metadata.EMPTY) as stream:
                stream.write(ECHO_MESSAGE.encode("utf-8"))
                await stream.drain()
                await stream.write_eof()
                reply = (await stream.read()).decode("utf-8", errors="replace")
            print(f"echo: sent {ECHO_MESSAGE!r}, received {reply!r}", flush=True)
            ok = ok and reply == ECHO_MESSAGE
        except QuicReverseError as exc:
            print(f"echo: failed: {describe(exc)}", flush=True)
            ok = False

        # 3. foobar: not exposed by the edge, so it must be rejected.
        try:
            stream = await handle.open("foobar", Metadata.EMPTY)
        except StreamRejected as exc:
            code = getattr(exc.code, "name", exc.code)
            print(f"foobar: rejected as expected: {code} ({exc.reason or 'no reason'})", flush=True)
        except QuicReverseError as exc:
            print(f"foobar: failed: {describe(exc)}", flush=True)
            ok = False
        else:
            print("foobar: unexpectedly accepted", flush=True)
            stream.reset()
            ok = False

        # 4. graceful close: StreamClose(0), wait for the edge's answer.
        await handle.close(CloseCode.NORMAL, "demo complete")
    print(f"edge {peer}: session closed", flush=True)
    return ok


async def main(args: argparse.Namespace) -> int:
    """Listen for edges and run the demo with each; ``--once`` stops after the first."""
    tls = server_tls(args)
    if args.cert_out is not None:
        write_der_copy(Path(tls.certfile), args.cert_out)
        print(f"certificate (DER) for edges: {args.cert_out}", flush=True)
    stop = asyncio.Event()
    results: list[bool] = []

    async def on_connection(connection: Connection) -> None:
        try:
            ok = await run_demo(connection)
        except QuicReverseError as exc:
            print(f"edge session failed: {describe(exc)}", flush=True)
            ok = False
        results.append(ok)
        if args.once:
            stop.set()

    with shutdown_on_signals(stop):
        server = await listen(args, tls, on_connection)
        async with server:
            host, port = server.address
            print(f"listening on {host}:{port}", flush=True)
            await stop.wait()
            print("shutting down", flush=True)
    if args.once and not results:
        return EXIT_FAILURE  # interrupted before any edge came
    return EXIT_OK if all(results) else EXIT_FAILURE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, port=DEFAULT_PORT)
    add_server_certificate_arguments(parser, cert_dir=default_cert_dir() / "relay")
    parser.add_argument(
        "--cert-out",
        type=Path,
        default=RUST_RELAY_CERT,
        help="also write the certificate as DER here, where edges (Python or Rust) look "
        "by default (default %(default)s)",
    )
    parser.add_argument(
        "--no-cert-out",
        dest="cert_out",
        action="store_const",
        const=None,
        help="do not write the DER copy",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit after the first edge's demo (status 0 if it passed)",
    )
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the relay; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
