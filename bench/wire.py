"""Wire codec speed: encode+decode round trips and FrameReader throughput.

Run alone with ``.venv/bin/python -m bench.wire [--quick]``; ``python -m bench`` runs it
with the others. Each figure is the median (with min-max) of several samples, each
sample timing a loop of many operations; baseline samples are taken in the same run,
alternating with the measured ones so that machine noise affects both alike:

* ``OpenRequest`` with 4 structured metadata entries, ``decode(encode(m))`` against a
  ``pickle`` round trip of the same message object (a general-purpose serializer the
  codec should beat: goal at least 2x faster);
* ``Ping``, ``decode(encode(p))`` against the floor of the same work done by hand,
  ``struct.pack`` + ``struct.unpack_from`` + ``Ping(...)`` (goal: within 2x of it);
* ``FrameReader`` parsing a stream of 1000 framed Pings delivered in 1400-byte chunks,
  against a bare loop of ``unpack_from`` + slicing over the same bytes in one piece
  (goal: at least half its rate);
* ``FrameReader`` fed one maximal (64 KiB) frame one ``bytes`` object of one byte at a
  time (transports deliver ``bytes``), in ns per byte,
  against appending the same bytes one at a time to a ``bytearray`` (the cost of merely
  buffering them). The per-byte cost staying flat is what "no quadratic copying"
  means; goal: within 4x of the bare append.

Ratios are "better than baseline" when above 1 (for µs figures, baseline / value).
"""

from __future__ import annotations

import argparse
import pickle
import struct
import time
from collections.abc import Callable

from bench._harness import Row, make_row, print_table
from quic_reverse.wire import (
    MAX_FRAME_PAYLOAD,
    FrameReader,
    Metadata,
    OpenFlags,
    OpenRequest,
    Ping,
    decode,
    encode,
    encode_frame,
    encode_message_frame,
)

OPEN_REQUEST = OpenRequest(
    request_id=42,
    service="ssh",
    metadata=Metadata.structured(
        [("user", "alice"), ("port", 22), ("tls", True), ("token", b"\x01" * 16)]
    ),
    flags=OpenFlags.HIGH_PRIORITY,
)
PING = Ping(sequence=123_456)
_PING_STRUCT = struct.Struct("<IQ")
_LEN = struct.Struct(">I")


def _per_op_us(fn: Callable[[], object], ops: int, samples: int) -> list[float]:
    """Samples of µs per call: each sample times ``ops`` calls of ``fn`` after a warm-up."""
    for _ in range(min(ops, 1000)):
        fn()
    out: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(ops):
            fn()
        out.append((time.perf_counter() - t0) / ops * 1e6)
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _open_request_round_trip() -> object:
    return decode(encode(OPEN_REQUEST))


def _open_request_pickle() -> object:
    return pickle.loads(pickle.dumps(OPEN_REQUEST, protocol=pickle.HIGHEST_PROTOCOL))


def _ping_round_trip() -> object:
    return decode(encode(PING))


def _ping_struct() -> object:
    return Ping(sequence=_PING_STRUCT.unpack_from(_PING_STRUCT.pack(5, PING.sequence))[1])


def _frame_stream(frames: int) -> tuple[bytes, list[bytes]]:
    data = b"".join(encode_message_frame(Ping(sequence=i)) for i in range(frames))
    chunks = [data[i : i + 1400] for i in range(0, len(data), 1400)]
    return data, chunks


def _reader_rate(chunks: list[bytes], frames: int, samples: int, repeat: int) -> list[float]:
    """Frames per second through a FrameReader fed ``chunks``."""
    out: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(repeat):
            reader = FrameReader()
            got = 0
            for chunk in chunks:
                got += len(reader.feed(chunk))
            if got != frames:
                raise RuntimeError(f"FrameReader returned {got} of {frames} frames")
        out.append(frames * repeat / (time.perf_counter() - t0))
    return out


def _bare_rate(data: bytes, frames: int, samples: int, repeat: int) -> list[float]:
    """Frames per second of a bare length-prefix loop over the whole stream at once."""
    unpack = _LEN.unpack_from
    out: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(repeat):
            pos, got, n = 0, [], len(data)
            while pos + 4 <= n:
                end = pos + 4 + unpack(data, pos)[0]
                got.append(data[pos + 4 : end])
                pos = end
            if len(got) != frames:
                raise RuntimeError("bare loop miscounted frames")
        out.append(frames * repeat / (time.perf_counter() - t0))
    return out


def _interleaved(
    value: Callable[[], list[float]], base: Callable[[], list[float]], samples: int
) -> tuple[list[float], float]:
    """Alternate baseline and measured samples so machine noise hits both alike.

    Returns the measured samples and the median of the baseline samples.
    """
    measured: list[float] = []
    baseline: list[float] = []
    for _ in range(samples):
        baseline += base()
        measured += value()
    return measured, _median(baseline)


def run(quick: bool) -> list[Row]:
    """Measure and return the rows (see the module docstring for what and why)."""
    ops = 2_000 if quick else 50_000
    samples = 3 if quick else 9
    rows: list[Row] = []

    measured, base = _interleaved(
        lambda: _per_op_us(_open_request_round_trip, ops, 1),
        lambda: _per_op_us(_open_request_pickle, ops, 1),
        samples,
    )
    rows.append(
        make_row(
            "wire: OpenRequest + 4 structured metadata entries, encode+decode",
            "µs",
            measured,
            baseline="pickle round trip of the same message",
            baseline_value=base,
            higher_is_better=False,
            goal=">= 2x pickle (ratio = pickle µs / codec µs)",
        )
    )

    measured, base = _interleaved(
        lambda: _per_op_us(_ping_round_trip, ops, 1),
        lambda: _per_op_us(_ping_struct, ops, 1),
        samples,
    )
    rows.append(
        make_row(
            "wire: Ping encode+decode",
            "µs",
            measured,
            baseline="struct.pack + unpack_from + Ping() by hand",
            baseline_value=base,
            higher_is_better=False,
            goal=">= 0.5x the hand-written struct floor",
        )
    )

    frames = 1000
    repeat = 2 if quick else 20
    data, chunks = _frame_stream(frames)
    measured, base = _interleaved(
        lambda: _reader_rate(chunks, frames, 1, repeat),
        lambda: _bare_rate(data, frames, 1, repeat),
        samples,
    )
    rows.append(
        make_row(
            "wire: FrameReader, 1000 Ping frames in 1400-byte chunks",
            "frames/s",
            measured,
            baseline="bare unpack_from + slice loop, one piece",
            baseline_value=base,
            higher_is_better=True,
            goal=">= 0.5x the bare loop",
        )
    )

    frame = encode_frame(bytes(MAX_FRAME_PAYLOAD))
    measured, base = _interleaved(
        lambda: _byte_feed_ns(frame, 1, reader=True),
        lambda: _byte_feed_ns(frame, 1, reader=False),
        1 if quick else 5,
    )
    rows.append(
        make_row(
            "wire: FrameReader, one 64 KiB frame fed 1 byte at a time",
            "ns/byte",
            measured,
            baseline="bytearray += 1 byte",
            baseline_value=base,
            higher_is_better=False,
            goal=">= 0.25x bytearray append",
        )
    )
    return rows


def _byte_feed_ns(frame: bytes, samples: int, *, reader: bool) -> list[float]:
    """ns per byte of feeding ``frame`` one byte per call (to a FrameReader or a bytearray)."""
    size = len(frame)
    out: list[float] = []
    for _ in range(samples):
        if reader:
            frame_reader = FrameReader()
            got: list[bytes] = []
            t0 = time.perf_counter()
            for i in range(size):
                got += frame_reader.feed(frame[i : i + 1])
            elapsed = time.perf_counter() - t0
            if len(got) != 1 or len(got[0]) != size - 4:
                raise RuntimeError("FrameReader did not return the frame")
        else:
            buf = bytearray()
            t0 = time.perf_counter()
            for i in range(size):
                buf += frame[i : i + 1]
            elapsed = time.perf_counter() - t0
        out.append(elapsed / size * 1e9)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wire codec benchmarks")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args(argv)
    print_table(run(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
