"""UDP through the tunnel (datagram flows) vs direct UDP: ``python -m bench.udp``.

Processes, all on 127.0.0.1: a UDP echo service (``--echo``), ``quic-reverse relay``
with ``--forward udp:127.0.0.1:0=bench/echo``, ``quic-reverse edge`` with
``--expose echo=udp:127.0.0.1:PORT`` (default stack qh3), and this process as the
client. The client keeps a window of datagrams of 1,200 bytes in flight (each one
echoed) and counts echoes per second, once straight to the echo service and once
through the relay's UDP forward. Lost datagrams (no echo by the end) are reported in
the row names; they are expected to be 0 on loopback at these windows.

Head-of-line check: TCP upload throughput through a TCP forward of the **same** edge
session, alone and while a second client floods a UDP forward (to a discarding UDP
service) with 1,200-byte datagrams as fast as it can: datagrams are unreliable and
never queue behind (or in front of) stream data beyond the congestion window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench._harness import ManagedProcess, Row, make_row, print_table

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
SIZE = 1200
WINDOW = 32
STARTUP = 30.0


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class _Discard(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: object) -> None:
        pass


async def _count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            total += len(data)
        writer.write(f"got {total}".encode())
        await writer.drain()
    writer.close()


async def _serve_echo() -> None:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(LOOPBACK, 0))
    discard, _ = await loop.create_datagram_endpoint(_Discard, local_addr=(LOOPBACK, 0))
    count = await asyncio.start_server(_count, LOOPBACK, 0)
    print(
        f"ready echo={echo.get_extra_info('sockname')[1]} "
        f"discard={discard.get_extra_info('sockname')[1]} "
        f"count={count.sockets[0].getsockname()[1]}",
        flush=True,
    )
    await asyncio.Event().wait()


def _wait_log(path: Path, pattern: str, proc: ManagedProcess) -> re.Match[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + STARTUP
    while True:
        m = rx.search(path.read_text(errors="replace") if path.exists() else "")
        if m:
            return m
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.label}: no /{pattern}/: {path.read_text()[-2000:]}")
        time.sleep(0.05)  # polling another process's log file: no event to wait on


def _echo_rate(port: int, count: int) -> tuple[float, int]:
    """Echo ``count`` datagrams of SIZE bytes with WINDOW in flight; (seconds, lost).

    Half a second without any echo writes the window off as lost and refills it."""
    payload = bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((LOOPBACK, port))
        s.setblocking(False)
        sent = received = lost = 0
        t0 = last = time.perf_counter()
        while sent < count or sent - received - lost > 0:
            while sent < count and sent - received - lost < WINDOW:
                s.send(payload)
                sent += 1
            ready, _, _ = select.select([s], [], [], 0.5)
            if not ready:
                lost += sent - received - lost
                continue
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                if len(data) == SIZE and received + lost < sent:
                    received += 1
                    last = time.perf_counter()
    return last - t0, sent - received


def _upload(port: int, size: int) -> float:
    """Upload ``size`` bytes through a TCP port to the count service; MB/s."""
    block = b"\x5a" * (1 << 16)
    t0 = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=120) as s:
        left = size
        while left > 0:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(64):
            reply += chunk
    elapsed = time.perf_counter() - t0
    if reply != f"got {size}".encode():
        raise RuntimeError(f"upload: service replied {reply!r}")
    return size / elapsed / 1e6


def _flood(port: int, stop: threading.Event, sent: list[int]) -> None:
    payload = b"\xa5" * SIZE
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((LOOPBACK, port))
        while not stop.is_set():
            for _ in range(64):
                with contextlib.suppress(OSError):  # ENOBUFS: the flood outran the kernel
                    s.send(payload)
                    sent[0] += 1
            time.sleep(0)


@dataclasses.dataclass
class Ports:
    echo: int  # direct
    udp_echo: int  # relay udp forward -> echo
    udp_discard: int  # relay udp forward -> discard
    tcp_count: int  # relay tcp forward -> count


@contextlib.contextmanager
def _world(tmp: Path) -> Iterator[Ports]:
    """The services, relay and edge; the ports to reach them."""
    from quic_reverse.tunnel.auth import generate_token, write_token_file

    token = generate_token()
    tokens = tmp / "tokens.toml"
    tokens.write_text(f'bench = "{token}"\n', encoding="utf-8")
    tokens.chmod(0o600)
    write_token_file(tmp / "bench.token", token)
    py = [sys.executable, "-m", "quic_reverse"]
    with contextlib.ExitStack() as stack:
        logs = {n: stack.enter_context((tmp / f"{n}.log").open("wb")) for n in ("svc", "r", "e")}

        def start(args: list[str], label: str, log: str) -> ManagedProcess:
            return stack.enter_context(
                ManagedProcess(
                    args, label=label, stdout=logs[log], stderr=subprocess.STDOUT, cwd=ROOT
                )
            )

        svc = start([sys.executable, "-m", "bench.udp", "--echo"], "echo", "svc")
        m = _wait_log(tmp / "svc.log", r"ready echo=(\d+) discard=(\d+) count=(\d+)", svc)
        echo, discard, count = (int(g) for g in m.groups())
        relay = start(
            [
                *py,
                "relay",
                "--listen",
                f"{LOOPBACK}:0",
                "--self-signed",
                "--state-dir",
                str(tmp / "state"),
                "--tokens",
                str(tokens),
                "--forward",
                f"udp:{LOOPBACK}:0=bench/echo",
                "--forward",
                f"udp:{LOOPBACK}:0=bench/discard",
                "--forward",
                f"{LOOPBACK}:0=bench/count",
            ],
            "relay",
            "r",
        )
        _wait_log(tmp / "r.log", r"relay ready", relay)
        text = (tmp / "r.log").read_text()
        fp = re.search(r"fingerprint: ([0-9a-f]{64})", text)
        qport = re.search(r"listening for edges on [\d.]+:(\d+)", text)
        fwd = re.search(r"forward udp:[\d.]+:(\d+) -> bench/echo", text)
        fwd_discard = re.search(r"forward udp:[\d.]+:(\d+) -> bench/discard", text)
        fwd_count = re.search(r"forward [\d.]+:(\d+) -> bench/count", text)
        if fp is None or qport is None or fwd is None or fwd_discard is None or fwd_count is None:
            raise RuntimeError(f"relay start-up log not understood: {text[-2000:]}")
        edge = start(
            [
                *py,
                "edge",
                "--relay",
                f"{LOOPBACK}:{qport.group(1)}",
                "--name",
                "bench",
                "--token-file",
                str(tmp / "bench.token"),
                "--fingerprint",
                fp.group(1),
                "--expose",
                f"echo=udp:{LOOPBACK}:{echo}",
                "--expose",
                f"discard=udp:{LOOPBACK}:{discard}",
                "--expose",
                f"count={LOOPBACK}:{count}",
            ],
            "edge",
            "e",
        )
        _wait_log(tmp / "e.log", r"authenticated to relay", edge)
        yield Ports(echo, int(fwd.group(1)), int(fwd_discard.group(1)), int(fwd_count.group(1)))


def run(quick: bool) -> list[Row]:
    """Benchmark entry point for ``python -m bench``."""
    count = 2_000 if quick else 20_000
    runs = 1 if quick else 3
    upload = (16 if quick else 64) << 20
    tcp: dict[str, list[float]] = {"alone": [], "flood": []}
    offered: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as d, _world(Path(d)) as ports:
        direct_port, tunnel_port = ports.echo, ports.udp_echo
        _echo_rate(tunnel_port, 100)  # opens the flow (and warms up)
        results: dict[str, list[tuple[float, int]]] = {"direct": [], "tunnel": []}
        for _ in range(runs):  # interleaved
            results["direct"].append(_echo_rate(direct_port, count))
            results["tunnel"].append(_echo_rate(tunnel_port, count))
        _upload(ports.tcp_count, 1 << 20)  # warm-up
        for _ in range(runs):
            tcp["alone"].append(_upload(ports.tcp_count, upload))
            stop, sent = threading.Event(), [0]
            flooder = threading.Thread(target=_flood, args=(ports.udp_discard, stop, sent))
            t0 = time.perf_counter()
            flooder.start()
            try:
                tcp["flood"].append(_upload(ports.tcp_count, upload))
            finally:
                stop.set()
                flooder.join(30)
            offered.append(sent[0] / (time.perf_counter() - t0))
    rates = {k: [(count - lost) / t for t, lost in v] for k, v in results.items()}
    lost = {k: sum(lost for _, lost in v) for k, v in results.items()}
    med = sorted(rates["direct"])[len(rates["direct"]) // 2]
    rows: list[Row] = []
    for unit, scale in (("datagrams/s", 1.0), ("MB/s", SIZE / 1e6)):
        rows.append(
            make_row(
                f"udp tunnel: {SIZE}-byte datagram echo, window {WINDOW} "
                f"({lost['tunnel']} of {runs * count} lost)",
                unit,
                [r * scale for r in rates["tunnel"]],
                baseline="direct UDP",
                baseline_value=med * scale,
                goal="reference (no goal set)",
            )
        )
        rows.append(
            make_row(
                f"direct UDP: {SIZE}-byte datagram echo, window {WINDOW} "
                f"({lost['direct']} of {runs * count} lost)",
                unit,
                [r * scale for r in rates["direct"]],
                goal="ceiling (reference)",
            )
        )
    flood_rate = sorted(offered)[len(offered) // 2]
    alone = sorted(tcp["alone"])[len(tcp["alone"]) // 2]
    rows.append(
        make_row(
            f"tunnel TCP upload ({upload >> 20} MiB) during a UDP flood on the same session "
            f"(~{flood_rate:,.0f} datagrams/s offered)",
            "MB/s",
            tcp["flood"],
            baseline="same upload, no flood",
            baseline_value=alone,
            goal="reference: ratio = share kept under a flood",
        )
    )
    rows.append(
        make_row(
            f"tunnel TCP upload ({upload >> 20} MiB), no UDP flood",
            "MB/s",
            tcp["alone"],
            goal="reference",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="UDP through the tunnel vs direct UDP")
    parser.add_argument("--quick", action="store_true", help="small run (smoke test)")
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        asyncio.run(_serve_echo())
        return
    logging.basicConfig(level=logging.WARNING)
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
