"""Mutation fuzzer for the wire decoders: ``decode``, ``FrameReader`` and ``StreamBind.decode``.

Run it with::

    .venv/bin/python -m tests.fuzz_wire --count 1000000 [--seed N]

(``make fuzz`` runs the million-input campaign.) Inputs are seeded from the reference
vectors (``tests/data/reference-v1.json``: message payloads and frames, StreamBinds,
malformed inputs) and mutated: bit flips, interesting bytes and integers written over
length and index fields, insertions, deletions, duplications, truncations, splices.

The rule checked for every input is the decoders' contract: each call returns a value
or raises :class:`quic_reverse.errors.ProtocolError` — nothing else (no ``struct.error``,
``UnicodeDecodeError``, ``IndexError``, ``ValueError``, ``KeyError``, ``MemoryError``).
On top of that, whatever ``decode`` accepts must re-encode to exactly the same bytes
(the strict decoder accepts only canonical encodings), and a ``FrameReader`` fed the
input in random chunks must agree with one fed the whole input at once.

A short run is part of the pytest suite (``tests/wire/test_fuzz.py``).
"""

from __future__ import annotations

import argparse
import functools
import random
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from quic_reverse.errors import ProtocolError
from quic_reverse.wire import (
    STREAM_BIND_SIZE,
    FrameReader,
    StreamBind,
    decode,
    encode,
    encode_frame,
)
from tests.wire import vectors

_INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x7F, 0x80, 0xFE, 0xFF)
_INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    12,
    13,
    0x7F,
    0xFF,
    0x100,
    0xFFFF,
    0x10000,
    0x10001,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
)
_PACKERS = (
    struct.Struct("<I"),
    struct.Struct("<Q"),
    struct.Struct(">I"),
    struct.Struct(">Q"),
)


def seed_corpus() -> list[bytes]:
    """Starting inputs: every vector's bytes (the 64 KiB ones cut short) plus binds and frames."""
    corpus: list[bytes] = []
    for entry in vectors.load():
        if entry["kind"] in ("message", "stream_bind"):
            corpus.append(bytes.fromhex(entry["payload_hex"]))
            corpus.append(bytes.fromhex(entry["frame_hex"]))
        else:
            corpus.append(vectors.unhex(entry["input_hex"])[:256])
    return [c for c in dict.fromkeys(corpus)]


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes:
    """Apply one to four random mutations to ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(_INTERESTING_BYTES)
        elif op == 2 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 3:
            packer = rng.choice(_PACKERS)
            value = rng.choice(_INTERESTING_INTS) % (1 << (8 * packer.size))
            raw = packer.pack(value)
            pos = rng.randrange(n + 1)
            buf[pos : pos + len(raw)] = raw
        elif op == 4:
            pos = rng.randrange(n + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 5 and n:
            start = rng.randrange(n)
            del buf[start : start + rng.randint(1, 16)]
        elif op == 6 and n:
            start = rng.randrange(n)
            chunk = buf[start : start + rng.randint(1, 32)]
            pos = rng.randrange(n + 1)
            buf[pos:pos] = chunk
        elif op == 7 and n:
            del buf[rng.randrange(n) :]
        elif op == 8:
            other = rng.choice(corpus)
            cut = rng.randrange(n + 1)
            buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
        else:
            buf += rng.choice(corpus)[: rng.randint(0, 16)]
    return bytes(buf)


@dataclass
class Report:
    """Outcome counts of a campaign; ``failures`` holds descriptions of contract breaks."""

    inputs: int = 0
    decoded: int = 0
    decode_rejected: int = 0
    frames: int = 0
    frame_rejected: int = 0
    binds: int = 0
    bind_rejected: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.inputs} inputs in {self.seconds:.1f} s: decode accepted {self.decoded}, "
            f"rejected {self.decode_rejected}; FrameReader frames {self.frames}, rejected "
            f"{self.frame_rejected}; StreamBind accepted {self.binds}, rejected "
            f"{self.bind_rejected}; contract violations {len(self.failures)}"
        )


def _guard(report: Report, target: str, data: bytes, call: Callable[[], object]) -> object:
    """Run ``call``; a ProtocolError is returned, anything else other than a value is a failure."""
    try:
        return call()
    except ProtocolError as exc:
        return exc
    except Exception as exc:  # the contract: nothing but ProtocolError may escape
        report.failures.append(f"{target}: {type(exc).__name__}: {exc!r} on input {data.hex()}")
        return exc


def _check_decode(report: Report, data: bytes) -> None:
    result = _guard(report, "decode", data, lambda: decode(data))
    if isinstance(result, ProtocolError):
        report.decode_rejected += 1
        if "malformed entries" in str(result):
            # The fast structured-metadata loop failed where the precise re-read did not.
            report.failures.append(f"decode: fast/precise metadata paths disagree on {data.hex()}")
    elif not isinstance(result, Exception):
        report.decoded += 1
        again = _guard(report, "encode(decode(x))", data, lambda: encode(result))  # type: ignore[arg-type]
        if again != data:
            report.failures.append(f"decode accepted a non-canonical input {data.hex()}")


def _feed_all(reader: FrameReader, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


def _check_frames(report: Report, rng: random.Random, data: bytes) -> None:
    whole = _guard(report, "FrameReader", data, lambda: FrameReader().feed(data))
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 6))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    split = _guard(report, "FrameReader", data, lambda: _feed_all(FrameReader(), chunks))
    if isinstance(whole, ProtocolError):
        report.frame_rejected += 1
        if not isinstance(split, ProtocolError):
            report.failures.append(f"FrameReader: chunked feed accepted {data.hex()}")
        return
    if isinstance(whole, list):
        report.frames += len(whole)
        if split != whole:
            report.failures.append(f"FrameReader: chunking changed the frames of {data.hex()}")
        for payload in whole:
            _check_decode(report, payload)
    if len(data) <= 1024:
        # The input as a payload must come back unchanged through framing.
        wrapped = encode_frame(data)
        step = rng.randint(1, 9)
        pieces = [wrapped[i : i + step] for i in range(0, len(wrapped), step)]
        back = _guard(report, "FrameReader", data, lambda: _feed_all(FrameReader(), pieces))
        if back != [data]:
            report.failures.append(f"FrameReader: framed payload not recovered: {data.hex()}")


def _check_bind(report: Report, data: bytes) -> None:
    for candidate in (data, data[:STREAM_BIND_SIZE].ljust(STREAM_BIND_SIZE, b"\x00")):
        result = _guard(
            report, "StreamBind.decode", candidate, functools.partial(StreamBind.decode, candidate)
        )
        if isinstance(result, StreamBind):
            report.binds += 1
            if result.encode() != candidate:
                report.failures.append(f"StreamBind: round trip changed {candidate.hex()}")
        elif isinstance(result, ProtocolError):
            report.bind_rejected += 1


def run(count: int, seed: int = 0, *, max_failures: int = 20) -> Report:
    """Fuzz ``count`` mutated inputs through all three decoders; deterministic per seed."""
    rng = random.Random(seed)
    corpus = seed_corpus()
    report = Report()
    started = time.perf_counter()
    for i in range(count):
        base = corpus[i] if i < len(corpus) else rng.choice(corpus)
        data = base if i < len(corpus) else mutate(rng, base, corpus)
        _check_decode(report, data)
        _check_frames(report, rng, data)
        _check_bind(report, data)
        report.inputs += 1
        if len(report.failures) >= max_failures:
            break
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100_000, help="number of inputs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are reproducible)")
    parser.add_argument("--max-failures", type=int, default=20)
    args = parser.parse_args(argv)
    report = run(args.count, args.seed, max_failures=args.max_failures)
    for failure in report.failures:
        print("FAIL", failure)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
