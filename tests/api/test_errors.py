"""Issue 15 item 2: every error also derives from the builtin it means; code written
for asyncio streams and sockets catches it by that builtin. Raised by real operations
over QUIC on 127.0.0.1; str() and attributes are as before."""

from __future__ import annotations

import asyncio
import pickle
import ssl

import pytest

from quic_reverse import (
    CertificateError,
    ConnectionClosed,
    Disconnected,
    IncompleteReadError,
    OpenRequestReceived,
    QuicReverseError,
    Role,
    Session,
    Stream,
    StreamReset,
    StreamStopped,
    TransportError,
)
from quic_reverse.transport.quic import ClientTLS, connect
from tests.api._pair import session_pair
from tests.support.quic import quic_pair, quic_server
from tests.support.timing import LONG, SHORT


async def test_peer_reset_is_connection_reset_error() -> None:
    async with session_pair() as (client, server), asyncio.timeout(LONG):
        accepted: asyncio.Queue[Stream] = asyncio.Queue()

        async def handler(stream: Stream) -> None:
            await accepted.put(stream)
            await asyncio.Event().wait()

        serving = asyncio.create_task(server.serve({"svc": handler}))
        stream = await client.open("svc")
        peer = await accepted.get()
        peer.reset(7)
        with pytest.raises(ConnectionResetError) as info:
            await stream.read(10)
        assert isinstance(info.value, StreamReset)
        assert info.value.error_code == 7
        assert info.value.errno is None
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_peer_stop_sending_is_broken_pipe_error() -> None:
    async with session_pair() as (client, server), asyncio.timeout(LONG):
        go = asyncio.Event()

        async def handler(stream: Stream) -> None:
            await stream.send(b"hi")
            await go.wait()
            stream.reset(9)  # STOP_SENDING to the opener

        serving = asyncio.create_task(server.serve({"svc": handler}))
        stream = await client.open("svc")
        assert await stream.readexactly(2) == b"hi"
        go.set()
        with pytest.raises(BrokenPipeError) as info:
            for _ in range(1000):  # until STOP_SENDING has arrived
                await stream.send(b"x" * 1024)
                await asyncio.sleep(SHORT / 500)
        assert isinstance(info.value, StreamStopped)
        assert info.value.error_code == 9
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_short_readexactly_is_asyncio_incomplete_read_error() -> None:
    async with session_pair() as (client, server), asyncio.timeout(LONG):

        async def handler(stream: Stream) -> None:
            await stream.send(b"abc")

        serving = asyncio.create_task(server.serve({"svc": handler}))
        stream = await client.open("svc")
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await stream.readexactly(10)
        assert isinstance(info.value, IncompleteReadError)
        assert isinstance(info.value, EOFError)
        assert info.value.partial == b"abc"
        assert info.value.expected == 10
        assert str(info.value) == "stream ended after 3 of 10 bytes"
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_closed_connection_is_connection_error() -> None:
    async with quic_pair() as (client_conn, server_conn), asyncio.timeout(LONG):
        server_task = asyncio.create_task(Session(server_conn, Role.SERVER).start())
        client = await Session(client_conn, Role.CLIENT).start()
        server = await server_task
        stream_task = asyncio.create_task(client.open("svc"))
        event = await server.process_message()
        assert isinstance(event, OpenRequestReceived)
        peer = await server.accept_open(event.request_id)
        stream = await stream_task
        server_conn.close(5, b"gone")
        with pytest.raises(ConnectionError) as info:
            await stream.read(10)
        assert isinstance(info.value, ConnectionClosed | StreamReset)
        # The session saw the connection go: its operations fail as ConnectionError too.
        with pytest.raises(ConnectionError) as ended:
            for _ in range(100):  # events queued before the end come first
                await client.process_message()
        assert isinstance(ended.value, Disconnected)
        assert isinstance(client.close_reason, ConnectionError)
        peer.reset()
        await client.wait_closed()
        await server.wait_closed()


async def test_pin_mismatch_is_ssl_cert_verification_error() -> None:
    async def on_connection(conn: object) -> None:
        return None

    async with quic_server(on_connection) as server, asyncio.timeout(LONG):
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await connect(*server.address, tls=ClientTLS(pin_sha256="00" * 32))
        error = info.value
        assert isinstance(error, CertificateError)
        assert isinstance(error, ssl.SSLError) and isinstance(error, TransportError)
        assert str(error).startswith("server certificate SHA-256 ")
        assert error.verify_message == str(error)
        assert error.reason == "CERTIFICATE_VERIFY_FAILED"


async def test_untrusted_certificate_is_ssl_cert_verification_error() -> None:
    async def on_connection(conn: object) -> None:
        return None

    async with quic_server(on_connection) as server, asyncio.timeout(LONG):
        # The system store does not trust the development certificate.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(*server.address, tls=ClientTLS())


@pytest.mark.parametrize(
    ("error", "builtin", "text"),
    [
        (StreamReset(3, 4), ConnectionResetError, "stream 4 reset by peer with code 3"),
        (StreamStopped(3, 4), BrokenPipeError, "stream 4 stopped by peer with code 3"),
        (ConnectionClosed("closed", error_code=2, reason="r"), ConnectionError, "closed"),
        (Disconnected("keep-alive failed"), ConnectionError, "keep-alive failed"),
        (
            IncompleteReadError(b"ab", 5),
            asyncio.IncompleteReadError,
            "stream ended after 2 of 5 bytes",
        ),
        (CertificateError("bad"), ssl.SSLCertVerificationError, "bad"),
    ],
)
def test_str_args_and_bases(error: QuicReverseError, builtin: type[Exception], text: str) -> None:
    assert isinstance(error, builtin) and isinstance(error, QuicReverseError)
    assert str(error) == text
    assert error.args == (text,)
    if isinstance(error, OSError):
        assert error.errno is None and error.strerror in (None, text)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == text


def test_attributes_kept() -> None:
    reset = StreamReset(3, 4, message="custom")
    assert (reset.error_code, reset.stream_id, str(reset)) == (3, 4, "custom")
    closed = ConnectionClosed(error_code=2, reason="why")
    assert (closed.error_code, closed.reason, str(closed)) == (2, "why", "connection closed")
    short = IncompleteReadError(b"", None)
    assert short.expected is None and short.partial == b""
