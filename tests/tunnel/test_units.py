"""Unit tests of the tunnel's pure parts: config parsing/merging, tokens, backoff."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

from quic_reverse.errors import ConfigError
from quic_reverse.tunnel.auth import TokenStore, generate_token, read_edge_token, write_token_file
from quic_reverse.tunnel.config import (
    AUTH_SERVICE,
    Forward,
    build_edge_config,
    build_relay_config,
    load_config_file,
    parse_expose,
    parse_forward,
    parse_hostport,
)
from quic_reverse.tunnel.supervisor import Backoff

TOKEN = "t0ken-" + "x" * 20


def _edge_flags(**over: Any) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "relay": "127.0.0.1:4433",
        "name": "edgeA",
        "token_file": "/tmp/tok",
        "expose": ["ssh=127.0.0.1:22"],
        "fingerprint": "AB:" * 31 + "AB",
    }
    flags.update(over)
    return flags


# ---------------------------------------------------------------- addresses / specs


def test_parse_hostport_forms() -> None:
    assert parse_hostport("x", "example.com:443") == ("example.com", 443)
    assert parse_hostport("x", "[::1]:4433") == ("::1", 4433)
    assert parse_hostport("x", "2222", default_host="127.0.0.1") == ("127.0.0.1", 2222)
    for bad in ("", "nohost", ":22", "h:99999", "h:-1", "h:x", "[::1]4433"):
        with pytest.raises(ConfigError):
            parse_hostport("x", bad)


def test_parse_forward_defaults_to_loopback() -> None:
    assert parse_forward("2222=edgeA/ssh") == Forward(
        host="127.0.0.1", port=2222, edge="edgeA", service="ssh"
    )
    fwd = parse_forward("0.0.0.0:80=e-1/web.v2")
    assert (fwd.host, fwd.port, fwd.edge, fwd.service) == ("0.0.0.0", 80, "e-1", "web.v2")
    for bad in ("2222", "2222=edgeA", "2222=/ssh", "2222=edge A/ssh", "x=edgeA/ssh"):
        with pytest.raises(ConfigError):
            parse_forward(bad)


def test_parse_expose() -> None:
    e = parse_expose("ssh=127.0.0.1:22")
    assert (e.service, e.host, e.port) == ("ssh", "127.0.0.1", 22)
    for bad in ("ssh", "ssh=22", "=127.0.0.1:22", "ssh=127.0.0.1:0", "s s=h:1"):
        with pytest.raises(ConfigError):
            parse_expose(bad)


# ---------------------------------------------------------------- relay config


def test_relay_config_requires_tls_and_tokens() -> None:
    with pytest.raises(ConfigError, match="certificate"):
        build_relay_config({}, None, {"tokens": "t"})
    with pytest.raises(ConfigError, match="tokens"):
        build_relay_config({}, None, {"self_signed": True})
    with pytest.raises(ConfigError, match="either"):
        build_relay_config({}, None, {"self_signed": True, "cert": "c", "key": "k", "tokens": "t"})


def test_relay_file_and_flags_merge(tmp_path: Path) -> None:
    cfg_file = tmp_path / "tunnel.toml"
    cfg_file.write_text(
        """
[relay]
listen = "127.0.0.1:5000"
cert = "certs/relay.crt"
key = "certs/relay.key"
tokens = "tokens.toml"
forward = ["127.0.0.1:2222=edgeA/ssh"]
grace = 3
""",
        encoding="utf-8",
    )
    table, base = load_config_file(cfg_file, "relay")
    cfg = build_relay_config(table, base, {"listen": "127.0.0.1:6000", "grace": None})
    assert cfg.listen == ("127.0.0.1", 6000)  # flag wins
    assert cfg.grace == 3.0  # file value kept when the flag is absent
    assert cfg.cert == tmp_path / "certs/relay.crt"  # relative to the file
    assert cfg.forwards == (parse_forward("127.0.0.1:2222=edgeA/ssh"),)
    cfg2 = build_relay_config(table, base, {"forward": ["3333=edgeB/web"]})
    assert [str(f) for f in cfg2.forwards] == ["127.0.0.1:3333=edgeB/web"]


def test_relay_config_rejects_bad_values(tmp_path: Path) -> None:
    base_flags = {"self_signed": True, "tokens": "t"}
    with pytest.raises(ConfigError, match="unknown setting"):
        build_relay_config({"lisen": "x"}, None, base_flags)
    with pytest.raises(ConfigError, match="wrong type"):
        build_relay_config({"grace": "soon"}, None, base_flags)
    with pytest.raises(ConfigError, match="grace"):
        build_relay_config({}, None, {**base_flags, "grace": -1.0})
    with pytest.raises(ConfigError, match="two forwards"):
        build_relay_config({}, None, {**base_flags, "forward": ["1=a/b", "1=c/d"]})
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(bad, "relay")
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.toml", "relay")


# ---------------------------------------------------------------- edge config


def test_edge_config_verification_modes() -> None:
    cfg = build_edge_config({}, None, _edge_flags())
    assert cfg.fingerprint == "ab" * 32  # normalised
    with pytest.raises(ConfigError, match="verified"):
        build_edge_config({}, None, _edge_flags(fingerprint=None))
    with pytest.raises(ConfigError, match="exactly one"):
        build_edge_config({}, None, _edge_flags(insecure=True))
    with pytest.raises(ConfigError, match="SHA-256"):
        build_edge_config({}, None, _edge_flags(fingerprint="abc"))
    assert build_edge_config({}, None, _edge_flags(fingerprint=None, insecure=True)).insecure


def test_edge_config_allow_list() -> None:
    cfg = build_edge_config(
        {"expose": {"ssh": "127.0.0.1:22", "web": "127.0.0.1:8080"}},
        None,
        _edge_flags(expose=None),
    )
    assert cfg.exposed("web") is not None and cfg.exposed("web").port == 8080  # type: ignore[union-attr]
    assert cfg.exposed("telnet") is None
    with pytest.raises(ConfigError, match="twice"):
        build_edge_config({}, None, _edge_flags(expose=["a=h:1", "a=h:2"]))
    with pytest.raises(ConfigError, match="nothing to expose"):
        build_edge_config({}, None, _edge_flags(expose=[]))
    with pytest.raises(ConfigError):
        build_edge_config({}, None, _edge_flags(expose=[f"{AUTH_SERVICE}=h:1"]))
    with pytest.raises(ConfigError, match="--name"):
        build_edge_config({}, None, _edge_flags(name=None))
    with pytest.raises(ConfigError, match="backoff_cap"):
        build_edge_config({}, None, _edge_flags(backoff_initial=5.0, backoff_cap=1.0))


# ---------------------------------------------------------------- tokens


def test_token_store_verifies_per_edge(tmp_path: Path) -> None:
    other = generate_token()
    path = tmp_path / "tokens.toml"
    path.write_text(f'edgeA = "{TOKEN}"\nedgeB = "{other}"\n', encoding="utf-8")
    path.chmod(0o600)
    store = TokenStore.from_file(path)
    assert store.names == {"edgeA", "edgeB"}
    assert store.verify("edgeA", TOKEN)
    assert store.verify("edgeB", other)
    assert not store.verify("edgeA", other)  # tokens are per edge
    assert not store.verify("edgeC", TOKEN)
    assert not store.verify("edgeA", TOKEN[:-1])
    assert not store.verify("edgeA", "é" * 20)
    assert not store.verify(None, TOKEN)
    assert not store.verify("edgeA", b"bytes")


def test_token_file_errors_never_show_the_token(tmp_path: Path) -> None:
    secret = "s3cr3t-value-that-must-not-leak"
    path = tmp_path / "tokens.toml"
    path.write_text(f'edgeA = "{secret}\n', encoding="utf-8")  # unterminated string
    with pytest.raises(ConfigError) as info:
        TokenStore.from_file(path)
    assert secret not in str(info.value)
    path.write_text('edgeA = "short"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="16-512") as info:
        TokenStore.from_file(path)
    assert "short" not in str(info.value)
    path.write_text("edgeA = 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad entries: edgeA"):
        TokenStore.from_file(path)
    with pytest.raises(ConfigError, match="no edge tokens"):
        TokenStore({})


def test_edge_token_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "edge.token"
    write_token_file(path, TOKEN)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_edge_token(path) == TOKEN
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="quic_reverse.tunnel.auth"):
        assert read_edge_token(path) == TOKEN
    assert "readable by other users" in caplog.text
    assert TOKEN not in caplog.text
    path.write_text("has space in the token value\n", encoding="ascii")
    with pytest.raises(ConfigError, match="printable"):
        read_edge_token(path)
    with pytest.raises(ConfigError, match="not found"):
        read_edge_token(tmp_path / "nope")


# ---------------------------------------------------------------- backoff


def test_backoff_full_jitter_bounds_with_injected_rng() -> None:
    calls: list[tuple[float, float]] = []

    def top(a: float, b: float) -> float:
        calls.append((a, b))
        return b

    b = Backoff(0.5, 4.0, uniform=top)
    delays = [b.next_delay() for _ in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]  # exponential, then capped
    assert all(lo == 0.0 for lo, _ in calls)  # full jitter: lower bound is always 0
    b.reset()
    assert b.next_delay() == 0.5
    b.attempt = 10_000  # no overflow for huge attempt counts
    assert b.ceiling() == 4.0


def test_backoff_draws_spread_over_whole_range() -> None:
    rng = random.Random(1234)
    b = Backoff(1.0, 8.0, uniform=rng.uniform)
    b.attempt = 5  # ceiling is the cap
    draws = []
    for _ in range(400):
        b.attempt = 5
        draws.append(b.next_delay())
    assert all(0.0 <= d <= 8.0 for d in draws)
    assert min(draws) < 1.0 and max(draws) > 7.0  # jitter covers [0, cap]
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


# ---------------------------------------------------------------- settings table


def test_one_table_drives_flags_and_file_keys() -> None:
    """Every setting of the relay/edge tables is a CLI flag of the same name and a
    config-file key; values from either source go through the same conversion."""
    from quic_reverse.cli import build_parser
    from quic_reverse.tunnel.config import EDGE_TABLE, RELAY_TABLE

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, table in (("relay", RELAY_TABLE), ("edge", EDGE_TABLE)):
        flags = {
            opt
            for action in sub.choices[command]._actions  # type: ignore[index]
            for opt in action.option_strings
        }
        for setting in table:
            assert setting.flag in flags, (command, setting.name)
    base = {"self_signed": True, "tokens": "t"}
    from_file = build_relay_config(
        {"max_streams": 7, "linger": 2, "log_level": "debug"}, None, base
    )
    from_flags = build_relay_config(
        {}, None, {**base, "max_streams": "7", "linger": "2", "log_level": "debug"}
    )
    assert from_file == from_flags
    assert (from_file.max_streams, from_file.linger, from_file.log_level) == (7, 2.0, "debug")


def test_shared_validators_and_one_fingerprint_normaliser() -> None:
    from quic_reverse import Config
    from quic_reverse._validate import check_duration, fingerprint

    hexfp = "ab" * 32
    for form in (hexfp, hexfp.upper(), ":".join(["AB"] * 32), "sha256:" + hexfp):
        assert fingerprint("--fingerprint", form) == hexfp
        assert build_edge_config({}, None, _edge_flags(fingerprint=form)).fingerprint == hexfp
    with pytest.raises(ConfigError, match="--fingerprint: expected a SHA-256"):
        fingerprint("--fingerprint", "sha256:abc")
    # The library's Config and the tunnel word a bad duration the same way.
    with pytest.raises(ConfigError, match="open_timeout must be a number of seconds") as lib:
        Config(open_timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="open_timeout must be a number of seconds") as tun:
        check_duration("open_timeout", "soon")
    assert str(lib.value) == str(tun.value)
    with pytest.raises(ConfigError, match=r"\[edge\] relay: wrong type: expected a string"):
        build_edge_config({"relay": 5}, None, _edge_flags(relay=None))


def test_unknown_table_in_config_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[relais]\nlisten = '1.2.3.4:5'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown table\(s\) or key\(s\) \[relais\]"):
        load_config_file(path, "relay")
