"""Subprocess harness for the tunnel tests: start ``python -m quic_reverse relay|edge``,
watch their logs for "ready" lines, and always stop them.

Startup is detected by reading log lines (never by sleeping): every wait has a
deadline, and a process that exits while we wait fails the test with its log tail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..support.timing import MS

ROOT = Path(__file__).resolve().parents[2]
STARTUP = 20_000 * MS  # generous for a loaded 2-core CI machine
AUTH_TIMEOUT = 3_000 * MS  # the relays' --auth-timeout


class Proc:
    """A child process whose stdout+stderr lines are collected by reader threads."""

    def __init__(self, name: str, args: Sequence[str], *, module: str = "quic_reverse") -> None:
        self._start(name, [sys.executable, "-m", module, *args])

    def _start(self, name: str, command: Sequence[str]) -> None:
        """Run ``command`` with reader threads collecting its lines (subclasses call this
        with a command of their own, e.g. wrapped in ``ip netns exec``)."""
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._threads = [
            threading.Thread(target=self._pump, args=(s,), daemon=True)
            for s in (self.popen.stdout, self.popen.stderr)
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: object) -> None:
        assert stream is not None
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """Index to pass as ``after=`` to wait only for lines logged from now on."""
        with self._cond:
            return len(self.lines)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def find(self, pattern: str, *, after: int = 0) -> re.Match[str] | None:
        rx = re.compile(pattern)
        with self._cond:
            for line in self.lines[after:]:
                m = rx.search(line)
                if m:
                    return m
        return None

    def wait_for(self, pattern: str, *, timeout: float = STARTUP, after: int = 0) -> re.Match[str]:
        """Block until a line matching ``pattern`` appears (or fail with the log tail)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = after
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                exited = self.popen.poll() is not None and not any(
                    t.is_alive() for t in self._threads
                )
                if remaining <= 0 or exited:
                    why = "exited" if exited else f"no match within {timeout:.0f}s"
                    raise AssertionError(
                        f"{self.name}: {why} waiting for /{pattern}/; log tail:\n{self.tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s; log tail:\n{self.tail()}"
            ) from None

    def terminate(self, timeout: float = 15_000 * MS) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} ignored SIGTERM; log tail:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        for t in self._threads:
            t.join(5)
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def managed(*procs: Proc) -> Iterator[None]:
    """Kill the given processes on exit, whatever happened."""
    try:
        yield
    finally:
        for p in procs:
            p.kill()


@dataclass
class Services:
    """The local TCP services process (echo + count)."""

    proc: Proc
    echo: int
    count: int


def start_services() -> Services:
    proc = Proc("services", [], module="tests.tunnel._services")
    m = proc.wait_for(r"ready echo=(\d+) count=(\d+)")
    return Services(proc=proc, echo=int(m.group(1)), count=int(m.group(2)))


@dataclass
class RelayProc:
    proc: Proc
    quic_port: int
    fingerprint: str
    forwards: dict[str, int]  # "edge/service" -> TCP port


def start_relay(
    state: Path,
    tokens: Path,
    forwards: Sequence[str],
    *,
    listen: str = "127.0.0.1:0",
    extra: Sequence[str] = (),
) -> RelayProc:
    args = [
        "relay",
        "--listen",
        listen,
        "--self-signed",
        "--state-dir",
        str(state),
        "--tokens",
        str(tokens),
        "--auth-timeout",
        str(AUTH_TIMEOUT),
        "--open-timeout",
        "5",
        "--grace",
        "2",
        "--ping-interval",
        "2",
        "--ping-timeout",
        "3",
        "--log-level",
        "info",
        *extra,
    ]
    for f in forwards:
        args += ["--forward", f]
    proc = Proc("relay", args)
    try:
        proc.wait_for(r"relay ready")
        fp = proc.wait_for(r"fingerprint: ([0-9a-f]{64})").group(1)
        port = int(proc.wait_for(r"listening for edges on [\d.]+:(\d+)").group(1))
    except BaseException:
        proc.kill()
        raise
    fwd: dict[str, int] = {}
    for line in proc.text.splitlines():
        m = re.search(r"forward [\d.]+:(\d+) -> (\S+)$", line)
        if m:
            fwd[m.group(2)] = int(m.group(1))
    return RelayProc(proc=proc, quic_port=port, fingerprint=fp, forwards=fwd)


def start_edge(
    name: str,
    token_file: Path,
    relay: RelayProc,
    expose: Sequence[str],
    *,
    wait: bool = True,
    extra: Sequence[str] = (),
) -> Proc:
    args = [
        "edge",
        "--relay",
        f"127.0.0.1:{relay.quic_port}",
        "--name",
        name,
        "--token-file",
        str(token_file),
        "--fingerprint",
        relay.fingerprint,
        "--ping-interval",
        "1",
        "--ping-timeout",
        "2",
        "--connect-timeout",
        "2",
        "--backoff-initial",
        "0.2",
        "--backoff-cap",
        "1",
        *extra,
    ]
    for e in expose:
        args += ["--expose", e]
    proc = Proc(f"edge {name}", args)
    if wait:
        try:
            proc.wait_for(r"authenticated to relay")
        except BaseException:
            proc.kill()
            raise
    return proc
