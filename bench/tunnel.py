"""Tunnel benchmark: ``quic-reverse relay``/``edge`` vs ``ssh -N -R`` vs direct TCP.

Topology, identical for the tunnel and for SSH (every hop a separate process, all on
127.0.0.1)::

    TCP client (this process) -> relay | sshd -> edge | ssh -R client -> local service

* throughput: one TCP connection uploads N MiB (256, ``--quick`` 16) to a counting
  service, which answers once it has read everything (so the time covers delivery,
  not just buffering); and downloads N MiB from a source service.
* connect+echo: sequential TCP connect, 64-byte echo round trip, close; p50/p99
  latency and the resulting rate.
* direct TCP to the service is the ceiling; ``ssh -N -R`` with OpenSSH's default
  cipher on a private sshd (started and stopped here, with throw-away keys) is the
  baseline. Goal: tunnel throughput >= 1.0x ``ssh -R``, connect latency below it.

Run alone: ``.venv/bin/python -m bench.tunnel [--quick]``. Never asserts speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench._harness import (
    ManagedProcess,
    Row,
    make_row,
    percentile,
    print_table,
    sshd_path,
    summarize,
    wait_tcp_port,
)

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20
STARTUP = 30.0


# --------------------------------------------------------------------------- services


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _nodelay(writer.get_extra_info("socket"))
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _nodelay(writer.get_extra_info("socket"))
    total = 0
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(f"got {total}".encode())
        await writer.drain()
    writer.close()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read an 8-byte big-endian length, send that many bytes, close."""
    _nodelay(writer.get_extra_info("socket"))
    block = b"\xa5" * CHUNK
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        left = int.from_bytes(await reader.readexactly(8), "big")
        while left > 0:
            n = min(left, CHUNK)
            writer.write(block[:n] if n < CHUNK else block)
            await writer.drain()
            left -= n
        writer.write_eof()
        await reader.read()  # wait for the client to close
    writer.close()


async def _serve_forever() -> None:
    limit = CHUNK
    servers = {
        name: await asyncio.start_server(handler, LOOPBACK, 0, limit=limit)
        for name, handler in (("echo", _echo), ("count", _count), ("source", _source))
    }
    ports = " ".join(f"{n}={s.sockets[0].getsockname()[1]}" for n, s in servers.items())
    print(f"ready {ports}", flush=True)
    await asyncio.Event().wait()  # until the benchmark stops this process


def _nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --------------------------------------------------------------------------- clients


def _upload(port: int, size: int) -> float:
    """Upload ``size`` bytes, wait for the service's count; return seconds."""
    block = b"\x5a" * CHUNK
    t0 = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=120) as s:
        _nodelay(s)
        left = size
        while left > 0:
            n = min(left, CHUNK)
            s.sendall(block if n == CHUNK else block[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(64):
            reply += chunk
    elapsed = time.perf_counter() - t0
    if reply != f"got {size}".encode():
        raise RuntimeError(f"upload through port {port}: service replied {reply!r}")
    return elapsed


def _download(port: int, size: int) -> float:
    """Ask the source service for ``size`` bytes and read them all; return seconds."""
    t0 = time.perf_counter()
    got = 0
    with socket.create_connection((LOOPBACK, port), timeout=120) as s:
        _nodelay(s)
        s.sendall(size.to_bytes(8, "big"))
        buf = bytearray(CHUNK)
        while n := s.recv_into(buf):
            got += n
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"download through port {port}: got {got} of {size} bytes")
    return elapsed


def _connect_echo(port: int, count: int) -> list[float]:
    """Sequential connect + 64-byte echo + close; per-connection latency in seconds."""
    payload = os.urandom(64)
    out: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection((LOOPBACK, port), timeout=30) as s:
            _nodelay(s)
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(64 - len(got))
                if not chunk:
                    raise RuntimeError(f"echo through port {port}: closed after {len(got)} bytes")
                got += chunk
        out.append(time.perf_counter() - t0)
        if got != payload:
            raise RuntimeError(f"echo through port {port}: wrong bytes")
    return out


# --------------------------------------------------------------------------- processes


def _wait_log(path: Path, pattern: str, proc: ManagedProcess, timeout: float = STARTUP) -> str:
    """Poll a log file for a regex (bounded); the process exiting first is an error."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return text
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.label} exited ({proc.returncode}): {text[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.label}: no /{pattern}/ within {timeout}s: {text[-2000:]}")
        time.sleep(0.05)  # polling another process's log file: no event to wait on


@dataclass
class Paths:
    """TCP ports reaching the echo / count / source services one way or another."""

    echo: int
    count: int
    source: int


@contextlib.contextmanager
def _services(tmp: Path) -> Iterator[Paths]:
    log = tmp / "services.out"
    with (
        log.open("wb") as fh,
        ManagedProcess(
            [sys.executable, "-m", "bench.tunnel", "--services"],
            label="services",
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        ) as proc,
    ):
        text = _wait_log(log, r"ready echo=\d+ count=\d+ source=\d+", proc)
        m = re.search(r"ready echo=(\d+) count=(\d+) source=(\d+)", text)
        assert m is not None
        yield Paths(int(m.group(1)), int(m.group(2)), int(m.group(3)))


@contextlib.contextmanager
def _tunnel(tmp: Path, svc: Paths) -> Iterator[Paths]:
    from quic_reverse.tunnel.auth import generate_token, write_token_file

    token = generate_token()
    tokens = tmp / "tokens.toml"
    tokens.write_text(f'bench = "{token}"\n', encoding="utf-8")
    tokens.chmod(0o600)
    write_token_file(tmp / "bench.token", token)
    relay_log, edge_log = tmp / "relay.log", tmp / "edge.log"
    py = [sys.executable, "-m", "quic_reverse"]
    relay_args = [
        *py,
        "relay",
        "--listen",
        f"{LOOPBACK}:0",
        "--self-signed",
        "--state-dir",
        str(tmp / "state"),
        "--tokens",
        str(tokens),
        "--log-level",
        "info",
    ]
    for name in ("echo", "count", "source"):
        relay_args += ["--forward", f"{LOOPBACK}:0=bench/{name}"]
    # --metrics (or QUIC_REVERSE_BENCH_METRICS=1 under `python -m bench`): relay and edge
    # serve /metrics, to measure what the metrics hooks cost.
    metrics = ["--metrics", f"{LOOPBACK}:0"] if os.environ.get(METRICS_ENV) == "1" else []
    relay_args += metrics
    with contextlib.ExitStack() as stack:
        rfh = stack.enter_context(relay_log.open("wb"))
        relay = stack.enter_context(
            ManagedProcess(
                relay_args, label="relay", stdout=rfh, stderr=subprocess.STDOUT, cwd=ROOT
            )
        )
        text = _wait_log(relay_log, r"relay ready", relay)
        fp = re.search(r"fingerprint: ([0-9a-f]{64})", text)
        qport = re.search(r"listening for edges on [\d.]+:(\d+)", text)
        fwd = dict(
            (m.group(2), int(m.group(1)))
            for m in re.finditer(r"forward [\d.]+:(\d+) -> bench/(\w+)", text)
        )
        if fp is None or qport is None or len(fwd) != 3:
            raise RuntimeError(f"relay start-up log not understood: {text[-2000:]}")
        efh = stack.enter_context(edge_log.open("wb"))
        edge_args = [
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
            f"echo={LOOPBACK}:{svc.echo}",
            "--expose",
            f"count={LOOPBACK}:{svc.count}",
            "--expose",
            f"source={LOOPBACK}:{svc.source}",
            *metrics,
        ]
        edge = stack.enter_context(
            ManagedProcess(edge_args, label="edge", stdout=efh, stderr=subprocess.STDOUT, cwd=ROOT)
        )
        _wait_log(edge_log, r"authenticated to relay", edge)
        yield Paths(fwd["echo"], fwd["count"], fwd["source"])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


@contextlib.contextmanager
def _ssh(tmp: Path, svc: Paths, sshd: str) -> Iterator[Paths]:
    """A private sshd on 127.0.0.1 and ``ssh -N -R`` forwards to the services."""
    from bench._harness import free_port

    d = tmp / "ssh"
    d.mkdir(mode=0o700)
    _keygen(d / "host_key")
    _keygen(d / "id")
    shutil.copy(d / "id.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {LOOPBACK}",
                f"HostKey {d / 'host_key'}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "PermitRootLogin prohibit-password",
                "LogLevel ERROR",
                "",
            ]
        ),
        encoding="utf-8",
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    remote = {name: free_port() for name in ("echo", "count", "source")}
    ssh_args = [
        "ssh",
        "-F",
        "/dev/null",
        "-N",
        "-T",
        "-p",
        str(port),
        "-i",
        str(d / "id"),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    for name, target in (("echo", svc.echo), ("count", svc.count), ("source", svc.source)):
        ssh_args += ["-R", f"{LOOPBACK}:{remote[name]}:{LOOPBACK}:{target}"]
    ssh_args.append(f"{getpass.getuser()}@{LOOPBACK}")
    with ManagedProcess([sshd, "-D", "-e", "-f", str(d / "sshd_config")], label="sshd") as server:
        wait_tcp_port(port, process=server, timeout=STARTUP)
        with ManagedProcess(ssh_args, label="ssh -R") as client:
            for p in remote.values():
                wait_tcp_port(p, process=client, timeout=STARTUP)
            yield Paths(remote["echo"], remote["count"], remote["source"])


# --------------------------------------------------------------------------- measuring


@dataclass
class Figures:
    upload: list[float]  # MB/s per run
    download: list[float]
    latency: list[float]  # seconds per connect+echo
    rate: float  # connects/s over the sequential run


def _measure(paths: Paths, size: int, runs: int, connects: int) -> Figures:
    _upload(paths.count, min(size, 4 << 20))  # warm-up
    up = [size / _upload(paths.count, size) / 1e6 for _ in range(runs)]
    down = [size / _download(paths.source, size) / 1e6 for _ in range(runs)]
    _connect_echo(paths.echo, 5)  # warm-up
    t0 = time.perf_counter()
    lat = _connect_echo(paths.echo, connects)
    rate = connects / (time.perf_counter() - t0)
    return Figures(up, down, lat, rate)


def run(quick: bool) -> list[Row]:
    """Measure direct TCP, the tunnel and ``ssh -N -R`` in one run; return rows."""
    size = (16 if quick else 256) << 20
    runs = 1 if quick else 3
    connects = 50 if quick else 300
    mib = size >> 20
    sshd = sshd_path()
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="qr-bench-tunnel-") as tmpname:
        tmp = Path(tmpname)
        with _services(tmp) as svc:
            results["direct"] = _measure(svc, size, runs, connects)
            with _tunnel(tmp, svc) as paths:
                results["tunnel"] = _measure(paths, size, runs, connects)
            if sshd is not None:
                with _ssh(tmp, svc, sshd) as paths:
                    results["ssh"] = _measure(paths, size, runs, connects)
    return _rows(results, mib, sshd is not None)


def _rows(results: dict[str, Figures], mib: int, have_ssh: bool) -> list[Row]:
    direct, tunnel = results["direct"], results["tunnel"]
    ssh = results.get("ssh")
    ssh_name = "ssh -N -R (OpenSSH default cipher)" if have_ssh else None
    skipped = "" if have_ssh else " (ssh -R skipped: sshd not installed)"
    rows: list[Row] = []

    def med(xs: list[float]) -> float:
        return summarize(xs).median

    for label, pick in (
        ("upload", lambda f: f.upload),
        ("download", lambda f: f.download),
    ):
        get: Callable[[Figures], list[float]] = pick
        rows.append(
            make_row(
                f"tunnel: {mib} MiB {label} through relay+edge",
                "MB/s",
                get(tunnel),
                baseline=ssh_name,
                baseline_value=med(get(ssh)) if ssh else None,
                goal=">= 1.0x ssh -R" + skipped,
            )
        )
        if ssh is not None:
            rows.append(
                make_row(
                    f"ssh -N -R: {mib} MiB {label}",
                    "MB/s",
                    get(ssh),
                    baseline="direct TCP",
                    baseline_value=med(get(direct)),
                    goal="reference (baseline)",
                )
            )
        rows.append(
            make_row(
                f"direct TCP: {mib} MiB {label}",
                "MB/s",
                get(direct),
                goal="ceiling (reference)",
            )
        )
    for pct in (50, 99):
        t = percentile(tunnel.latency, pct) * 1e3
        rows.append(
            make_row(
                f"tunnel: TCP connect+echo p{pct} latency",
                "ms",
                [t],
                baseline=ssh_name,
                baseline_value=percentile(ssh.latency, pct) * 1e3 if ssh else None,
                higher_is_better=False,
                goal="ratio > 1 (below ssh -R)" + skipped,
            )
        )
        if ssh is not None:
            rows.append(
                make_row(
                    f"ssh -N -R: TCP connect+echo p{pct} latency",
                    "ms",
                    [percentile(ssh.latency, pct) * 1e3],
                    goal="reference (baseline)",
                    higher_is_better=False,
                )
            )
        rows.append(
            make_row(
                f"direct TCP: connect+echo p{pct} latency",
                "ms",
                [percentile(direct.latency, pct) * 1e3],
                goal="ceiling (reference)",
                higher_is_better=False,
            )
        )
    rows.append(
        make_row(
            "tunnel: sequential TCP connect+echo rate",
            "conn/s",
            [tunnel.rate],
            baseline=ssh_name,
            baseline_value=ssh.rate if ssh else None,
            goal="> 1.0x ssh -R" + skipped,
        )
    )
    if ssh is not None:
        rows.append(
            make_row(
                "ssh -N -R: sequential TCP connect+echo rate",
                "conn/s",
                [ssh.rate],
                baseline="direct TCP",
                baseline_value=direct.rate,
                goal="reference (baseline)",
            )
        )
    rows.append(
        make_row(
            "direct TCP: sequential connect+echo rate",
            "conn/s",
            [direct.rate],
            goal="ceiling (reference)",
        )
    )
    return rows


#: Set to "1" to run relay and edge with ``--metrics`` (see ``--metrics``).
METRICS_ENV = "QUIC_REVERSE_BENCH_METRICS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tunnel vs ssh -N -R vs direct TCP")
    parser.add_argument("--quick", action="store_true", help="16 MiB, few connects")
    parser.add_argument(
        "--metrics", action="store_true", help=f"relay and edge with --metrics (or {METRICS_ENV}=1)"
    )
    parser.add_argument("--services", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.services:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_forever())
        return 0
    if args.metrics:
        os.environ[METRICS_ENV] = "1"
    print_table(run(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
