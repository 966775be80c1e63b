"""The sans-IO session core: negotiation, request table, logical ids, limits, deadlines.

No asyncio, no sockets, no clock. The asyncio driver (:mod:`quic_reverse.session`) feeds
it and executes what it says:

Inputs
    ``start(now)``, ``receive_data(data, now)``, ``receive_eof(now)``,
    ``connection_lost(error)``, ``peer_closed_connection(error)``, ``handle_timer(now)``,
    the commands (``open_request``, ``cancel_open``, ``accept``, ``reject``,
    ``send_ping``, ``send_stream_close``, ``close``, ``abort``), and the data-stream
    pairing calls (``stream_arrived``, ``stream_header``, ``stream_lost``,
    ``stream_released``).
Outputs
    ``move_data_to(buffer)`` (bytes for the control stream, in order: the one output
    path; ``data_to_send()`` wraps it), ``outputs()`` (driver actions:
    :class:`OpenResolved`, :class:`OpenFailed`, :class:`StreamRefused`,
    :class:`PongReceived`, :class:`PingFailed`, :class:`Negotiated`,
    :class:`SessionEnded`), ``next_user_event()`` (the bounded queue of
    :mod:`quic_reverse.events` for ``process_message()``) and ``next_deadline()`` /
    ``take_new_deadline()``.

After any input, the driver drains the bytes and ``outputs()`` and re-arms its single
timer (see :mod:`.timers`).

Layout
    :mod:`.timers`   the deadline heap (every deadline: negotiation, open, bind,
                     header, ping, keep-alive, close), lazy deletion
    :mod:`.outputs`  the states and the driver actions above
    :mod:`.base`     state shared by the parts, and the one output path
    :mod:`.opens`    local opens: ids, queue, in-flight slots, orphans
    :mod:`.pairing`  incoming data streams: tokens, header deadlines, early streams
    :mod:`.remote`   remote opens: admission under the stream limit (waiting
                     requests), accept/reject, logical ids
    :mod:`.flows`    datagram flows (extension): flow opens, flow ids, FlowClose
    :mod:`.session`  :class:`SessionCore`: state, negotiation, dispatch (the one hot
                     function, ``_handle_message``), pings, keep-alive, close
"""

from __future__ import annotations

from .outputs import (
    CoreState,
    FlowClosed,
    FlowOpened,
    Negotiated,
    OpenFailed,
    OpenResolved,
    Output,
    PingFailed,
    PongReceived,
    SessionEnded,
    StreamRefused,
)
from .session import SessionCore

__all__ = [
    "CoreState",
    "FlowClosed",
    "FlowOpened",
    "Negotiated",
    "OpenFailed",
    "OpenResolved",
    "Output",
    "PingFailed",
    "PongReceived",
    "SessionCore",
    "SessionEnded",
    "StreamRefused",
]
