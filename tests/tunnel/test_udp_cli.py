"""docs/TUNNEL.md's UDP section run as written: the relay and edge commands as real
processes (free ports and the printed fingerprint pasted in), the documented dnspython
query (run as its own process) against a DNS server this test starts; plus the
``udp:`` forms of flags and config files."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from quic_reverse.errors import ConfigError
from quic_reverse.tunnel.auth import generate_token, write_token_file
from quic_reverse.tunnel.config import (
    build_edge_config,
    build_relay_config,
    parse_expose,
    parse_forward,
)

from ..examples._proc import free_udp_port
from ..support.timing import LONG
from ._procs import ROOT, Proc, managed

FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)


def udp_section() -> str:
    text = (ROOT / "docs" / "TUNNEL.md").read_text(encoding="utf-8")
    start = text.index("## UDP forwarding")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(udp_section()) if kind == lang]


def sh_commands() -> list[str]:
    (body,) = blocks("sh")
    joined = re.sub(r"\\\n\s*", " ", body)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


@pytest.fixture
def dns_server() -> Iterator[int]:
    """A DNS server on UDP 127.0.0.1 (dnspython): example.test. A 192.0.2.53."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            if question.name.to_text() == "example.test." and question.rdtype == dns.rdatatype.A:
                response.answer.append(
                    dns.rrset.from_text("example.test.", 60, "IN", "A", "192.0.2.53")
                )
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(response.to_wire(), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(LONG)
        sock.close()


@pytest.mark.subprocess
def test_udp_section_runs_as_written(tmp_path: Path, dns_server: int) -> None:
    relay_cmd, edge_cmd = sh_commands()
    assert relay_cmd.startswith("quic-reverse relay ") and edge_cmd.startswith("quic-reverse edge ")
    (python_block,) = blocks("python")
    token = generate_token()
    write_token_file(tmp_path / "edgeA.token", token)
    (tmp_path / "tokens.toml").write_text(f'edgeA = "{token}"\n', encoding="utf-8")
    (tmp_path / "tokens.toml").chmod(0o600)
    quic_port, dns_forward = free_udp_port(), free_udp_port()

    def args(command: str, **swap: str) -> list[str]:
        for old, new in swap.items():
            assert old in command, (old, command)
            command = command.replace(old, new)
        words = shlex.split(command)[1:]  # "quic-reverse" -> python -m quic_reverse
        return [str(tmp_path / w) if w in ("tokens.toml", "edgeA.token") else w for w in words]

    relay = Proc(
        "relay",
        [
            *args(
                relay_cmd,
                **{
                    "127.0.0.1:4433": f"127.0.0.1:{quic_port}",
                    "127.0.0.1:5353": f"127.0.0.1:{dns_forward}",
                },
            ),
            "--state-dir",
            str(tmp_path / "state"),
        ],
    )
    with managed(relay):
        fingerprint = relay.wait_for(r"fingerprint: ([0-9a-f]{64})").group(1)
        relay.wait_for(r"relay ready")
        edge = Proc(
            "edge",
            args(
                edge_cmd,
                **{
                    "127.0.0.1:4433": f"127.0.0.1:{quic_port}",
                    "3f9c...e1": fingerprint,
                    "udp:127.0.0.1:53": f"udp:127.0.0.1:{dns_server}",
                },
            ),
        )
        with managed(edge):
            edge.wait_for(r"authenticated to relay")
            query = python_block.replace("port=5353", f"port={dns_forward}")
            result = subprocess.run(
                [sys.executable, "-c", query],
                capture_output=True,
                text=True,
                timeout=LONG * 3,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert "192.0.2.53" in result.stdout
            relay.wait_for(r"udp 127\.0\.0\.1:\d+ -> edgeA/dns: flow \d+ opened")


def test_udp_forms_of_forward_and_expose() -> None:
    fwd = parse_forward("udp:127.0.0.1:5353=edgeA/dns")
    assert (fwd.protocol, fwd.host, fwd.port, str(fwd)) == (
        "udp",
        "127.0.0.1",
        5353,
        "udp:127.0.0.1:5353=edgeA/dns",
    )
    assert parse_forward("udp:5353=edgeA/dns").host == "127.0.0.1"
    assert parse_forward("127.0.0.1:22=edgeA/ssh").protocol == "tcp"
    assert parse_forward("tcp:udp:53=edgeA/x").host == "udp"
    exposed = parse_expose("dns=udp:127.0.0.1:53")
    assert (exposed.protocol, exposed.port) == ("udp", 53)
    assert parse_expose("ssh=127.0.0.1:22").protocol == "tcp"
    with pytest.raises(ConfigError, match="port 0"):
        parse_expose("dns=udp:127.0.0.1:0")


def test_udp_settings_from_file_and_flags(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    relay = build_relay_config(
        {
            "self_signed": True,
            "tokens": str(tokens),
            "forward": ["udp:127.0.0.1:5353=edgeA/dns", "127.0.0.1:5353=edgeA/dns-tcp"],
            "udp_idle_timeout": 30,
        },
        tmp_path,
        {"max_udp_flows": "7"},
    )
    assert [f.protocol for f in relay.forwards] == ["udp", "tcp"]  # same port, both kinds
    assert (relay.udp_idle_timeout, relay.max_udp_flows) == (30, 7)
    with pytest.raises(ConfigError, match=r"two forwards listen on 127\.0\.0\.1:9 \(udp\)"):
        build_relay_config(
            {"self_signed": True, "tokens": str(tokens), "forward": ["udp:9=e/a", "udp:9=e/b"]},
            tmp_path,
            {},
        )
    token_file = tmp_path / "edgeA.token"
    write_token_file(token_file, generate_token())
    edge = build_edge_config(
        {
            "relay": "127.0.0.1:4433",
            "name": "edgeA",
            "token_file": str(token_file),
            "insecure": True,
            "expose": {"dns": "udp:127.0.0.1:53", "ssh": "127.0.0.1:22"},
        },
        tmp_path,
        {},
    )
    assert [e.protocol for e in edge.expose] == ["udp", "tcp"]
    assert (edge.udp_idle_timeout, edge.max_udp_flows) == (60.0, 1024)
    with pytest.raises(ConfigError, match="udp_idle_timeout"):
        build_edge_config(
            {
                "relay": "127.0.0.1:4433",
                "name": "edgeA",
                "token_file": str(token_file),
                "insecure": True,
                "expose": {"dns": "udp:127.0.0.1:53"},
                "udp_idle_timeout": 0,
            },
            tmp_path,
            {},
        )
