"""The one-command demo behind ``make demo``: echo server and client, end to end.

Starts ``echo_server.py`` as a child process on a free UDP port of 127.0.0.1 (or
``--host``/``--port``) with a fresh development certificate in a temporary directory,
waits until it prints its ready line, runs ``echo_client.py echo/uppercase "Hello
World"`` against it (which prints ``HELLO WORLD``), stops the server with SIGINT and
exits with the client's status. Both children run with the same Python as this script.

This is exactly what you would do by hand in two terminals::

    python examples/echo_server.py
    python examples/echo_client.py echo/uppercase "Hello World"
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
from pathlib import Path

from _common import CERT_NAME, DEFAULT_HOST, run

HERE = Path(__file__).resolve().parent
READY = re.compile(rb"^listening on (\S+):(\d+)\s*$")
STARTUP_TIMEOUT = 30.0
CLIENT_TIMEOUT = 30.0


async def wait_ready(server: asyncio.subprocess.Process) -> int:
    """Read the server's stdout until its ready line; return the port it listens on."""
    assert server.stdout is not None
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while line := await server.stdout.readline():
            if match := READY.match(line):
                return int(match.group(2))
    raise RuntimeError("echo_server.py exited before it was ready")


async def stop(server: asyncio.subprocess.Process) -> None:
    """Ask the server to stop (SIGINT, like Ctrl-C); kill it if it does not within 10 s."""
    if server.returncode is None:
        server.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(server.wait(), timeout=10)
        except TimeoutError:
            server.kill()
            await server.wait()


async def main(args: argparse.Namespace) -> int:
    """Server up, client run, server down; return the client's exit status."""
    extra = ["-v"] if args.verbose else []
    with tempfile.TemporaryDirectory(prefix="quic-reverse-demo-") as tmp:
        print("starting examples/echo_server.py ...", flush=True)
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "echo_server.py"),
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--cert-dir",
            tmp,
            *extra,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            try:
                port = await wait_ready(server)
            except TimeoutError:
                print(
                    f"demo: the echo server did not get ready within {STARTUP_TIMEOUT:g} s",
                    file=sys.stderr,
                )
                return 1
            except RuntimeError as exc:
                print(f"demo: {exc}", file=sys.stderr)
                return 1
            print(f"echo server ready on {args.host}:{port}", flush=True)
            command = ["echo_client.py", "echo/uppercase", "Hello World"]
            print(f'running examples/{" ".join(command[:2])} "Hello World"', flush=True)
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / command[0]),
                *command[1:],
                "--host",
                args.host,
                "--port",
                str(port),
                "--ca",
                str(Path(tmp) / CERT_NAME),
                *extra,
            )
            try:
                status = await asyncio.wait_for(client.wait(), timeout=CLIENT_TIMEOUT)
            except TimeoutError:
                client.kill()
                await client.wait()
                print("demo: the client did not finish in time", file=sys.stderr)
                return 1
        finally:
            await stop(server)
        print(f"demo: client exited with status {status}", flush=True)
        return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address for the server (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="UDP port for the server (default 0: a free port)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(main(parse_args())))
