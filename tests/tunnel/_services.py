"""Local TCP services for the tunnel tests, run as a separate process.

``python -m tests.tunnel._services`` listens on two free ports of 127.0.0.1 and prints
``ready echo=PORT count=PORT`` on stdout:

* echo: writes back everything it reads; answers the client's FIN with its own FIN.
* count: reads until the client's FIN, then replies ``got <N>`` and closes (half-close).

It exits when its stdin closes (the test harness holds the pipe), so it can never
outlive the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _nodelay(writer)
    with contextlib.suppress(OSError):
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    writer.close()


async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _nodelay(writer)
    total = 0
    with contextlib.suppress(OSError):
        while data := await reader.read(256 * 1024):
            total += len(data)
        writer.write(f"got {total}".encode())
        await writer.drain()
    writer.close()


async def main() -> None:
    limit = 256 * 1024
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0, limit=limit)
    count_srv = await asyncio.start_server(count, "127.0.0.1", 0, limit=limit)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    count_port = count_srv.sockets[0].getsockname()[1]
    print(f"ready echo={echo_port} count={count_port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # returns when the parent goes away
    echo_srv.close()
    count_srv.close()


if __name__ == "__main__":
    asyncio.run(main())
