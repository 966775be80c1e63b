"""Memory per tunnelled connection, relay and edge as real processes on 127.0.0.1.

``python -m tests.tunnel._memory [N]`` (default 2000) starts the echo service, a relay
and an edge (default limits), then opens N TCP connections through the forward in
three phases and prints the RSS growth of relay and edge divided by N:

* idle: each connection did one 64-byte echo and stays open;
* after bulk: each then echoed 256 KiB (receive buffers grew) and is idle again;
* active: each has 64 KiB written by the client and not yet read back (bytes in
  flight in every buffer along the chain).

``--idle-only`` stops after the first phase (a capacity check: ``10000 --idle-only``).
Not a test (it asserts nothing); the numbers go to the report and docs/TUNNEL.md.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from quic_reverse.tunnel.auth import generate_token, write_token_file

from ._procs import start_edge, start_relay, start_services

#: Keep-alive that tolerates the load of thousands of transfers at once on 2 cores.
LENIENT = ["--ping-interval", "5", "--ping-timeout", "30"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def main(n: int, idle_only: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="qr-mem-"))
    token = generate_token()
    (tmp / "tokens.toml").write_text(f'edgeA = "{token}"\n', encoding="utf-8")
    write_token_file(tmp / "edgeA.token", token)
    services = start_services()
    relay = start_relay(
        tmp / "state",
        tmp / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo"],
        extra=[*LENIENT, "--open-timeout", "60"],
    )
    edge = start_edge(
        "edgeA",
        tmp / "edgeA.token",
        relay,
        [f"echo=127.0.0.1:{services.echo}"],
        extra=LENIENT,
    )
    port = relay.forwards["edgeA/echo"]
    procs = {"relay": relay.proc.popen.pid, "edge": edge.popen.pid}
    try:
        # Warm up (imports, first buffers) so the baseline is not the cold process.
        for _ in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x" * 64)
            await r.readexactly(64)
            w.close()
        await asyncio.sleep(1)
        base = {k: rss_kib(p) for k, p in procs.items()}
        conns = []
        sem = asyncio.Semaphore(500)

        async def one() -> None:
            async with sem:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"y" * 64)
                await r.readexactly(64)
                conns.append((r, w))

        await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(1)
        idle = {k: rss_kib(p) for k, p in procs.items()}
        print(f"{len(conns)} connections open at once, each echoed 64 bytes")
        if idle_only:
            per = {k: (idle[k] - base[k]) / n for k in procs}
            print(f"  idle        relay {per['relay']:6.1f}   edge {per['edge']:6.1f}")
            return

        async def bulk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            async with sem:
                w.write(b"z" * 256 * 1024)
                await r.readexactly(256 * 1024)

        await asyncio.gather(*(bulk(r, w) for r, w in conns))
        await asyncio.sleep(1)
        after_bulk = {k: rss_kib(p) for k, p in procs.items()}
        for _, w in conns:
            w.write(b"a" * 64 * 1024)
        await asyncio.sleep(3)
        active = {k: rss_kib(p) for k, p in procs.items()}
        print(f"N = {n} connections; RSS growth per connection (KiB), relay / edge:")
        for label, snap in (("idle", idle), ("after bulk", after_bulk), ("active", active)):
            per = {k: (snap[k] - base[k]) / n for k in procs}
            print(f"  {label:11s} relay {per['relay']:6.1f}   edge {per['edge']:6.1f}")
        for _, w in conns:
            w.transport.abort()
        await asyncio.sleep(3)
        closed = {k: rss_kib(p) for k, p in procs.items()}
        per = {k: (closed[k] - base[k]) / n for k in procs}
        print(f"  all closed  relay {per['relay']:6.1f}   edge {per['edge']:6.1f}")
    finally:
        for proc in (relay.proc, edge):
            print("\n".join([x for x in proc.lines if " ERROR " in x or " WARNING " in x][:10]))
        edge.kill()
        relay.proc.kill()
        services.proc.kill()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(int(args[0]) if args else 2000, "--idle-only" in sys.argv))
