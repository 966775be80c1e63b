"""Session overhead: reverse opens and one-stream throughput, each beside raw QUIC (qh3).

Run alone with ``.venv/bin/python -m bench.session [--quick]``. Both ends run in this
process, over real UDP on 127.0.0.1, on one qh3 connection; every session figure has its
raw-transport twin measured in the same run on a fresh connection of the same stack:

* **open + echo, sequential**: one stream at a time. Raw: ``open_bi`` + 1-byte echo.
  Session: ``handle.open("echo")`` (the reverse open: OpenRequest, OpenResponse, the peer
  opens the stream, StreamBind pairing) + the same 1-byte echo. Opens/s and p50/p99 µs.
* **open + echo, 64 concurrent**: 64 workers doing the same in parallel; opens/s and
  p50/p99 latency per open.
* **one-stream throughput**: a bulk upload (opener -> peer), MB/s until the peer has
  read everything and acknowledged, session ``Stream.send`` vs raw ``SendStream.write``.
  Both go the same way, QUIC server -> client (the relay sends to the edge), which in
  qh3 is slower than client -> server.

Both open figures come with the process CPU time per open (both ends run here, so it
is the whole cost of an open, and much less disturbed by other load than wall time).

Goals (issues 4 and 11): opens >= 0.8x raw, sequential and 64 concurrent; throughput
>= 0.95x raw. Ratios above 1 are better than raw (for latency and CPU, raw / session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

from bench._harness import Row, make_row, percentile, print_table, summarize
from bench.transport import open_echo, serve_echo  # the transport bench's own ops
from quic_reverse import Config, Role, Session, SessionHandle, Stream
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, ServerTLS, connect, serve
from quic_reverse.transport.tls import write_self_signed

STACK: Literal["qh3", "aioquic"] = "qh3"
CONCURRENCY = 64
CHUNK = 64 * 1024


@contextlib.asynccontextmanager
async def quic_connection_pair(certdir: Path) -> AsyncIterator[tuple[Connection, Connection]]:
    """A fresh (client, server) qh3 connection over loopback UDP."""
    cert, key = write_self_signed(certdir)
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    async def on_connection(conn: Connection) -> None:
        if not accepted.done():
            accepted.set_result(conn)
        await conn.wait_closed()

    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=str(cert), keyfile=str(key)),
        on_connection=on_connection,
        stack=STACK,
    )
    client: Connection | None = None
    try:
        host, port = server.address
        client = await connect(host, port, tls=ClientTLS(cafile=str(cert)), stack=STACK)
        async with asyncio.timeout(10):
            server_conn = await accepted
        yield client, server_conn
    finally:
        if client is not None:
            client.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await client.wait_closed()
        server.close()
        await server.wait_closed()


# ----------------------------------------------------------------------------- raw


async def _raw_sink_server(conn: Connection) -> None:
    """Accept one stream; read it to EOF, then answer with one byte and FIN."""
    pair = await conn.accept_bi()
    if pair is None:
        return
    send, recv = pair
    while await recv.read(CHUNK):
        pass
    await send.write(b"k")
    await send.finish()


async def raw_open(conn: Connection) -> None:
    """A raw stream open, used and ended: open_bi, 1 byte each way (the peer has
    accepted it: usable at both ends), then FIN and stop reading."""
    send, recv = await conn.open_bi()
    await send.write(b"x")
    if await recv.read_exactly(1) != b"x":
        raise RuntimeError("raw open mismatch")
    await send.finish()
    recv.stop(0)


# ----------------------------------------------------------------------------- session


async def _session_echo(stream: Stream) -> None:
    async for chunk in stream:
        await stream.send(chunk)


async def _session_sink(stream: Stream) -> None:
    while await stream.read(CHUNK):
        pass
    await stream.send(b"k")


async def _session_null(stream: Stream) -> None:
    """Accept, wait for the opener's FIN, return (serve() then sends FIN)."""
    await stream.read()


async def session_open(handle: SessionHandle) -> None:
    """A reverse open, used and ended: open() returns once the peer accepted it and its
    StreamBind arrived (usable at both ends); then FIN and stop reading (aclose)."""
    stream = await handle.open("null")
    await stream.aclose()


async def session_open_echo(handle: SessionHandle) -> None:
    stream = await handle.open("echo")
    await stream.send(b"x")
    await stream.write_eof()
    if await stream.readexactly(1) != b"x" or await stream.read(1) != b"":
        raise RuntimeError("session echo mismatch")
    await stream.aclose()


@contextlib.asynccontextmanager
async def session_pair(certdir: Path) -> AsyncIterator[SessionHandle]:
    """Yield the relay-side (server) handle; the edge (client) serves echo and sink."""
    async with quic_connection_pair(certdir) as (c, s):
        edge, relay = await asyncio.gather(
            Session(c, Role.CLIENT, Config(agent="bench-edge")).start(),
            Session(s, Role.SERVER, Config(agent="bench-relay")).start(),
        )
        serving = asyncio.create_task(
            edge.serve({"echo": _session_echo, "sink": _session_sink, "null": _session_null})
        )
        try:
            yield relay
        finally:
            await relay.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await serving
            await edge.close()


# ----------------------------------------------------------------------------- measuring


async def sequential(
    op: Callable[[], Awaitable[None]], n: int, cpu: list[float] | None = None
) -> list[float]:
    """Latency (s) of ``n`` back-to-back operations, after a short warm-up; appends
    the process CPU µs per operation (both ends) to ``cpu`` if given."""
    for _ in range(min(20, n)):
        await op()
    out = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await op()
        out.append(time.perf_counter() - t0)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / n * 1e6)
    return out


Conc = tuple[float, list[float], float]


async def concurrent(op: Callable[[], Awaitable[None]], n: int, workers: int) -> Conc:
    """Run ``n`` operations with ``workers`` in flight.

    Returns (ops/s, latencies, CPU µs per op). Both ends run in this process, so the
    process CPU time per op is the whole cost of an open, and is much less disturbed
    than wall time by other load on a shared machine.
    """
    await asyncio.gather(*(op() for _ in range(workers)))  # warm-up
    latencies: list[float] = []
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    cpu = (time.process_time() - c0) / n * 1e6
    return n / (time.perf_counter() - t0), latencies, cpu


async def raw_upload(conn: Connection, peer: Connection, nbytes: int) -> tuple[float, float]:
    """One raw stream carrying ``nbytes`` to a sink (on ``peer``) that acknowledges at
    EOF: (MB/s wall, MB per CPU second of this process, i.e. both ends)."""
    sink = asyncio.create_task(_raw_sink_server(peer))
    payload = b"\xab" * CHUNK
    t0 = time.perf_counter()
    c0 = time.process_time()
    send, recv = await conn.open_bi()
    sent = 0
    while sent < nbytes:
        await send.write(payload)
        sent += len(payload)
    await send.finish()
    ack = await recv.read(1)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await sink
    if ack != b"k":
        raise RuntimeError("raw upload not acknowledged")
    return sent / elapsed / 1e6, sent / cpu / 1e6


async def session_upload(handle: SessionHandle, nbytes: int) -> tuple[float, float]:
    """The same upload through a session stream (see :func:`raw_upload`)."""
    payload = b"\xab" * CHUNK
    t0 = time.perf_counter()
    c0 = time.process_time()
    stream = await handle.open("sink")
    sent = 0
    while sent < nbytes:
        await stream.send(payload)
        sent += len(payload)
    await stream.write_eof()
    ack = await stream.read(1)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await stream.aclose()
    if ack != b"k":
        raise RuntimeError("session upload not acknowledged")
    return sent / elapsed / 1e6, sent / cpu / 1e6


Op = Callable[[], Awaitable[None]]


def _latency_rows(
    label: str, ses: list[list[float]], raw: list[list[float]], goal: str, baseline: str
) -> list[Row]:
    """Rate row (opens/s from the mean latency of each sample) plus p50/p99 rows."""

    def rate(lat: list[float]) -> float:
        return len(lat) / sum(lat)

    rows = [
        make_row(
            label,
            "opens/s",
            [rate(x) for x in ses],
            goal=goal,
            baseline=baseline,
            baseline_value=summarize(rate(x) for x in raw).median,
        )
    ]
    for pct in (50, 99):
        rows.append(
            make_row(
                f"{label} p{pct}",
                "µs",
                [percentile(x, pct) * 1e6 for x in ses],
                goal="informational (ratio = raw / session)",
                baseline=f"{baseline} p{pct}",
                baseline_value=summarize(percentile(x, pct) * 1e6 for x in raw).median,
                higher_is_better=False,
            )
        )
    return rows


def _concurrent_rows(
    label: str,
    ses: list[Conc],
    raw: list[Conc],
    goal: str,
    baseline: str,
) -> list[Row]:
    rows = [
        make_row(
            label,
            "opens/s",
            [r for r, _, _ in ses],
            goal=goal,
            baseline=baseline,
            baseline_value=summarize(r for r, _, _ in raw).median,
        )
    ]
    for pct in (50, 99):
        rows.append(
            make_row(
                f"{label} p{pct}",
                "µs",
                [percentile(lat, pct) * 1e6 for _, lat, _ in ses],
                goal="informational (ratio = raw / session)",
                baseline=f"{baseline} p{pct}",
                baseline_value=summarize(percentile(lat, pct) * 1e6 for _, lat, _ in raw).median,
                higher_is_better=False,
            )
        )
    return rows


async def measure(quick: bool) -> list[Row]:
    n_seq = 150 if quick else 1500
    n_conc = 640 if quick else 6400
    n_bytes = (8 if quick else 64) * 1024 * 1024
    samples = 3 if quick else 5
    seq: dict[str, list[list[float]]] = {"raw": [], "raw_echo": [], "open": [], "echo": []}
    conc: dict[str, list[Conc]] = {
        "raw": [],
        "raw_echo": [],
        "open": [],
        "echo": [],
    }
    seq_cpu: dict[str, list[float]] = {"raw": [], "open": []}
    raw_tput: list[tuple[float, float]] = []
    ses_tput: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        certdir = Path(tmp)
        # Alternate raw and session samples so machine noise hits both alike.
        for _ in range(samples):
            async with quic_connection_pair(certdir) as (c, s):
                echo_server = asyncio.create_task(serve_echo(s))
                for key, raw_fn in (("raw", raw_open), ("raw_echo", open_echo)):
                    raw_op: Op = functools.partial(raw_fn, c)
                    seq[key].append(await sequential(raw_op, n_seq, seq_cpu.get(key)))
                    conc[key].append(await concurrent(raw_op, n_conc, CONCURRENCY))
                echo_server.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await echo_server
            async with session_pair(certdir) as relay:
                for key, fn in (("open", session_open), ("echo", session_open_echo)):
                    op: Op = functools.partial(fn, relay)
                    seq[key].append(await sequential(op, n_seq, seq_cpu.get(key)))
                    conc[key].append(await concurrent(op, n_conc, CONCURRENCY))
            async with quic_connection_pair(certdir) as (c, s):
                raw_tput.append(
                    await raw_upload(s, c, n_bytes)
                )  # server -> client, like relay -> edge
            async with session_pair(certdir) as relay:
                ses_tput.append(await session_upload(relay, n_bytes))

    raw_name = "raw qh3 stream open (open_bi + 1-byte answer)"
    raw_echo = "raw qh3 open_bi + 1-byte echo, FIN both ways"
    goal = ">= 0.8x raw qh3 stream open"
    rows: list[Row] = []
    rows += _latency_rows("reverse open sequential", seq["open"], seq["raw"], goal, raw_name)
    rows.append(
        make_row(
            "reverse open sequential, CPU per open",
            "µs",
            seq_cpu["open"],
            goal="informational (ratio = raw / session; both ends in this process)",
            baseline=f"{raw_name}, CPU per open",
            baseline_value=summarize(seq_cpu["raw"]).median,
            higher_is_better=False,
        )
    )
    rows += _concurrent_rows(
        f"reverse open {CONCURRENCY} concurrent", conc["open"], conc["raw"], goal, raw_name
    )
    rows.append(
        make_row(
            f"reverse open {CONCURRENCY} concurrent, CPU per open",
            "µs",
            [cpu for _, _, cpu in conc["open"]],
            goal="informational (ratio = raw / session; less noisy than wall time)",
            baseline=f"{raw_name}, CPU per open",
            baseline_value=summarize(cpu for _, _, cpu in conc["raw"]).median,
            higher_is_better=False,
        )
    )
    info = "informational (a reverse open costs one more round trip than a raw open)"
    rows += _latency_rows(
        "reverse open + 1-byte echo sequential", seq["echo"], seq["raw_echo"], info, raw_echo
    )[:1]
    rows += _concurrent_rows(
        f"reverse open + 1-byte echo {CONCURRENCY} concurrent",
        conc["echo"],
        conc["raw_echo"],
        info,
        raw_echo,
    )[:1]
    rows.append(
        make_row(
            f"session one-stream upload {n_bytes >> 20} MiB",
            "MB/s",
            [w for w, _ in ses_tput],
            goal=">= 0.95x raw qh3 stream",
            baseline="raw qh3 one-stream upload",
            baseline_value=summarize(w for w, _ in raw_tput).median,
        )
    )
    rows.append(
        make_row(
            f"session one-stream upload {n_bytes >> 20} MiB, per CPU second",
            "MB/s",
            [c for _, c in ses_tput],
            goal="informational (both ends in this process; less noisy than wall time)",
            baseline="raw qh3 one-stream upload, per CPU second",
            baseline_value=summarize(c for _, c in raw_tput).median,
        )
    )
    return rows


def run(quick: bool) -> list[Row]:
    """Benchmark entry point for ``python -m bench`` (see the module docstring)."""
    return asyncio.run(measure(quick))


def main() -> None:
    parser = argparse.ArgumentParser(description="session benchmarks (qh3, loopback)")
    parser.add_argument("--quick", action="store_true", help="small run (smoke test)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
