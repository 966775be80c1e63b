"""Every example runs for real: subprocesses, QUIC over UDP on 127.0.0.1, free ports.

Each test asserts on what a person would see (stdout/stderr) and on the exit status.
Servers are shared per module where that is safe, to keep the suite lean.
"""

from __future__ import annotations

import ast
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quic_reverse.transport.tls import write_self_signed

from ._proc import (
    EXAMPLES,
    Server,
    free_udp_port,
    run_example,
    script,
    start_process,
    start_server,
)

pytestmark = pytest.mark.subprocess

SCRIPTS = ["basic.py", "echo_server.py", "echo_client.py", "relay.py", "edge.py", "demo.py"]


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the echo server's generated development certificate."""
    return tmp_path_factory.mktemp("echo-certs")


@pytest.fixture(scope="module")
def echo_server(cert_dir: Path) -> Iterator[Server]:
    """One echo server (generated dev certificate) shared by the client tests."""
    server = start_server("echo_server.py", "--cert-dir", str(cert_dir))
    try:
        yield server
    finally:
        server.stop()
        server.kill()


def echo_client(server: Server, cert_dir: Path, *args: str) -> tuple[int, str, str]:
    """Run echo_client.py against ``server``; return (status, stdout, stderr)."""
    result = run_example(
        "echo_client.py",
        *args,
        "--port",
        str(server.port),
        "--ca",
        str(cert_dir / "cert.pem"),
        timeout=30,
    )
    return result.returncode, result.stdout, result.stderr


def test_examples_use_only_the_public_api() -> None:
    """No example imports a QUIC stack (or a private module) directly."""
    for name in [*SCRIPTS, "_common.py"]:
        tree = ast.parse((EXAMPLES / name).read_text(), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in {"qh3", "aioquic", "cryptography"}, f"{name} imports {module}"
                if top == "quic_reverse":
                    assert not any(part.startswith("_") for part in module.split(".")), (
                        f"{name} imports private module {module}"
                    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str) -> None:
    """``--help`` works and documents ``-v`` (and the address options where networked)."""
    result = run_example(name, "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "-v" in result.stdout
    if name != "basic.py":
        assert "--host" in result.stdout and "--port" in result.stdout


def test_basic() -> None:
    """In-memory sessions: negotiation, ping, accepted open with data, rejection, close."""
    result = run_example("basic.py", timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "protocol version: 1" in out
    assert "remote agent:     example-server/1.0" in out
    assert re.search(r"ping: pong after \d+\.\d+ ms", out), out
    assert "reply 'Hello, Python!'" in out
    assert "rejected: UNSUPPORTED_SERVICE" in out
    assert "server: close received: NORMAL (example complete)" in out
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("service", "message", "expected"),
    [
        ("echo/uppercase", "Hello World", "HELLO WORLD"),
        ("echo/reverse", "Hello World", "dlroW olleH"),
        ("echo/plain", "Grüße, QUIC", "Grüße, QUIC"),
    ],
)
def test_echo_services(
    echo_server: Server, cert_dir: Path, service: str, message: str, expected: str
) -> None:
    """Each echo service transforms the message as documented; exit status 0."""
    status, out, err = echo_client(echo_server, cert_dir, service, message)
    assert status == 0, err
    assert out == expected + "\n"


def test_echo_unknown_service_is_rejected(echo_server: Server, cert_dir: Path) -> None:
    """An unknown service: the rejection code and reason on stderr, exit status 1."""
    status, out, err = echo_client(echo_server, cert_dir, "echo/nope", "x")
    assert status == 1
    assert out == ""
    assert re.search(r"^rejected: UNSUPPORTED_SERVICE: \S", err, re.MULTILINE), err
    assert "Traceback" not in err


def test_echo_client_on_aioquic(echo_server: Server, cert_dir: Path) -> None:
    """The client on aioquic talks to the server on qh3 (``--stack``)."""
    status, out, err = echo_client(
        echo_server, cert_dir, "--stack", "aioquic", "echo/uppercase", "Hello World"
    )
    assert status == 0, err
    assert out == "HELLO WORLD\n"


def test_echo_server_with_own_certificate_stops_on_ctrl_c(tmp_path: Path) -> None:
    """``--cert/--key`` + client ``--ca``; then SIGINT stops the server cleanly (status 0)."""
    cert, key = write_self_signed(tmp_path)
    server = start_server("echo_server.py", "--cert", str(cert), "--key", str(key))
    try:
        result = run_example(
            "echo_client.py",
            "echo/plain",
            "with my own certificate",
            "--port",
            str(server.port),
            "--ca",
            str(cert),
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "with my own certificate\n"
        status, out, err = server.stop(signal.SIGINT)
    finally:
        server.kill()
    assert status == 0, err
    assert "development certificate" not in out  # it used ours
    assert "Traceback" not in err


def test_echo_client_without_server_fails_cleanly(tmp_path: Path) -> None:
    """Nobody listening: a clear error on stderr and exit status 1, within the timeout."""
    cert, _ = write_self_signed(tmp_path)
    started = time.monotonic()
    result = run_example(
        "echo_client.py",
        "echo/plain",
        "hi",
        "--port",
        str(free_udp_port()),
        "--ca",
        str(cert),
        "--timeout",
        "2",
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 25


@pytest.mark.parametrize("relay_stack", ["qh3", "aioquic"])
def test_relay_and_edge(tmp_path: Path, relay_stack: str) -> None:
    """The reverse pattern: the edge dials, the relay opens time/echo, foobar is refused.

    The edge always runs on qh3; the relay on either stack (``--stack``).
    """
    der = tmp_path / "relay.der"
    relay = start_server(
        "relay.py",
        "--once",
        "--stack",
        relay_stack,
        "--cert-dir",
        str(tmp_path / "relay"),
        "--cert-out",
        str(der),
    )
    try:
        edge = run_example("edge.py", "--port", str(relay.port), "--ca", str(der), timeout=60)
        status, out, err = relay.wait(timeout=30)
    finally:
        relay.kill()
    assert edge.returncode == 0, edge.stderr
    assert status == 0, f"{out}\n{err}"

    match = re.search(r"^time: (\d+)$", out, re.MULTILINE)
    assert match, out
    assert abs(int(match.group(1)) - time.time()) < 300
    assert "echo: sent 'Hello from the relay!', received 'Hello from the relay!'" in out
    assert re.search(r"^foobar: rejected as expected: UNSUPPORTED_SERVICE", out, re.MULTILINE)
    assert re.search(r"^edge \S+: session closed$", out, re.MULTILINE), out
    assert "Traceback" not in err

    assert f"time: sent {match.group(1)}" in edge.stdout
    assert "echo: echoed 21 bytes" in edge.stdout
    assert "relay closed the session" in edge.stdout
    assert "Traceback" not in edge.stderr


def test_demo() -> None:
    """What ``make demo`` runs: server up, client prints HELLO WORLD, server down, status 0."""
    result = run_example("demo.py", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HELLO WORLD" in result.stdout.splitlines()
    assert "demo: client exited with status 0" in result.stdout
    assert "Traceback" not in result.stderr


def test_relay_stops_on_ctrl_c(tmp_path: Path) -> None:
    """A relay waiting for edges stops cleanly on Ctrl-C (status 0, no traceback)."""
    relay = start_server("relay.py", "--cert-dir", str(tmp_path), "--no-cert-out")
    try:
        status, out, err = relay.stop(signal.SIGINT)
    finally:
        relay.kill()
    assert status == 0, err
    assert "shutting down" in out
    assert "Traceback" not in err


def test_edge_interrupted_while_connecting(tmp_path: Path) -> None:
    """Ctrl-C while the edge dials a relay that is not there: status 130, no traceback."""
    cert, _ = write_self_signed(tmp_path)
    edge = start_process(
        [
            sys.executable,
            script("edge.py"),
            "--port",
            str(free_udp_port()),
            "--ca",
            str(cert),
            "--timeout",
            "60",
        ],
        ready=re.compile(r"^connecting to relay 127\.0\.0\.1:\d+ \.\.\.$"),
    )
    try:
        status, _, err = edge.stop(signal.SIGINT)
    finally:
        edge.kill()
    assert status == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
