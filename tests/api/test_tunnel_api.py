"""Issue 15 item 4: the tunnel's Python API (quic_reverse.tunnel.api): a Relay and an
Edge started and stopped from a program with the CLI's settings; a TCP client reaches
a local service through them (real QUIC and TCP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from quic_reverse import ConfigError, UsageError
from quic_reverse.tunnel.api import Edge, EdgeExit, Relay
from quic_reverse.tunnel.auth import generate_token
from tests.support.timing import LONG


@contextlib.asynccontextmanager
async def echo_service() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _files(tmp_path: Path, name: str = "office") -> tuple[Path, Path]:
    token = generate_token()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'{name} = "{token}"\n')
    tokens.chmod(0o600)
    token_file = tmp_path / f"{name}.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return tokens, token_file


async def _round_trip(address: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def test_relay_and_edge_from_a_program(tmp_path: Path) -> None:
    tokens, token_file = _files(tmp_path)
    async with echo_service() as echo_port, asyncio.timeout(LONG):
        relay = Relay(
            listen="127.0.0.1:0",
            self_signed=True,
            state_dir=tmp_path / "state",
            tokens=tokens,
            forward=["127.0.0.1:0=office/echo"],
            grace=1,
        )
        async with relay:
            assert relay.fingerprint is not None
            host, port = relay.address
            assert port > 0 and relay.edges() == []
            edge = Edge(
                relay=f"{host}:{port}",
                name="office",
                token_file=token_file,
                fingerprint=relay.fingerprint,
                expose=[f"echo=127.0.0.1:{echo_port}"],
                backoff_initial="0.05",
                grace=1.0,
            )
            async with edge:
                assert edge.is_running()
                await relay.wait_for_edge("office")
                assert relay.edges() == ["office"]
                forward = relay.forward_address("office", "echo")
                assert await _round_trip(forward, b"hello through the tunnel") == (
                    b"hello through the tunnel"
                )
            assert not edge.is_running()
            assert await edge.wait() is EdgeExit.STOPPED
        with pytest.raises(UsageError):
            await relay.start()  # a stopped relay is not restarted


async def test_config_file_and_overrides(tmp_path: Path) -> None:
    tokens, _ = _files(tmp_path)
    config = tmp_path / "tunnel.toml"
    config.write_text(
        "[relay]\n"
        'listen = "127.0.0.1:0"\n'
        "self_signed = true\n"
        f'state_dir = "{tmp_path / "state"}"\n'
        'tokens = "tokens.toml"\n'  # relative to the file, as for the CLI
        "grace = 7\n"
    )
    relay = Relay(config_file=config, grace="2")
    assert relay.config.grace == 2.0  # the keyword wins, as a flag does
    assert relay.config.tokens == tokens
    async with relay, asyncio.timeout(LONG):
        assert relay.address[1] > 0
        stopper = asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(relay.stop()))
        await relay.serve_forever()
        assert stopper is not None


async def test_edge_with_wrong_token_reports_auth_failed(tmp_path: Path) -> None:
    tokens, _ = _files(tmp_path)
    wrong = tmp_path / "wrong.token"
    wrong.write_text(generate_token())
    wrong.chmod(0o600)
    async with (
        Relay(
            listen="127.0.0.1:0", self_signed=True, state_dir=tmp_path / "s", tokens=tokens
        ) as relay,
        asyncio.timeout(LONG),
    ):
        edge = Edge(
            relay="{}:{}".format(*relay.address),
            name="office",
            token_file=wrong,
            fingerprint=relay.fingerprint,
            expose=["echo=127.0.0.1:9"],
        )
        await edge.start()
        assert await edge.wait() is EdgeExit.AUTH_FAILED
        assert await edge.stop() is EdgeExit.AUTH_FAILED


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    tokens, token_file = _files(tmp_path)
    with pytest.raises(ConfigError, match="unknown setting"):
        Relay(listen="127.0.0.1:0", self_signed=True, tokens=tokens, forwards=["x"])
    with pytest.raises(ConfigError, match="grace"):
        Relay(listen="127.0.0.1:0", self_signed=True, tokens=tokens, grace="soon")
    with pytest.raises(ConfigError, match="tokens"):
        Relay(listen="127.0.0.1:0", self_signed=True)
    with pytest.raises(ConfigError, match=r"--fingerprint"):
        Edge(relay="127.0.0.1:4433", name="office", token_file=token_file, expose=["a=1.2.3.4:5"])
    with pytest.raises(ConfigError, match="expose"):
        Edge(relay="127.0.0.1:4433", name="office", token_file=token_file, insecure=True)


async def test_edge_usage_errors(tmp_path: Path) -> None:
    _, token_file = _files(tmp_path)
    edge = Edge(
        relay="127.0.0.1:9",
        name="office",
        token_file=token_file,
        insecure=True,
        expose=["a=127.0.0.1:9"],
    )
    assert await edge.stop() is None
    with pytest.raises(UsageError):
        await edge.wait()
    with pytest.raises(UsageError):
        Relay(listen="127.0.0.1:0", self_signed=True, tokens=_files(tmp_path)[0]).address  # noqa: B018
