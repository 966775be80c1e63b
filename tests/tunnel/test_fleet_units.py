"""The relay fleet in process (no Redis): fleet settings, and relay B's side of a
relay-to-relay session (the fleet secret, one hop at most, opens to its own edges)
over the memory transport."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from quic_reverse import Config, Metadata, RejectCode, Role, Session, StreamRejected
from quic_reverse.errors import CertificateError, ConfigError
from quic_reverse.session import SessionHandle
from quic_reverse.tunnel.auth import FLEET_KEY, TOKEN_KEY, generate_token, write_token_file
from quic_reverse.tunnel.config import AUTH_SERVICE, RelayConfig, build_relay_config
from quic_reverse.tunnel.fleet import HOP_KEY, Fleet
from quic_reverse.tunnel.redis_registry import Route
from quic_reverse.tunnel.relay import ensure_self_signed

from ..support.timing import LONG
from .test_inprocess import Setup, echo_service, relay_setup, until

FLEET_TOKEN = generate_token()


def _base(tmp_path: Path) -> dict[str, Any]:
    return {"self_signed": True, "tokens": str(tmp_path / "tokens.toml")}


def test_fleet_settings_all_or_nothing(tmp_path: Path) -> None:
    base = _base(tmp_path)
    fleet = {
        "registry": "redis://127.0.0.1:6379/0",
        "fleet_token_file": str(tmp_path / "fleet.token"),
        "fleet_fingerprint": "ab" * 32,
        "listen": "127.0.0.1:4433",
    }
    cfg = build_relay_config({}, None, {**base, **fleet})
    assert cfg.registry == "redis://127.0.0.1:6379/0"
    assert (cfg.registry_ttl, cfg.registry_heartbeat) == (10.0, 3.0)
    assert cfg.advertise is None  # the listen address is used
    cases = {
        "needs --registry": {**base, "fleet_fingerprint": "ab" * 32},
        "--fleet-token-file": {**base, "registry": fleet["registry"]},
        "one of --fleet-ca": {**base, **{k: v for k, v in fleet.items() if k != "fleet_ca"}}
        | {"fleet_fingerprint": None},
        "expected redis://": {**base, **fleet, "registry": "http://127.0.0.1:6379"},
        "must be below": {**base, **fleet, "registry_ttl": "2", "registry_heartbeat": "2"},
        "--advertise HOST:PORT must": {**base, **fleet, "listen": "0.0.0.0:4433"},
    }
    for expected, flags in cases.items():
        with pytest.raises(ConfigError, match=expected):
            build_relay_config({}, None, flags)
    both = {**base, **fleet, "fleet_ca": str(tmp_path / "ca.pem")}
    with pytest.raises(ConfigError, match="one of --fleet-ca"):
        build_relay_config({}, None, both)
    file_cfg = build_relay_config(
        {"registry": fleet["registry"], "advertise": "10.0.0.1:4433", "registry_ttl": 6},
        tmp_path,
        {**base, "fleet_token_file": fleet["fleet_token_file"], "fleet_fingerprint": "ab" * 32},
    )
    assert file_cfg.advertise == ("10.0.0.1", 4433)
    assert file_cfg.registry_ttl == 6


@contextlib.asynccontextmanager
async def fleet_relay(tmp_path: Path, **more: Any) -> Any:
    """An in-process relay in a fleet whose registry is unreachable (nothing listens
    on port 1): relay B of a relay-to-relay session, serving its own edges."""
    write_token_file(tmp_path / "fleet.token", FLEET_TOKEN)
    over: dict[str, Any] = {
        "registry": "redis://127.0.0.1:1/0",
        "fleet_token_file": tmp_path / "fleet.token",
        "fleet_fingerprint": None if "fleet_ca" in more else "ab" * 32,
        "listen": ("127.0.0.1", 0),
        **more,
    }
    async with relay_setup(tmp_path, **over) as setup:
        assert isinstance(setup.relay.fleet, Fleet)
        yield setup


async def peer_session(setup: Setup, token: str) -> SessionHandle:
    client, _ = setup.link()
    handle = await Session(client, Role.CLIENT, Config(open_timeout=LONG)).start()
    driver = asyncio.create_task(_drain(handle))
    setup.tasks.append(driver)
    fields = {FLEET_KEY: "0123456789abcdef", TOKEN_KEY: token}
    stream = await handle.open(AUTH_SERVICE, Metadata.structured(fields))
    await stream.aclose()
    return handle


async def _drain(handle: SessionHandle) -> None:
    with contextlib.suppress(Exception):
        while await handle.process_message() is not None:
            pass


def _fleet_open(hop: int) -> Metadata:
    fields: dict[str, str | int] = {"client": "192.0.2.7:5555", "via": "127.0.0.1:1", HOP_KEY: hop}
    return Metadata.structured(fields)


async def test_peer_relay_needs_the_fleet_secret(tmp_path: Path) -> None:
    async with fleet_relay(tmp_path) as setup:
        with pytest.raises(StreamRejected) as info:
            await peer_session(setup, generate_token())
        assert info.value.code == RejectCode.UNAUTHORIZED


async def test_peer_relay_opens_reach_local_edges_one_hop_only(tmp_path: Path) -> None:
    async with fleet_relay(tmp_path) as setup, echo_service() as (port, _):
        handle = await peer_session(setup, FLEET_TOKEN)
        # The edge is not connected here (yet): A must try another route.
        with pytest.raises(StreamRejected) as info:
            await handle.open("edgeA/echo", _fleet_open(1))
        assert info.value.code == RejectCode.SERVICE_UNAVAILABLE
        setup.edge({"echo": port})
        await until(setup.pool(), lambda: bool(setup.pool().live()))
        rejected = {
            # A second hop: never forwarded again.
            ("edgeA/echo", 2): RejectCode.UNAUTHORIZED,
            # An edge without a token; not EDGE/SERVICE.
            ("nobody/echo", 1): RejectCode.UNSUPPORTED_SERVICE,
            ("edgeA", 1): RejectCode.UNSUPPORTED_SERVICE,
        }
        for (service, hop), code in rejected.items():
            with pytest.raises(StreamRejected) as info:
                await handle.open(service, _fleet_open(hop))
            assert info.value.code == code, service
        with pytest.raises(StreamRejected) as info:
            await handle.open("edgeA/other", _fleet_open(1))  # the edge's own answer
        assert info.value.code == RejectCode.UNSUPPORTED_SERVICE
        stream = await handle.open("edgeA/echo", _fleet_open(1))
        payload = b"through relay B" * 1000
        await stream.send(payload)
        await stream.write_eof()
        got = b""
        async with asyncio.timeout(LONG):
            while chunk := await stream.read(65536):
                got += chunk
        assert got == payload
        await stream.aclose()
        assert setup.relay.fleet is not None and setup.relay.fleet.served == 1


def test_relay_config_dataclass_checks_fleet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --registry"):
        RelayConfig(self_signed=True, tokens=tmp_path / "t", advertise=("127.0.0.1", 1))


async def test_fleet_errors_are_reported_before_listening(tmp_path: Path) -> None:
    write_token_file(tmp_path / "fleet.token", FLEET_TOKEN)
    cases: dict[str, dict[str, Any]] = {
        "--fleet-token-file: token file": {"fleet_token_file": tmp_path / "missing.token"},
        "--registry 'redis://127.0.0.1:x/0'": {"registry": "redis://127.0.0.1:x/0"},
    }
    for expected, bad in cases.items():
        over: dict[str, Any] = {
            "registry": "redis://127.0.0.1:1/0",
            "fleet_token_file": tmp_path / "fleet.token",
            "fleet_fingerprint": "ab" * 32,
            "listen": ("127.0.0.1", 0),
            **bad,
        }
        with pytest.raises(ConfigError, match=expected):
            async with relay_setup(tmp_path, **over):
                pass


async def test_peer_session_verifies_the_peer_certificate_with_the_fleet_ca(
    tmp_path: Path,
) -> None:
    """Relay A dials relay B over real QUIC on 127.0.0.1: B's certificate is checked
    against --fleet-ca (its advertised host must be in it), then the fleet secret."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "other").mkdir()
    b_cert, _, _ = ensure_self_signed(tmp_path / "b" / "state")
    other_cert, _, _ = ensure_self_signed(tmp_path / "other")
    async with fleet_relay(tmp_path / "b") as b:
        assert b.relay.quic_address is not None
        route = Route(name="edgeA", relay="b", advertise=b.relay.quic_address, instances=())
        for ca, ok in ((b_cert, True), (other_cert, False)):
            async with fleet_relay(tmp_path / "a", fleet_ca=ca) as a:
                fleet = a.relay.fleet
                assert fleet is not None
                if ok:
                    link = await fleet._link(route)
                    assert link.alive
                    with pytest.raises(StreamRejected) as info:  # B holds no edgeA
                        await link.handle.open("edgeA/echo", _fleet_open(1))
                    assert info.value.code == RejectCode.SERVICE_UNAVAILABLE
                else:
                    with pytest.raises(CertificateError):
                        await fleet._link(route)
                    assert fleet._down.get("b", 0.0) > 0  # avoided for the TTL
