"""The README tells the truth: its code runs, its commands exist, its tables match the code.

* Every ``python`` block compiles; the ``server.py``/``client.py`` pair is extracted and
  run as real subprocesses over QUIC on 127.0.0.1 (on a free port); the low-level
  ``process_message()`` snippet runs against a real peer session (in-memory transport).
* The quick start is exactly ``make demo`` and ``make test``; ``make demo`` runs
  ``examples/demo.py`` (run for real in ``tests/examples``); CI (``.ci/run``) runs
  ``make test``. The by-hand commands that follow run as written (plus a free
  ``--port`` and a private temp dir).
* The tunnel section runs as written in a directory holding only ``.venv/``: the
  token step, the relay and the edge carry a TCP connection to a local service; in a
  fresh clone (no ``.venv/`` yet) the token step fails without leaving a file behind.
* The configuration table lists every ``Config`` field with its real default.
* The tunnel's relay and edge commands are ones ``docs/TUNNEL.md`` documents.
* Every relative link points to a file that exists.

Tests that start processes are marked ``subprocess``; the rest run in ``make test-fast``.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quic_reverse import CloseCode, Config, Metadata, Role, Session, Stream, StreamRejected
from quic_reverse.transport.memory import connection_pair

from .examples._proc import RUN_TIMEOUT, Server, free_udp_port, start_process
from .support.timing import LONG, MS, SHORT

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme() -> str:
    """The README's text."""
    return README.read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    return [body for lang, body in FENCE.findall(readme()) if lang == language]


def section(title: str) -> str:
    """The text of the README section ``## title`` (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme(), re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def snippet(first_line_prefix: str) -> str:
    """The python block whose first line starts with ``first_line_prefix``."""
    found = [b for b in blocks("python") if b.startswith(first_line_prefix)]
    assert len(found) == 1, f"expected one python block starting with {first_line_prefix!r}"
    return found[0]


def test_python_blocks_compile() -> None:
    """Every python block is valid Python (fragments may use top-level ``await``)."""
    python = blocks("python")
    assert len(python) >= 4
    for index, body in enumerate(python):
        compile(body, f"README.md python block {index}", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.subprocess
def test_server_and_client_snippets_run(tmp_path: Path) -> None:
    """The README's server.py and client.py, copied verbatim, print HELLO WORLD."""
    port = free_udp_port()
    sources = {}
    for name in ("server.py", "client.py"):
        body = snippet(f"# {name}:")
        assert body.count("PORT = 4433\n") == 1
        sources[name] = body.replace("PORT = 4433\n", f"PORT = {port}\n")
        (tmp_path / name).write_text(sources[name], encoding="utf-8")

    server = start_process([sys.executable, "server.py"], cwd=tmp_path)
    try:
        assert server.port == port
        client = subprocess.run(
            [sys.executable, "client.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout == "HELLO WORLD\n"
        status, _, err = server.stop()  # Ctrl-C: the snippet exits quietly
        assert status == 0, err
    finally:
        server.kill()


def make_dry_run(target: str) -> list[str]:
    """The commands ``make <target>`` would run, without running them (``make -n``)."""
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.subprocess
def test_quick_start_is_make_demo_and_make_test() -> None:
    """The two quick-start commands, what they run, and that CI runs the test command."""
    quick = section("Quick start")
    commands = [
        line.split("#")[0].strip()
        for body in FENCE.findall(quick)
        if body[0] == "sh"
        for line in body[1].splitlines()
    ]
    assert commands[:2] == ["make demo", "make test"]

    # What make would run (dry run: nothing is executed, the venv is never touched).
    # The last commands are the targets' own; any before them set up .venv/.
    demo = make_dry_run("demo")
    assert demo[-1] == ".venv/bin/python examples/demo.py"  # run for real in tests/examples
    test = make_dry_run("test")
    assert [line.split()[-1] for line in test[-5:]] == [
        "docs/build_api.py",
        "docs/build_api.py",
        "mypy",
        "build/api",  # the API reference (docs/build_api.py), warnings as errors
        "pytest",
    ]
    assert "-m ruff check" in test[-5] and "-m ruff format --check" in test[-4]
    assert "-W error docs/build_api.py" in test[-2]

    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
    assert (ROOT / "examples" / "demo.py").is_file()


def test_configuration_table_matches_config() -> None:
    """Every Config field is in the table, with its actual default."""
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section("Configuration"), re.MULTILINE)
    table = dict(rows)
    defaults = Config()
    fields = [f.name for f in dataclasses.fields(Config)]
    assert sorted(table) == sorted(fields)
    for name in fields:
        actual = getattr(defaults, name)
        text = table[name]
        if name == "features":
            assert text == f"Features({int(actual)})"
        else:
            assert ast.literal_eval(text) == actual, name


def sh_commands(text: str) -> list[str]:
    """The commands in ``text``'s sh blocks, one per entry: comments dropped,
    backslash continuations joined, blank lines left out."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang != "sh":
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = " ".join(line.split(" #")[0].split())
            if line:
                commands.append(line)
    return commands


def shell_commands(text: str) -> list[str]:
    """The ``quic-reverse ...`` commands in ``text``'s sh blocks (a ``.venv/bin/``
    prefix removed), continuations joined."""
    commands = [c.removeprefix(".venv/bin/") for c in sh_commands(text)]
    return [c for c in commands if c.startswith("quic-reverse ")]


def test_tunnel_commands_match_tunnel_doc() -> None:
    """The README's relay and edge commands are exactly commands docs/TUNNEL.md documents."""
    documented = shell_commands((ROOT / "docs" / "TUNNEL.md").read_text(encoding="utf-8"))
    commands = [
        c
        for c in shell_commands(section("The tunnel tool"))
        if c.startswith(("quic-reverse relay ", "quic-reverse edge "))
    ]
    assert any(c.startswith("quic-reverse relay ") for c in commands), commands
    assert any(c.startswith("quic-reverse edge ") for c in commands), commands
    for command in commands:
        assert command in documented, f"README tunnel command not in docs/TUNNEL.md: {command}"


def tunnel_steps() -> tuple[str, str, str]:
    """The tunnel section's three commands: (token step, relay, edge)."""
    commands = sh_commands(section("The tunnel tool"))
    assert len(commands) == 3, commands
    token, relay, edge = commands
    assert "quic-reverse token" in token
    assert relay.startswith(".venv/bin/quic-reverse relay ")
    assert edge.startswith(".venv/bin/quic-reverse edge ")
    return token, relay, edge


@pytest.mark.subprocess
def test_tunnel_token_step_in_a_fresh_clone_leaves_no_file(tmp_path: Path) -> None:
    """Before ``.venv/`` exists the token step fails (no such command) and writes
    nothing: no empty token file or tokens.toml is left behind."""
    token, _, _ = tunnel_steps()
    result = subprocess.run(
        ["sh", "-c", token],
        cwd=tmp_path,
        env={**os.environ, "PATH": os.defpath},  # quic-reverse is on no PATH either
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class _Echo(socketserver.BaseRequestHandler):
    """The stand-in for sshd: sends back every byte it gets."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def local_service() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (the edge's "sshd"); yields its port."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join(LONG)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def echo_through(port: int, payload: bytes, timeout: float) -> bytes:
    """Connect to ``port``, send ``payload``, half-close, return all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.subprocess
def test_tunnel_section_runs_as_written(tmp_path: Path, local_service: int) -> None:
    """In a directory holding only ``.venv/`` (as a clone after ``make demo``), the token
    step, the relay and the edge run as written (ports made free, the printed
    fingerprint pasted in) and a TCP connection to the forward reaches the service."""
    token, relay_cmd, edge_cmd = tunnel_steps()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    console_script = Path(sys.executable).parent / "quic-reverse"
    assert console_script.is_file(), "run the tests in the project's virtualenv (make test)"
    (bin_dir / "quic-reverse").symlink_to(console_script)

    subprocess.run(["sh", "-c", token], cwd=tmp_path, timeout=RUN_TIMEOUT, check=True)
    for name in ("edgeA.token", "tokens.toml"):
        assert (tmp_path / name).stat().st_size > 0, name
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"

    quic, forward = free_udp_port(), free_tcp_port()

    def local(command: str) -> list[str]:
        command = command.replace("127.0.0.1:4433", f"127.0.0.1:{quic}")
        command = command.replace("127.0.0.1:2222", f"127.0.0.1:{forward}")
        command = re.sub(r"127\.0\.0\.1:22\b", f"127.0.0.1:{local_service}", command)
        return ["sh", "-c", f"exec {command}"]

    fingerprint = re.compile(r"^relay certificate sha256 fingerprint: (?P<fp>[0-9a-f:]+)$")
    relay = start_process(local(relay_cmd), cwd=tmp_path, ready=fingerprint)
    edge: Server | None = None
    try:
        match = fingerprint.match(relay.stdout_lines[-1])
        assert match, relay.stdout_lines
        assert edge_cmd.count("3f9c...e1") == 1
        edge = start_process(
            local(edge_cmd.replace("3f9c...e1", match["fp"])),
            cwd=tmp_path,
            ready=None,  # the edge logs to stderr; the tunnel carrying is what we wait for
        )
        # The edge connects and authenticates in the background: try until it carries.
        reply = b""
        for _attempt in range(int(LONG / (100 * MS))):
            try:
                reply = echo_through(forward, b"ssh-2.0 hello", SHORT)
            except OSError:
                reply = b""
            if reply:
                break
            assert edge.proc.poll() is None, edge.stop()
            threading.Event().wait(100 * MS)
        assert reply == b"ssh-2.0 hello"
    finally:
        results = [relay.stop(signal.SIGINT)]
        if edge is not None:
            results.append(edge.stop(signal.SIGINT))
        relay.kill()
        if edge is not None:
            edge.kill()
    for status, out, err in results:
        assert status == 0, out + err
        assert "Traceback" not in err


def quick_start_pairs() -> list[tuple[str, str]]:
    """The quick start's by-hand (server, client) command pairs, after ``make ...``."""
    commands = [c for c in sh_commands(section("Quick start")) if not c.startswith("make ")]
    assert len(commands) == 4, commands
    return [(commands[0], commands[1]), (commands[2], commands[3])]


@pytest.mark.subprocess
@pytest.mark.parametrize("pair", [0, 1], ids=["echo", "relay-edge"])
def test_quick_start_by_hand_runs_as_written(pair: int, tmp_path: Path) -> None:
    """The two-terminal commands of the quick start, as written (plus ``--port`` on a free
    port and a private temp dir for the development certificates): the client side
    prints what the README says and exits 0."""
    server_cmd, client_cmd = quick_start_pairs()[pair]
    port = free_udp_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the examples' certificates go here

    def argv(command: str) -> list[str]:
        words = command.split()
        assert words[0] == ".venv/bin/python", command
        # The rest as written; the shell quoting of "Hello World" undone as sh would.
        rest = re.findall(r'"[^"]*"|\S+', command)[1:]
        return [sys.executable, *(w.strip('"') for w in rest), "--port", str(port)]

    server = start_process(argv(server_cmd), cwd=ROOT, env=env)
    try:
        client = subprocess.run(
            argv(client_cmd),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        status, out, err = server.stop(signal.SIGINT)
    finally:
        server.kill()
    assert client.returncode == 0, client.stdout + client.stderr
    if pair == 0:
        assert client.stdout == "HELLO WORLD\n"  # what the README's comment promises
    else:
        assert "relay closed the session" in client.stdout
        assert "foobar: rejected as expected" in out
    assert status == 0, out + err
    assert "Traceback" not in client.stderr + err


async def test_low_level_snippet_runs() -> None:
    """The README's ``process_message()`` loop, run as written on a server session: it
    accepts ``ssh``, rejects anything else, pings, and ends cleanly when the peer
    closes (it used to ``ping()`` after the close, which raises)."""
    body = snippet("from quic_reverse import CloseReceived")
    code = compile(body, "README low-level snippet", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    piped: list[bytes] = []

    async def pipe_to_sshd(stream: Stream) -> None:
        async with stream:
            piped.append(await stream.read())
            await stream.write_eof()

    async def peer(client_conn: Any) -> None:
        session = Session(client_conn, Role.CLIENT, Config())
        async with await session.start() as handle:
            async with await handle.open("ssh", Metadata.EMPTY) as stream:
                stream.write(b"hi sshd")
                await stream.write_eof()
                assert await stream.read() == b""
            with pytest.raises(StreamRejected):
                await handle.open("telnet", Metadata.EMPTY)
            await handle.close(CloseCode.NORMAL, "done")

    client_conn, server_conn = connection_pair()
    async with asyncio.timeout(LONG):
        peer_task = asyncio.create_task(peer(client_conn))
        server = await Session(server_conn, Role.SERVER, Config()).start()
        namespace: dict[str, Any] = {
            "asyncio": asyncio,
            "handle": server,
            "pipe_to_sshd": pipe_to_sshd,
        }
        result = eval(code, namespace)  # a coroutine: the snippet awaits at top level
        assert asyncio.iscoroutine(result)
        await asyncio.gather(result, peer_task)
        await server.close()
    assert piped == [b"hi sshd"]
    assert isinstance(namespace["rtt"], float) and namespace["rtt"] >= 0


@pytest.mark.parametrize("doc", ["README.md", "examples/README.md", "docs/ARCHITECTURE.md"])
def test_relative_links_exist(doc: str) -> None:
    """Every relative link in the document points to an existing file."""
    path = ROOT / doc
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    relative = [target for target in links if not re.match(r"^[a-z]+://", target)]
    assert relative, f"{doc}: no relative links found (is the pattern still right?)"
    for target in relative:
        assert (path.parent / target).exists(), f"{doc} links to missing {target}"
