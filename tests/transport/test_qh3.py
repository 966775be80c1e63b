"""The qh3 adapter and the stack-neutral ``connect``/``serve`` over real UDP on 127.0.0.1.

Certificate handling (pin, direct trust, verification failure) is checked on both
stacks since it lives in ``transport.quic``; the rest is qh3-specific: raised
stream limit, batched server receive, socket buffers, receive pause, close paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from quic_reverse.errors import (
    CertificateError,
    ConfigError,
    ConnectionClosed,
    StreamReset,
    TransportError,
)
from quic_reverse.transport import qh3 as qh3_adapter
from quic_reverse.transport._driver import StackConnection
from quic_reverse.transport._errors import convert_stack_errors
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import (
    ClientTLS,
    ServerTLS,
    Stack,
    TransportOptions,
    connect,
    serve,
)
from quic_reverse.transport.tls import certificate_fingerprint, write_self_signed
from tests.support.certs import ca_and_leaf
from tests.support.quic import dev_certificate, quic_pair, quic_server
from tests.transport.test_hardening import client_initial

T = 15.0
STACKS: tuple[Stack, ...] = ("qh3", "aioquic")


def _rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


async def _hold(conn: Connection) -> None:
    """Server handler: keep the connection until the client goes."""
    await conn.wait_closed()


def _cert_der() -> bytes:
    cert, _ = dev_certificate()
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)


@pytest.mark.parametrize("stack", STACKS)
async def test_pinned_certificate_is_accepted_and_exposed(stack: Stack) -> None:
    async with quic_server(_hold, stack) as server:
        pin = certificate_fingerprint(_cert_der())
        async with asyncio.timeout(T):
            conn = await connect(*server.address, tls=ClientTLS(pin_sha256=pin), stack=stack)
        try:
            assert conn.is_open
            assert conn.peer_certificate == _cert_der()
            assert conn.remote_address == server.address
        finally:
            conn.close()
            await asyncio.wait_for(conn.wait_closed(), T)


@pytest.mark.parametrize("stack", STACKS)
async def test_wrong_pin_and_untrusted_certificate_are_rejected(
    stack: Stack, tmp_path: Path
) -> None:
    other_cert, _ = write_self_signed(tmp_path)
    async with quic_server(_hold, stack) as server:
        with pytest.raises(CertificateError, match="does not match"):
            await asyncio.wait_for(
                connect(*server.address, tls=ClientTLS(pin_sha256="ab" * 32), stack=stack), T
            )
        # A cafile holding a different self-signed certificate: not trusted.
        with pytest.raises(CertificateError):
            await asyncio.wait_for(
                connect(*server.address, tls=ClientTLS(cafile=other_cert), stack=stack), T
            )
        # Default verification (system store) rejects a self-signed certificate.
        with pytest.raises(CertificateError):
            await asyncio.wait_for(connect(*server.address, tls=ClientTLS(), stack=stack), T)


@pytest.mark.parametrize("stack", STACKS)
async def test_ca_signed_certificate_is_verified_by_the_stack(stack: Stack, tmp_path: Path) -> None:
    ca, leaf, key = ca_and_leaf(tmp_path)
    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=leaf, keyfile=key),
        on_connection=_hold,
        stack=stack,
    )
    async with server:
        conn = await asyncio.wait_for(
            connect(*server.address, tls=ClientTLS(cafile=ca), stack=stack), T
        )
        assert conn.peer_certificate == x509.load_pem_x509_certificate(
            leaf.read_bytes()
        ).public_bytes(Encoding.DER)
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), T)
        # Right CA, wrong name: rejected by the stack's verifier.
        with pytest.raises(CertificateError):
            await asyncio.wait_for(
                connect(
                    *server.address,
                    tls=ClientTLS(cafile=ca, server_name="other.example"),
                    stack=stack,
                ),
                T,
            )


async def test_verify_off_without_pin_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    async with quic_server(_hold) as server:
        with caplog.at_level(logging.WARNING, logger="quic_reverse.transport.quic"):
            conn = await asyncio.wait_for(connect(*server.address, tls=ClientTLS(verify=False)), T)
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), T)
    assert any("verification is DISABLED" in r.getMessage() for r in caplog.records)


async def test_connect_to_silent_port_times_out_with_transport_error() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # bound but never answers
    try:
        with pytest.raises(TransportError, match="timed out"):
            await asyncio.wait_for(
                connect(
                    *sock.getsockname(),
                    tls=ClientTLS(verify=False),
                    options=TransportOptions(handshake_timeout=0.5),
                ),
                T,
            )
    finally:
        sock.close()


async def test_handler_return_closes_connection_and_server_close_wakes_clients() -> None:
    done = asyncio.Event()

    async def short(conn: Connection) -> None:
        done.set()

    cert, _ = dev_certificate()
    async with quic_server(short) as server:
        conn = await asyncio.wait_for(connect(*server.address, tls=ClientTLS(cafile=cert)), T)
        await asyncio.wait_for(done.wait(), T)
        await asyncio.wait_for(conn.wait_closed(), T)
        assert not conn.is_open
        assert await conn.accept_bi() is None
        with pytest.raises(ConnectionClosed):
            await conn.open_bi()

    async with quic_server(_hold) as server:
        conn = await asyncio.wait_for(connect(*server.address, tls=ClientTLS(cafile=cert)), T)
        send, recv = await conn.open_bi()
        await send.write(b"x")
        reading = asyncio.ensure_future(recv.read())
        server.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(reading, T)
        await asyncio.wait_for(conn.wait_closed(), T)


async def test_idle_timeout_closes_both_sides() -> None:
    async with quic_pair("qh3", idle_timeout=0.5) as (client, server):
        await asyncio.wait_for(client.wait_closed(), T)
        await asyncio.wait_for(server.wait_closed(), T)
        assert not client.is_open and not server.is_open


async def test_stream_limit_is_raised_past_qh3_default() -> None:
    # qh3 hard-codes 100 concurrent streams; the adapter advertises 1024 by default.
    count = 300
    async with quic_pair("qh3") as (client, server):
        streams = []
        async with asyncio.timeout(T):
            for _ in range(count):
                send, recv = await client.open_bi()
                await send.write(b"s")
                streams.append((send, recv))
            for _ in range(count):
                pair = await server.accept_bi()
                assert pair is not None
                assert await pair[1].read_exactly(1) == b"s"
        # ... and the 1025th opener waits until a slot is free.
        core = server._quic._core  # type: ignore[attr-defined]
        assert core.stream_limits[0] == 1024


async def test_server_receives_in_batches_and_socket_buffers_are_large() -> None:
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB
    batch_sizes: list[int] = []
    async with quic_pair("qh3") as (client, server):
        real = server.datagrams_received  # type: ignore[attr-defined]

        def spy(datagrams: list[bytes], addr: Any) -> None:
            batch_sizes.append(len(datagrams))
            real(datagrams, addr)

        server.datagrams_received = spy  # type: ignore[attr-defined]
        send, _ = await client.open_bi()
        await send.write(payload)
        await send.finish()
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        received = bytearray()
        async with asyncio.timeout(T):
            while chunk := await pair[1].read():
                received += chunk
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        sock = server._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert max(batch_sizes) > 1, "server never got more than one datagram per call"
    rmem_max = _rmem_max()
    # Linux doubles the request and caps it at rmem_max (for unprivileged callers).
    assert rcvbuf >= min(4 * 1024 * 1024, rmem_max)


async def test_non_reading_receiver_pauses_and_resumes() -> None:
    window = 1024 * 1024
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB, far more than the window
    async with quic_pair(
        "qh3", connection_window=window, stream_window=256 * 1024, send_buffer=256 * 1024
    ) as (client, server):
        assert isinstance(server, StackConnection)
        send, _ = await client.open_bi()
        await send.write(b"!")
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        _, recv = pair
        writing = asyncio.ensure_future(send.write(payload))
        try:
            async with asyncio.timeout(T):
                while not server.receiving_paused:
                    await server.wait_receive_activity()
            assert not writing.done()
            assert recv.buffered_bytes <= window + 256 * 1024
            # The reader catches up: everything arrives intact.
            got = bytearray(await asyncio.wait_for(recv.read_exactly(1), T))
            async with asyncio.timeout(T):
                while len(got) < len(payload) + 1:
                    got += await recv.read()
            await asyncio.wait_for(writing, T)
        finally:
            writing.cancel()
        assert bytes(got) == b"!" + payload


async def test_reset_surfaces_as_typed_error_not_eof() -> None:
    async with quic_pair("qh3") as (client, server):
        send, _ = await client.open_bi()
        await send.write(b"partial")
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        assert await asyncio.wait_for(pair[1].read_exactly(7), T) == b"partial"
        send.reset(42)
        with pytest.raises(StreamReset) as info:
            await asyncio.wait_for(pair[1].read(), T)
        assert info.value.error_code == 42


async def test_stack_errors_are_converted_at_the_boundary() -> None:
    with pytest.raises(TransportError) as info, convert_stack_errors("doing x"):
        raise OSError(111, "refused")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(TransportError, match="ValueError"), convert_stack_errors("doing y"):
        raise ValueError("stack internals")
    with pytest.raises(asyncio.CancelledError), convert_stack_errors("doing z"):
        raise asyncio.CancelledError
    # A client configuration handed to serve() is refused with a typed error.
    with pytest.raises(ConfigError, match="server configuration"):
        await qh3_adapter.serve(
            "127.0.0.1",
            0,
            configuration=qh3_adapter.client_configuration(),
            on_connection=_hold,
        )


@pytest.mark.parametrize("stack", STACKS)
async def test_invalid_error_codes_still_reset_and_close(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    async with quic_pair(stack) as (client, server):
        send, _ = await client.open_bi()
        await send.write(b"x")
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        assert await asyncio.wait_for(pair[1].read_exactly(1), T) == b"x"
        send.reset(1 << 62)  # not a QUIC varint: logged, sent as 0
        with pytest.raises(StreamReset) as reset:
            await asyncio.wait_for(pair[1].read(), T)
        assert reset.value.error_code == 0
        client.close(-1, b"bad code")
        await asyncio.wait_for(server.wait_closed(), T)
    assert any("invalid QUIC error code" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stack", STACKS)
async def test_peer_close_reason_is_escaped_in_the_error(stack: Stack) -> None:
    """A peer's close reason reaches logs through str(error): control characters
    (a forged log line, terminal escapes) must come out escaped."""
    async with quic_pair(stack) as (client, server):
        client.close(7, b"bye\n2026-01-01 CRITICAL forged\x1b[2J")
        await asyncio.wait_for(server.wait_closed(), T)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(server.open_bi(), T)
    text = str(info.value)
    assert info.value.reason == "bye\n2026-01-01 CRITICAL forged\x1b[2J"
    assert "\n" not in text and "\x1b" not in text
    assert "forged" in text


@pytest.mark.parametrize("stack", STACKS)
async def test_unusable_certificate_files_are_a_config_error(stack: Stack, tmp_path: Path) -> None:
    cert, _ = dev_certificate()
    bad_key = tmp_path / "key.pem"
    bad_key.write_text("not a key\n")
    with pytest.raises(ConfigError):
        await serve(
            "127.0.0.1",
            0,
            tls=ServerTLS(certfile=cert, keyfile=bad_key),
            on_connection=_hold,
            stack=stack,
        )
    with pytest.raises(ConfigError):
        await connect("127.0.0.1", 1, tls=ClientTLS(), stack="quiche")  # type: ignore[arg-type]


async def test_stack_panic_on_incoming_data_does_not_escape() -> None:
    class PanicException(BaseException):
        """Stands for pyo3's PanicException (what qh3's Rust core raises on a panic)."""

    async with quic_pair("qh3") as (client, server):
        assert isinstance(server, StackConnection)
        quic = server._quic
        real_feed = quic.qr_feed

        def panicking(datagrams: list[bytes], addr: Any, now: float) -> None:
            raise PanicException("called `Option::unwrap()` on a `None` value")

        quic.qr_feed = panicking  # type: ignore[method-assign]
        server.datagrams_received([b"\x40" + bytes(40)], ("127.0.0.1", 9))  # must not raise
        quic.qr_feed = real_feed  # type: ignore[method-assign]
        send, _ = await client.open_bi()
        await send.write(b"still alive")
        await send.finish()
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        assert await asyncio.wait_for(pair[1].read_exactly(11), T) == b"still alive"
        with pytest.raises(KeyboardInterrupt):  # anything else is not swallowed
            quic.qr_feed = _raise_keyboard_interrupt  # type: ignore[method-assign]
            server.datagrams_received([b"\x40" + bytes(40)], ("127.0.0.1", 9))
        quic.qr_feed = real_feed  # type: ignore[method-assign]


def _raise_keyboard_interrupt(datagrams: list[bytes], addr: Any, now: float) -> None:
    raise KeyboardInterrupt


def fake_initial(i: int) -> bytes:
    """A client's first Initial (a real ClientHello, so it decrypts) with a fresh
    destination CID, from a client that never answers: enough for a server to create
    connection state for it. (Garbage Initials no longer get any: test_hardening.)"""
    return client_initial()


@pytest.mark.parametrize("stack", STACKS)
async def test_server_survives_garbage_datagrams(stack: Stack) -> None:
    import random

    rng = random.Random(1234)
    cert, _ = dev_certificate()
    real_handlers: list[asyncio.Task[Any] | None] = []

    async def echo(conn: Connection) -> None:
        real_handlers.append(asyncio.current_task())
        while (pair := await conn.accept_bi()) is not None:
            send, recv = pair
            while data := await recv.read():
                await send.write(data)
            await send.finish()

    async with quic_server(echo, stack, handshake_timeout=0.5) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(300):
                size = rng.choice((1, 20, 200, 1200, 1350))
                data = bytearray(rng.randbytes(size))
                if i % 3 == 0 and size >= 1200:
                    data[0] = 0xC0  # long header, Initial
                    data[1:5] = (1).to_bytes(4, "big")  # QUIC v1
                    data[5] = 8  # DCID length
                sock.sendto(bytes(data), server.address)
        finally:
            sock.close()
        conn = await asyncio.wait_for(
            connect(*server.address, tls=ClientTLS(cafile=cert), stack=stack), T
        )
        send, recv = await conn.open_bi()
        await send.write(b"ok")
        await send.finish()
        assert await asyncio.wait_for(recv.read_exactly(2), T) == b"ok"
        # Garbage Initials do not decrypt: they never got a connection (test_hardening).
        garbage = [t for t in server._impl._tasks if t not in real_handlers]
        assert garbage == []
        assert server.connection_count == 1
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), T)


@pytest.mark.parametrize("stack", STACKS)
async def test_server_caps_connections_in_handshake(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst of Initials creates at most ``max_handshakes`` connection states; a
    real client still gets in once those time out (its Initial is retransmitted)."""
    cert, _ = dev_certificate()

    async def hold(conn: Connection) -> None:
        await conn.wait_closed()

    caplog.set_level(logging.WARNING, logger="quic_reverse.transport")
    async with quic_server(hold, stack, handshake_timeout=0.5, max_handshakes=2) as server:
        impl = server._impl
        registered: list[bytes] = []
        register = impl._register

        def counting(conn: StackConnection, dcid: bytes, addr: Any) -> None:
            registered.append(dcid)
            register(conn, dcid, addr)

        impl._register = counting  # type: ignore[method-assign]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(20):
                sock.sendto(fake_initial(i), server.address)
        finally:
            sock.close()
        conn = await asyncio.wait_for(
            connect(*server.address, tls=ClientTLS(cafile=cert), stack=stack), T
        )
        try:
            assert server.connection_count >= 1
            # 2 garbage states at most, then the real client (once or twice: its first
            # Initial may be dropped and retransmitted with a new state).
            assert len(registered) <= 4, len(registered)
            assert any("max_handshakes" in r.getMessage() for r in caplog.records)
        finally:
            conn.close()
            await asyncio.wait_for(conn.wait_closed(), T)
    with pytest.raises(ConfigError):
        TransportOptions(max_handshakes=0)


async def test_paused_connection_still_delivers_other_streams_to_a_slow_reader() -> None:
    """While a slow stream keeps the connection paused, other streams are not starved:
    each MiB the slow reader consumes lets the connection catch up."""
    window = 4 * 1024 * 1024
    async with quic_pair("qh3", connection_window=window, stream_window=1024 * 1024) as (
        client,
        server,
    ):
        assert isinstance(server, StackConnection)
        bulk_send, _ = await client.open_bi()
        await bulk_send.write(b"!")
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        bulk_recv = pair[1]
        writing = asyncio.ensure_future(bulk_send.write(bytes(64 * 1024 * 1024)))
        try:
            async with asyncio.timeout(T):
                while not server.receiving_paused:
                    await server.wait_receive_activity()
                ctl_send, _ = await client.open_bi()
                await ctl_send.write(b"ping")
                await ctl_send.finish()
                consumed = 0
                ctl = await server.accept_bi() if server._table.accept_queue else None
                for _ in range(256):  # bounded: at most 64 MiB read in 256 KiB bites
                    if ctl is None and server._table.accept_queue:
                        ctl = await server.accept_bi()
                    if ctl is not None and ctl[1].buffered_bytes >= 4:
                        break
                    consumed += len(await bulk_recv.read_exactly(256 * 1024))
                assert ctl is not None, "control stream never arrived"
                assert await ctl[1].read_exactly(4) == b"ping"
            assert consumed <= 8 * 1024 * 1024, consumed
        finally:
            writing.cancel()


@pytest.mark.parametrize("stack", STACKS)
async def test_failing_transport_setup_closes_the_socket(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the datagram transport cannot be created, the bound socket is closed and the
    error is a TransportError (no leaked file descriptor, no raw OSError)."""
    from quic_reverse.transport import _udp

    socks: list[socket.socket] = []

    async def failing(loop: Any, factory: Any, *, sock: socket.socket) -> Any:
        socks.append(sock)
        raise OSError("no transport for you")

    monkeypatch.setattr(_udp, "_optimized_factory", lambda: failing)
    with pytest.raises(TransportError, match="no transport for you"):
        async with quic_server(lambda conn: conn.wait_closed(), stack):
            pass
    (sock,) = socks
    assert sock.fileno() == -1


async def test_bad_ports_and_options_are_config_errors() -> None:
    """The OS would wrap port 70000 to 4464; option types are checked before use."""
    cert, key = dev_certificate()
    for port in (70000, -1, "443", True):
        with pytest.raises(ConfigError, match="port"):
            await connect("127.0.0.1", port, tls=ClientTLS(cafile=cert))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="port"):
            await serve(
                "127.0.0.1",
                port,  # type: ignore[arg-type]
                tls=ServerTLS(certfile=cert, keyfile=key),
                on_connection=lambda conn: conn.wait_closed(),
            )
    bad: list[dict[str, Any]] = [
        {"idle_timeout": "x"},
        {"handshake_timeout": float("nan")},
        {"idle_timeout": float("inf")},
        {"max_streams": "x"},
        {"stream_window": None},
        {"max_handshakes": 1.5},
    ]
    for kw in bad:
        with pytest.raises(ConfigError):
            TransportOptions(**kw)


async def test_failing_connection_constructor_logs_one_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stack constructor failing on every Initial logs one traceback, not one each."""
    calls = 0
    three = asyncio.Event()

    def failing(original_dcid: bytes, retry_source_cid: bytes | None = None) -> StackConnection:
        nonlocal calls
        calls += 1
        if calls == 3:
            three.set()
        raise RuntimeError("constructor failed")

    caplog.set_level(logging.DEBUG, logger="quic_reverse.transport")
    async with quic_server(lambda conn: conn.wait_closed()) as server:
        server._impl._new_connection = failing  # type: ignore[method-assign]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(3):
                sock.sendto(fake_initial(i), server.address)
            await asyncio.wait_for(three.wait(), T)
        finally:
            sock.close()
        assert server.connection_count == 0
    failures = [r for r in caplog.records if "creating a connection failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert failures[0].exc_info is not None  # the first one carries the traceback


@pytest.mark.parametrize("stack", STACKS)
async def test_unreadable_peer_certificate_is_none_and_logged(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stack failing to hand over the peer certificate yields None (so a pin fails
    closed) and leaves a debug line instead of vanishing silently."""
    caplog.set_level(logging.DEBUG, logger="quic_reverse.transport")
    async with quic_pair(stack) as (client, _server):
        assert isinstance(client, StackConnection)
        assert client.peer_certificate is not None

        def broken() -> bytes | None:
            raise RuntimeError("stack lost the certificate")

        monkeypatch.setattr(client._quic, "qr_peer_certificate", broken)
        assert client.peer_certificate is None
    assert any(
        "reading the peer certificate failed" in r.getMessage() and "lost" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("quic_level", [logging.WARNING, logging.DEBUG], ids=["warning", "debug"])
async def test_peer_close_is_not_a_warning(
    caplog: pytest.LogCaptureFixture, quic_level: int
) -> None:
    """qh3's "Native peer close" warning for a normal close is demoted to debug."""
    quic_logger = logging.getLogger("quic")
    old_level = quic_logger.level
    quic_logger.setLevel(quic_level)
    try:
        with caplog.at_level(logging.DEBUG):
            async with quic_pair("qh3") as (client, server):
                server.close(0, b"bye")
                await asyncio.wait_for(client.wait_closed(), 10)
                assert not client.is_open
    finally:
        quic_logger.setLevel(old_level)
    peer_close = [r for r in caplog.records if str(r.msg).startswith("Native peer close")]
    assert not [r for r in peer_close if r.levelno >= logging.WARNING]
    if quic_level == logging.DEBUG:
        assert peer_close, "the peer close must still be visible in debug logs"
        assert all(r.levelname == "DEBUG" for r in peer_close)
