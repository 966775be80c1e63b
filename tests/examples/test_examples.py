"""Every example runs for real: subprocesses, QUIC over UDP on 127.0.0.1, free ports.

Each test asserts on what a person would see (stdout/stderr) and on the exit status.
Servers are shared per module where that is safe, to keep the suite lean.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quic_reverse.transport.tls import write_self_signed

from ._proc import (
    EXAMPLES,
    NO_ANSWER_TIMEOUT,
    RUN_TIMEOUT,
    STARTUP_TIMEOUT,
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
    )
    return result.returncode, result.stdout, result.stderr


def der_copy(pem: Path, directory: Path) -> Path:
    """The certificate at ``pem`` written as DER (what the Rust examples write)."""
    der = directory / "cert.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(pem.read_text("ascii")))
    return der


def one_error_line(stderr: str) -> str:
    """The message of the single ``error: ...`` line that makes up ``stderr``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), stderr
    return lines[0].removeprefix("error: ")


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
    result = run_example(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "-v" in result.stdout
    if name != "basic.py":
        assert "--host" in result.stdout and "--port" in result.stdout


def test_basic() -> None:
    """In-memory sessions: negotiation, ping, accepted open with data, rejection, close."""
    result = run_example("basic.py")
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
    """Nobody listening: one line in words (no ``TimeoutError()`` repr), exit status 1."""
    cert, _ = write_self_signed(tmp_path)
    port = free_udp_port()
    result = run_example(
        "echo_client.py",
        "echo/plain",
        "hi",
        "--port",
        str(port),
        "--ca",
        str(cert),
        "--timeout",
        f"{NO_ANSWER_TIMEOUT:g}",
    )
    assert result.returncode == 1, result.stderr
    assert one_error_line(result.stderr) == (
        f"no answer from 127.0.0.1:{port} within {NO_ANSWER_TIMEOUT:g} s: "
        "is the server running, is UDP blocked?"
    )


def test_echo_client_refused_connection_in_words(echo_server: Server, cert_dir: Path) -> None:
    """The server closes the handshake (no common ALPN): its reason in words, not a
    ``ConnectionClosed(...)`` repr; exit status 1."""
    status, out, err = echo_client(echo_server, cert_dir, "--alpn", "other", "echo/plain", "x")
    assert status == 1, err
    assert out == ""
    message = one_error_line(err)
    assert message.startswith(f"127.0.0.1:{echo_server.port} refused the connection: "), message
    assert "ALPN" in message and "--alpn" in message
    assert "ConnectionClosed(" not in message


def test_echo_client_accepts_a_der_certificate(
    echo_server: Server, cert_dir: Path, tmp_path: Path
) -> None:
    """``echo_client.py --ca`` takes a DER certificate, as ``edge.py --ca`` does."""
    der = der_copy(cert_dir / "cert.pem", tmp_path)
    result = run_example(
        "echo_client.py", "echo/reverse", "abc", "--port", str(echo_server.port), "--ca", str(der)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cba\n"


@pytest.fixture
def busy_udp_port() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that this test holds bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("name", ["echo_server.py", "relay.py"])
def test_server_on_a_busy_port(name: str, busy_udp_port: int, tmp_path: Path) -> None:
    """The port is taken: one readable line, no traceback, exit status 1 (a run-time failure)."""
    extra = ["--no-cert-out"] if name == "relay.py" else []
    result = run_example(name, "--port", str(busy_udp_port), "--cert-dir", str(tmp_path), *extra)
    assert result.returncode == 1, result.stderr
    assert one_error_line(result.stderr) == (
        f"cannot listen on UDP 127.0.0.1:{busy_udp_port}: the port is already in use "
        "(another server? --port 0 picks a free port)"
    )


def bad_input_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(script, options, expected error message) for files that are wrong in every way."""
    cert, key = write_self_signed(tmp / "a")
    _, other_key = write_self_signed(tmp / "b")
    garbage = tmp / "garbage.pem"
    garbage.write_text("garbage\n")
    missing = tmp / "missing.pem"
    client = ["echo/plain", "x", "--port", str(free_udp_port())]
    edge = ["--port", str(free_udp_port())]
    cases: list[tuple[str, list[str], str]] = []
    for name, args in (("echo_client.py", client), ("edge.py", edge)):
        cases += [
            (name, [*args, "--ca", str(missing)], f"--ca {missing}: no such file"),
            (name, [*args, "--ca", str(garbage)], f"--ca {garbage}: not a PEM or DER certificate"),
            (name, [*args, "--ca", str(tmp)], f"--ca {tmp}: cannot read it: Is a directory"),
        ]
    for name in ("echo_server.py", "relay.py"):
        args = ["--port", "0", *(["--no-cert-out"] if name == "relay.py" else [])]
        cases += [
            (
                name,
                [*args, "--cert", str(cert)],
                "--cert needs --key (the certificate's private key)",
            ),
            (
                name,
                [*args, "--cert", str(missing), "--key", str(key)],
                f"--cert {missing}: no such file",
            ),
            (
                name,
                [*args, "--cert", str(garbage), "--key", str(key)],
                f"--cert {garbage}: not a PEM certificate",
            ),
            (
                name,
                [*args, "--cert", str(cert), "--key", str(other_key)],
                f"--key {other_key} is not the private key of --cert {cert}",
            ),
            (
                name,
                [*args, "--cert", str(cert), "--key", str(garbage)],
                f"--key {garbage}: not an unencrypted PEM private key for --cert {cert}",
            ),
        ]
    return cases


def test_bad_files_exit_2_with_one_line(tmp_path: Path) -> None:
    """A missing, unreadable or malformed certificate/key/CA, or a key that is not the
    certificate's: exit status 2 before anything is served or dialled, one line naming
    the option and the file, never a traceback."""
    for name, args, expected in bad_input_cases(tmp_path):
        result = run_example(name, *args)
        assert result.returncode == 2, (name, args, result.stderr)
        assert one_error_line(result.stderr) == expected, (name, args)
        assert "listening on" not in result.stdout and "connecting" not in result.stdout


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
        edge = run_example("edge.py", "--port", str(relay.port), "--ca", str(der))
        status, out, err = relay.wait()
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


def start_raw_relay(cert_dir: Path, code: int) -> Server:
    """``raw_relay.py``: negotiates with one edge, then closes the QUIC connection with
    ``code`` without sending StreamClose first."""
    return start_process(
        [
            sys.executable,
            str(Path(__file__).with_name("raw_relay.py")),
            "--cert-dir",
            str(cert_dir),
            "--code",
            str(code),
            "--timeout",
            f"{STARTUP_TIMEOUT:g}",
        ]
    )


def run_edge_against_raw_relay(tmp_path: Path, code: int) -> tuple[int, str, str]:
    """Run ``edge.py -v`` against a raw relay closing with ``code``; (status, stdout, stderr)."""
    relay = start_raw_relay(tmp_path, code)
    try:
        edge = run_example(
            "edge.py", "-v", "--port", str(relay.port), "--ca", str(tmp_path / "cert.pem")
        )
        status, out, err = relay.wait()
    finally:
        relay.kill()
    assert status == 0, f"the raw relay failed:\n{out}\n{err}"
    assert "negotiated" in out and f"closed with code {code}" in out, out
    return edge.returncode, edge.stdout, edge.stderr


def test_edge_treats_a_close_with_code_0_as_a_normal_end(tmp_path: Path) -> None:
    """The relay closes the QUIC connection with code 0 (no error) right after the
    negotiation, without StreamClose(0) (the Rust relay example may): the edge logs it
    at INFO and exits 0 (issue 10, item 7)."""
    status, out, err = run_edge_against_raw_relay(tmp_path, 0)
    assert status == 0, out + err
    assert "relay closed the session" in out.splitlines()
    assert re.search(r"^\S+ \S+ INFO +quic_reverse\.examples\.edge: relay ", err, re.M), err
    assert not re.search(r"(WARNING|ERROR) +quic_reverse\.examples", err), err
    assert "error:" not in err and "Traceback" not in err


def test_edge_fails_when_the_relay_closes_with_an_error_code(tmp_path: Path) -> None:
    """The same abrupt close with a non-zero code is a failure: exit 1, in words."""
    status, out, err = run_edge_against_raw_relay(tmp_path, 7)
    assert status == 1, out + err
    assert "relay closed the session" not in out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the peer closed the connection: no reason given [QUIC error code 0x7]"
    ]
    assert "Traceback" not in err


def test_expected_refusal_is_not_a_warning(tmp_path: Path) -> None:
    """The edge refuses the relay's ``foobar`` probe by design: nothing at WARNING on
    either side of a demo run where everything behaved as expected."""
    relay = start_server("relay.py", "--once", "--cert-dir", str(tmp_path), "--no-cert-out")
    try:
        edge = run_example("edge.py", "--port", str(relay.port), "--ca", str(tmp_path / "cert.pem"))
        status, out, err = relay.wait()
    finally:
        relay.kill()
    assert edge.returncode == 0 and status == 0, edge.stderr + err
    assert "foobar: rejected as expected" in out
    assert "WARNING" not in err, err
    assert "WARNING" not in edge.stderr, edge.stderr


@pytest.mark.parametrize(
    ("name", "args", "server"),
    [
        ("echo_client.py", ["echo/plain", "x"], "echo_server.py"),
        ("edge.py", [], "relay.py"),
    ],
)
def test_client_before_its_server_wrote_the_certificate(
    name: str, args: list[str], server: str, tmp_path: Path
) -> None:
    """No ``--ca`` and the server has not written its certificate yet: exit status 2,
    saying what to do."""
    result = run_example(
        name, *args, "--port", str(free_udp_port()), env={**os.environ, "TMPDIR": str(tmp_path)}
    )
    assert result.returncode == 2, result.stderr
    message = one_error_line(result.stderr)
    assert message.startswith(f"no --ca given and {tmp_path}/"), message
    assert message.endswith(f"does not exist: start {server} first, or pass --ca FILE")


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("echo_server.py", ["--port", "0"]),
        ("relay.py", ["--port", "0", "--no-cert-out"]),
        ("echo_client.py", ["echo/plain", "x"]),
        ("edge.py", []),
    ],
)
def test_stack_not_installed(name: str, args: list[str], tmp_path: Path) -> None:
    """``--stack aioquic`` without the extra: exit status 2 and how to install it, in one
    line (an ``aioquic`` that fails to import stands in for a missing one)."""
    fake = tmp_path / "site" / "aioquic"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('aioquic is not installed')\n")
    cert, _ = write_self_signed(tmp_path / "cert")
    client = ["--port", str(free_udp_port()), "--ca", str(cert)]
    server = ["--cert-dir", str(tmp_path / "cert")]
    result = run_example(
        name,
        *args,
        *(client if name in ("echo_client.py", "edge.py") else server),
        "--stack",
        "aioquic",
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) == (
        "--stack aioquic: aioquic is not installed (pip install 'quic-reverse[aioquic]')"
    )


def test_demo() -> None:
    """What ``make demo`` runs: server up, client prints HELLO WORLD, server down, status 0."""
    result = run_example("demo.py", timeout=2 * RUN_TIMEOUT)  # two children in turn
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
            f"{RUN_TIMEOUT:g}",
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
