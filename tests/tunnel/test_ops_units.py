"""Operability building blocks in-process (issue 13, issue 17 item 4): the PROXY v2
header against a parser written from the specification, the authentication limiter and
the peer log throttle with an injected clock, the JSON log format, sd_notify, certs."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path

import pytest
from cryptography import x509

from quic_reverse.errors import ConfigError
from quic_reverse.tunnel.certs import issue_relay_certificate
from quic_reverse.tunnel.logfmt import JsonFormatter
from quic_reverse.tunnel.notify import notify
from quic_reverse.tunnel.proxyproto import build_v2_header
from quic_reverse.tunnel.ratelimit import AuthLimiter, PeerLogThrottle

# --------------------------------------------------------------- PROXY protocol v2


def parse_proxy_v2(data: bytes) -> tuple[dict[str, object], int]:
    """A PROXY v2 reader written from HAProxy's proxy-protocol.txt section 2.2 (not
    from the code under test): returns the fields and the header length."""
    sig = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
    assert data[:12] == sig, "bad signature"
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    assert ver_cmd >> 4 == 2, "version must be 2"
    out: dict[str, object] = {"command": "PROXY" if ver_cmd & 0xF == 1 else "LOCAL"}
    body = data[16 : 16 + length]
    assert len(body) == length
    if fam == 0x11:  # TCP over IPv4: 4+4+2+2
        out["src"] = (str(ipaddress.IPv4Address(body[0:4])), struct.unpack("!H", body[8:10])[0])
        out["dst"] = (str(ipaddress.IPv4Address(body[4:8])), struct.unpack("!H", body[10:12])[0])
    elif fam == 0x21:  # TCP over IPv6: 16+16+2+2
        out["src"] = (str(ipaddress.IPv6Address(body[0:16])), struct.unpack("!H", body[32:34])[0])
        out["dst"] = (str(ipaddress.IPv6Address(body[16:32])), struct.unpack("!H", body[34:36])[0])
    else:
        out["family"] = fam
    return out, 16 + length


def test_proxy_v2_header_ipv4_ipv6_and_unspec() -> None:
    fields, n = parse_proxy_v2(build_v2_header("203.0.113.7:50211", "192.0.2.1:2222") + b"x")
    assert fields == {"command": "PROXY", "src": ("203.0.113.7", 50211), "dst": ("192.0.2.1", 2222)}
    assert n == 28
    fields, n = parse_proxy_v2(build_v2_header("[2001:db8::1]:443", "2001:db8::2:80"))
    assert fields["src"] == ("2001:db8::1", 443) and fields["dst"] == ("2001:db8::2", 80)
    assert n == 52
    # Mixed families: IPv4 mapped into IPv6.
    fields, _ = parse_proxy_v2(build_v2_header("203.0.113.7:1", "[::1]:2"))
    assert fields["src"] == ("::ffff:cb00:7107", 1)
    # Nothing usable from the relay: AF_UNSPEC, no address block (receiver uses its own).
    for bad in (None, "", "nonsense", "1.2.3.4:99999", "host:22", 17):
        fields, n = parse_proxy_v2(build_v2_header(bad, "127.0.0.1:1"))
        assert fields == {"command": "PROXY", "family": 0} and n == 16


# --------------------------------------------------------------- auth limiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auth_limiter_engages_per_address_logs_once_and_lifts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limiter = AuthLimiter(3, 10.0, clock=clock)
    caplog.set_level(logging.INFO, "quic_reverse")
    assert [limiter.admit("198.51.100.1") for _ in range(5)] == [True, True, True, False, False]
    engaged = [r for r in caplog.records if "limit engaged" in r.getMessage()]
    assert len(engaged) == 1 and "198.51.100.1" in engaged[0].getMessage()
    assert limiter.admit("198.51.100.2")  # another address is not affected
    clock.now += 10.0  # one token back
    assert limiter.admit("198.51.100.1")
    assert any("lifted; 2 connection(s) were refused" in r.getMessage() for r in caplog.records)
    assert not limiter.admit("198.51.100.1")
    limiter.succeeded("198.51.100.1")  # an edge authenticated from there: forgotten
    assert limiter.admit("198.51.100.1")


def test_auth_limiter_zero_disables_and_memory_is_bounded() -> None:
    assert all(AuthLimiter(0, 1.0).admit("192.0.2.1") for _ in range(100))
    clock = Clock()
    limiter = AuthLimiter(2, 1.0, clock=clock, max_addresses=100)
    for i in range(1000):
        limiter.admit(f"10.0.{i // 256}.{i % 256}")
        assert len(limiter) <= 100


# --------------------------------------------------------------- log throttle


def _record(msg: str, *args: object, peer: bool = True) -> logging.LogRecord:
    rec = logging.LogRecord(
        "quic_reverse.tunnel.auth", logging.WARNING, __file__, 1, msg, args, None
    )
    if peer:
        rec.peer = True
    return rec


def test_peer_log_throttle() -> None:
    clock = Clock()
    throttle = PeerLogThrottle(burst=3, window=10.0, clock=clock)
    passed = [throttle.filter(_record("edge %s failed", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    # Lines not triggered by a peer always pass.
    assert all(throttle.filter(_record("relay ready %s", i, peer=False)) for i in range(10))
    # The library's peer-triggered template is throttled without a flag.
    core = [
        throttle.filter(_record("%s: protocol error from peer: %s", "server", i, peer=False))
        for i in range(5)
    ]
    assert core == [True] * 3 + [False] * 2
    clock.now += 10.0
    rec = _record("edge %s failed", 99)
    assert throttle.filter(rec)
    assert rec.getMessage() == "edge 99 failed [7 similar line(s) suppressed]"


# --------------------------------------------------------------- JSON logs


def test_json_formatter_one_object_with_fields() -> None:
    rec = logging.LogRecord(
        "quic_reverse.tunnel.relay", logging.INFO, __file__, 1, "a %s", ("b",), None
    )
    rec.edge, rec.stream, rec.bytes_up = "edgeA", 3, 10
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["message"] == "a b" and obj["level"] == "INFO"
    assert obj["logger"] == "quic_reverse.tunnel.relay" and obj["time"].endswith("+00:00")
    assert (obj["edge"], obj["stream"], obj["bytes_up"]) == ("edgeA", 3, 10)
    assert "service" not in obj


# --------------------------------------------------------------- sd_notify


def test_notify_sends_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # not under systemd: nothing to do
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1", "STATUS=serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert notify("RELOADING=1")
        fields = sock.recv(4096).decode().split("\n")
        assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))
        assert notify("READY=1") is False  # never raises


# --------------------------------------------------------------- certificates


def test_cert_issues_ca_and_relay_certificate(tmp_path: Path) -> None:
    files = issue_relay_certificate(tmp_path / "pki", ["relay.example.com"], ["127.0.0.1"])
    assert files.ca_created
    for key in (files.key, files.ca_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.example.com"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    again = issue_relay_certificate(tmp_path / "pki", ["other.example"], [])
    assert not again.ca_created  # the CA is reused: edges keep trusting it
    x509.load_pem_x509_certificate(again.cert.read_bytes()).verify_directly_issued_by(ca)
    with pytest.raises(ConfigError, match="--name"):
        issue_relay_certificate(tmp_path / "x", [], [])
    with pytest.raises(ConfigError, match="--ip"):
        issue_relay_certificate(tmp_path / "x", [], ["300.1.1.1"])


def test_token_store_revoked_by_names_removed_and_changed_tokens() -> None:
    from quic_reverse.tunnel.auth import TokenStore, generate_token

    a, b, c = generate_token(), generate_token(), generate_token()
    old = TokenStore({"edgeA": a, "edgeB": b, "edgeC": c})
    new = TokenStore({"edgeA": a, "edgeC": generate_token(), "edgeD": generate_token()})
    assert old.revoked_by(new) == {"edgeB", "edgeC"}  # removed, changed; added is no revocation
    assert new.revoked_by(new) == frozenset()


def test_reload_keeps_restart_only_settings_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from quic_reverse.tunnel.config import RelayConfig
    from quic_reverse.tunnel.reload import RELAY_RESTART_ONLY, _keep

    old = RelayConfig(self_signed=True, tokens=Path("t"), listen=("127.0.0.1", 1), grace=1.0)
    new = RelayConfig(self_signed=True, tokens=Path("t"), listen=("127.0.0.1", 2), grace=2.0)
    caplog.set_level(logging.WARNING, "quic_reverse")
    kept = _keep(old, new, RELAY_RESTART_ONLY, "relay")
    assert kept.listen == ("127.0.0.1", 1) and kept.grace == 2.0
    assert "setting 'listen' changed; it applies after a restart" in caplog.text
    assert "grace" not in caplog.text
