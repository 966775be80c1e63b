"""The issue 15 examples run for real (subprocesses, QUIC over UDP and TCP on
127.0.0.1, bounded by the examples harness's timeouts)."""

from __future__ import annotations

import ast
import re

import pytest

from tests.examples._proc import EXAMPLES, run_example

pytestmark = pytest.mark.subprocess

SCRIPTS = ["embedded_tunnel.py", "reconnecting_client.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_uses_only_the_public_api_and_has_help(name: str) -> None:
    tree = ast.parse((EXAMPLES / name).read_text(), filename=name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quic_reverse"):
            assert not any(p.startswith("_") for p in (node.module or "").split(".")), node.module
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any((n or "").split(".")[0] in {"qh3", "aioquic"} for n in names)
    result = run_example(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "-v" in result.stdout and "--port" in result.stdout


def test_embedded_tunnel() -> None:
    """Relay + edge started from Python; a TCP client is answered through the tunnel."""
    result = run_example("embedded_tunnel.py", "--message", "ping through quic")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^relay listening on 127\.0\.0\.1:\d+$", out, re.MULTILINE), out
    assert "edge 'office' connected; exposes echo" in out
    assert re.search(r"-> relay -> edge -> echo: 'ping through quic'$", out, re.MULTILINE), out
    assert "edge stopped: STOPPED" in out and out.endswith("relay stopped\n")
    assert "Traceback" not in result.stderr


def test_reconnecting_client() -> None:
    """Three sessions: one after the server closed the session, one after a restart
    during which dials failed and backed off."""
    result = run_example("reconnecting_client.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for n in (1, 2, 3):
        assert f"session {n}: the client answered 'hello? hello from client session {n}'" in out
    dials = re.search(r"the client made 3 sessions in (\d+) dials", out)
    assert dials is not None, out
    assert int(dials.group(1)) >= 4  # at least one dial failed while the server was away
    assert "connect failed" in result.stderr  # ...and was logged as a warning
    assert "Traceback" not in result.stderr
