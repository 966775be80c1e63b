"""Throughput of a path: an iperf-like TCP blast between the lab's namespaces.

:func:`tcp_throughput` starts a sink in one namespace and a source in the other
(``python -m pathlab.measure sink|source``, both plain sockets, no tunnel) and returns
bytes, seconds (first to last byte at the sink) and whether the sha256 matched. The same
helper measures a tunnel: pass the relay's forward as ``connect`` and run the source
where the TCP clients live (see ``pathlab/README.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import Lab, Namespace

__all__ = ["Throughput", "main", "python_command", "tcp_throughput"]

CHUNK = 256 * 1024
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Throughput:
    """One transfer: ``nbytes`` received in ``seconds``; ``intact`` = sha256 matched."""

    nbytes: int
    seconds: float
    intact: bool

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def python_command(module: str, *args: str) -> list[str]:
    """``[python, -m, module, *args]`` runnable from any cwd (``pathlab`` importable)."""
    return [sys.executable, "-c", _BOOT, str(_ROOT), module, *args]


_BOOT = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); m = sys.argv[2]; "
    "sys.argv = [m] + sys.argv[3:]; runpy.run_module(m, run_name='__main__')"
)


def _payload_block(seed: int) -> bytes:
    block = bytearray()
    counter = 0
    while len(block) < CHUNK:
        block += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(block[:CHUNK])


def tcp_throughput(
    lab: Lab,
    nbytes: int = 64 << 20,
    *,
    sender: Literal["edge", "relay"] = "edge",
    port: int = 5201,
    timeout: float = 300.0,
    seed: int = 1,
    congestion: str | None = None,
) -> Throughput:
    """Send ``nbytes`` over TCP from ``sender``'s namespace to the other side's address
    and measure it at the receiver. ``congestion`` sets the sender's TCP congestion
    control per socket (``TCP_CONGESTION``, e.g. ``"cubic"``; default: the host's).
    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (both processes are
    killed)."""
    src: Namespace = lab.edge_ns if sender == "edge" else lab.relay_ns
    dst: Namespace = lab.relay_ns if sender == "edge" else lab.edge_ns
    sink = lab.popen(
        dst,
        python_command("pathlab.measure", "sink", f"{dst.address}:{port}", str(nbytes)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        ready = sink.stdout.readline()
        if not ready.startswith("listening"):
            raise RuntimeError(f"sink did not start: {ready!r}")
        source = lab.run(
            src,
            python_command(
                "pathlab.measure",
                "source",
                f"{dst.address}:{port}",
                str(nbytes),
                str(seed),
                *([congestion] if congestion else []),
            ),
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        if source.returncode != 0:
            raise RuntimeError(f"source failed: {source.stderr.strip()}")
        out, _ = sink.communicate(timeout=timeout)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    got = json.loads(out)
    sent = json.loads(source.stdout)
    return Throughput(
        nbytes=int(got["bytes"]),
        seconds=float(got["seconds"]),
        intact=got["sha256"] == sent["sha256"] and int(got["bytes"]) == nbytes,
    )


def _sink(address: str, nbytes: int) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_server((host, int(port))) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            digest = hashlib.sha256()
            total = 0
            first = 0.0
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while total < nbytes:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                if total == 0:
                    first = time.monotonic()
                digest.update(view[:n])
                total += n
            last = time.monotonic()
    print(json.dumps({"bytes": total, "seconds": last - first, "sha256": digest.hexdigest()}))


def _source(address: str, nbytes: int, seed: int, congestion: str | None) -> None:
    host, port = address.rsplit(":", 1)
    block = _payload_block(seed)
    digest = hashlib.sha256()
    with socket.socket() as conn:
        if congestion:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        conn.settimeout(60)
        conn.connect((host, int(port)))
        conn.settimeout(None)
        sent = 0
        while sent < nbytes:
            piece = block[: min(CHUNK, nbytes - sent)]
            conn.sendall(piece)
            digest.update(piece)
            sent += len(piece)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
    print(json.dumps({"bytes": sent, "sha256": digest.hexdigest()}))


def main(argv: list[str] | None = None) -> int:
    """``python -m pathlab.measure sink HOST:PORT NBYTES`` or
    ``python -m pathlab.measure source HOST:PORT NBYTES [SEED [CONGESTION]]``."""
    parser = argparse.ArgumentParser(prog="python -m pathlab.measure")
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("sink", help="accept one connection, read NBYTES, print JSON")
    s.add_argument("address")
    s.add_argument("nbytes", type=int)
    c = sub.add_parser("source", help="connect, send NBYTES of seeded data, print JSON")
    c.add_argument("address")
    c.add_argument("nbytes", type=int)
    c.add_argument("seed", type=int, nargs="?", default=1)
    c.add_argument("congestion", nargs="?", help="TCP congestion control (e.g. cubic)")
    args = parser.parse_args(argv)
    if args.role == "sink":
        _sink(args.address, args.nbytes)
    else:
        _source(args.address, args.nbytes, args.seed, args.congestion)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
