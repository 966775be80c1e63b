"""State shared by the parts of the core, and its one output path.

:class:`CoreBase` declares what every part (:mod:`.opens`, :mod:`.pairing`,
:mod:`.session`) reads or writes; :class:`~quic_reverse._core.session.SessionCore`
initialises it. Every control byte goes out through :meth:`CoreBase._send` /
:meth:`CoreBase._send_frame` into one buffer that the driver takes with
``move_data_to()``; every driver action through :attr:`CoreBase._outputs`; every event
for ``process_message()`` through :attr:`CoreBase._events`; every deadline through
:attr:`CoreBase._deadlines`.
"""

from __future__ import annotations

import collections
import logging

from .. import events as ev
from ..config import Config, Role
from ..errors import SessionClosed
from ..wire import Message, OpenResponse, encode_message_frame
from .outputs import CoreState, Output, SessionEnded
from .timers import Deadlines

__all__ = ["CoreBase", "logger"]

logger = logging.getLogger("quic_reverse.session")

# Enum members as module constants: in Python 3.11 ``Enum.MEMBER`` is a descriptor
# lookup several times slower than a global, and the core checks states on every input.
IDLE = CoreState.IDLE
AWAIT_HELLO = CoreState.AWAIT_HELLO
AWAIT_HELLO_ACK = CoreState.AWAIT_HELLO_ACK
OPEN = CoreState.OPEN
CLOSING = CoreState.CLOSING
CLOSED = CoreState.CLOSED


class CoreBase:
    """Shared state and output path of the core's parts (see the module docstring)."""

    role: Role
    config: Config
    state: CoreState
    end: SessionEnded | None
    active_streams: int  # bound or accepted streams not yet released
    _tag: str  # for log lines (enum .value is a slow property)
    _out: bytearray
    _outputs: list[Output]
    # OpenResponse: an OpenResponseReceived not built yet (see next_user_event)
    _events: collections.deque[ev.ControlEvent | OpenResponse]
    _info_events: int
    _dropped_events: int  # informational events dropped unread (queue full)
    _deadlines: Deadlines

    # ------------------------------------------------------------------ output path

    def _send(self, msg: Message) -> None:
        self._out += encode_message_frame(msg)

    def _send_frame(self, frame: bytes) -> None:
        """Send an already encoded frame (an OpenRequest encoded when it was queued)."""
        self._out += frame

    def _push_info(self, event: ev.ControlEvent | OpenResponse) -> None:
        """Queue an informational event, dropping the oldest one past the limit."""
        events = self._events
        events.append(event)
        self._info_events += 1
        if self._info_events > self.config.max_buffered_events:
            for i, old in enumerate(events):  # nearly always i == 0
                if type(old) is not ev.OpenRequestReceived:
                    if i:
                        del events[i]
                    else:
                        events.popleft()
                    self._info_events -= 1
                    self._dropped_events += 1
                    if self._dropped_events & (self._dropped_events - 1) == 0:  # 1, 2, 4...
                        logger.debug(
                            "%s: event queue full, dropped %r (%d dropped so far)",
                            self._tag,
                            old,
                            self._dropped_events,
                        )
                    break

    def _require_open(self) -> None:
        if self.state is OPEN:
            return
        if self.end is not None:
            err = self.end.error
            if isinstance(err, SessionClosed):
                raise SessionClosed(str(err), code=err.code, reason=err.reason)
            raise SessionClosed(f"session ended: {err}") from err
        if self.state is CLOSING:
            raise SessionClosed("session is closing")
        raise SessionClosed("session not negotiated yet")
