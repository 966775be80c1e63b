"""End-to-end tunnel tests: ``python -m quic_reverse relay`` and ``edge`` as real
subprocesses, real QUIC over UDP and real TCP on 127.0.0.1, a separate local services
process (echo, count), and TCP clients in the test.

Every wait is bounded; processes are always killed in teardown.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from quic_reverse import Config, Metadata, RejectCode, Role, Session, StreamRejected
from quic_reverse.transport import quic
from quic_reverse.tunnel.auth import generate_token, write_token_file
from quic_reverse.tunnel.config import DEFAULT_ALPN

from ..support.timing import MS
from ._procs import (
    AUTH_TIMEOUT,
    STARTUP,
    Proc,
    RelayProc,
    Services,
    start_edge,
    start_relay,
    start_services,
)
from ._tcp import send_all_then_eof

pytestmark = pytest.mark.subprocess

WAIT = 30_000 * MS
PROMPT = 3_000 * MS  # "closed promptly"


@dataclass
class Tunnel:
    services: Services
    relay: RelayProc
    edge: Proc
    tmp: Path
    tokens: dict[str, str]

    def port(self, target: str) -> int:
        return self.relay.forwards[target]


def _write_tokens(tmp: Path, names: list[str]) -> dict[str, str]:
    tokens = {name: generate_token() for name in names}
    path = tmp / "tokens.toml"
    path.write_text("".join(f'{n} = "{t}"\n' for n, t in tokens.items()), encoding="utf-8")
    path.chmod(0o600)
    for name, token in tokens.items():
        write_token_file(tmp / f"{name}.token", token)
    return tokens


FORWARDS = [
    "127.0.0.1:0=edgeA/echo",
    "127.0.0.1:0=edgeA/count",
    "127.0.0.1:0=edgeA/secret",  # not on edgeA's allow-list
    "127.0.0.1:0=edgeB/echo",  # edgeB has a token but presents a wrong one
    "127.0.0.1:0=ghost/echo",  # never connects
]


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    svc = start_services()
    try:
        yield svc
    finally:
        svc.proc.kill()


@pytest.fixture(scope="module")
def tunnel(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    tmp = tmp_path_factory.mktemp("tunnel")
    tokens = _write_tokens(tmp, ["edgeA", "edgeB", "ghost"])
    # No startup grace: the "never connected" case below is closed at once
    # (test_startup_grace_bridges_an_edge_that_connects_late covers the grace).
    relay = start_relay(
        tmp / "state", tmp / "tokens.toml", FORWARDS, extra=["--startup-grace", "0"]
    )
    edge: Proc | None = None
    try:
        edge = start_edge(
            "edgeA",
            tmp / "edgeA.token",
            relay,
            [f"echo=127.0.0.1:{services.echo}", f"count=127.0.0.1:{services.count}"],
        )
        yield Tunnel(services=services, relay=relay, edge=edge, tmp=tmp, tokens=tokens)
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()
    for name, token in tokens.items():  # tokens never reach any log
        assert token not in relay.proc.text, f"relay logged the token of {name}"
        if edge is not None:
            assert token not in edge.text, f"edge logged the token of {name}"


async def _echo_roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


async def _closed_within(port: int, seconds: float) -> str:
    """Connect and report how the relay ended it: 'eof' or 'reset' (fails on a hang)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(seconds):
            try:
                data = await reader.read(1)
            except ConnectionResetError:
                return "reset"
        assert data == b"", "a closed forward must not deliver data"
        return "eof"
    finally:
        writer.close()


# ------------------------------------------------------------------------- data path


async def test_64_mib_sha256_both_directions(tunnel: Tunnel) -> None:
    size = 64 * 1024 * 1024
    payload = os.urandom(size)
    sent_digest = hashlib.sha256(payload).hexdigest()
    reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port("edgeA/echo"))

    digest = hashlib.sha256()
    received = 0
    async with asyncio.timeout(90_000 * MS):
        sender = asyncio.create_task(send_all_then_eof(writer, payload))
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
            received += len(chunk)
        await sender
    writer.close()
    assert received == size
    assert digest.hexdigest() == sent_digest
    m = await asyncio.to_thread(
        tunnel.relay.proc.wait_for, rf"edgeA/echo: stream \d+ closed; {size} bytes up, {size}"
    )
    assert m is not None


async def test_100_concurrent_connections(tunnel: Tunnel) -> None:
    port = tunnel.port("edgeA/echo")
    payloads = [os.urandom(16 * 1024) + f"client {i}".encode() for i in range(100)]
    async with asyncio.timeout(WAIT * 2):
        replies = await asyncio.gather(*(_echo_roundtrip(port, p) for p in payloads))
    assert replies == payloads


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_half_close_client_still_gets_reply(tunnel: Tunnel) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port("edgeA/count"))
    async with asyncio.timeout(WAIT):
        writer.write(b"y" * 300_000)
        writer.write_eof()  # shutdown(SHUT_WR) travels as stream FIN to the service
        reply = await reader.read()
    writer.close()
    assert reply == b"got 300000"


async def test_service_not_on_allow_list_is_refused(tunnel: Tunnel) -> None:
    mark, edge_mark = tunnel.relay.proc.mark(), tunnel.edge.mark()
    assert await _closed_within(tunnel.port("edgeA/secret"), PROMPT) in ("eof", "reset")
    await asyncio.to_thread(
        tunnel.relay.proc.wait_for, r"edgeA/secret: edge rejected .*UNSUPPORTED_SERVICE", after=mark
    )
    await asyncio.to_thread(
        tunnel.edge.wait_for, r"'secret'.*not exposed; rejected", after=edge_mark
    )
    # An expected rejection is not a problem of the tunnel: at most one WARNING line for it.
    problems = [
        line
        for line in tunnel.edge.text.splitlines()[edge_mark:]
        if "'secret'" in line and re.search(r" (WARNING|ERROR) ", line)
    ]
    assert len(problems) <= 1, problems


async def test_edge_not_connected_client_closed_promptly(tunnel: Tunnel) -> None:
    mark = tunnel.relay.proc.mark()
    started = time.monotonic()
    assert await _closed_within(tunnel.port("ghost/echo"), PROMPT) in ("eof", "reset")
    assert time.monotonic() - started < PROMPT
    await asyncio.to_thread(
        tunnel.relay.proc.wait_for, r"ghost/echo: edge 'ghost' has never connected", after=mark
    )


async def test_wrong_token_rejected_and_nothing_routed(tunnel: Tunnel) -> None:
    wrong = tunnel.tmp / "wrong.token"
    write_token_file(wrong, generate_token())
    mark = tunnel.relay.proc.mark()
    edge = start_edge(
        "edgeB",
        wrong,
        tunnel.relay,
        [f"echo=127.0.0.1:{tunnel.services.echo}"],
        wait=False,
    )
    try:
        code = await asyncio.to_thread(edge.wait_exit, WAIT)
        assert code == 1, edge.tail()
        assert edge.find(r"authentication as 'edgeB' rejected")
        await asyncio.to_thread(
            tunnel.relay.proc.wait_for, r"failed authentication as 'edgeB'", after=mark
        )
        # No session was registered: the edgeB forward is unreachable.
        assert await _closed_within(tunnel.port("edgeB/echo"), PROMPT) in ("eof", "reset")
        assert not tunnel.relay.proc.find(r"edge 'edgeB' authenticated", after=mark)
        assert tunnel.tokens["edgeB"] not in edge.text
    finally:
        edge.kill()
    # The good edge was not disturbed.
    assert await _echo_roundtrip(tunnel.port("edgeA/echo"), b"still fine") == b"still fine"


# ------------------------------------------------------------------------- staying up


@pytest.fixture
def private(services: Services, tmp_path: Path) -> Iterator[tuple[Path, RelayProc]]:
    """A relay of its own (tests that kill and restart processes)."""
    _write_tokens(tmp_path, ["edgeA"])
    relay = start_relay(tmp_path / "state", tmp_path / "tokens.toml", ["127.0.0.1:0=edgeA/echo"])
    try:
        yield tmp_path, relay
    finally:
        relay.proc.kill()


async def test_edge_killed_and_restarted(
    services: Services, private: tuple[Path, RelayProc]
) -> None:
    """A new edge process is a new instance: it joins as a replica at once and serves
    new clients; the killed one leaves the pool when keep-alive finds it dead, and the
    TCP client that was using it is closed."""
    tmp, relay = private
    expose = [f"echo=127.0.0.1:{services.echo}"]
    port = relay.forwards["edgeA/echo"]
    first = start_edge("edgeA", tmp / "edgeA.token", relay, expose)
    second: Proc | None = None
    try:
        # A long-lived TCP client through the first edge's session.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"before")
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(6) == b"before"
        first.kill()  # SIGKILL: no goodbye to the relay
        mark = relay.proc.mark()
        second = start_edge("edgeA", tmp / "edgeA.token", relay, expose)
        await asyncio.to_thread(
            relay.proc.wait_for, r"edge 'edgeA' authenticated .*2 live replica", after=mark
        )
        # New clients are served by the new instance (the one with fewer streams)...
        async with asyncio.timeout(WAIT):
            assert await _echo_roundtrip(port, b"after") == b"after"
        # ...and the dead session's TCP client is closed once keep-alive finds it dead.
        async with asyncio.timeout(WAIT):
            try:
                rest = await reader.read()
            except ConnectionResetError:
                rest = b""
        assert rest == b""
        writer.close()
        await asyncio.to_thread(relay.proc.wait_for, r"session lost", after=mark)
        assert not relay.proc.find(r"replacing its session", after=mark)
        async with asyncio.timeout(WAIT):
            assert await _echo_roundtrip(port, b"again") == b"again"
    finally:
        first.kill()
        if second is not None:
            second.kill()


async def test_relay_restarted_edge_reconnects(
    services: Services, private: tuple[Path, RelayProc]
) -> None:
    tmp, relay = private
    cap = 1.0  # --backoff-cap given to the edge by start_edge
    connect_timeout = 2.0  # --connect-timeout given to the edge by start_edge
    edge = start_edge("edgeA", tmp / "edgeA.token", relay, [f"echo=127.0.0.1:{services.echo}"])
    relay2: RelayProc | None = None
    try:
        port = relay.forwards["edgeA/echo"]
        assert await _echo_roundtrip(port, b"one") == b"one"
        assert relay.proc.terminate() == 0  # graceful stop on SIGTERM
        await asyncio.to_thread(edge.wait_for, r"reconnecting to")
        mark = edge.mark()
        relay2 = start_relay(
            tmp / "state",  # same state dir: same certificate, so the pin still matches
            tmp / "tokens.toml",
            [f"127.0.0.1:{port}=edgeA/echo"],
            listen=f"127.0.0.1:{relay.quic_port}",
        )
        started = time.monotonic()
        await asyncio.to_thread(edge.wait_for, r"authenticated to relay", after=mark)
        # One in-flight attempt may have to time out, then at most one backoff delay.
        assert time.monotonic() - started < cap + connect_timeout + 3_000 * MS
        async with asyncio.timeout(WAIT):
            assert await _echo_roundtrip(port, b"two") == b"two"
    finally:
        edge.kill()
        if relay2 is not None:
            relay2.proc.kill()


async def test_relay_killed_edge_notices_within_seconds(
    services: Services, private: tuple[Path, RelayProc]
) -> None:
    tmp, relay = private
    edge = start_edge("edgeA", tmp / "edgeA.token", relay, [f"echo=127.0.0.1:{services.echo}"])
    try:
        mark = edge.mark()
        relay.proc.kill()  # SIGKILL: no session close, the edge must notice by itself
        started = time.monotonic()
        await asyncio.to_thread(edge.wait_for, r"session with the relay lost", after=mark)
        # --ping-interval 1 --ping-timeout 2: dead relay noticed within a few seconds.
        assert time.monotonic() - started < 1 + 2 + 3_000 * MS
        await asyncio.to_thread(edge.wait_for, r"reconnecting to", after=mark)
    finally:
        edge.kill()


async def test_unauthenticated_session_is_refused_and_closed(tunnel: Tunnel) -> None:
    """A peer that skips authentication gets nothing routed and is closed at the deadline."""
    mark = tunnel.relay.proc.mark()
    conn = await quic.connect(
        "127.0.0.1",
        tunnel.relay.quic_port,
        tls=quic.ClientTLS(alpn=(DEFAULT_ALPN,), pin_sha256=tunnel.relay.fingerprint),
    )
    try:
        handle = await Session(conn, Role.CLIENT, Config()).start()
        with pytest.raises(StreamRejected) as info:
            await handle.open("echo", Metadata.EMPTY)
        assert info.value.code == RejectCode.UNAUTHORIZED
        async with asyncio.timeout(AUTH_TIMEOUT + 5):
            await handle.wait_closed()  # the relay closed it at the auth deadline
        assert handle.is_closed
    finally:
        conn.close()
        await conn.wait_closed()
    await asyncio.to_thread(tunnel.relay.proc.wait_for, r"did not authenticate within", after=mark)


def test_config_file_with_flag_override_and_sigterm(services: Services, tmp_path: Path) -> None:
    """The edge reads its settings from --config; a flag overrides the file; SIGTERM
    stops it gracefully with status 0 and the relay sees a clean session close."""
    _write_tokens(tmp_path, ["edgeA"])
    relay = start_relay(tmp_path / "state", tmp_path / "tokens.toml", [])
    try:
        config = tmp_path / "edge.toml"
        config.write_text(
            f"""
[edge]
relay = "127.0.0.1:1"            # wrong on purpose: --relay on the command line wins
name = "edgeA"
token_file = "edgeA.token"       # relative to this file
fingerprint = "{relay.fingerprint}"
expose = {{ echo = "127.0.0.1:{services.echo}" }}
ping_interval = 1.0
""",
            encoding="utf-8",
        )
        edge = Proc(
            "edge (config file)",
            ["edge", "--config", str(config), "--relay", f"127.0.0.1:{relay.quic_port}"],
        )
        try:
            edge.wait_for(
                r"authenticated to relay 127.0.0.1:\d+ as 'edgeA'( \(\w+\))?; exposing echo="
            )
            assert edge.terminate() == 0
            assert edge.find(r"edge stopped")
            relay.proc.wait_for(r"edge 'edgeA' .*closed the session: NORMAL")
        finally:
            edge.kill()
    finally:
        relay.proc.kill()


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[edge]\nrelay = 5\n", encoding="utf-8")
    cases = [
        ([], r"usage: quic-reverse"),
        (["edge", "--config", str(bad)], r"configuration error: \[edge\] relay: wrong type"),
        (["relay", "--self-signed"], r"configuration error: relay: --tokens FILE is required"),
        (
            ["edge", "--relay", "h:1", "--name", "a", "--token-file", "t", "--expose", "x=h:1"],
            r"must be verified",
        ),
        (["relay", "--bogus"], r"unrecognized arguments"),
    ]
    for args, pattern in cases:
        proc = Proc("cli", args)
        try:
            assert proc.wait_exit(STARTUP) == 2, (args, proc.tail())
            assert re.search(pattern, proc.text), (args, proc.tail())
        finally:
            proc.kill()
    helper = Proc("cli", ["relay", "--help"])
    try:
        assert helper.wait_exit(STARTUP) == 0
        for flag in (
            "--listen",
            "--cert",
            "--key",
            "--self-signed",
            "--tokens",
            "--forward",
            "--config",
            "--grace",
            "--auth-timeout",
        ):
            assert flag in helper.text
    finally:
        helper.kill()


def test_relay_cannot_listen_exits_1(tmp_path: Path) -> None:
    _write_tokens(tmp_path, ["edgeA"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = Proc(
            "relay",
            [
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--self-signed",
                "--state-dir",
                str(tmp_path / "state"),
                "--tokens",
                str(tmp_path / "tokens.toml"),
                "--forward",
                f"127.0.0.1:{port}=edgeA/echo",
            ],
        )
        try:
            assert proc.wait_exit(STARTUP) == 1, proc.tail()
            assert proc.find(r"cannot start the relay: .*address already in use")
        finally:
            proc.kill()


async def test_relay_sigterm_lets_running_streams_finish(
    services: Services, private: tuple[Path, RelayProc]
) -> None:
    tmp, relay = private
    edge = start_edge("edgeA", tmp / "edgeA.token", relay, [f"echo=127.0.0.1:{services.echo}"])
    port = relay.forwards["edgeA/echo"]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(WAIT):
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            mark = relay.proc.mark()
            relay.proc.popen.send_signal(signal.SIGTERM)
            await asyncio.to_thread(relay.proc.wait_for, r"shutting down", after=mark)
            # No new clients once shutting down...
            with pytest.raises(OSError):
                late = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
                late.close()
            # ...but the running stream keeps working within the grace period.
            writer.write(b"during")
            assert await reader.readexactly(6) == b"during"
            writer.write_eof()
            assert await reader.read() == b""
        writer.close()
        assert await asyncio.to_thread(relay.proc.wait_exit, WAIT) == 0
        assert not relay.proc.find(r"grace period over", after=mark)
        await asyncio.to_thread(edge.wait_for, r"relay closed the session: NORMAL")
    finally:
        edge.kill()


async def test_aioquic_relay_with_qh3_edge(services: Services, tmp_path: Path) -> None:
    """The relay's ``[relay]`` config file (stack, forwards) is honoured, and the two
    QUIC stacks interoperate through the tunnel."""
    _write_tokens(tmp_path, ["edgeA"])
    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nstack = "aioquic"\nforward = ["127.0.0.1:0=edgeA/echo"]\ngrace = 1\n',
        encoding="utf-8",
    )
    relay = start_relay(
        tmp_path / "state", tmp_path / "tokens.toml", [], extra=["--config", str(config)]
    )
    edge: Proc | None = None
    try:
        assert relay.proc.find(r"listening for edges on .*\(udp, aioquic\)")
        edge = start_edge(
            "edgeA", tmp_path / "edgeA.token", relay, [f"echo=127.0.0.1:{services.echo}"]
        )
        payload = os.urandom(256 * 1024)
        async with asyncio.timeout(WAIT):
            assert await _echo_roundtrip(relay.forwards["edgeA/echo"], payload) == payload
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()


async def test_backpressure_slow_reader_bounds_memory(services: Services, tmp_path: Path) -> None:
    """A client that writes to the echo service but never reads: the whole chain
    (relay, QUIC stream, edge, service, and back) fills its bounded buffers and then
    stops the writer, instead of relay or edge buffering everything in memory; once
    the client goes away the session carries on.

    Own relay and edge with a lenient keep-alive: while a stalled stream holds the
    connection's receive high-water mark, the QUIC adapter delays big datagrams, which
    can delay a Pong (see the report of the transport's pause behaviour).
    """
    _write_tokens(tmp_path, ["edgeA"])
    lenient = ["--ping-interval", "5", "--ping-timeout", "20"]
    relay = start_relay(
        tmp_path / "state", tmp_path / "tokens.toml", ["127.0.0.1:0=edgeA/echo"], extra=lenient
    )
    edge: Proc | None = None
    try:
        edge = start_edge(
            "edgeA",
            tmp_path / "edgeA.token",
            relay,
            [f"echo=127.0.0.1:{services.echo}"],
            extra=lenient,
        )
        port = relay.forwards["edgeA/echo"]
        total_cap = 384 * 1024 * 1024
        block = b"\x11" * (1 << 20)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        accepted = 0
        stalled = False
        try:
            async with asyncio.timeout(120_000 * MS):
                while accepted < total_cap:
                    writer.write(block)
                    try:
                        # No progress for 2 s: the chain is full.
                        async with asyncio.timeout(2_000 * MS):
                            await writer.drain()
                    except TimeoutError:
                        stalled = True
                        break
                    accepted += len(block)
            relay_rss = _rss_mib(relay.proc.popen.pid)
            edge_rss = _rss_mib(edge.popen.pid)
        finally:
            writer.transport.abort()
            del reader
        assert stalled, f"the writer never blocked after {accepted >> 20} MiB"
        # In flight at most: socket buffers of four TCP legs, the QUIC receive
        # high-water marks and send buffers -- far less than what the client offered.
        assert accepted < 160 * 1024 * 1024, accepted
        assert relay_rss < 250 and edge_rss < 250, (relay_rss, edge_rss)
        async with asyncio.timeout(WAIT):
            assert await _echo_roundtrip(port, b"session survived") == b"session survived"
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()


def test_edge_refuses_relay_with_wrong_certificate(tunnel: Tunnel, tmp_path: Path) -> None:
    """The edge verifies the relay before sending its token: a wrong pin or a CA that
    did not issue the relay's certificate makes it exit 1 without authenticating."""
    from quic_reverse.transport.tls import write_self_signed

    other_ca, _ = write_self_signed(tmp_path / "other")
    mark = tunnel.relay.proc.mark()
    for label, verify in (
        ("pin", ["--fingerprint", "ab" * 32]),
        ("ca", ["--ca", str(other_ca)]),
    ):
        args = [
            "edge",
            "--relay",
            f"127.0.0.1:{tunnel.relay.quic_port}",
            "--name",
            "edgeA",
            "--token-file",
            str(tunnel.tmp / "edgeA.token"),
            "--expose",
            "x=127.0.0.1:9",
            "--connect-timeout",
            "5",
            *verify,
        ]
        edge = Proc(f"edge ({label})", args)
        try:
            assert edge.wait_exit(WAIT) == 1, (label, edge.tail())
            assert edge.find(r"certificate check failed"), (label, edge.tail())
            assert not edge.find(r"authenticated to relay")
        finally:
            edge.kill()
    assert not tunnel.relay.proc.find(r"edge 'edgeA' reconnected", after=mark)


async def test_never_negotiating_connections_closed_at_the_auth_deadline(
    private: tuple[Path, RelayProc],
) -> None:
    """Issue 10 item 4: 500 QUIC connections that complete the handshake and never
    negotiate are all closed by the relay at its auth deadline (counted from
    acceptance), not later by a second timeout."""
    _, relay = private
    tls = quic.ClientTLS(alpn=(DEFAULT_ALPN,), pin_sha256=relay.fingerprint)
    sem = asyncio.Semaphore(50)

    async def one() -> float:
        async with sem:
            conn = await quic.connect("127.0.0.1", relay.quic_port, tls=tls, idle_timeout=60)
        connected = time.monotonic()
        try:
            await conn.wait_closed()
            return time.monotonic() - connected
        finally:
            conn.close()

    async with asyncio.timeout(WAIT * 2):
        lifetimes = await asyncio.gather(*(one() for _ in range(500)))
    # Each was closed by the relay (the client idle timeout is 60 s), within the auth
    # deadline plus scheduling slack for 500 connections on a loaded machine.
    assert max(lifetimes) < AUTH_TIMEOUT + 3_000 * MS, max(lifetimes)
    assert relay.proc.find(r"did not authenticate within")


async def test_burst_larger_than_the_stream_limit_is_served(
    services: Services, tmp_path: Path
) -> None:
    """Issue 10 item 2: with --max-streams 40 on relay and edge, 400 TCP clients at
    once all get their echo: those beyond the limit wait for a free stream (bounded by
    --open-timeout) instead of being closed."""
    _write_tokens(tmp_path, ["edgeA"])
    limit = ["--max-streams", "40"]
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo"],
        extra=[*limit, "--open-timeout", str(WAIT)],
    )
    edge: Proc | None = None
    try:
        edge = start_edge(
            "edgeA",
            tmp_path / "edgeA.token",
            relay,
            [f"echo=127.0.0.1:{services.echo}"],
            extra=limit,
        )
        port = relay.forwards["edgeA/echo"]
        payloads = [b"client %d " % i + os.urandom(4096) for i in range(400)]
        async with asyncio.timeout(WAIT * 2):
            replies = await asyncio.gather(*(_echo_roundtrip(port, p) for p in payloads))
        assert replies == payloads
        assert not relay.proc.find(r"closing the client")
        assert not edge.find(r"LIMIT_EXCEEDED")
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()


async def test_startup_grace_bridges_an_edge_that_connects_late(
    services: Services, tmp_path: Path
) -> None:
    """A relay just (re)started has no edges yet: a TCP client arriving before its edge
    reconnects is held (startup_grace, bounded by open_timeout) and served once the
    edge is back, instead of being closed at once ("has never connected")."""
    _write_tokens(tmp_path, ["edgeA"])
    relay = start_relay(tmp_path / "state", tmp_path / "tokens.toml", ["127.0.0.1:0=edgeA/echo"])
    edge: Proc | None = None
    try:
        client = asyncio.create_task(
            _echo_roundtrip(relay.forwards["edgeA/echo"], b"held until the edge came")
        )
        await asyncio.sleep(300 * MS)  # the client waits at the relay meanwhile
        assert not client.done(), "the client was not held for the late edge"
        edge = start_edge(
            "edgeA", tmp_path / "edgeA.token", relay, [f"echo=127.0.0.1:{services.echo}"]
        )
        async with asyncio.timeout(4_000 * MS):  # below the relay's open_timeout (5 s)
            assert await client == b"held until the edge came"
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()
