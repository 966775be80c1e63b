"""Transport throughput (qh3 adapter vs bare qh3) and raw stream-open rate.

Run alone with ``.venv/bin/python -m bench.transport [--quick]``.

Throughput: one stream carries 256 MiB (``--quick``: 16 MiB) in each direction,
client in this process, server in a separate process on 127.0.0.1, measured
end to end (upload: until the server has read everything and answered; download:
until the client has read EOF). Two servers run side by side:

* **adapter**: ``quic_reverse.transport.quic.serve``/``connect`` (stack qh3, default
  tuning: batching UDP transport, 4 MiB socket buffers, large windows, bounded
  send buffer with real backpressure, receive high-water);
* **bare qh3**: qh3's own asyncio API (``QuicConnectionProtocol``, stream
  reader/writer) with the *same* settings: the same ``QuicConfiguration`` windows,
  the same client datagram size as the adapter reaches by path MTU discovery on
  this route (4 KiB on loopback), the same 4 MiB socket buffers, the same batching
  server transport (qh3's
  ``serve()`` does one ``recvfrom`` per packet, ~6x slower; that is not the baseline
  we want to beat) and the same 1 MiB send budget (write, then wait after each
  transmit while ``get_send_buffer_size`` is above it). A second bare upload that
  queues all bytes at once (no backpressure at all) is reported for reference.

Repetitions alternate adapter/bare so that machine noise hits both alike; each
figure is the median of 5 runs (``--quick``: 1).

Stream opens: :func:`measure_open_rate` (reusable, e.g. by the session benchmark)
opens a stream, sends one byte + FIN and reads the one-byte echo + FIN, one at a
time and with 64 in flight, against :func:`serve_echo` on the peer.

Goals (issue 3): adapter upload >= 350 MB/s and >= 0.95 x bare qh3; download reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._harness import ManagedProcess, Row, make_row, percentile, print_table, summarize
from quic_reverse.transport.base import Connection, RecvStream, SendStream
from quic_reverse.transport.quic import ClientTLS, ServerTLS, TransportOptions, connect, serve
from quic_reverse.transport.tls import write_self_signed

MiB = 1024 * 1024
CHUNK = MiB
CONCURRENCY = 64
_SIZE = struct.Struct("!Q")
_OPTIONS = TransportOptions()  # the tuned defaults: what both sides use


# ============================================================================ reusable


async def serve_echo(conn: Connection) -> None:
    """Peer side of :func:`measure_open_rate`: echo every stream, then FIN."""
    tasks: set[asyncio.Task[None]] = set()

    async def echo(send: SendStream, recv: RecvStream) -> None:
        with contextlib.suppress(Exception):
            while data := await recv.read(CHUNK):
                await send.write(data)
            await send.finish()

    try:
        while (pair := await conn.accept_bi()) is not None:
            task = asyncio.create_task(echo(*pair))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()


async def open_echo(conn: Connection) -> None:
    """One stream open: open_bi, 1 byte + FIN, read the 1-byte echo and FIN."""
    send, recv = await conn.open_bi()
    await send.write(b"x")
    await send.finish()
    if await recv.read_exactly(1) != b"x" or await recv.read(1) != b"":
        raise RuntimeError("echo mismatch")


@dataclass(frozen=True)
class OpenRate:
    """Result of :func:`measure_open_rate`: opens/s and per-open latency (s)."""

    per_second: float
    latencies: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


async def measure_open_rate(
    conn: Connection,
    *,
    count: int,
    concurrency: int = 1,
    op: Callable[[Connection], Awaitable[None]] = open_echo,
) -> OpenRate:
    """Run ``count`` opens (``op``, default :func:`open_echo`) with ``concurrency`` in flight.

    The peer must run :func:`serve_echo` (or an equivalent) for the default ``op``.
    A short warm-up precedes the measurement.
    """
    if count < 1 or concurrency < 1:
        raise ValueError("count and concurrency must be >= 1")
    await asyncio.gather(*(op(conn) for _ in range(min(concurrency, count))))
    latencies: list[float] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await op(conn)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return OpenRate(count / (time.perf_counter() - t0), latencies)


# ============================================================================ bare qh3


def _paced_protocol_class() -> Any:
    """qh3's QuicConnectionProtocol plus an event set after every transmit.

    A careful user of the bare stack bounds the send queue the same way the adapter
    does (qh3's ``drain()`` never blocks): write, then wait while
    ``get_send_buffer_size`` is above the send budget, woken after each transmit.
    """
    from qh3.asyncio.protocol import QuicConnectionProtocol

    class PacedProtocol(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.transmitted = asyncio.Event()

        def transmit(self) -> None:
            super().transmit()
            self.transmitted.set()

    return PacedProtocol


async def _bare_write(protocol: Any, writer: asyncio.StreamWriter, size: int) -> None:
    """Write ``size`` bytes keeping at most one send budget queued in qh3."""
    stream_id = writer.get_extra_info("stream_id")
    quic = protocol._quic
    budget = _OPTIONS.send_buffer
    left = size
    while left > 0:
        n = min(left, CHUNK)
        writer.write(_PAYLOAD[:n])
        left -= n
        while quic.get_send_buffer_size(stream_id) >= budget:
            protocol.transmitted.clear()
            await protocol.transmitted.wait()


# ============================================================================ servers
# Protocol on each stream: b"U" + data + FIN -> server answers 8-byte count + FIN;
# b"D" + 8-byte size -> server sends ``size`` bytes + FIN; b"E" + data + FIN -> echo.

_PAYLOAD = bytes(range(256)) * (CHUNK // 256)


async def _adapter_stream(send: SendStream, recv: RecvStream) -> None:
    command = await recv.read_exactly(1)
    if command == b"U":
        total = 0
        while data := await recv.read(CHUNK):
            total += len(data)
        await send.write(_SIZE.pack(total))
    elif command == b"D":
        (size,) = _SIZE.unpack(await recv.read_exactly(_SIZE.size))
        view = memoryview(_PAYLOAD)
        while size > 0:
            n = min(size, CHUNK)
            await send.write(view[:n])
            size -= n
    else:
        while data := await recv.read(CHUNK):
            await send.write(data)
    await send.finish()


async def _adapter_server(cert: str, key: str, ready: Callable[[int], None]) -> None:
    async def on_connection(conn: Connection) -> None:
        tasks: set[asyncio.Task[None]] = set()
        while (pair := await conn.accept_bi()) is not None:
            task = asyncio.create_task(_adapter_stream(*pair))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=cert, keyfile=key),
        on_connection=on_connection,
        options=_OPTIONS,
    )
    async with server:
        ready(server.address[1])
        await asyncio.Event().wait()


def _bare_server_configuration(cert: str, key: str) -> Any:
    from quic_reverse.transport import qh3 as adapter

    return adapter.server_configuration(
        cert,
        key,
        stream_window=_OPTIONS.stream_window,
        connection_window=_OPTIONS.connection_window,
    )


async def _bare_server(cert: str, key: str, ready: Callable[[int], None]) -> None:
    """qh3's own QuicServer/QuicConnectionProtocol, given our batching transport."""
    from qh3._hazmat import pull_quic_header
    from qh3.asyncio._transport import create_optimized_datagram_transport
    from qh3.asyncio.server import QuicServer

    from quic_reverse.transport._udp import configure_socket

    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = await reader.readexactly(1)
        if command == b"U":
            total = 0
            while data := await reader.read(CHUNK):
                total += len(data)
            writer.write(_SIZE.pack(total))
        elif command == b"D":
            (size,) = _SIZE.unpack(await reader.readexactly(_SIZE.size))
            protocol = writer.transport.protocol  # type: ignore[attr-defined]
            await _bare_write(protocol, writer, size)
        writer.write_eof()

    def stream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    class BatchingQuicServer(QuicServer):
        """Routes each burst of one connection's datagrams in one protocol call."""

        def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
            batch: list[bytes] = []
            target: Any = None
            for data in datagrams:
                try:
                    dcid = pull_quic_header(data, 0, self._configuration.connection_id_length)[3]
                except ValueError:
                    continue
                protocol = self._protocols.get(dcid)
                if protocol is None or not protocol._connected:
                    if batch:
                        target.datagrams_received(batch, addr)
                        batch, target = [], None
                    self.datagram_received(data, addr)
                    continue
                if protocol is not target and batch:
                    target.datagrams_received(batch, addr)
                    batch = []
                target = protocol
                batch.append(data)
            if batch:
                target.datagrams_received(batch, addr)

    loop = asyncio.get_running_loop()
    configuration = _bare_server_configuration(cert, key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    configure_socket(sock)
    sock.bind(("127.0.0.1", 0))
    server = BatchingQuicServer(
        configuration=configuration,
        stream_handler=stream_handler,
        create_protocol=_paced_protocol_class(),
    )
    transport, _ = await create_optimized_datagram_transport(loop, lambda: server, sock=sock)
    try:
        ready(sock.getsockname()[1])
        await asyncio.Event().wait()
    finally:
        server.close()  # type: ignore[no-untyped-call]
        transport.close()


def _serve_main(kind: str, cert: str, key: str) -> int:
    """Server subprocess entry: print ``PORT <n>`` once listening, serve until SIGINT."""

    def ready(port: int) -> None:
        print(f"PORT {port}", flush=True)

    run = _adapter_server if kind == "adapter" else _bare_server
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(cert, key, ready))
    return 0


# ============================================================================ clients


async def _adapter_client(port: int, cert: str) -> Connection:
    return await connect("127.0.0.1", port, tls=ClientTLS(cafile=cert), options=_OPTIONS)


async def _adapter_upload(conn: Connection, size: int) -> float:
    send, recv = await conn.open_bi()
    view = memoryview(_PAYLOAD)
    t0 = time.perf_counter()
    await send.write(b"U")
    left = size
    while left > 0:
        n = min(left, CHUNK)
        await send.write(view[:n])
        left -= n
    await send.finish()
    (count,) = _SIZE.unpack(await recv.read_exactly(_SIZE.size))
    elapsed = time.perf_counter() - t0
    if count != size:
        raise RuntimeError(f"server received {count} of {size} bytes")
    return size / elapsed / 1e6


async def _adapter_download(conn: Connection, size: int) -> float:
    send, recv = await conn.open_bi()
    t0 = time.perf_counter()
    await send.write(b"D" + _SIZE.pack(size))
    await send.finish()
    total = 0
    while data := await recv.read(CHUNK):
        total += len(data)
    elapsed = time.perf_counter() - t0
    if total != size:
        raise RuntimeError(f"received {total} of {size} bytes")
    return size / elapsed / 1e6


@contextlib.asynccontextmanager
async def _bare_client(port: int, cert: str) -> Any:
    from qh3.asyncio.client import connect as qh3_connect

    from quic_reverse.transport import qh3 as adapter
    from quic_reverse.transport._udp import configure_socket, route_max_udp_payload

    config = adapter.client_configuration(
        cafile=None,
        verify=False,  # the benchmark's own certificate; verification cost is per handshake
        stream_window=_OPTIONS.stream_window,
        connection_window=_OPTIONS.connection_window,
    )
    # Same datagram size as the adapter's client reaches by path MTU discovery on this
    # route (bare qh3 probes only up to its configured size), so the comparison is of
    # the adapter's code, not of its packet size.
    route = route_max_udp_payload(socket.AF_INET, ("127.0.0.1", port))
    if route is not None:
        config.max_datagram_size = min(route, adapter.MAX_DISCOVERED_DATAGRAM_SIZE)
    async with qh3_connect(
        "127.0.0.1", port, configuration=config, create_protocol=_paced_protocol_class()
    ) as protocol:
        transport = protocol._transport
        assert transport is not None
        configure_socket(transport.get_extra_info("socket"))
        yield protocol


async def _bare_upload(protocol: Any, size: int, *, paced: bool = True) -> float:
    reader, writer = await protocol.create_stream()
    t0 = time.perf_counter()
    writer.write(b"U")
    if paced:
        await _bare_write(protocol, writer, size)
    else:
        left = size
        while left > 0:  # everything queued at once: qh3 has no backpressure
            n = min(left, CHUNK)
            writer.write(_PAYLOAD[:n])
            left -= n
    writer.write_eof()
    (count,) = _SIZE.unpack(await reader.readexactly(_SIZE.size))
    elapsed = time.perf_counter() - t0
    if count != size:
        raise RuntimeError(f"bare server received {count} of {size} bytes")
    return size / elapsed / 1e6


async def _bare_download(protocol: Any, size: int) -> float:
    reader, writer = await protocol.create_stream()
    t0 = time.perf_counter()
    writer.write(b"D" + _SIZE.pack(size))
    writer.write_eof()
    total = 0
    while data := await reader.read(CHUNK):
        total += len(data)
    elapsed = time.perf_counter() - t0
    if total != size:
        raise RuntimeError(f"bare client received {total} of {size} bytes")
    return size / elapsed / 1e6


# ============================================================================ driver


def _start_server(kind: str, cert: str, key: str) -> tuple[ManagedProcess, int]:
    proc = ManagedProcess(
        [sys.executable, "-m", "bench.transport", "--serve", kind, "--cert", cert, "--key", key],
        label=f"transport-{kind}-server",
        stdout=-1,  # subprocess.PIPE
        stderr=None,
        cwd=str(Path(__file__).resolve().parent.parent),
    ).start()
    try:
        stdout = proc.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], 30.0)
        line = stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"{kind} server did not start (got {line!r})")
        return proc, int(line.split()[1])
    except BaseException:
        proc.stop()
        raise


async def _measure(
    ports: dict[str, int], cert: str, size: int, reps: int, opens: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "adapter_up",
            "adapter_down",
            "bare_up",
            "bare_down",
            "bare_up_unpaced",
            "open_seq",
            "open_seq_p50",
            "open_conc",
            "open_conc_p50",
        )
    }
    conn = await _adapter_client(ports["adapter"], cert)
    try:
        async with _bare_client(ports["bare"], cert) as bare:
            # warm-up both paths (handshake caches, first-stream allocations)
            await _adapter_upload(conn, 4 * MiB)
            await _bare_upload(bare, 4 * MiB)
            for _ in range(reps):
                samples["adapter_up"].append(await _adapter_upload(conn, size))
                samples["bare_up"].append(await _bare_upload(bare, size))
                samples["adapter_down"].append(await _adapter_download(conn, size))
                samples["bare_down"].append(await _bare_download(bare, size))
                samples["bare_up_unpaced"].append(await _bare_upload(bare, size, paced=False))
        for _ in range(reps):
            seq = await measure_open_rate(conn, count=opens, concurrency=1, op=_open_echo_e)
            samples["open_seq"].append(seq.per_second)
            samples["open_seq_p50"].append(seq.p50 * 1e6)
            conc = await measure_open_rate(
                conn, count=opens * 2, concurrency=CONCURRENCY, op=_open_echo_e
            )
            samples["open_conc"].append(conc.per_second)
            samples["open_conc_p50"].append(conc.p50 * 1e6)
    finally:
        conn.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await conn.wait_closed()
    return samples


async def _open_echo_e(conn: Connection) -> None:
    """:func:`open_echo` against the benchmark server (whose echo command is ``E``)."""
    send, recv = await conn.open_bi()
    await send.write(b"Ex")
    await send.finish()
    if await recv.read_exactly(1) != b"x" or await recv.read(1) != b"":
        raise RuntimeError("echo mismatch")


def run(quick: bool) -> list[Row]:
    """Measure and return rows in the common benchmark format."""
    size = 16 * MiB if quick else 256 * MiB
    reps = 1 if quick else 5
    opens = 300 if quick else 2000
    label = f"{size // MiB} MiB"
    with tempfile.TemporaryDirectory(prefix="qr-bench-transport-") as tmp:
        cert_path, key_path = write_self_signed(tmp)
        cert, key = str(cert_path), str(key_path)
        with contextlib.ExitStack() as stack:
            ports: dict[str, int] = {}
            for kind in ("adapter", "bare"):
                proc, ports[kind] = _start_server(kind, cert, key)
                stack.callback(proc.stop)
            samples = asyncio.run(_measure(ports, cert, size, reps, opens))
    bare_up = summarize(samples["bare_up"])
    bare_down = summarize(samples["bare_down"])
    return [
        make_row(
            f"transport qh3 adapter upload, 1 stream, {label}",
            "MB/s",
            samples["adapter_up"],
            goal=">= 350 MB/s and >= 0.95 x bare qh3",
            baseline="bare qh3, same settings",
            baseline_value=bare_up.median,
        ),
        make_row(
            "transport bare qh3 upload (baseline)",
            "MB/s",
            bare_up,
            goal="informational (baseline)",
        ),
        make_row(
            "transport bare qh3 upload, unbounded queue (everything written at once)",
            "MB/s",
            samples["bare_up_unpaced"],
            goal="informational",
        ),
        make_row(
            f"transport qh3 adapter download, 1 stream, {label}",
            "MB/s",
            samples["adapter_down"],
            goal="report; >= 0.95 x bare qh3",
            baseline="bare qh3, same settings",
            baseline_value=bare_down.median,
        ),
        make_row(
            "transport bare qh3 download (baseline)",
            "MB/s",
            bare_down,
            goal="informational (baseline)",
        ),
        make_row(
            "transport stream opens/s, sequential (open+1B echo)",
            "opens/s",
            samples["open_seq"],
            goal="informational (raw open rate; session baseline)",
        ),
        make_row(
            "transport stream open p50, sequential",
            "µs",
            samples["open_seq_p50"],
            goal="informational",
        ),
        make_row(
            f"transport stream opens/s, {CONCURRENCY} concurrent",
            "opens/s",
            samples["open_conc"],
            goal="informational (raw open rate; session baseline)",
        ),
        make_row(
            f"transport stream open p50, {CONCURRENCY} concurrent",
            "µs",
            samples["open_conc_p50"],
            goal="informational",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="16 MiB, 1 repetition")
    parser.add_argument("--serve", choices=("adapter", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.serve:
        return _serve_main(args.serve, args.cert, args.key)
    print_table(run(args.quick))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
