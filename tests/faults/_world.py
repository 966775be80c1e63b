"""Harness of the fault tests: relay, edge and the local services as real CLI processes
inside the two namespaces of a :class:`pathlab.Lab`, TCP clients in this process (their
sockets made inside the relay's namespace), and the counters the tests assert on.

Topology::

    test process (sockets in relay_ns) --TCP--> relay (relay_ns, 10.99.0.1)
        ==QUIC over the delay line==> edge (edge_ns, 10.99.0.2) --TCP--> services (edge_ns)

Timing: the keep-alive and reconnect settings below are passed to the processes, and the
bounds the tests assert are derived from them as docs/TUNNEL.md documents them
("Keep-alive and reconnect"), plus :data:`SLACK` for a loaded 2-core machine. All in
multiples of :data:`tests.support.timing.MS`.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pathlab import Lab, Namespace

from quic_reverse.tunnel.auth import generate_token, write_token_file
from tests.support.timing import MS
from tests.tunnel._procs import Proc, RelayProc, Services

#: The console script of this checkout's venv (the "real CLI").
QUIC_REVERSE = str(Path(sys.executable).with_name("quic-reverse"))

# Settings passed to the processes (seconds = n * MS).
RELAY_PING_INTERVAL = 2000 * MS
RELAY_PING_TIMEOUT = 3000 * MS
RELAY_AUTH_TIMEOUT = 3000 * MS
RELAY_OPEN_TIMEOUT = 5000 * MS
EDGE_PING_INTERVAL = 1000 * MS
EDGE_PING_TIMEOUT = 2000 * MS
EDGE_CONNECT_TIMEOUT = 2000 * MS
EDGE_BACKOFF_INITIAL = 200 * MS
EDGE_BACKOFF_CAP = 1000 * MS

#: Allowance for a loaded machine on top of every documented bound.
SLACK = 3000 * MS
#: A process starting and logging "ready" (python start-up dominates).
STARTUP = 20_000 * MS
#: docs/TUNNEL.md: the edge notices a dead relay within ping_interval + ping_timeout.
EDGE_NOTICES = EDGE_PING_INTERVAL + EDGE_PING_TIMEOUT + SLACK
#: ... and the relay notices a dead edge within its own ping_interval + ping_timeout.
RELAY_NOTICES = RELAY_PING_INTERVAL + RELAY_PING_TIMEOUT + SLACK
#: docs/TUNNEL.md / tests/tunnel: once the relay is reachable again, one in-flight
#: attempt may have to time out, then at most one backoff delay.
RECONNECT = EDGE_CONNECT_TIMEOUT + EDGE_BACKOFF_CAP + SLACK
#: A TCP leg closing after its session or client went away ("promptly").
PROMPT = 3000 * MS
#: Polling period of :func:`wait_until`.
POLL = 50 * MS


def _seconds(value: float) -> str:
    return f"{value:.3f}"


class NsProc(Proc):
    """A :class:`tests.tunnel._procs.Proc` whose command runs inside a namespace."""

    def __init__(self, name: str, lab: Lab, ns: Namespace, argv: Sequence[str]) -> None:
        # `ip netns exec` execs: popen.pid is the process itself.
        self._start(name, lab.command(ns, argv))

    @property
    def pid(self) -> int:
        return self.popen.pid


def count_lines(proc: Proc, pattern: str, *, after: int = 0) -> int:
    """How many log lines of ``proc`` (from index ``after``) match ``pattern``."""
    rx = re.compile(pattern)
    return sum(1 for line in proc.text.splitlines()[after:] if rx.search(line))


@dataclass
class World:
    """One lab with its processes; :meth:`close` kills them all."""

    lab: Lab
    tmp: Path
    services: Services
    procs: list[Proc]

    def close(self) -> None:
        for p in self.procs:
            p.kill()

    # ------------------------------------------------------------------ processes

    def start_relay(
        self,
        forwards: Sequence[str],
        *,
        quic_port: int = 0,
        extra: Sequence[str] = (),
    ) -> RelayProc:
        args = [
            QUIC_REVERSE, "relay",
            "--listen", f"{self.lab.relay_ns.address}:{quic_port}",
            "--self-signed", "--state-dir", str(self.tmp / "state"),
            "--tokens", str(self.tmp / "tokens.toml"),
            "--auth-timeout", _seconds(RELAY_AUTH_TIMEOUT),
            "--open-timeout", _seconds(RELAY_OPEN_TIMEOUT),
            "--grace", _seconds(2000 * MS),
            "--ping-interval", _seconds(RELAY_PING_INTERVAL),
            "--ping-timeout", _seconds(RELAY_PING_TIMEOUT),
            "--log-level", "info",
            *extra,
        ]  # fmt: skip
        for f in forwards:
            args += ["--forward", f]
        proc = NsProc("relay", self.lab, self.lab.relay_ns, args)
        self.procs.append(proc)
        proc.wait_for(r"relay ready", timeout=STARTUP)
        fp = proc.wait_for(r"fingerprint: ([0-9a-f]{64})", timeout=STARTUP).group(1)
        port = int(proc.wait_for(r"listening for edges on [\d.]+:(\d+)", timeout=STARTUP)[1])
        fwd: dict[str, int] = {}
        for line in proc.text.splitlines():
            m = re.search(r"forward [\d.]+:(\d+) -> (\S+)$", line)
            if m:
                fwd[m.group(2)] = int(m.group(1))
        return RelayProc(proc=proc, quic_port=port, fingerprint=fp, forwards=fwd)

    def start_edge(
        self,
        relay: RelayProc,
        *,
        name: str = "edgeA",
        wait: bool = True,
        extra: Sequence[str] = (),
    ) -> NsProc:
        args = [
            QUIC_REVERSE, "edge",
            "--relay", f"{self.lab.relay_ns.address}:{relay.quic_port}",
            "--name", name,
            "--token-file", str(self.tmp / f"{name}.token"),
            "--fingerprint", relay.fingerprint,
            "--ping-interval", _seconds(EDGE_PING_INTERVAL),
            "--ping-timeout", _seconds(EDGE_PING_TIMEOUT),
            "--connect-timeout", _seconds(EDGE_CONNECT_TIMEOUT),
            "--backoff-initial", _seconds(EDGE_BACKOFF_INITIAL),
            "--backoff-cap", _seconds(EDGE_BACKOFF_CAP),
            "--expose", f"echo=127.0.0.1:{self.services.echo}",
            "--expose", f"count=127.0.0.1:{self.services.count}",
            *extra,
        ]  # fmt: skip
        proc = NsProc(f"edge {name}", self.lab, self.lab.edge_ns, args)
        self.procs.append(proc)
        if wait:
            proc.wait_for(r"authenticated to relay", timeout=STARTUP)
        return proc

    # ------------------------------------------------------------------ counters

    def edge_legs(self, service_port: int | None = None) -> int:
        """ESTABLISHED TCP connections to the echo service inside the edge namespace,
        counted on the connecting side (the edge's legs), via ``ss``."""
        port = self.services.echo if service_port is None else service_port
        done = self.lab.run(
            self.lab.edge_ns,
            ["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10_000 * MS,
        )
        assert done.returncode == 0, done.stderr
        return len([line for line in done.stdout.splitlines() if line.strip()])


def make_world(lab: Lab, tmp: Path, names: Sequence[str] = ("edgeA",)) -> World:
    tokens = {name: generate_token() for name in names}
    path = tmp / "tokens.toml"
    path.write_text("".join(f'{n} = "{t}"\n' for n, t in tokens.items()), encoding="utf-8")
    path.chmod(0o600)
    for name, token in tokens.items():
        write_token_file(tmp / f"{name}.token", token)
    svc = NsProc("services", lab, lab.edge_ns, [sys.executable, "-m", "tests.tunnel._services"])
    try:
        m = svc.wait_for(r"ready echo=(\d+) count=(\d+)", timeout=STARTUP)
    except BaseException:
        svc.kill()
        raise
    services = Services(proc=svc, echo=int(m.group(1)), count=int(m.group(2)))
    return World(lab=lab, tmp=tmp, services=services, procs=[svc])


def fd_count(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_until(
    what: str, probe: Callable[[], int], want: Callable[[int], bool], bound: float
) -> int:
    """Poll ``probe()`` (in a thread) until ``want(value)``; fail after ``bound`` seconds
    with the last value. Bounded: at most ``bound / POLL`` probes."""
    deadline = time.monotonic() + bound
    value = await asyncio.to_thread(probe)
    while not want(value):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still {value} after {bound:.1f}s")
        await asyncio.sleep(POLL)
        value = await asyncio.to_thread(probe)
    return value


# ---------------------------------------------------------------------- TCP clients

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(lab: Lab, port: int, count: int = 1, *, batch: int = 200) -> list[Client]:
    """``count`` TCP connections from the relay namespace to ``127.0.0.1:port`` there
    (established ``batch`` at a time so the listen backlog never overflows)."""
    socks = await asyncio.to_thread(lab.socket, lab.relay_ns, count=count)
    loop = asyncio.get_running_loop()
    clients: list[Client] = []

    async def one(sock: socket.socket) -> Client:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=sock, limit=1 << 20)

    try:
        for i in range(0, count, batch):
            clients += await asyncio.gather(*(one(s) for s in socks[i : i + batch]))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return clients


async def echo(client: Client, payload: bytes, bound: float) -> None:
    """Write ``payload`` and read it back within ``bound`` (the connection stays open)."""
    reader, writer = client
    async with asyncio.timeout(bound):
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
    assert got == payload


async def echo_once(lab: Lab, port: int, payload: bytes, bound: float) -> bytes:
    """A whole client within ``bound``: connect, send, half-close, read to EOF, close."""
    async with asyncio.timeout(bound):
        ((reader, writer),) = await connect(lab, port)
        try:
            writer.write(payload)
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()


async def closed(client: Client, bound: float) -> str:
    """Wait until the peer closes ``client``: 'eof' or 'reset' (fails after ``bound``
    seconds or on unexpected data)."""
    reader, _ = client
    try:
        async with asyncio.timeout(bound):
            data = await reader.read(1 << 16)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        raise AssertionError(f"connection still open after {bound:.1f}s") from None
    assert data == b"", f"a closed connection delivered {len(data)} bytes"
    return "eof"


def close_all(clients: Sequence[Client]) -> None:
    for _, writer in clients:
        writer.transport.abort()
