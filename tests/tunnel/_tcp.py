"""TCP helpers shared by the tunnel tests."""

from __future__ import annotations

import asyncio

CHUNK = 1 << 20


async def send_all_then_eof(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write ``payload`` in 1 MiB chunks, honouring backpressure, then half-close."""
    view = memoryview(payload)
    for i in range(0, len(payload), CHUNK):
        writer.write(view[i : i + CHUNK])
        await writer.drain()
    writer.write_eof()
