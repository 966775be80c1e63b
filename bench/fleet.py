"""The relay fleet: one relay-to-relay hop vs the edge's own relay, and the registry's
load: ``python -m bench.fleet``.

Processes, all on 127.0.0.1: ``redis-server`` (no persistence), relays A and B
sharing it (``--registry``), one edge connected to B only, a TCP echo and a TCP count
service exposed by the edge, and this process as the client.

* Upload throughput (to the count service) and connect latency (connect to the first
  echoed byte of a 64-byte request, one client after another) through B's forward
  (the edge's own relay) and through A's forward (A -> B -> edge: one hop).
* The registry: time for one relay to re-publish its share of a 100,000-edge /
  50-relay fleet (2,000 edge names, one pipeline) into the same Redis, and what that
  Redis serves (``redis-benchmark``: SET and HSET, 50 connections, no pipelining)
  beside what such a fleet asks of it (docs/TUNNEL.md, *Fleet*).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench._harness import ManagedProcess, Row, make_row, print_table

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
STARTUP = 30.0
#: The fleet of the registry figures (docs/TUNNEL.md, Fleet).
EDGES, RELAYS, HEARTBEAT = 100_000, 50, 3.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            total += len(data)
        writer.write(f"got {total}".encode())
        await writer.drain()
    writer.close()


async def _serve() -> None:
    echo = await asyncio.start_server(_echo, LOOPBACK, 0)
    count = await asyncio.start_server(_count, LOOPBACK, 0)
    print(
        f"ready echo={echo.sockets[0].getsockname()[1]} count={count.sockets[0].getsockname()[1]}",
        flush=True,
    )
    await asyncio.Event().wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


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


@dataclass
class World:
    redis_port: int
    #: Forward ports: (relay, service) -> port; relay "own" (B) or "hop" (A).
    ports: dict[tuple[str, str], int]


@contextlib.contextmanager
def _world(tmp: Path) -> Iterator[World]:
    from quic_reverse.tunnel.auth import generate_token, write_token_file
    from quic_reverse.tunnel.relay import ensure_self_signed

    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server not installed (Debian: apt-get install redis-server)")
    token = generate_token()
    tokens = tmp / "tokens.toml"
    tokens.write_text(f'bench = "{token}"\n', encoding="utf-8")
    tokens.chmod(0o600)
    write_token_file(tmp / "bench.token", token)
    write_token_file(tmp / "fleet.token", generate_token())
    _, _, fp = ensure_self_signed(tmp / "state")
    redis_port = _free_port()
    py = [sys.executable, "-m", "quic_reverse"]
    with contextlib.ExitStack() as stack:
        names = ("svc", "redis", "own", "hop", "edge")
        logs = {n: stack.enter_context((tmp / f"{n}.log").open("wb")) for n in names}

        def start(args: list[str], label: str) -> ManagedProcess:
            return stack.enter_context(
                ManagedProcess(
                    args, label=label, stdout=logs[label], stderr=subprocess.STDOUT, cwd=ROOT
                )
            )

        svc = start([sys.executable, "-m", "bench.fleet", "--serve"], "svc")
        m = _wait_log(tmp / "svc.log", r"ready echo=(\d+) count=(\d+)", svc)
        echo, count = (int(g) for g in m.groups())
        no_persistence = ["--save", "", "--appendonly", "no"]
        redis = start(
            [server, "--port", str(redis_port), "--bind", LOOPBACK, *no_persistence], "redis"
        )
        _wait_log(tmp / "redis.log", r"Ready to accept connections", redis)
        ports: dict[tuple[str, str], int] = {}
        quic: dict[str, int] = {}
        for label in ("own", "hop"):
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
                    f"{LOOPBACK}:0=bench/echo",
                    "--forward",
                    f"{LOOPBACK}:0=bench/count",
                    "--registry",
                    f"redis://{LOOPBACK}:{redis_port}/0",
                    "--fleet-token-file",
                    str(tmp / "fleet.token"),
                    "--fleet-fingerprint",
                    fp,
                ],
                label,
            )
            _wait_log(tmp / f"{label}.log", r"relay ready", relay)
            text = (tmp / f"{label}.log").read_text()
            q = re.search(r"listening for edges on [\d.]+:(\d+)", text)
            assert q is not None, text[-2000:]
            quic[label] = int(q.group(1))
            for service in ("echo", "count"):
                f = re.search(rf"forward [\d.]+:(\d+) -> bench/{service}", text)
                assert f is not None, text[-2000:]
                ports[(label, service)] = int(f.group(1))
        edge = start(
            [
                *py,
                "edge",
                "--relay",
                f"{LOOPBACK}:{quic['own']}",
                "--name",
                "bench",
                "--token-file",
                str(tmp / "bench.token"),
                "--fingerprint",
                fp,
                "--expose",
                f"echo={LOOPBACK}:{echo}",
                "--expose",
                f"count={LOOPBACK}:{count}",
            ],
            "edge",
        )
        _wait_log(tmp / "edge.log", r"authenticated to relay", edge)
        yield World(redis_port, ports)


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


def _connect_ms(port: int) -> float:
    """Connect, send 64 bytes, read them back: milliseconds to the first echoed byte."""
    t0 = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x" * 64)
        got = s.recv(64)
        took = (time.perf_counter() - t0) * 1000
        if not got:
            raise RuntimeError("connect: no echo")
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    return took


async def _republish(redis_port: int, names: int) -> float:
    """Seconds for one relay to (re-)publish ``names`` edge names (one pipeline)."""
    from quic_reverse.tunnel.redis_registry import RedisRegistry

    reg = RedisRegistry(
        f"redis://{LOOPBACK}:{redis_port}/1",
        relay_id="bench",
        advertise=(LOOPBACK, 1),
        ttl=10.0,
        heartbeat=3.0,
    )
    for i in range(names):
        reg.publish(f"edge{i}", (f"i{i}",))
    t0 = time.perf_counter()
    await reg.start()
    took = time.perf_counter() - t0
    if not reg.up:
        raise RuntimeError("registry unreachable")
    await reg.close()
    return took


async def _lookups(redis_port: int, count: int, concurrency: int = 64) -> float:
    """Lookups per second one relay's registry client does (fresh reads: HGETALL, then
    one PTTL per holding relay), ``concurrency`` at once, on names held by 2 relays."""
    from quic_reverse.tunnel.redis_registry import RedisRegistry

    url = f"redis://{LOOPBACK}:{redis_port}/1"
    holders = [
        RedisRegistry(url, relay_id=f"r{i}", advertise=(LOOPBACK, i + 1), ttl=60.0, heartbeat=30.0)
        for i in range(2)
    ]
    names = [f"edge{i}" for i in range(1000)]
    for reg in holders:
        for name in names:
            reg.publish(name, ("i",))
        await reg.start()
    reader = RedisRegistry(
        url, relay_id="reader", advertise=(LOOPBACK, 9), ttl=60.0, heartbeat=30.0
    )
    await reader.start()
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        for i in range(k, count, concurrency):
            routes = await reader.lookup(names[i % len(names)], fresh=True)
            if len(routes) != 2:
                raise RuntimeError(f"lookup found {len(routes)} routes, expected 2")
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    rate = done / (time.perf_counter() - t0)
    for reg in (*holders, reader):
        await reg.close()
    return rate


def _redis_benchmark(port: int, requests: int) -> dict[str, float]:
    """What the Redis serves: requests/s of SET and HSET, 50 connections, no pipelining."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise RuntimeError("redis-benchmark not installed (Debian: redis-tools)")
    args = [exe, "-h", LOOPBACK, "-p", str(port), "-c", "50", "-n", str(requests), "-q"]
    args += ["--csv", "-t", "set,hset", "--dbnum", "2"]
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rates: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r'"(\w+)","([\d.]+)"', line)
        if m:
            rates[m.group(1)] = float(m.group(2))
    if not rates:
        raise RuntimeError(f"redis-benchmark output not understood: {out[-500:]}")
    return rates


def run(quick: bool) -> list[Row]:
    """Benchmark entry point for ``python -m bench``."""
    runs = 1 if quick else 3
    upload = (16 if quick else 64) << 20
    clients = 50 if quick else 300
    mbps: dict[str, list[float]] = {"own": [], "hop": []}
    lat: dict[str, list[float]] = {"own": [], "hop": []}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as d, _world(Path(d)) as world:
        for label in ("own", "hop"):  # warm-up: the peer session, the first stream
            _upload(world.ports[(label, "count")], 1 << 20)
            _connect_ms(world.ports[(label, "echo")])
        for _ in range(runs):  # interleaved
            for label in ("own", "hop"):
                mbps[label].append(_upload(world.ports[(label, "count")], upload))
        for _ in range(clients):
            for label in ("own", "hop"):
                lat[label].append(_connect_ms(world.ports[(label, "echo")]))
        share = EDGES // RELAYS
        republish = [asyncio.run(_republish(world.redis_port, share)) for _ in range(runs)]
        lookups = [asyncio.run(_lookups(world.redis_port, 2_000 if quick else 20_000))]
        capacity = _redis_benchmark(world.redis_port, 20_000 if quick else 200_000)
    own_mbps = sorted(mbps["own"])[len(mbps["own"]) // 2]
    own_p50 = sorted(lat["own"])[len(lat["own"]) // 2]
    rows: list[Row] = [
        make_row(
            f"fleet: TCP upload ({upload >> 20} MiB) through one relay-to-relay hop",
            "MB/s",
            mbps["hop"],
            baseline="the edge's own relay",
            baseline_value=own_mbps,
            goal="ratio >= 0.8",
        ),
        make_row(
            f"fleet: TCP upload ({upload >> 20} MiB) through the edge's own relay",
            "MB/s",
            mbps["own"],
            goal="reference",
        ),
        make_row(
            f"fleet: connect to first echoed byte through one hop, p50 of {clients}",
            "ms",
            [sorted(lat["hop"])[len(lat["hop"]) // 2]],
            baseline="the edge's own relay",
            baseline_value=own_p50,
            higher_is_better=False,
            goal="< 1 ms added (value - baseline)",
        ),
        make_row(
            f"fleet: connect to first echoed byte through the edge's own relay, p50 of {clients}",
            "ms",
            [own_p50],
            higher_is_better=False,
            goal="reference",
        ),
        make_row(
            f"fleet registry: one relay re-publishes its {share:,} edge names "
            f"({EDGES:,} edges / {RELAYS} relays)",
            "ms",
            [t * 1000 for t in republish],
            higher_is_better=False,
            goal="< heartbeat (3 s)",
        ),
        make_row(
            "fleet registry: lookups one relay reads per second (HGETALL + 2 PTTL, "
            "64 at once, edge names held by 2 relays)",
            "lookups/s",
            lookups,
            goal="reference (the relay-side bound of uncached lookups)",
        ),
    ]
    for command, rate in sorted(capacity.items()):
        rows.append(
            make_row(
                f"redis-server {command}, 50 connections, no pipelining (what one Redis serves)",
                "ops/s",
                [rate],
                goal="reference for docs/TUNNEL.md Fleet arithmetic",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="relay fleet: one hop vs own relay")
    parser.add_argument("--quick", action="store_true", help="small run (smoke test)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return
    logging.basicConfig(level=logging.WARNING)
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
