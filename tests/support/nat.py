"""``Nat``: a UDP forwarder on 127.0.0.1 whose outside source port can change.

It stands between a QUIC client and server the way a home router does: the client
sends to ``Nat.port``; the server sees the NAT's outside socket. :meth:`Nat.rebind`
replaces the outside socket by one on a new port (the router's mapping expired and was
re-created): the same client, its same QUIC connection, now seen by the server from
another address, and the server's datagrams to the old address are lost. Runs in a
thread, so a test's event loop (or subprocesses) can drive both ends.
"""

from __future__ import annotations

import select
import socket
import threading

from tests.support.timing import LONG, MS

__all__ = ["LOOPBACK", "Nat"]

LOOPBACK = "127.0.0.1"


class Nat:
    """A UDP forwarder whose outside address (source port towards the relay) can change.

    Inside: one socket the edge sends to (``port``); the first peer that writes to it is
    the edge. Outside: one socket per mapping, bound to a fresh ephemeral port; only the
    current mapping forwards (a datagram arriving on an old mapping is dropped, as a
    NAT drops traffic to an expired mapping).
    """

    def __init__(self, relay_port: int) -> None:
        self._relay = (LOOPBACK, relay_port)
        self._inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._inside.bind((LOOPBACK, 0))
        self.port: int = self._inside.getsockname()[1]
        self._outside = self._new_outside()
        self._edge: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.forwarded = 0
        self.mappings: list[int] = [self._outside.getsockname()[1]]
        self._thread = threading.Thread(target=self._loop, name="nat", daemon=True)
        self._thread.start()

    @staticmethod
    def _new_outside() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((LOOPBACK, 0))
        return s

    def rebind(self) -> int:
        """Drop the current mapping; continue from a new source port. Returns it."""
        fresh = self._new_outside()
        with self._lock:
            old, self._outside = self._outside, fresh
            self.mappings.append(fresh.getsockname()[1])
        old.close()
        return self.mappings[-1]

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                outside = self._outside
            try:
                ready, _, _ = select.select([self._inside, outside], [], [], 50 * MS)
            except (OSError, ValueError):  # the old mapping was closed under us
                continue
            for s in ready:
                try:
                    data, addr = s.recvfrom(65535)
                except OSError:
                    continue
                with self._lock:
                    current = self._outside
                try:
                    if s is self._inside:
                        self._edge = addr
                        current.sendto(data, self._relay)
                        self.forwarded += 1
                    elif s is current and self._edge is not None:
                        self._inside.sendto(data, self._edge)
                except OSError:
                    pass  # UDP: a full buffer drops the datagram, QUIC retransmits

    def close(self) -> None:
        self._stop.set()
        self._thread.join(LONG)
        self._inside.close()
        with self._lock:
            self._outside.close()
