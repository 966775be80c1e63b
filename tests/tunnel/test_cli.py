"""Bad input to ``quic-reverse relay|edge`` (issue 10, "Bad input to the CLI"), SIGHUP,
and the fingerprint forms, with real processes: every case is one readable line naming
the option or file at fault, no traceback, exit 2 for configuration/file errors found
before serving and 1 for runtime failures.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from quic_reverse.transport.tls import write_self_signed
from quic_reverse.tunnel.auth import generate_token, write_token_file

from ..support.timing import LONG
from ._procs import Proc, start_edge, start_relay

pytestmark = pytest.mark.subprocess

WAIT = 3 * LONG


def _tokens(tmp: Path, names: Sequence[str] = ("edgeA",)) -> Path:
    path = tmp / "tokens.toml"
    lines = []
    for name in names:
        token = generate_token()
        lines.append(f'{name} = "{token}"\n')
        write_token_file(tmp / f"{name}.token", token)
    path.write_text("".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return path


def _run(args: Sequence[str], *, module: str = "quic_reverse") -> tuple[int, str]:
    proc = Proc("cli", list(args), module=module)
    try:
        code = proc.wait_exit(WAIT)
        proc.kill()  # joins the reader threads: the text is complete
        return code, proc.text
    finally:
        proc.kill()


def _relay_args(tmp: Path, *extra: str) -> list[str]:
    return ["relay", "--listen", "127.0.0.1:0", "--tokens", str(tmp / "tokens.toml"), *extra]


def _edge_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "edge",
        "--relay",
        "127.0.0.1:9",
        "--name",
        "edgeA",
        "--token-file",
        str(tmp / "edgeA.token"),
        "--expose",
        "echo=127.0.0.1:9",
        *extra,
    ]


def _assert_one_line(code: int, text: str, expected_code: int, pattern: str) -> None:
    assert code == expected_code, text
    assert "Traceback" not in text, text
    assert re.search(pattern, text), (pattern, text)


def test_certificate_and_file_errors_exit_2_naming_the_option(tmp_path: Path) -> None:
    _tokens(tmp_path)
    cert, key = write_self_signed(tmp_path / "a")
    _, other_key = write_self_signed(tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(Path(key).read_bytes())
    unreadable.chmod(0)
    cases: list[tuple[list[str], str]] = [
        # mismatched certificate and key: fails at start, not on every edge handshake
        (
            _relay_args(tmp_path, "--cert", str(cert), "--key", str(other_key)),
            r"--key .* does not belong to the certificate in --cert",
        ),
        (_relay_args(tmp_path, "--cert", str(cert)), r"--cert needs --key"),
        (_relay_args(tmp_path, "--key", str(key)), r"--key needs --cert"),
        (
            _relay_args(tmp_path, "--cert", str(tmp_path / "missing.pem"), "--key", str(key)),
            r"--cert .*missing\.pem.*not found",
        ),
        (
            _relay_args(tmp_path, "--cert", str(garbage), "--key", str(key)),
            r"--cert .*garbage\.pem.*no PEM certificate",
        ),
        (
            _relay_args(tmp_path, "--cert", str(cert), "--key", str(garbage)),
            r"--key .*garbage\.pem.*not a PEM private key",
        ),
        (
            [
                "relay",
                "--self-signed",
                "--state-dir",
                str(tmp_path / "s"),
                "--tokens",
                str(tmp_path / "missing.toml"),
            ],
            r"tokens file .*missing\.toml.* not found",
        ),
        (
            _edge_args(tmp_path, "--ca", str(tmp_path / "missing-ca.pem")),
            r"--ca .*missing-ca\.pem.*not found",
        ),
        (_edge_args(tmp_path, "--ca", str(garbage)), r"--ca .*no PEM certificate"),
        (
            _edge_args(tmp_path, "--fingerprint", "sha256:" + "ab" * 31),
            r"--fingerprint: expected a SHA-256",
        ),
        (
            _edge_args(tmp_path, "--insecure", "--ping-interval", "soon"),
            r"--ping-interval: expected",
        ),
        (_edge_args(tmp_path, "--insecure", "--max-streams", "0"), r"--max-streams must be >= 1"),
    ]
    if Path(unreadable).stat().st_mode and not _running_as_root():
        cases.append(
            (
                _relay_args(tmp_path, "--cert", str(cert), "--key", str(unreadable)),
                r"--key .*unreadable\.key.*[Pp]ermission denied",
            )
        )
    for args, pattern in cases:
        code, text = _run(args)
        _assert_one_line(code, text, 2, pattern)


def _running_as_root() -> bool:
    import os

    return os.geteuid() == 0


def test_config_file_errors_exit_2(tmp_path: Path) -> None:
    _tokens(tmp_path)
    cases = [
        ("[relais]\nlisten = '127.0.0.1:0'\n", r"unknown table\(s\) or key\(s\) \[relais\]"),
        ("[relay]\ngrace = 'soon'\n", r"\[relay\] grace: wrong type: expected a number of seconds"),
        ("[relay]\nforward = 5\n", r"\[relay\] forward: wrong type: expected a string or an array"),
        ("[relay]\nself_signed = 'yes'\n", r"self_signed: wrong type: expected a boolean"),
        ("[relay]\nlog_level = 'loud'\n", r"log_level: expected one of debug, info"),
    ]
    for body, pattern in cases:
        config = tmp_path / "bad.toml"
        config.write_text(body, encoding="utf-8")
        code, text = _run(_relay_args(tmp_path, "--self-signed", "--config", str(config)))
        _assert_one_line(code, text, 2, pattern)


def test_forward_errors_name_the_forward(tmp_path: Path) -> None:
    _tokens(tmp_path, ["edgeA"])
    common = ["--self-signed", "--state-dir", str(tmp_path / "state")]
    code, text = _run(_relay_args(tmp_path, *common, "--forward", "127.0.0.1:0=ghost/echo"))
    _assert_one_line(
        code, text, 2, r"--forward 127\.0\.0\.1:0=ghost/echo: edge 'ghost' has no token"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, text = _run(
            _relay_args(tmp_path, *common, "--forward", f"127.0.0.1:{port}=edgeA/echo")
        )
    _assert_one_line(
        code,
        text,
        1,
        rf"cannot start the relay: .*--forward 127\.0\.0\.1:{port}=edgeA/echo: cannot listen",
    )


def test_stack_aioquic_not_installed_says_how_to_install(tmp_path: Path) -> None:
    _tokens(tmp_path)
    code, text = _run(
        _relay_args(tmp_path, "--self-signed", "--stack", "aioquic"),
        module="tests.tunnel._no_aioquic",
    )
    _assert_one_line(code, text, 2, r"pip install 'quic-reverse\[aioquic\]'")
    code, text = _run(
        _edge_args(tmp_path, "--insecure", "--stack", "aioquic"), module="tests.tunnel._no_aioquic"
    )
    _assert_one_line(code, text, 2, r"pip install 'quic-reverse\[aioquic\]'")


def test_log_level_config_key_and_sha256_fingerprint_and_sighup(tmp_path: Path) -> None:
    """``log_level`` works as a config key; ``sha256:<hex>`` is accepted by --fingerprint
    (one normaliser with the library); SIGHUP is logged and kills neither process."""
    _tokens(tmp_path)
    echo = socket.create_server(("127.0.0.1", 0))
    config = tmp_path / "relay.toml"
    config.write_text("[relay]\nlog_level = 'info'\ngrace = 1\n", encoding="utf-8")
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo"],
        extra=["--config", str(config)],
    )
    edge: Proc | None = None
    try:
        relay.fingerprint = "sha256:" + relay.fingerprint.upper()
        edge = start_edge(
            "edgeA",
            tmp_path / "edgeA.token",
            relay,
            [f"echo=127.0.0.1:{echo.getsockname()[1]}"],
        )
        for proc in (relay.proc, edge):
            mark = proc.mark()
            proc.popen.send_signal(signal.SIGHUP)
            proc.wait_for(r"SIGHUP received: .*still running", after=mark, timeout=WAIT)
            assert proc.popen.poll() is None
        assert edge.terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()
        echo.close()
