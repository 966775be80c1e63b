"""``--stack auto`` on a real lossy path (pathlab delay line, 2 % loss and 10 ms each
way): the real relay (default stack) and an edge with ``--stack auto``. The edge starts
on qh3; once its loss hint's window closes (>= 10 s, tunnel/losshint.py) it switches
to aioquic make-before-break. A TCP connection opened before the switch keeps echoing
(before, during and after, every byte intact), new connections are served over the
aioquic session (the edge's /status.json: per-session controller and streams), and the
old session closes once its last connection has ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from pathlab import Lab

from tests.support.timing import MS

from ._world import PROMPT, SLACK, Client, close_all, closed, connect, echo
from .conftest import lab_world

pytestmark = pytest.mark.faults

#: The edge's /status.json, inside its namespace.
METRICS_PORT = 19090
#: One echo round trip over the lossy line (a few retransmissions at worst).
ROUND_TRIP = 5000 * MS
#: The hint's window is >= 10 s, judged at the edge's keep-alive events: the switch
#: comes after 10 to ~16 s of traffic.
SWITCH = 25_000 * MS


def status(lab: Lab) -> dict[str, Any]:
    """The edge's /status.json (a socket in the edge's namespace)."""
    (sock,) = lab.socket(lab.edge_ns)
    with sock:
        sock.settimeout(ROUND_TRIP)
        sock.connect(("127.0.0.1", METRICS_PORT))
        sock.sendall(b"GET /status.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    data: dict[str, Any] = json.loads(body)
    return data


def sessions(lab: Lab) -> dict[str, int]:
    """Congestion controller -> active streams of each of the edge's relay sessions."""
    return {r["path"]["congestion_control"]: r["active"] for r in status(lab)["relays"]}


async def test_auto_switches_a_lossy_session_without_cutting_connections(
    tmp_path: Path,
) -> None:
    payload = os.urandom(4096)
    with lab_world(tmp_path, delay_ms=10, loss=0.02, seed=7) as world:
        relay = world.start_relay(["127.0.0.1:0=edgeA/echo"])
        edge = world.start_edge(
            relay, extra=["--stack", "auto", "--metrics", f"127.0.0.1:{METRICS_PORT}"]
        )
        assert edge.find(r"authenticated to relay .* \(qh3\)")
        port = relay.forwards["edgeA/echo"]
        early: list[Client] = []
        bulk: list[Client] = []
        late: list[Client] = []
        try:
            early = await connect(world.lab, port)
            await echo(early[0], payload, ROUND_TRIP)
            assert await asyncio.to_thread(sessions, world.lab) == {"qh3-reno": 1}
            # Bulk echo on a second connection: enough packets for the hint's window
            # (>= 1,000 sent by the edge). It, too, started before the switch.
            bulk = await connect(world.lab, port)
            block = os.urandom(64 << 10)
            deadline = time.monotonic() + SWITCH
            rounds = 0
            while not edge.find(r"switched to aioquic"):
                assert time.monotonic() < deadline, edge.tail()
                await echo(bulk[0], block, ROUND_TRIP * 4)
                rounds += 1
                if rounds % 8 == 0:
                    await echo(early[0], payload, ROUND_TRIP)  # during
            line = edge.find(r"switched to aioquic: .*").group(0)  # type: ignore[union-attr]
            assert re.search(r"\d+\.\d% of QUIC packets lost \([\d,]+ of [\d,]+ in", line)
            assert "qh3-reno" in line and "2 running stay on the qh3 session" in line
            edge.wait_for(r"authenticated to relay .* \(aioquic\)", timeout=ROUND_TRIP)
            await echo(early[0], payload, ROUND_TRIP)
            await echo(bulk[0], block, ROUND_TRIP * 4)
            # New connections after the switch: served over the aioquic session.
            late = await connect(world.lab, port, count=2)
            for client in late:
                await echo(client, payload, ROUND_TRIP)
            assert await asyncio.to_thread(sessions, world.lab) == {
                "qh3-reno": 2,
                "quic-reverse-bbr": 2,
            }
            await echo(early[0], payload, ROUND_TRIP)  # after
            # The old session lives while a connection from before uses it ...
            close_all(bulk)
            bulk = []
            await echo(early[0], payload, ROUND_TRIP)
            assert not edge.find(r"drained qh3 session is closed")
            # ... and closes once the last one ended (the client closes: FIN both ways).
            early[0][1].write_eof()
            assert await closed(early[0], PROMPT) == "eof"
            edge.wait_for(r"drained qh3 session is closed \(its last connection ended\)",
                          timeout=PROMPT + SLACK)  # fmt: skip
            assert await asyncio.to_thread(sessions, world.lab) == {"quic-reverse-bbr": 2}
            for client in late:
                await echo(client, payload, ROUND_TRIP)
        finally:
            close_all(early + bulk + late)
        # No reconnect happened: the switch was the only new session.
        assert len(re.findall(r"authenticated to relay", edge.text)) == 2
        assert len(re.findall(r"switched to aioquic", edge.text)) == 1
        assert not re.search(r"Traceback|ERROR", edge.text + relay.proc.text)
        # Every connection ended on its own at the relay too: the drained session was
        # closed only after its last bytes and FIN had arrived (none aborted by it).
        assert not relay.proc.find(r"aborted"), relay.proc.tail()
        # The relay reads the close a moment after the edge logged it (bounded wait).
        relay.proc.wait_for(r"closed the session: NORMAL 'edge switched stack'", timeout=PROMPT)
