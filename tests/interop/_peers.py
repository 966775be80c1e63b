"""Peer processes for the interop tests: Rust binaries and Python examples side by side.

A :class:`Peer` is a subprocess in its own process group whose stdout and stderr are
read line by line by two threads, so a test can wait (bounded, event-driven) for a line
that matches a pattern while the process keeps running, then for its exit, and always
gets everything it printed in the assertion message. :class:`Peers` starts them and,
at the end of the test, stops every one still running (SIGINT, SIGTERM, then SIGKILL
to the whole group) -- the Rust relay example, for one, never exits by itself.

Every process of one test shares one private ``TMPDIR``: that is where the Rust relay
writes ``quic-reverse-relay.der`` and where both edges look for it, so tests never
see each other's certificates.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from tests.support.timing import LONG, MS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
#: The Rust examples log through ``tracing`` with colours that no option turns off.
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: Python example servers (and the Rust ``interop echo-server``) print this when ready.
READY = re.compile(r"^listening on (?P<host>[\d.]+):(?P<port>\d+)\b")

STOP_GRACE = 2_000 * MS


class Peer:
    """One running process and the lines it printed so far (ANSI colours removed)."""

    def __init__(self, label: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.label = label
        self.argv = list(argv)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = 0
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(s, sink), daemon=True)
            for s, sink in (
                (self.proc.stdout, self.stdout_lines),
                (self.proc.stderr, self.stderr_lines),
            )
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[bytes], sink: list[str]) -> None:
        with stream:
            for raw in stream:
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\r\n")
                with self._changed:
                    sink.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._eof += 1
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(line + "\n" for line in self.stdout_lines)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(line + "\n" for line in self.stderr_lines)

    def report(self) -> str:
        """Everything the process printed, for an assertion message."""
        status = self.proc.poll()
        return (
            f"--- {self.label} (status {'running' if status is None else status}): "
            f"{' '.join(self.argv)}\n"
            f"stdout:\n{self.stdout}stderr:\n{self.stderr}"
        )

    def wait_for(self, pattern: re.Pattern[str], timeout: float = LONG) -> re.Match[str]:
        """The first stdout line matching ``pattern``, waiting at most ``timeout`` s.

        Fails (with everything printed so far) if the process closes its output or the
        time is up first.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.stdout_lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.stdout_lines)
                remaining = deadline - time.monotonic()
                if self._eof == len(self._readers) or remaining <= 0:
                    break
                self._changed.wait(remaining)
        why = (
            "exited"
            if self._eof == len(self._readers)
            else f"printed nothing else in {timeout:g} s"
        )
        raise AssertionError(
            f"{self.label} {why} before a line matching {pattern.pattern!r}\n{self.report()}"
        )

    def wait(self, timeout: float = LONG) -> int:
        """Wait (bounded) for the process to exit and its output to be read; its status."""
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"{self.label} did not exit within {timeout:g} s\n{self.report()}"
            ) from None
        for reader in self._readers:
            reader.join(timeout)
        return status

    def stop(self) -> int:
        """Stop the process group (SIGINT, SIGTERM, SIGKILL); idempotent; the exit status."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_GRACE)
        status = self.proc.wait()
        # The leader is gone; anything it left behind in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for reader in self._readers:
            reader.join(STOP_GRACE)
        return status


class Peers:
    """Starts the processes of one test, all with the same private ``TMPDIR``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ)
        self.env.update(TMPDIR=str(tmp), NO_COLOR="1", RUST_BACKTRACE="1")
        self.started: list[Peer] = []

    def start(self, label: str, argv: Sequence[str]) -> Peer:
        peer = Peer(label, argv, self.env, self.tmp)
        self.started.append(peer)
        return peer

    def python(self, script: str, *args: str) -> Peer:
        """``examples/<script> *args`` with this interpreter."""
        return self.start(script, [sys.executable, str(EXAMPLES / script), *args])

    def report(self) -> str:
        return "\n".join(peer.report() for peer in self.started)

    def stop_all(self) -> None:
        for peer in self.started:
            peer.stop()
