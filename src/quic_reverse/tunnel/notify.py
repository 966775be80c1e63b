"""systemd readiness and reload notification (``sd_notify``), without a dependency.

With ``Type=notify-reload`` (or ``Type=notify``) systemd sets ``$NOTIFY_SOCKET`` to a
datagram socket (a path, or ``@name`` in the abstract namespace); relay and edge send
``READY=1`` once they serve, ``RELOADING=1`` + ``MONOTONIC_USEC=...`` when a SIGHUP
reload starts and ``READY=1`` when it is done, ``STOPPING=1`` when they shut down, and
``STATUS=...`` lines along the way. Without the variable every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

__all__ = ["notify"]


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``...) to ``$NOTIFY_SOCKET``; True if sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if "RELOADING=1" in fields:
        fields = (*fields, f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(fields).encode(), address)
        return True
    return False
