"""Unit tests of the stream book-keeping of the QUIC adapters (``transport/_streams.py``)."""

from __future__ import annotations

from quic_reverse.transport._streams import StreamState, StreamTable


def test_peer_streams_become_visible_on_their_own_first_frame() -> None:
    table = StreamTable(is_client=False)  # the peer is a client: ids 0, 4, 8, ...
    state, new = table.for_frame(8)  # implicitly opens 0 and 4
    assert new and state is not None and state.stream_id == 8
    assert table.for_frame(8) == (state, False)
    four, new = table.for_frame(4)  # opened implicitly, first frame now: new
    assert new and four is not None
    four.recv_done = four.fin_sent = True
    assert table.forget_if_done(four)
    assert table.for_frame(4) == (None, False)  # a late frame of a finished stream
    zero, new = table.for_frame(0)
    assert new and zero is not None


def test_frames_that_are_not_ours_are_ignored() -> None:
    table = StreamTable(is_client=True)  # the peer is a server: ids 1, 5, 9, ...
    assert table.for_frame(0) == (None, False)  # our own id, never opened
    assert table.for_frame(3) == (None, False)  # peer unidirectional
    assert table.is_peer_initiated(3) and not table.is_peer_initiated(2)
    local = table.add_local(4)
    assert table.for_frame(4) == (local, False)
    assert not table.forget_if_done(local)  # still open in both directions


def test_receive_buffer_takes_across_chunks_without_losing_bytes() -> None:
    state = StreamState(0)
    for chunk in (b"abc", b"defg", b"h", b"ijklmnop"):
        state.push(chunk)
    assert state.recv_buffered == 16
    out = [state.take(2), state.take(4), state.take(1), state.take(100)]
    assert out == [b"ab", b"cdef", b"g", b"hijklmnop"]
    assert state.recv_buffered == 0 and state.consumed == 16
    state.push(b"xyz")
    assert state.clear() == 3 and state.recv_buffered == 0 and not state.chunks
