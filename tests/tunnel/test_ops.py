"""Operability of relay and edge as real processes (issue 13; issue 17 item 4):
``--metrics`` (Prometheus, /healthz, /ready, the status page in headless Chromium),
reload on SIGHUP and ``--check``, the authentication limit, JSON logs, PROXY v2,
``quic-reverse cert``, the token from the environment, systemd notification, and the
copy-paste examples of docs/TUNNEL.md's operability section.

Every wait is bounded (multiples of ``MS``); processes are always killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from quic_reverse import Config, QuicReverseError, Role, Session
from quic_reverse.transport import quic
from quic_reverse.tunnel.auth import (
    AuthRejected,
    authenticate_to_relay,
    generate_token,
    write_token_file,
)
from quic_reverse.tunnel.config import DEFAULT_ALPN

from ..support.timing import LONG, MS
from ._procs import ROOT, Proc, RelayProc, Services, start_edge, start_relay, start_services
from .test_ops_units import parse_proxy_v2

pytestmark = pytest.mark.subprocess

WAIT = 3 * LONG


# ------------------------------------------------------------------------- helpers


def _tokens(tmp: Path, names: list[str]) -> dict[str, str]:
    tokens = {name: generate_token() for name in names}
    _write_tokens_file(tmp / "tokens.toml", tokens)
    for name, token in tokens.items():
        write_token_file(tmp / f"{name}.token", token)
    return tokens


def _write_tokens_file(path: Path, tokens: dict[str, str]) -> None:
    path.write_text("".join(f'{n} = "{t}"\n' for n, t in tokens.items()), encoding="utf-8")
    path.chmod(0o600)


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    svc = start_services()
    try:
        yield svc
    finally:
        svc.proc.kill()


def _metrics_port(proc: Proc) -> int:
    return int(proc.wait_for(r"status page on http://127\.0\.0\.1:(\d+)/").group(1))


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        async with asyncio.timeout(LONG):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def echo(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(LONG):
            return await reader.read()
    finally:
        writer.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition with prometheus_client's own parser (fails on bad format)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _relay_proc(args: list[str]) -> RelayProc:
    """A relay started with exactly ``args`` (plus an ephemeral --listen)."""
    proc = Proc("relay", ["relay", "--listen", "127.0.0.1:0", *args])
    try:
        port = int(proc.wait_for(r"listening for edges on [\d.]+:(\d+)").group(1))
        proc.wait_for(r"relay ready")
        fp = proc.wait_for(r"fingerprint[: ]+([0-9a-f]{64})").group(1)
    except BaseException:
        proc.kill()
        raise
    forwards = {
        m.group(2): int(m.group(1))
        for m in re.finditer(r"forward [\d.]+:(\d+) -> ([\w./-]+)", proc.text)
    }
    return RelayProc(proc=proc, quic_port=port, fingerprint=fp, forwards=forwards)


async def _until(check: Any) -> None:
    """Re-check a condition that another process changes (bounded by LONG)."""
    async with asyncio.timeout(LONG):
        # Another process's state over HTTP: there is no event to wait on.
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(50 * MS)


# ------------------------------------------------------------------------- metrics


async def test_metrics_health_ready(services: Services, tmp_path: Path) -> None:
    """/metrics (parsed by prometheus_client), /healthz, /ready on relay and edge; the
    counters move with a tunnelled connection; no token anywhere."""
    tokens = _tokens(tmp_path, ["edgeA"])
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo"],
        extra=["--metrics", "127.0.0.1:0"],
    )
    # An edge whose relay does not answer yet: alive but not ready.
    lonely = Proc(
        "edge (no relay)",
        [
            "edge",
            "--relay",
            "127.0.0.1:9",
            "--name",
            "edgeA",
            "--token-file",
            str(tmp_path / "edgeA.token"),
            "--insecure",
            "--expose",
            f"echo=127.0.0.1:{services.echo}",
            "--metrics",
            "0",
        ],
    )
    edge: Proc | None = None
    try:
        rport = _metrics_port(relay.proc)
        lport = _metrics_port(lonely)
        assert await http_get(lport, "/healthz") == (200, "ok\n")
        assert (await http_get(lport, "/ready"))[0] == 503
        lonely.kill()
        assert await http_get(rport, "/healthz") == (200, "ok\n")
        assert (await http_get(rport, "/ready"))[0] == 200
        edge = start_edge(
            "edgeA",
            tmp_path / "edgeA.token",
            relay,
            [f"echo=127.0.0.1:{services.echo}"],
            extra=["--metrics", "127.0.0.1:0"],
        )
        eport = _metrics_port(edge)
        assert (await http_get(eport, "/ready"))[0] == 200
        payload = os.urandom(5000)
        assert await echo(relay.forwards["edgeA/echo"], payload) == payload
        fwd = f"127.0.0.1:{relay.forwards['edgeA/echo']}=edgeA/echo"

        async def counted() -> bool:
            text = (await http_get(rport, "/metrics"))[1]
            key = (
                "quic_reverse_tunnel_connections_total",
                (("forward", fwd), ("outcome", "closed")),
            )
            return _samples(text).get(key) == 1.0

        await _until(counted)
        m = _samples((await http_get(rport, "/metrics"))[1])
        assert m[("quic_reverse_edges_connected", (("edge", "edgeA"),))] == 1.0
        assert m[("quic_reverse_tunnel_connections_active", (("forward", fwd),))] == 0.0
        assert m[("quic_reverse_tunnel_bytes_total", (("direction", "up"),))] == 5000.0
        assert m[("quic_reverse_tunnel_bytes_total", (("direction", "down"),))] == 5000.0
        assert m[("quic_reverse_auth_failures_total", ())] == 0.0

        async def rtt_sampled() -> bool:
            text = (await http_get(rport, "/metrics"))[1]
            return any(k[0] == "quic_reverse_session_rtt_seconds" for k in _samples(text))

        await _until(rtt_sampled)  # the first scrape starts a ping; a later one shows it
        em = _samples((await http_get(eport, "/metrics"))[1])
        assert em[("quic_reverse_relay_sessions_connected", ())] == 1.0
        assert em[("quic_reverse_reconnects_total", ())] == 0.0
        assert em[("quic_reverse_tunnel_bytes_total", (("direction", "up"),))] == 5000.0
        key = (
            "quic_reverse_tunnel_connections_total",
            (("outcome", "closed"), ("service", "echo")),
        )
        assert em[key] == 1.0
        assert (await http_get(rport, "/nope"))[0] == 404
        for port in (rport, eport):
            for path in ("/metrics", "/status.json", "/"):
                body = (await http_get(port, path))[1]
                assert tokens["edgeA"] not in body
        assert edge.terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        lonely.kill()
        if edge is not None:
            edge.kill()
        relay.proc.kill()


# ------------------------------------------------------------------------- status page


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: commands on fd 3, answers on fd 4, NUL-separated)."""

    def __init__(self, log: Path) -> None:
        # A short profile path: Chromium puts a unix socket in it (108-byte limit).
        self.profile = tempfile.mkdtemp(prefix="qr-chromium-")
        self._log = log.open("wb")
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        assert exe, (
            "the status page test needs Debian's chromium: apt-get install -y chromium "
            "(.ci/run installs it)"
        )
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            # bash, not sh: dash cannot redirect descriptors above 9.
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{res_w}', *args],
            pass_fds=(cmd_r, res_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        os.close(cmd_r)
        os.close(res_w)
        self._next = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._res_r, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, _, buf = buf.partition(b"\0")
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._answers[msg["id"]] = msg
                        self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        mid = self._next
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + WAIT
        with self._cond:
            while mid not in self._answers:
                left = deadline - time.monotonic()
                assert left > 0 and self._reader.is_alive(), f"chromium: no answer to {method}"
                self._cond.wait(left)
            answer = self._answers.pop(mid)
        assert "error" not in answer, answer
        return answer["result"]  # type: ignore[no-any-return]

    def open(self, url: str) -> str:
        """A new tab on ``url``; returns its session id."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session: str = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        # Answered once the navigation committed: later evaluations run in the new page.
        answer = self.call("Page.navigate", session, url=url)
        assert "errorText" not in answer, answer
        return session

    def evaluate(self, session: str, expression: str, timeout: float = WAIT) -> Any:
        """Evaluate ``expression`` (a promise is awaited) in the page."""
        result = self.call(
            "Runtime.evaluate",
            session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            timeout=int(timeout * 1000),
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(LONG)
        os.close(self._cmd_w)
        self._reader.join(LONG)
        os.close(self._res_r)
        shutil.rmtree(self.profile, ignore_errors=True)
        self._log.close()


#: Resolves once the page shows ``n`` edge rows (the page refreshes itself; this only
#: watches the DOM, with a deadline).
WAIT_ROWS = """new Promise((resolve, reject) => {
  const t0 = Date.now();
  const tick = () => {
    const rows = [...document.querySelectorAll("#edges tr.edge")];
    if (rows.length >= %d) resolve(rows.map(r => r.textContent));
    else if (Date.now() - t0 > %d) reject(new Error(document.body.innerText));
    else setTimeout(tick, 50);
  };
  tick();
})"""


async def test_status_page_in_headless_chromium(services: Services, tmp_path: Path) -> None:
    """Issue 13: the page loads in a real browser, shows the connected edge (instance,
    address, counts), and updates by itself when a second edge connects."""
    _tokens(tmp_path, ["edgeA", "edgeB"])
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo", "127.0.0.1:0=edgeB/echo"],
        extra=["--metrics", "127.0.0.1:0"],
    )
    edges: list[Proc] = []
    browser: Chromium | None = None
    try:
        port = _metrics_port(relay.proc)
        expose = [f"echo=127.0.0.1:{services.echo}"]
        edges.append(start_edge("edgeA", tmp_path / "edgeA.token", relay, expose))
        assert await echo(relay.forwards["edgeA/echo"], b"hello") == b"hello"
        browser = Chromium(tmp_path / "chromium.log")
        page = await asyncio.to_thread(browser.open, f"http://127.0.0.1:{port}/")
        ms = int(WAIT * 1000)
        rows = await asyncio.to_thread(browser.evaluate, page, WAIT_ROWS % (1, ms))
        assert len(rows) == 1 and "edgeA" in rows[0] and "127.0.0.1:" in rows[0], rows
        title = await asyncio.to_thread(browser.evaluate, page, "document.title")
        assert title == "quic-reverse status"
        forwards = await asyncio.to_thread(
            browser.evaluate,
            page,
            "[...document.querySelectorAll('#forwards tr.forward')].map(r => r.textContent)",
        )
        assert any("edgeA/echo" in f and "closed: 1" in f for f in forwards), forwards
        loaded_at = await asyncio.to_thread(browser.evaluate, page, "performance.timeOrigin")
        edges.append(start_edge("edgeB", tmp_path / "edgeB.token", relay, expose))
        rows = await asyncio.to_thread(browser.evaluate, page, WAIT_ROWS % (2, ms))
        assert sorted(r[:5] for r in rows) == ["edgeA", "edgeB"], rows
        # Same document: it updated itself, it was not reloaded.
        assert (
            await asyncio.to_thread(browser.evaluate, page, "performance.timeOrigin") == loaded_at
        )
        for proc in edges:
            assert proc.terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        if browser is not None:
            browser.close()
        for proc in edges:
            proc.kill()
        relay.proc.kill()


# ------------------------------------------------------------------------- reload


async def test_reload_on_sighup(services: Services, tmp_path: Path) -> None:
    """Issue 13 item 3: SIGHUP re-reads --config: a removed forward stops listening
    while its live connection goes on; an added forward listens; an edge whose token
    was removed is closed while the other keeps its connection; the log level changes;
    an invalid config is refused and the old one stays."""
    tokens = _tokens(tmp_path, ["edgeA", "edgeB"])
    config = tmp_path / "relay.toml"

    def write(forwards: list[str], level: str) -> None:
        config.write_text(
            f"[relay]\ntokens = 'tokens.toml'\nforward = {json.dumps(forwards)}\n"
            f"log_level = '{level}'\n",
            encoding="utf-8",
        )

    write(["127.0.0.1:0=edgeA/echo", "127.0.0.1:0=edgeB/echo"], "info")
    # Not start_relay: its --log-level flag would override the file's log_level.
    relay = _relay_proc(
        ["--self-signed", "--state-dir", str(tmp_path / "state"), "--config", str(config)]
    )
    edges: list[Proc] = []
    writer: asyncio.StreamWriter | None = None
    try:
        expose = [f"echo=127.0.0.1:{services.echo}", f"again=127.0.0.1:{services.echo}"]
        edges.append(start_edge("edgeA", tmp_path / "edgeA.token", relay, expose))
        edges.append(start_edge("edgeB", tmp_path / "edgeB.token", relay, expose))
        port_a = relay.forwards["edgeA/echo"]
        # Live connections through both forwards.
        reader, writer = await asyncio.open_connection("127.0.0.1", port_a)
        writer.write(b"before ")
        await writer.drain()
        async with asyncio.timeout(LONG):
            assert await reader.readexactly(7) == b"before "
        # Reload: forward A removed (same port must not be needed), a new forward to
        # edgeA added, edgeB's token removed, debug logging.
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        new_port = free.getsockname()[1]
        free.close()
        write([f"127.0.0.1:{new_port}=edgeA/echo"], "debug")
        _write_tokens_file(tmp_path / "tokens.toml", {"edgeA": tokens["edgeA"]})
        mark = relay.proc.mark()
        relay.proc.popen.send_signal(signal.SIGHUP)
        relay.proc.wait_for(r"configuration reloaded: 1 forward\(s\) added, 2 removed", after=mark)
        assert relay.proc.find(r"edge 'edgeB' .*token was removed or changed", after=mark)
        assert edges[1].wait_exit(WAIT) == 1  # its reconnect is rejected: it exits
        # The removed forward's live connection still works; the forward is gone.
        writer.write(b"after")
        writer.write_eof()
        async with asyncio.timeout(LONG):
            assert await reader.read() == b"after"
        with pytest.raises(OSError):
            await echo(port_a, b"x")
        assert await echo(new_port, b"new forward") == b"new forward"
        assert relay.proc.find(r" DEBUG ", after=mark), "log level not applied"
        # An invalid configuration is refused; the running one stays.
        config.write_text("[relay]\nforward = 'not a forward'\n", encoding="utf-8")
        mark = relay.proc.mark()
        relay.proc.popen.send_signal(signal.SIGHUP)
        relay.proc.wait_for(r"ERROR .*reload refused: .*stays in force", after=mark)
        assert await echo(new_port, b"still") == b"still"
        # Same address, new target: the old listener makes way for the new one.
        write([f"127.0.0.1:{new_port}=edgeA/again"], "info")
        mark = relay.proc.mark()
        relay.proc.popen.send_signal(signal.SIGHUP)
        relay.proc.wait_for(r"configuration reloaded: 1 forward\(s\) added, 1 removed", after=mark)
        assert await echo(new_port, b"again") == b"again"
        assert relay.proc.find(r"-> edgeA/again: stream \d+ opened", after=mark)
        assert not edges[0].find(r"reconnecting"), "edgeA must not have been disturbed"
        assert relay.proc.popen.poll() is None
        assert edges[0].terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        if writer is not None:
            writer.close()
        for proc in edges:
            proc.kill()
        relay.proc.kill()


async def test_edge_reload_adds_an_exposed_service(services: Services, tmp_path: Path) -> None:
    _tokens(tmp_path, ["edgeA"])
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo", "127.0.0.1:0=edgeA/later"],
    )
    config = tmp_path / "edge.toml"
    config.write_text(f"[edge]\nexpose = {{ echo = '127.0.0.1:{services.echo}' }}\n")
    edge = start_edge("edgeA", tmp_path / "edgeA.token", relay, [], extra=["--config", str(config)])
    try:
        assert await echo(relay.forwards["edgeA/later"], b"x") == b""  # not exposed yet
        config.write_text(
            f"[edge]\nexpose = {{ echo = '127.0.0.1:{services.echo}', "
            f"later = '127.0.0.1:{services.echo}' }}\n"
        )
        mark = edge.mark()
        edge.popen.send_signal(signal.SIGHUP)
        edge.wait_for(r"configuration reloaded: exposing .* \(1 added, 0 removed\)", after=mark)
        assert await echo(relay.forwards["edgeA/later"], b"now") == b"now"
        assert not edge.find(r"reconnecting")
        assert edge.terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        edge.kill()
        relay.proc.kill()


def _run(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "quic_reverse", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return done.returncode, done.stdout + done.stderr


def test_check_validates_and_exits_0_or_2(tmp_path: Path) -> None:
    _tokens(tmp_path, ["edgeA"])
    good = tmp_path / "relay.toml"
    good.write_text(
        "[relay]\nself_signed = true\ntokens = 'tokens.toml'\nforward = '127.0.0.1:0=edgeA/ssh'\n"
        "[edge]\nrelay = '127.0.0.1:4433'\nname = 'edgeA'\ntoken_file = 'edgeA.token'\n"
        "insecure = true\nexpose = { ssh = '127.0.0.1:22' }\n"
    )
    assert _run(["relay", "--check", "--config", str(good)]) == (
        0,
        "quic-reverse relay: configuration ok (1 forward(s), 1 edge token(s))\n",
    )
    assert _run(["edge", "--check", "--config", str(good)])[0] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\nself_signed = true\ntokens = 'tokens.toml'\nforward = '1=ghost/x'\n")
    code, out = _run(["relay", "--check", "--config", str(bad)])
    assert code == 2 and "edge 'ghost' has no token" in out and "Traceback" not in out
    code, out = _run(["edge", "--check", "--config", str(good), "--token-file", "missing"])
    assert code == 2 and "missing" in out


# ------------------------------------------------------------------------- auth limit


async def _bad_login(relay: RelayProc) -> str:
    """One authentication attempt with a wrong token: 'rejected' or 'refused'."""
    tls = quic.ClientTLS(alpn=(DEFAULT_ALPN,), pin_sha256=relay.fingerprint)
    conn = await quic.connect("127.0.0.1", relay.quic_port, tls=tls)
    try:
        handle = await Session(conn, Role.CLIENT, Config(negotiation_timeout=LONG)).start()
        await authenticate_to_relay(handle, "edgeA", "x" * 43, "attacker")
    except AuthRejected:
        return "rejected"
    except QuicReverseError:
        return "refused"  # closed before any protocol work
    finally:
        conn.close()
        async with asyncio.timeout(LONG):
            await conn.wait_closed()  # the client's UDP socket is released
    raise AssertionError("a wrong token was accepted")


async def test_auth_failures_rate_limited_per_address(services: Services, tmp_path: Path) -> None:
    """Issue 17 item 4: after --auth-failure-burst connections without a successful
    authentication, new connections from that address are refused at once, with one
    WARNING line; the authenticated edge (same address!) keeps working undisturbed."""
    _tokens(tmp_path, ["edgeA"])
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo"],
        extra=["--auth-failure-burst", "3", "--auth-failure-interval", "600"],
    )
    edge = start_edge("edgeA", tmp_path / "edgeA.token", relay, [f"echo=127.0.0.1:{services.echo}"])
    try:
        async with asyncio.timeout(WAIT):
            outcomes = [await _bad_login(relay) for _ in range(8)]
        assert outcomes == ["rejected"] * 3 + ["refused"] * 5
        assert (
            len(re.findall(r"authentication limit engaged for 127\.0\.0\.1", relay.proc.text)) == 1
        )
        assert len(re.findall(r"failed authentication as", relay.proc.text)) == 3
        assert await echo(relay.forwards["edgeA/echo"], b"still served") == b"still served"
        assert not edge.find(r"reconnecting|session with the relay lost")
        assert edge.terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        edge.kill()
        relay.proc.kill()


async def test_peer_triggered_log_lines_are_throttled(tmp_path: Path) -> None:
    """Issue 17 item 4: without the limit (--auth-failure-burst 0), 30 failed logins
    write at most 10 warning lines per 10 s, the 10th saying that more are suppressed."""
    _tokens(tmp_path, ["edgeA"])
    relay = start_relay(
        tmp_path / "state", tmp_path / "tokens.toml", [], extra=["--auth-failure-burst", "0"]
    )
    try:
        async with asyncio.timeout(WAIT):
            outcomes = [await _bad_login(relay) for _ in range(30)]
        assert outcomes == ["rejected"] * 30
        assert relay.proc.find(r"failed authentication as .*further lines like this suppressed")
        assert 10 <= len(re.findall(r"failed authentication as", relay.proc.text)) < 30
        assert relay.proc.terminate() == 0
    finally:
        relay.proc.kill()


# ------------------------------------------------------------------------- JSON logs


async def test_json_logs(services: Services, tmp_path: Path) -> None:
    _tokens(tmp_path, ["edgeA"])
    json_flag = ["--log-format", "json"]
    relay = _relay_proc(
        [
            "--self-signed",
            "--state-dir",
            str(tmp_path / "state"),
            "--tokens",
            str(tmp_path / "tokens.toml"),
            "--forward",
            "127.0.0.1:0=edgeA/echo",
            *json_flag,
        ]
    )
    edge = start_edge(
        "edgeA",
        tmp_path / "edgeA.token",
        relay,
        [f"echo=127.0.0.1:{services.echo}"],
        extra=json_flag,
    )
    try:
        assert await echo(relay.forwards["edgeA/echo"], b"12345") == b"12345"
        relay.proc.wait_for(r'"bytes_down": 5')
        edge.wait_for(r'"bytes_up": 5')
        assert relay.proc.terminate() == 0
        assert edge.terminate() == 0
    finally:
        edge.kill()
        relay.proc.kill()
    for proc in (relay.proc, edge):
        lines = [ln for ln in proc.lines if not ln.startswith("relay certificate")]
        objs = [json.loads(line) for line in lines]  # every line is one JSON object
        assert objs and all({"time", "level", "logger", "message"} <= o.keys() for o in objs)
    closed = [json.loads(ln) for ln in relay.proc.lines if '"bytes_up"' in ln]
    assert closed[0]["edge"] == "edgeA" and closed[0]["service"] == "echo"
    assert closed[0]["bytes_up"] == 5 and isinstance(closed[0]["stream"], int)
    assert closed[0]["client"].startswith("127.0.0.1:") and closed[0]["duration"] >= 0


# ------------------------------------------------------------------------- PROXY v2


async def test_proxy_protocol_v2_reaches_the_service(tmp_path: Path) -> None:
    """Issue 13 item 5: with --proxy-protocol the local service first reads a PROXY v2
    header (parsed here from the specification) naming the relay's real TCP client and
    the forward it came in on; then the client's bytes."""
    _tokens(tmp_path, ["edgeA"])
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.put_nowait(await reader.read())
        writer.close()

    server = await asyncio.start_server(service, "127.0.0.1", 0)
    sport = server.sockets[0].getsockname()[1]
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/web", "127.0.0.1:0=edgeA/plain"],
    )
    edge = start_edge(
        "edgeA",
        tmp_path / "edgeA.token",
        relay,
        [f"web=127.0.0.1:{sport}", f"plain=127.0.0.1:{sport}"],
        extra=["--proxy-protocol", "web"],
    )
    try:
        fport = relay.forwards["edgeA/web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", fport)
        client = writer.get_extra_info("sockname")
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        writer.write_eof()
        async with asyncio.timeout(LONG):
            data = await got.get()
            await reader.read()
        writer.close()
        fields, n = parse_proxy_v2(data)
        assert fields == {
            "command": "PROXY",
            "src": ("127.0.0.1", client[1]),
            "dst": ("127.0.0.1", fport),
        }
        assert data[n:] == b"GET / HTTP/1.0\r\n\r\n"
        # A service without the option gets the bytes alone.
        assert await echo(relay.forwards["edgeA/plain"], b"raw") == b""
        async with asyncio.timeout(LONG):
            assert await got.get() == b"raw"
        assert edge.terminate() == 0
        assert relay.proc.terminate() == 0
    finally:
        edge.kill()
        relay.proc.kill()
        server.close()


# ------------------------------------------------------------------------- cert, env token


async def test_cert_command_and_token_from_environment(services: Services, tmp_path: Path) -> None:
    """Issue 13 items 6 and 7: `quic-reverse cert` makes a CA and relay certificate the
    edge verifies with --ca; the edge reads its token from $QUIC_REVERSE_TOKEN and never
    logs it (debug level)."""
    tokens = _tokens(tmp_path, ["edgeA"])
    code, out = _run(
        ["cert", "--dir", str(tmp_path / "pki"), "--name", "localhost", "--ip", "127.0.0.1"]
    )
    assert code == 0, out
    pki = tmp_path / "pki"
    relay = Proc(
        "relay",
        [
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(pki / "relay.crt"),
            "--key",
            str(pki / "relay.key"),
            "--tokens",
            str(tmp_path / "tokens.toml"),
            "--forward",
            "127.0.0.1:0=edgeA/echo",
        ],
    )
    edge: Proc | None = None
    try:
        qport = relay.wait_for(r"listening for edges on [\d.]+:(\d+)").group(1)
        fport = int(relay.wait_for(r"forward [\d.]+:(\d+) -> edgeA/echo").group(1))
        os.environ["QUIC_REVERSE_TOKEN"] = tokens["edgeA"]
        try:
            edge = Proc(
                "edge",
                [
                    "edge",
                    "--relay",
                    f"127.0.0.1:{qport}",
                    "--name",
                    "edgeA",
                    "--ca",
                    str(pki / "ca.pem"),
                    "--server-name",
                    "localhost",
                    "--expose",
                    f"echo=127.0.0.1:{services.echo}",
                    "--log-level",
                    "debug",
                ],
            )
        finally:
            del os.environ["QUIC_REVERSE_TOKEN"]
        edge.wait_for(r"authenticated to relay")
        assert await echo(fport, b"pki") == b"pki"
        assert edge.terminate() == 0
        assert relay.terminate() == 0
    finally:
        if edge is not None:
            edge.kill()
        relay.kill()
    assert edge is not None and tokens["edgeA"] not in edge.text
    code, out = _run(
        [
            "edge",
            "--relay",
            "127.0.0.1:1",
            "--name",
            "edgeA",
            "--insecure",
            "--expose",
            "a=127.0.0.1:1",
            "--check",
        ]
    )
    assert code == 2 and "QUIC_REVERSE_TOKEN" in out


# ------------------------------------------------------------------------- systemd


def test_systemd_notify_ready_reloading_stopping(tmp_path: Path) -> None:
    _tokens(tmp_path, ["edgeA"])
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(WAIT)
    os.environ["NOTIFY_SOCKET"] = str(path)
    try:
        relay = start_relay(tmp_path / "state", tmp_path / "tokens.toml", [])
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
        relay.proc.popen.send_signal(signal.SIGHUP)
        assert sock.recv(4096).split(b"\n")[0] == b"RELOADING=1"
        assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
        relay.proc.popen.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert relay.proc.wait_exit(WAIT) == 0
    finally:
        relay.proc.kill()
        sock.close()


# ------------------------------------------------------------------------- systemd units

UNITS = ROOT / "deploy" / "systemd"


def _exec_start(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def test_systemd_units_start_commands_check_ok(tmp_path: Path) -> None:
    """The units' ExecStart lines are valid command lines (run with --check against the
    files the units expect), and `systemd-analyze verify` accepts the units."""
    etc, creds = tmp_path / "etc", tmp_path / "credentials"
    etc.mkdir()
    creds.mkdir()
    tokens = _tokens(creds, ["edgeA"])
    (creds / "edge.token").write_text(tokens["edgeA"])
    code, out = _run(["cert", "--dir", str(creds), "--name", "relay.example.com"])
    assert code == 0, out
    (etc / "relay.toml").write_text("[relay]\nforward = ['127.0.0.1:2222=edgeA/ssh']\n")
    (etc / "edge.toml").write_text(
        f"[edge]\nrelay = 'relay.example.com:4433'\nname = 'edgeA'\nca = '{creds}/ca.pem'\n"
        "server_name = 'relay.example.com'\nexpose = { ssh = '127.0.0.1:22' }\n"
    )
    for name in ("quic-reverse-relay.service", "quic-reverse-edge.service"):
        argv = _exec_start(UNITS / name)
        assert argv[0] == "/usr/local/bin/quic-reverse"
        args = [
            a.replace("${CREDENTIALS_DIRECTORY}", str(creds)).replace("/etc/quic-reverse", str(etc))
            for a in argv[1:]
        ]
        code, out = _run([*args, "--check"])
        assert code == 0 and "configuration ok" in out, (name, out)
        text = (UNITS / name).read_text()
        for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"):
            assert line in text, (name, line)
        analyze = shutil.which("systemd-analyze")
        if analyze is not None:  # Debian's systemd package; the unit must also load there
            exe = Path(sys.executable).with_name("quic-reverse")
            unit = tmp_path / name
            unit.write_text(text.replace("/usr/local/bin/quic-reverse", str(exe)))
            done = subprocess.run(
                [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=WAIT
            )
            assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------- docs examples


def _doc_examples() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "TUNNEL.md").read_text()
    return re.findall(r"<!-- test: ([\w-]+) -->\n```sh\n(.*?)```", text, re.S)


def test_docs_operations_examples_run(tmp_path: Path) -> None:
    """Every `<!-- test: ... -->` shell example of docs/TUNNEL.md's Operations section
    runs as written, in order, in one directory (only the port numbers are changed to
    free ones; `quic-reverse` is this checkout's console script)."""
    examples = _doc_examples()
    assert [name for name, _ in examples] == ["ops-check", "ops-run", "ops-reload", "ops-cert"]
    ports: dict[str, str] = {}
    for literal in ("4433", "9100", "9101", "2222", "2223"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[literal] = str(s.getsockname()[1])
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("QUIC_REVERSE_TOKEN", None)
    script = "set -euo pipefail\n" + "\n".join(body for _, body in examples)
    script = re.sub(r"\b(4433|9100|9101|2222|2223)\b", lambda m: ports[m.group(1)], script)
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the examples' background relay and edge: one group
    )
    try:
        out, _ = shell.communicate(timeout=WAIT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # whatever an example left running
        shell.wait(LONG)
    assert shell.returncode == 0, out
    assert "configuration ok (1 forward(s), 1 edge token(s))" in out
    assert 'quic_reverse_edges_connected{edge="edgeA"} 1.0' in out
    assert "configuration reloaded: 1 forward(s) added, 1 removed" in out
    token = (tmp_path / "edgeA.token").read_text().strip()
    for log in ("relay.log", "edge.log"):
        assert token not in (tmp_path / log).read_text()
    assert oct((tmp_path / "pki" / "relay.key").stat().st_mode & 0o777) == "0o600"
