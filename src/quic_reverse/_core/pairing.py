"""Pairing incoming data streams with local opens (PROTOCOL-v1 §5).

Every incoming data stream gets a *token* while its 13-byte StreamBind is read
(bounded by ``stream_bind_timeout``). Once the header is known the stream is paired
**by logical id** with the local open that the peer accepted with that id; a stream
that arrives before its OpenResponse is held (bounded in time and in number: at most
as many as there are opens still awaiting an answer); a bad header or an id nobody
waits for is refused (the driver resets it) and the session carries on.
"""

from __future__ import annotations

from ..errors import ProtocolError
from ..wire.bind import bind_id
from .base import OPEN, logger
from .opens import EarlyStream, LocalOpens
from .outputs import StreamRefused
from .timers import TimerKind

__all__ = ["StreamPairing"]

#: Extra data streams tolerated beyond the number of opens awaiting one (a peer that
#: is legitimately slow to send a header; orphans of cancelled opens).
STREAM_SLACK = 8


class StreamPairing(LocalOpens):
    """The data-stream part of the core (a mixin of ``SessionCore``)."""

    def _init_pairing(self) -> None:
        self._next_token = 1
        self._headers: dict[int, float] = {}  # token -> header deadline
        self._early: dict[int, EarlyStream] = {}  # lsid -> stream waiting for its response

    def stream_arrived(self, now: float, *, header_ready: bool = False) -> int | None:
        """A peer-opened data stream arrived; returns its token, or ``None`` to refuse it.

        Refused when the session is not open or when more streams are unpaired than
        there are opens awaiting one (a flood): memory stays bounded. With
        ``header_ready`` the caller passes the header to :meth:`stream_header` right
        away, so no header deadline is armed.
        """
        if self.state is not OPEN:
            return None
        budget = self._inflight + len(self._orphan_lsids) + len(self._orphan_requests)
        if len(self._headers) + len(self._early) >= budget + STREAM_SLACK:
            return None
        token = self._next_token
        self._next_token += 1
        deadline = now + self.config.stream_bind_timeout
        self._headers[token] = deadline
        if not header_ready:
            self._deadlines.schedule(deadline, TimerKind.HEADER, token)
        return token

    def stream_header(self, token: int, header: bytes, now: float) -> None:
        """The 13-byte StreamBind of stream ``token`` was read; pair it by logical id."""
        if self._headers.pop(token, None) is None:
            return  # already refused (timeout or session end)
        if self.state is not OPEN:
            self._outputs.append(StreamRefused(token, "session not open"))
            return
        try:
            lsid = bind_id(header)
        except ProtocolError as exc:
            self._outputs.append(StreamRefused(token, f"bad StreamBind header: {exc}"))
            return
        if lsid == 0:
            self._outputs.append(StreamRefused(token, "StreamBind with reserved id 0"))
            return
        rid = self._by_lsid.get(lsid)
        if rid is not None:
            self._drop_local(rid, now)
            self._bind(rid, lsid, token)
            return
        if self._orphan_lsids.pop(lsid, None) is not None:
            self._outputs.append(StreamRefused(token, f"stream {lsid} of an abandoned open"))
            return
        if lsid in self._early:
            self._outputs.append(StreamRefused(token, f"duplicate StreamBind id {lsid}"))
            return
        if len(self._early) < self._awaiting_response + len(self._orphan_requests):
            deadline = now + self.config.stream_bind_timeout
            self._early[lsid] = EarlyStream(token, deadline)
            self._deadlines.schedule(deadline, TimerKind.EARLY, lsid)
            logger.debug("%s: stream %d arrived before its OpenResponse", self._tag, lsid)
            return
        self._outputs.append(StreamRefused(token, f"no open is waiting for stream id {lsid}"))

    def stream_lost(self, token: int) -> None:
        """Reading the header of stream ``token`` failed (reset, FIN, connection)."""
        self._headers.pop(token, None)

    # ------------------------------------------------------------------ deadlines

    def _header_live(self, token: int, deadline: float) -> bool:
        return self._headers.get(token) == deadline

    def _header_expired(self, token: int) -> None:
        del self._headers[token]
        self._outputs.append(StreamRefused(token, "StreamBind header not received in time"))

    def _early_live(self, lsid: int, deadline: float) -> bool:
        early = self._early.get(lsid)
        return early is not None and early.deadline == deadline

    def _early_expired(self, lsid: int) -> None:
        early = self._early.pop(lsid)
        self._outputs.append(
            StreamRefused(early.token, f"no OpenResponse for stream {lsid} in time")
        )

    def _fail_streams(self) -> None:
        """The session ended: refuse every stream still unpaired."""
        for early in self._early.values():
            self._outputs.append(StreamRefused(early.token, "session ended"))
        self._early.clear()
        for token in self._headers:
            self._outputs.append(StreamRefused(token, "session ended"))
        self._headers.clear()
