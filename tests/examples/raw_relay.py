"""A raw relay for the edge example's tests: negotiates by hand, then closes abruptly.

It is the QUIC server side of ``examples/edge.py`` speaking raw control frames (no
``Session``), so it does exactly what the test asks and nothing more: accept one
connection, take the edge's control stream, exchange Hello/HelloAck, then close the
QUIC connection with ``--code`` (0 = no error) **without** sending StreamClose first,
as the Rust relay example sometimes does when it drops its connection right after
``close()``.

::

    python tests/examples/raw_relay.py --cert-dir DIR [--code N]

prints ``listening on HOST:PORT`` when ready (``DIR/cert.pem`` is the certificate the
edge must trust), ``negotiated`` once the Hello/HelloAck exchange is done, ``closed
with code N`` after the close, and exits 0; 1 if the edge does not negotiate within
``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from quic_reverse.transport import Connection
from quic_reverse.transport.base import RecvStream
from quic_reverse.transport.quic import ServerTLS, serve
from quic_reverse.transport.tls import write_self_signed
from quic_reverse.wire import (
    Features,
    FrameReader,
    Hello,
    HelloAck,
    Message,
    decode,
    encode_message_frame,
)

ALPN = "quic-reverse-example"  # what examples/edge.py offers by default


async def read_until(recv: RecvStream, reader: FrameReader, kind: type[Message]) -> Message:
    """Read control frames until one of type ``kind`` arrives (the caller bounds the time)."""
    while True:
        data = await recv.read(65536)
        if not data:
            raise EOFError(f"control stream ended before {kind.__name__}")
        for payload in reader.feed(data):
            message = decode(payload)
            if isinstance(message, kind):
                return message


async def negotiate_and_close(connection: Connection, code: int) -> None:
    """Answer the edge's Hello like a relay would, then close the connection with ``code``."""
    pair = await connection.accept_bi()
    if pair is None:
        raise EOFError("the edge closed before opening its control stream")
    send, recv = pair
    reader = FrameReader()
    await read_until(recv, reader, Hello)
    await send.write(
        encode_message_frame(Hello(protocol_version=1, features=Features(0), agent="raw-relay"))
        + encode_message_frame(HelloAck(selected_version=1, selected_features=Features(0)))
    )
    await read_until(recv, reader, HelloAck)
    print("negotiated", flush=True)
    connection.close(code, b"")  # no StreamClose(0) before it
    await connection.wait_closed()
    print(f"closed with code {code}", flush=True)


async def main(args: argparse.Namespace) -> int:
    """Serve one edge connection, then exit."""
    cert, key = write_self_signed(args.cert_dir)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_connection(connection: Connection) -> None:
        try:
            await negotiate_and_close(connection, args.code)
        except Exception as exc:  # reported through the exit status
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)

    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=cert, keyfile=key, alpn=(ALPN,)),
        on_connection=on_connection,
    )
    async with server:
        print("listening on {}:{}".format(*server.address), flush=True)
        try:
            async with asyncio.timeout(args.timeout):
                await done
        except (TimeoutError, EOFError) as exc:
            print(f"raw relay: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--code", type=int, default=0, help="QUIC application error code")
    parser.add_argument("--timeout", type=float, default=30.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
