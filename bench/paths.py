"""Path benchmark: the tunnel vs ``ssh -N -R`` over emulated network paths (issue 11).

Each path is a :class:`pathlab.Lab`: two network namespaces, ``relay_ns`` (10.99.0.1)
and ``edge_ns`` (10.99.0.2), joined by a veth pair (MTU 1500, kernel speed) or by the
user-space delay line (MTU 1500, 25 ms each way = 50 ms RTT, seeded random loss each
way). Topology, identical for the tunnel and for SSH::

    TCP client (this process, socket in relay_ns) -> relay | sshd  (relay_ns)
        ==path==> edge | ssh -R client (edge_ns) -> sink / source service (edge_ns)

* the tunnel is the real ``quic-reverse relay`` / ``edge`` CLI, once per QUIC stack:
  qh3 (the default) and aioquic (with this library's default congestion control for
  aioquic: ``quic_reverse.transport.congestion``, delivery-rate based);
* ``ssh -N -R`` is Debian's OpenSSH: an ``sshd`` started here inside ``relay_ns`` on a
  host key and a client key generated for the run, ``ssh`` inside ``edge_ns``; TCP
  uses the host's default congestion control (shown in the baseline name);
* upload = client -> service (data flows relay -> edge), download = service -> client;
  every transfer is one TCP connection of seeded data whose sha256 is checked at the
  receiver (a mismatch makes the run fail, it is never reported as a figure);
* a transfer stops at its size (veth 256 MiB, 0 % 64, 1 % 32, 5 % 16; ``--quick``
  8 and 2 MiB on two paths) or after a time cap (15 s, ``--quick`` 4 s; slow paths
  would otherwise take minutes); the figure is bytes delivered / seconds (an upload
  counts until the service confirmed every byte), so a capped transfer is still a fair
  rate; 2 transfers per direction (``--quick`` 1), the figure is their median;
* one more pair of rows, on loopback and without root: aioquic with that congestion
  control vs aioquic's NewReno, one process, 64 MiB (``--quick`` 16), 5 interleaved
  runs: what loss tolerance costs where nothing is lost.

* after each stack's transfers, one line on stderr gives the CPU the relay and the edge
  spent per MiB moved, per direction (``/proc/<pid>/stat``): on this two-core machine
  the relay, the edge, the bench client and the services share the CPU, so CPU per
  byte is what bounds the tunnel, and it is far less sensitive to other load than
  MiB/s. ``QR_BENCH_PROFILE=<dir>`` runs the relay and the edge under cProfile
  (``<stack>-relay.prof`` / ``<stack>-edge.prof`` in ``<dir>``).

Goal (issue 11): tunnel >= 1.0x ``ssh -N -R`` on every path, both directions.
Needs root (namespaces, TUN) and ``sshd``; elsewhere one row says why it was skipped.
Run alone: ``.venv/bin/python -m bench.paths [--quick] [--path veth|rtt50|loss1|loss5]
[--stack qh3|aioquic|aioquic-edge|auto]`` (repeatable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pathlab
from pathlab import Lab, Namespace

from bench._harness import Row, make_row, print_table, sshd_path

ROOT = Path(__file__).resolve().parents[1]
STARTUP = 30.0
#: Ports inside the (fresh, private) namespaces.
SINK_PORT, SOURCE_PORT = 10001, 10002
QUIC_PORT, SSHD_PORT = 4433, 2222
SSH_SINK, SSH_SOURCE = 20001, 20002
#: The seeded stream is this block repeated (an odd length, so a shifted copy never
#: matches by accident).
BLOCK_LEN = 1_000_003
CHUNK = 256 * 1024
#: Set to a directory to run the relay and edge under cProfile, one
#: ``<stack>-relay.prof`` / ``<stack>-edge.prof`` there per run (read them with
#: ``python -m pstats``); the figures are then not comparable.
PROFILE_ENV = "QR_BENCH_PROFILE"


@dataclass(frozen=True)
class PathSpec:
    """One emulated path."""

    name: str
    label: str
    lab: dict[str, Any]
    size: int  # bytes per transfer (before the time cap)


def _paths(quick: bool) -> list[PathSpec]:
    mib = 1 << 20
    full = [
        PathSpec("veth", "veth MTU 1500, no delay", {"emulate": False}, 256 * mib),
        PathSpec("rtt50", "50 ms RTT, 0 % loss", {"delay_ms": 25}, 64 * mib),
        PathSpec("loss1", "50 ms RTT, 1 % loss", {"delay_ms": 25, "loss": 0.01}, 32 * mib),
        PathSpec("loss5", "50 ms RTT, 5 % loss", {"delay_ms": 25, "loss": 0.05}, 16 * mib),
    ]
    if quick:
        return [
            PathSpec("veth", full[0].label, full[0].lab, 8 * mib),
            PathSpec("loss1", full[2].label, full[2].lab, 2 * mib),
        ]
    return full


def _block(seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < BLOCK_LEN:
        out += hashlib.sha256(f"paths:{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:BLOCK_LEN])


def _expected_sha(seed: int, n: int) -> str:
    digest = hashlib.sha256()
    block = _block(seed)
    left = n
    while left > 0:
        take = min(left, BLOCK_LEN)
        digest.update(block[:take])
        left -= take
    return digest.hexdigest()


# --------------------------------------------------------------------------- services


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF; answer ``<bytes> <sha256>``."""
    digest = hashlib.sha256()
    total = 0
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            digest.update(data)
            total += len(data)
        writer.write(f"{total} {digest.hexdigest()}\n".encode())
        await writer.drain()
    writer.close()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read ``<nbytes> <seed>\\n``; send that much of the seeded stream; close."""
    with contextlib.suppress(OSError, ValueError):
        nbytes, seed = (int(x) for x in (await reader.readline()).split())
        block = _block(seed)
        sent = 0
        while sent < nbytes:
            take = min(nbytes - sent, BLOCK_LEN)
            writer.write(block[:take])
            await writer.drain()
            sent += take
        writer.write_eof()
        await reader.read()
    writer.close()


async def _serve() -> None:
    servers = [
        await asyncio.start_server(_sink, "127.0.0.1", SINK_PORT, limit=CHUNK),
        await asyncio.start_server(_source, "127.0.0.1", SOURCE_PORT, limit=CHUNK),
    ]
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for s in servers:
            s.close()


# --------------------------------------------------------------------------- clients


@dataclass
class Transfer:
    nbytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / (1 << 20) / self.seconds


def _connect(lab: Lab, port: int, timeout: float) -> socket.socket:
    (sock,) = lab.socket(lab.relay_ns)
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def upload(lab: Lab, port: int, size: int, cap: float, seed: int) -> Transfer:
    """Send up to ``size`` bytes (or for ``cap`` seconds), half-close, check the sink's
    count and sha256; seconds = until the sink's answer."""
    block = _block(seed)
    sock = _connect(lab, port, STARTUP)
    with sock:
        sock.settimeout(cap * 4 + STARTUP)
        t0 = time.perf_counter()
        sent = 0
        while sent < size and time.perf_counter() - t0 < cap:
            pos = sent % BLOCK_LEN
            piece = block[pos : pos + min(CHUNK, size - sent, BLOCK_LEN - pos)]
            sock.sendall(piece)
            sent += len(piece)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(256):
            reply += chunk
        elapsed = time.perf_counter() - t0
    m = re.fullmatch(rb"(\d+) ([0-9a-f]{64})\n", reply)
    if m is None or int(m.group(1)) != sent:
        raise RuntimeError(f"upload via port {port}: sent {sent} bytes, sink said {reply!r}")
    if m.group(2).decode() != _expected_sha(seed, sent):
        raise RuntimeError(f"upload via port {port}: data corrupted (sha256 mismatch)")
    return Transfer(sent, elapsed)


def download(lab: Lab, port: int, size: int, cap: float, seed: int) -> Transfer:
    """Ask the source for ``size`` bytes; read until all arrived or ``cap`` passed;
    check the sha256 of what arrived."""
    sock = _connect(lab, port, STARTUP)
    digest = hashlib.sha256()
    got = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with sock:
        sock.settimeout(cap + STARTUP)
        t0 = time.perf_counter()
        sock.sendall(f"{size} {seed}\n".encode())
        while got < size and time.perf_counter() - t0 < cap:
            n = sock.recv_into(buf)
            if n == 0:
                break
            digest.update(view[:n])
            got += n
        elapsed = time.perf_counter() - t0
    if got == 0:
        raise RuntimeError(f"download via port {port}: nothing arrived")
    if digest.hexdigest() != _expected_sha(seed, got):
        raise RuntimeError(f"download via port {port}: data corrupted (sha256 mismatch)")
    return Transfer(got, elapsed)


# --------------------------------------------------------------------------- processes


def _wait_log(path: Path, pattern: str, proc: subprocess.Popen[Any], what: str) -> str:
    rx = re.compile(pattern)
    deadline = time.monotonic() + STARTUP
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if rx.search(text):
            return text
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {text[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no /{pattern}/ within {STARTUP}s: {text[-2000:]}")
        time.sleep(0.05)  # another process's log file: nothing to wait on


def _wait_port(lab: Lab, port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + STARTUP
    while True:
        try:
            _connect(lab, port, 1.0).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: port {port} not open within {STARTUP}s") from None
            time.sleep(0.05)


def _popen_logged(lab: Lab, ns: Namespace, argv: list[str], log: Path) -> subprocess.Popen[Any]:
    with log.open("wb") as fh:
        return lab.popen(ns, argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def start_services(lab: Lab) -> subprocess.Popen[Any]:
    """The sink and source services in ``edge_ns`` (stopped with the lab)."""
    services = lab.popen(
        lab.edge_ns,
        [sys.executable, "-m", "bench.paths", "--services"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert services.stdout is not None
    if services.stdout.readline().strip() != "ready":
        raise RuntimeError("path services did not start")
    return services


@contextlib.contextmanager
def tunnel(
    lab: Lab, tmp: Path, stack: str, processes: dict[str, int] | None = None
) -> Iterator[tuple[int, int]]:
    """The real relay (relay_ns) and edge (edge_ns) CLIs; yields the forward ports.
    Their pids are put in ``processes`` (``"relay"``, ``"edge"``) if given.

    ``stack`` is both processes' ``--stack``; ``"aioquic-edge"``: only the edge runs
    aioquic and the relay keeps its default, following the edge's stack per connection
    (transport/_stackhint.py); ``"auto"``: the relay keeps its default, the edge runs
    ``--stack auto`` and is warmed up (:func:`_warm_up`) before the ports are yielded.
    """
    relay_stack, edge_stack = {"aioquic-edge": ("qh3", "aioquic"), "auto": ("qh3", "auto")}.get(
        stack, (stack, stack)
    )
    from quic_reverse.tunnel.auth import generate_token, write_token_file

    d = tmp / f"tunnel-{stack}"
    d.mkdir()
    token = generate_token()
    (d / "tokens.toml").write_text(f'bench = "{token}"\n', encoding="utf-8")
    (d / "tokens.toml").chmod(0o600)
    write_token_file(d / "bench.token", token)
    py = [sys.executable, "-m", "quic_reverse"]
    profile_dir = os.environ.get(PROFILE_ENV)

    def cli(role: str) -> list[str]:
        if not profile_dir:
            return py
        out = Path(profile_dir) / f"{stack}-{role}.prof"
        return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "quic_reverse"]

    relay = _popen_logged(
        lab,
        lab.relay_ns,
        [
            *cli("relay"), "relay", "--stack", relay_stack,
            "--listen", f"{lab.relay_ns.address}:{QUIC_PORT}",
            "--self-signed", "--state-dir", str(d / "state"), "--tokens", str(d / "tokens.toml"),
            "--forward", "127.0.0.1:0=bench/sink", "--forward", "127.0.0.1:0=bench/source",
            "--log-level", "info",
        ],
        d / "relay.log",
    )  # fmt: skip
    try:
        text = _wait_log(d / "relay.log", r"relay ready", relay, "relay")
        fp = re.search(r"fingerprint: ([0-9a-f]{64})", text)
        fwd = {m[2]: int(m[1]) for m in re.finditer(r"forward [\d.]+:(\d+) -> bench/(\w+)", text)}
        if fp is None or len(fwd) != 2:
            raise RuntimeError(f"relay start-up log not understood: {text[-2000:]}")
        edge = _popen_logged(
            lab,
            lab.edge_ns,
            [
                *cli("edge"), "edge", "--stack", edge_stack,
                "--relay", f"{lab.relay_ns.address}:{QUIC_PORT}", "--name", "bench",
                "--token-file", str(d / "bench.token"), "--fingerprint", fp.group(1),
                "--expose", f"sink=127.0.0.1:{SINK_PORT}",
                "--expose", f"source=127.0.0.1:{SOURCE_PORT}",
            ],
            d / "edge.log",
        )  # fmt: skip
        try:
            _wait_log(d / "edge.log", r"authenticated to relay", edge, "edge")
            if processes is not None:  # ip netns exec execs: the same pid
                processes.update(relay=relay.pid, edge=edge.pid)
            if stack == "auto":
                _warm_up(lab, fwd["source"], d / "edge.log")
            yield fwd["sink"], fwd["source"]
        finally:
            _stop(edge)
    finally:
        _stop(relay)


#: ``auto``'s warm-up cap (s): the edge's loss hint judges a window of >= 10 s at its
#: keep-alive events (every 5 s), so a lossy path switches within about 15 s.
AUTO_WARMUP = 25.0


def _warm_up(lab: Lab, source: int, log: Path) -> None:
    """``auto``: one download (the edge sends) until the edge's log shows the switch to
    aioquic, or :data:`AUTO_WARMUP` passed (a clean path never switches). The measured
    transfers come after it, each a new connection: on the session the edge settled on
    (a transfer that started before a switch would stay on qh3 to its end)."""
    sock = _connect(lab, source, STARTUP)
    with sock:
        sock.settimeout(1.0)
        sock.sendall(f"{1 << 40} 1\n".encode())
        t0 = look = time.perf_counter()
        while (now := time.perf_counter()) - t0 < AUTO_WARMUP:
            with contextlib.suppress(TimeoutError):
                if not sock.recv(CHUNK):
                    break
            if now >= look:  # the log, twice a second
                look = now + 0.5
                if "switched to aioquic" in log.read_text(errors="replace"):
                    break
    print(f"[paths] auto warm-up: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


@contextlib.contextmanager
def _ssh(lab: Lab, tmp: Path, sshd: str) -> Iterator[tuple[int, int]]:
    """sshd in relay_ns on keys made for this run, ``ssh -N -R`` from edge_ns."""
    d = tmp / "ssh"
    d.mkdir(mode=0o700)
    _keygen(d / "host_key")
    _keygen(d / "id")
    shutil.copy(d / "id.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {SSHD_PORT}",
                f"ListenAddress {lab.relay_ns.address}",
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
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege-separation dir
    server = _popen_logged(
        lab, lab.relay_ns, [sshd, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log"
    )
    try:
        deadline = time.monotonic() + STARTUP
        while True:  # sshd listens on the lab address, not on loopback
            (probe,) = lab.socket(lab.relay_ns)
            with probe:
                probe.settimeout(1.0)
                if probe.connect_ex((lab.relay_ns.address, SSHD_PORT)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.05)
        client = _popen_logged(
            lab,
            lab.edge_ns,
            [
                "ssh", "-F", "/dev/null", "-N", "-T", "-p", str(SSHD_PORT), "-i", str(d / "id"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
                "-R", f"127.0.0.1:{SSH_SINK}:127.0.0.1:{SINK_PORT}",
                "-R", f"127.0.0.1:{SSH_SOURCE}:127.0.0.1:{SOURCE_PORT}",
                f"root@{lab.relay_ns.address}",
            ],
            d / "ssh.log",
        )  # fmt: skip
        try:
            _wait_port(lab, SSH_SINK, client, "ssh -R")
            _wait_port(lab, SSH_SOURCE, client, "ssh -R")
            yield SSH_SINK, SSH_SOURCE
        finally:
            _stop(client)
    finally:
        _stop(server)


# --------------------------------------------------------------------------- measuring


@dataclass
class Figures:
    up: list[float] = field(default_factory=list)  # MiB/s per transfer
    down: list[float] = field(default_factory=list)
    #: CPU milliseconds per MiB moved, per process ("relay up", "edge down", ...).
    cpu: dict[str, list[float]] = field(default_factory=dict)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(
    lab: Lab,
    ports: tuple[int, int],
    size: int,
    cap: float,
    runs: int,
    processes: dict[str, int] | None = None,
) -> Figures:
    """Upload then download, ``runs`` times. With ``processes`` (role -> pid), also the
    CPU each of them spent per MiB moved (the relay and edge share two cores with the
    bench client and the services, so CPU per byte is what bounds the tunnel here)."""
    sink, source = ports
    figures = Figures()
    processes = processes or {}
    for i in range(runs):
        for direction in ("up", "down"):
            before = {role: _cpu_seconds(pid) for role, pid in processes.items()}
            if direction == "up":
                t = upload(lab, sink, size, cap, seed=2 * i + 1)
            else:
                t = download(lab, source, size, cap, seed=2 * i + 2)
            getattr(figures, direction).append(t.mib_per_s)
            mib = t.nbytes / (1 << 20)
            for role, pid in processes.items():
                used = _cpu_seconds(pid) - before[role]
                figures.cpu.setdefault(f"{role} {direction}", []).append(1000 * used / mib)
    return figures


def _congestion_control() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "?"


def run(
    quick: bool, only: list[str] | None = None, only_stacks: list[str] | None = None
) -> list[Row]:
    """Measure the tunnel (each stack) and ``ssh -N -R`` on each path; return rows."""
    reason = pathlab.available()
    sshd = sshd_path()
    if reason is None and sshd is None:
        reason = "sshd not installed (Debian package openssh-server)"
    rows: list[Row] = [] if only else loopback_rows(quick)
    if reason is not None or sshd is None:
        return [*rows, _skip_row(reason or "sshd not installed")]
    cap = 4.0 if quick else 15.0
    runs = 1 if quick else 2
    cc = _congestion_control()
    for spec in _paths(quick):
        if only and spec.name not in only:
            continue
        # qh3 pinned, aioquic pinned, and on lossy paths the edge's default ("auto":
        # qh3 until the path proves lossy; on clean paths it stays on qh3, so the qh3
        # rows are its figures there and its 25 s warm-up is not spent).
        stacks: tuple[str, ...] = (
            ("qh3", "auto", "aioquic")
            if spec.lab.get("loss")
            else (
                "qh3",
                "aioquic",
            )
        )
        if only_stacks:
            stacks = tuple(only_stacks)
        print(f"[paths] {spec.label} ...", file=sys.stderr, flush=True)
        results: dict[str, Figures] = {}
        with (
            tempfile.TemporaryDirectory(prefix="qr-bench-paths-") as tmpname,
            pathlab.Lab(seed=7, **spec.lab) as lab,
        ):
            tmp = Path(tmpname)
            start_services(lab)
            with _ssh(lab, tmp, sshd) as ports:
                results["ssh"] = _measure(lab, ports, spec.size, cap, runs)
            for stack in stacks:
                processes: dict[str, int] = {}
                with tunnel(lab, tmp, stack, processes) as ports:
                    results[stack] = _measure(lab, ports, spec.size, cap, runs, processes)
                cpu = ", ".join(
                    f"{role} {_median(xs):.1f}" for role, xs in results[stack].cpu.items()
                )
                print(f"[paths] {spec.name} {stack}: CPU ms per MiB: {cpu}", file=sys.stderr)
        rows += _rows(spec, results, cc, stacks)
    return rows


async def _loopback_upload(size: int, algorithm: str, cert: Path, key: Path) -> float:
    """One aioquic connection on 127.0.0.1 (both ends in this process), ``algorithm``
    as congestion control on both ends; one stream uploads ``size`` bytes; MB/s."""
    from quic_reverse.transport import aioquic as aioquic_stack
    from quic_reverse.transport.quic import ClientTLS, ServerTLS, connect, serve

    aioquic_stack.DEFAULT_CONGESTION_CONTROL = algorithm
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def on_connection(conn: Any) -> None:
        send, recv = await conn.accept_bi()
        total = 0
        while data := await recv.read(1 << 20):
            total += len(data)
        done.set_result(time.perf_counter())
        await send.finish()
        await conn.wait_closed()  # the client closes once it has its figure

    server = await serve(
        "127.0.0.1", 0, tls=ServerTLS(certfile=cert, keyfile=key),
        on_connection=on_connection, stack="aioquic",
    )  # fmt: skip
    async with server:
        conn = await connect(
            "127.0.0.1", server.address[1], tls=ClientTLS(cafile=cert), stack="aioquic"
        )
        try:
            send, _ = await conn.open_bi()
            block = memoryview(b"\x5a" * (1 << 20))
            t0 = time.perf_counter()
            left = size
            while left > 0:
                n = min(left, len(block))
                await send.write(block[:n])
                left -= n
            await send.finish()
            t1 = await asyncio.wait_for(done, STARTUP * 4)
        finally:
            conn.close()
    return size / (t1 - t0) / 1e6


def loopback_rows(quick: bool) -> list[Row]:
    """aioquic on loopback: this library's congestion control vs aioquic's NewReno
    (the cost of the loss-tolerant controller where nothing is lost)."""
    from quic_reverse.transport import congestion
    from quic_reverse.transport.tls import write_self_signed

    size = (16 if quick else 64) << 20
    runs = 1 if quick else 5
    samples: dict[str, list[float]] = {congestion.NAME: [], "reno": []}
    with tempfile.TemporaryDirectory(prefix="qr-bench-cc-") as tmp:
        cert, key = write_self_signed(tmp)
        for _ in range(runs):  # interleaved, so machine noise hits both alike
            for algorithm, out in samples.items():
                out.append(asyncio.run(_loopback_upload(size, algorithm, cert, key)))
    mib = size >> 20
    return [
        make_row(
            f"loopback aioquic {mib} MiB upload, {congestion.NAME} congestion control",
            "MB/s",
            samples[congestion.NAME],
            baseline="aioquic NewReno (its default), same run",
            baseline_value=_median(samples["reno"]),
            goal=">= 0.95x NewReno (the loss-tolerant controller costs 5 % here, or less)",
        ),
        make_row(
            f"loopback aioquic {mib} MiB upload, NewReno",
            "MB/s",
            samples["reno"],
            goal="reference (baseline)",
        ),
    ]


def _skip_row(reason: str) -> Row:
    nan = float("nan")
    return {
        "name": f"paths: skipped ({reason})",
        "unit": "MiB/s",
        "value": nan,
        "min": nan,
        "max": nan,
        "baseline": None,
        "baseline_value": None,
        "ratio": None,
        "goal": "tunnel >= 1.0x ssh -N -R on each path (not measured here)",
    }


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _rows(
    spec: PathSpec, results: dict[str, Figures], cc: str, stacks: tuple[str, ...]
) -> list[Row]:
    ssh = results["ssh"]
    rows: list[Row] = []
    for direction, label in (("up", "upload (client -> service)"), ("down", "download")):
        ssh_samples: list[float] = getattr(ssh, direction)
        for stack in stacks:
            rows.append(
                make_row(
                    f"path {spec.label}: tunnel ({stack}) {label}",
                    "MiB/s",
                    getattr(results[stack], direction),
                    baseline=f"ssh -N -R (TCP {cc})",
                    baseline_value=_median(ssh_samples),
                    goal=">= 1.0x ssh -R",
                )
            )
        rows.append(
            make_row(
                f"path {spec.label}: ssh -N -R {label}",
                "MiB/s",
                ssh_samples,
                goal="reference (baseline)",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tunnel vs ssh -N -R over emulated paths")
    parser.add_argument("--quick", action="store_true", help="two small paths, small sizes")
    parser.add_argument("--path", action="append", help="only these paths (veth, rtt50, ...)")
    parser.add_argument(
        "--stack", action="append", help="only these stacks (qh3, aioquic, aioquic-edge, auto)"
    )
    parser.add_argument("--services", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.services:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve())
        return 0
    print_table(run(args.quick, args.path, args.stack))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
