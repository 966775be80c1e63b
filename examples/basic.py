"""Basic: two sessions in one process over the in-memory transport (no network).

Shows the whole life of a session with the low-level API, step by step:

1. negotiation (Hello/HelloAck both ways) and the negotiated parameters,
2. a ping and its round-trip time,
3. an open request that the server accepts, with data both ways,
4. an open request that the server rejects,
5. a graceful session close that the server receives.

::

    python examples/basic.py

The in-memory transport (``quic_reverse.transport.memory``) behaves like QUIC streams
without sockets, which makes it the right tool for unit tests of code built on
sessions. Swap ``connection_pair()`` for ``quic_reverse.transport.quic.connect`` /
``serve`` and nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from _common import run, setup_logging

from quic_reverse import (
    CloseCode,
    CloseReceived,
    Config,
    Metadata,
    OpenRequest,
    RejectCode,
    Role,
    Session,
    SessionHandle,
    StreamRejected,
)
from quic_reverse.transport.memory import connection_pair

log = logging.getLogger("quic_reverse.examples.basic")


async def server_loop(handle: SessionHandle) -> None:
    """The server side, low level: react to each control event as it arrives."""
    while (event := await handle.process_message()) is not None:
        match event:
            case OpenRequest(request_id=request_id, service="greeting"):
                print(f"  server: open request {request_id} for 'greeting', accepting")
                stream = await handle.accept_open(request_id)
                async with stream:
                    name = (await stream.read()).decode()
                    stream.write(f"Hello, {name}!".encode())
                    await stream.write_eof()
            case OpenRequest(request_id=request_id, service=service):
                print(f"  server: open request {request_id} for {service!r}, rejecting")
                await handle.reject_open(
                    request_id, RejectCode.UNSUPPORTED_SERVICE, f"no service {service!r}"
                )
            case CloseReceived(code=code, reason=reason):
                print(f"  server: close received: {code.name} ({reason})")
                return
            case _:
                print(f"  server: event {event}")


async def main(args: argparse.Namespace) -> int:
    """Run both sides of one session and print what happens."""
    print("=== quic-reverse basic example (in-memory transport) ===")
    client_conn, server_conn = connection_pair()
    client = Session(client_conn, Role.CLIENT, Config(agent="example-client/1.0"))
    server = Session(server_conn, Role.SERVER, Config(agent="example-server/1.0"))

    print("negotiating...")
    client_handle, server_handle = await asyncio.gather(client.start(), server.start())
    print("negotiated parameters (client view):")
    print(f"  protocol version: {client_handle.negotiated_version}")
    print(f"  features:         {client_handle.negotiated_features!r}")
    print(f"  remote agent:     {client_handle.remote_agent}")

    server_task = asyncio.create_task(server_loop(server_handle))

    rtt = await client_handle.ping()
    print(f"ping: pong after {rtt * 1000:.3f} ms")

    print("open 'greeting':")
    async with await client_handle.open("greeting", Metadata.EMPTY) as stream:
        stream.write(b"Python")
        await stream.drain()
        await stream.write_eof()
        reply = (await stream.read()).decode()
    print(f"  client: reply {reply!r} on logical stream {stream.logical_stream_id}")

    print("open 'nothing-here':")
    try:
        await client_handle.open("nothing-here", Metadata.EMPTY)
    except StreamRejected as exc:
        print(f"  client: rejected: {getattr(exc.code, 'name', exc.code)} ({exc.reason})")

    print("closing the session...")
    await client_handle.close(CloseCode.NORMAL, "example complete")
    await asyncio.wait_for(server_task, timeout=10)
    await server_handle.close(CloseCode.NORMAL, None)
    print("=== done ===")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Parse options and run the example; return the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
