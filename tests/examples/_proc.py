"""Run the example scripts as real subprocesses, with bounded waits and guaranteed cleanup.

Servers are started with ``--port 0`` and report the port they bound in their ready line
(``listening on HOST:PORT``), so tests never guess a free port. Every wait has a
deadline; a server that is still running at teardown is interrupted (SIGINT, like
Ctrl-C) and killed if it does not stop in time.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.support.timing import LONG, MS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
READY = re.compile(r"^listening on (?P<host>\S+):(?P<port>\d+)$")

#: Bounds on a whole child process (each starts an interpreter and a QUIC stack).
STARTUP_TIMEOUT = 3 * LONG
RUN_TIMEOUT = 6 * LONG
STOP_TIMEOUT = 15_000 * MS
#: ``--timeout`` for a client that must give up on an address nobody answers on.
NO_ANSWER_TIMEOUT = 1_000 * MS


def script(name: str) -> str:
    """Absolute path of an example script."""
    return str(EXAMPLES / name)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (for "nobody listens here" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_example(
    name: str,
    *args: str,
    timeout: float = RUN_TIMEOUT,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` to completion (bounded by ``timeout``) and capture its output."""
    return subprocess.run(
        [sys.executable, script(name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )


@dataclass
class Server:
    """A running server subprocess and what it printed so far."""

    proc: subprocess.Popen[bytes]
    port: int
    stdout_lines: list[str]
    _stderr: IO[bytes]
    _buffer: bytearray = field(default_factory=bytearray)

    def stop(
        self, sig: signal.Signals = signal.SIGINT, timeout: float = STOP_TIMEOUT
    ) -> tuple[int, str, str]:
        """Signal the server, wait (bounded) for it to exit; return (status, stdout, stderr).

        ``stdout`` is everything the server printed, including the lines read while
        waiting for it to become ready. A server that does not exit in time is killed
        and reported with status ``-9``.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
        """Wait (bounded) for the server to exit on its own; kill it if it does not."""
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        stdout = "".join(line + "\n" for line in self.stdout_lines)
        stdout += (bytes(self._buffer) + rest).decode(errors="replace")
        self._buffer.clear()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        return self.proc.returncode, stdout, stderr

    def kill(self) -> None:
        """Last-resort cleanup: make sure the process is gone (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
        for stream in (self.proc.stdout, self._stderr):
            if stream is not None and not stream.closed:
                stream.close()


def start_server(name: str, *args: str, timeout: float = STARTUP_TIMEOUT) -> Server:
    """Start ``examples/<name> --port 0 *args`` and wait (bounded) for its ready line."""
    return start_process([sys.executable, script(name), "--port", "0", *args], timeout=timeout)


def start_process(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    ready: re.Pattern[str] | None = READY,
    timeout: float = STARTUP_TIMEOUT,
) -> Server:
    """Start ``argv`` and wait (bounded) until it prints a line matching ``ready``.

    ``ready`` defaults to ``listening on HOST:PORT``; if the pattern has a ``port``
    group, the server's ``port`` is taken from it (else it is 0). ``ready=None``
    returns at once, for a process that prints nothing to wait for.
    """
    name = Path(argv[1]).name if len(argv) > 1 else argv[0]
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Server.wait()/kill()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, cwd=cwd, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    buffer = bytearray()
    if ready is None:
        return Server(proc, 0, lines, stderr, buffer)
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # the server exited before it was ready
            buffer += chunk
            while (newline := buffer.find(b"\n")) >= 0:
                line = buffer[:newline].decode(errors="replace").rstrip("\r")
                del buffer[: newline + 1]
                lines.append(line)
                if match := ready.match(line):
                    port = int(match["port"]) if "port" in ready.groupindex else 0
                    return Server(proc, port, lines, stderr, buffer)
    server = Server(proc, 0, lines, stderr, buffer)
    status, out, err = server.stop(signal.SIGKILL)
    raise AssertionError(
        f"{name} did not print its ready line within {timeout} s (status {status})\n"
        f"stdout:\n{out}\nstderr:\n{err}"
    )
