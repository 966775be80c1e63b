"""The Rust crate quic-reverse v1 beside this project, on the same operations, in the same run.

Run alone with ``.venv/bin/python -m bench.rust [--quick]``. The Rust reference's
``bench local`` (``../shared/rust-ref``, built once per machine and cached, see
``tests/interop/rustref.py``) runs both ends in one process over loopback QUIC (quinn),
the opener being the QUIC server (relay) and the acceptor the client (edge), as in
``bench/session.py``, whose own operations measure the Python twins (qh3), samples
alternating with the Rust ones:

* **reverse open + 1-byte echo, sequential**: opens/s, p50 and p99 µs;
* **the same with 64 concurrent workers**: opens/s; the Rust crate also with its
  ``open()`` serialized by a lock (its workaround, see below);
* **one-stream upload** to a sink that acknowledges at EOF: MB/s.

Beside them, **raw qh3** (``open_bi`` + the same 1-byte echo, ``bench.transport``'s
operation, sequential and 64 concurrent) against the Rust crate: the ceiling of any
session on qh3. Issue 11 asks the session for >= 0.3x the crate's current-thread rate
at 64 concurrent; where raw qh3 itself is below that, no session on qh3 can meet it.

Each Rust figure is measured under tokio's current-thread runtime (one thread, like
asyncio) and under its multi-threaded runtime (one worker per core). Every row is a
Rust figure; its baseline is the Python figure and its ratio says where Python stands:
Python / Rust for rates and throughput, Rust µs / Python µs for latencies -- below 1,
the Python session is that much slower.

Known behaviour of the reference: concurrent ``open()`` calls on one session pair data
streams with whichever open is waiting, so under the multi-threaded runtime most of
them fail with "stream bind ID mismatch"; such a row says how many failed and has no
ratio. A full run builds the Rust binaries if needed (about two minutes); ``--quick``
only uses an existing build. Without them, the module returns one row saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.interop.rustref import RustRef, RustRefUnavailable, ensure_built, find_built

from bench._harness import Row, error_row, make_row, percentile, print_table, summarize
from bench.session import (
    CONCURRENCY,
    Conc,
    concurrent,
    quic_connection_pair,
    sequential,
    session_open_echo,
    session_pair,
    session_upload,
)
from bench.transport import open_echo, serve_echo

#: tokio runtimes of the Rust figures: label -> ``bench`` options.
RUNTIMES: dict[str, tuple[str, ...]] = {
    "current-thread": ("--threads", "0"),
    "multi-thread": (),
}
#: ``bench local`` figure names (see its ``--help``) -> our keys.
FIGURES = {
    "reverse open + 1-byte echo, sequential": "seq",
    f"reverse open + 1-byte echo, {CONCURRENCY} concurrent": "conc",
    f"reverse open + 1-byte echo, {CONCURRENCY} concurrent, open() serialized (workaround)": (
        "serialized"
    ),
}
RUST_TIMEOUT = 300.0
PYTHON = "Python session (qh3)"
Figures = dict[str, dict[str, Any]]


def bench_local(binary: Path, runtime: Sequence[str], n_seq: int, n_conc: int, mib: int) -> Figures:
    """One run of ``bench local``: its ``RESULT`` lines by key (seq, conc, serialized, upload)."""
    argv = [str(binary), "local", *runtime, "--seq", str(n_seq), "--conc", str(n_conc)]
    argv += ["--workers", str(CONCURRENCY), "--mib", str(mib)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUST_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    figures: Figures = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            figure = json.loads(line.removeprefix("RESULT "))
            name = str(figure["name"])
            figures[FIGURES.get(name, "upload" if "upload" in name else name)] = figure
    missing = {"seq", "conc", "serialized", "upload"} - figures.keys()
    if missing:
        raise RuntimeError(f"{' '.join(argv)} printed no {sorted(missing)}:\n{proc.stdout}")
    return figures


async def python_sample(
    certdir: Path, n_seq: int, n_conc: int, n_bytes: int
) -> tuple[list[float], Conc, float]:
    """The Python twins: (sequential latencies, concurrent result, upload MB/s)."""
    async with session_pair(certdir) as relay:
        op = functools.partial(session_open_echo, relay)
        seq = await sequential(op, n_seq)
        conc = await concurrent(op, n_conc, CONCURRENCY)
    async with session_pair(certdir) as relay:
        upload, _ = await session_upload(relay, n_bytes)
    return seq, conc, upload


async def raw_sample(certdir: Path, n_seq: int, n_conc: int) -> tuple[list[float], Conc]:
    """Raw qh3 on the same operation (open_bi + 1-byte echo): (sequential, concurrent)."""
    async with quic_connection_pair(certdir) as (client, server):
        echo_server = asyncio.create_task(serve_echo(server))
        try:
            op = functools.partial(open_echo, client)
            seq = await sequential(op, n_seq)
            conc = await concurrent(op, n_conc, CONCURRENCY)
        finally:
            echo_server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await echo_server
    return seq, conc


RAW = "raw qh3 (open_bi + 1-byte echo, FIN both ways)"


def ceiling_rows(
    rust: list[Figures],
    seq: list[list[float]],
    conc: list[Conc],
    raw: tuple[list[list[float]], list[Conc]],
) -> list[Row]:
    """The session and raw qh3 as fractions of the Rust crate's current-thread rates."""
    raw_seq, raw_conc = raw
    rust_seq = summarize(r["seq"]["value"] for r in rust).median
    rust_conc = summarize(r["conc"]["value"] for r in rust).median
    crate = "Rust crate (current-thread tokio): reverse open + 1-byte echo"
    echo = "reverse open + 1-byte echo"
    return [
        make_row(
            f"{PYTHON}: {echo}, {CONCURRENCY} concurrent",
            "opens/s",
            [rate for rate, _, _ in conc],
            goal=">= 0.3x the Rust crate, single-threaded (issue 11)",
            baseline=f"{crate}, {CONCURRENCY} concurrent",
            baseline_value=rust_conc,
        ),
        make_row(
            f"{RAW}, {CONCURRENCY} concurrent",
            "opens/s",
            [rate for rate, _, _ in raw_conc],
            goal="informational: the stack's ceiling (a session on qh3 stays below it)",
            baseline=f"{crate}, {CONCURRENCY} concurrent",
            baseline_value=rust_conc,
        ),
        make_row(
            f"{PYTHON}: {echo}, sequential",
            "opens/s",
            [len(lat) / sum(lat) for lat in seq],
            goal="informational",
            baseline=f"{crate}, sequential",
            baseline_value=rust_seq,
        ),
        make_row(
            f"{RAW}, sequential",
            "opens/s",
            [len(lat) / sum(lat) for lat in raw_seq],
            goal="informational: the stack's ceiling (a session on qh3 stays below it)",
            baseline=f"{crate}, sequential",
            baseline_value=rust_seq,
        ),
    ]


def _row(
    name: str,
    unit: str,
    rust: list[float],
    python: list[float],
    *,
    latency: bool = False,
    baseline: str = PYTHON,
) -> Row:
    """A Rust figure with the Python figure as baseline; ratio = Python's standing.

    ``make_row``'s ratio compares a figure with its baseline, and here the figure is the
    Rust one: Python / Rust for a rate is its "lower is better" form, Rust µs / Python µs
    for a latency its "higher is better" form.
    """
    how = "Rust µs / Python µs" if latency else "Python / Rust"
    return make_row(
        name,
        unit,
        rust,
        goal=f"informational (ratio = {how}; below 1: Python slower)",
        baseline=baseline,
        baseline_value=summarize(python).median,
        higher_is_better=latency,
    )


def rows_for(
    runtime: str,
    rust: list[Figures],
    seq: list[list[float]],
    conc: list[Conc],
    up: list[float],
    mib: int,
) -> list[Row]:
    """The rows of one tokio runtime from its samples and the Python samples."""
    label = f"Rust crate ({runtime} tokio)"
    echo = "reverse open + 1-byte echo"
    rows = [
        _row(
            f"{label}: {echo}, sequential",
            "opens/s",
            [r["seq"]["value"] for r in rust],
            [len(lat) / sum(lat) for lat in seq],
        )
    ]
    for pct in (50, 99):
        rows.append(
            _row(
                f"{label}: {echo}, sequential p{pct}",
                "µs",
                [r["seq"][f"p{pct}_us"] for r in rust],
                [percentile(lat, pct) * 1e6 for lat in seq],
                latency=True,
                baseline=f"{PYTHON} p{pct}",
            )
        )
    py_conc = [rate for rate, _, _ in conc]
    failed = max(int(r["conc"]["errors"]) for r in rust)
    name = f"{label}: {echo}, {CONCURRENCY} concurrent"
    if failed:
        total = max(int(r["conc"]["n"]) for r in rust)
        rows.append(
            make_row(
                f"{name} (up to {failed} of {total} opens failed: the crate's concurrent open())",
                "opens/s",
                [r["conc"]["value"] for r in rust],
                goal="informational (failed opens counted as done: no comparison)",
            )
        )
    else:
        rows.append(_row(name, "opens/s", [r["conc"]["value"] for r in rust], py_conc))
    rows.append(
        _row(
            f"{name}, open() serialized (the crate's workaround)",
            "opens/s",
            [r["serialized"]["value"] for r in rust],
            py_conc,
        )
    )
    rows.append(
        _row(
            f"{label}: reverse-opened one-stream upload {mib} MiB",
            "MB/s",
            [r["upload"]["value"] for r in rust],
            up,
        )
    )
    return rows


def locate(quick: bool) -> RustRef:
    """The Rust binaries: built if needed (full run), only an existing build (``quick``)."""
    if not quick:
        return ensure_built()
    found = find_built()
    if found is None:
        raise RustRefUnavailable(
            "not built on this machine yet and --quick does not build it (~2 min): "
            "`make bench` or `.venv/bin/python -m pytest -m interop` builds it once"
        )
    return found


async def measure(binary: Path, quick: bool) -> list[Row]:
    n_seq = 150 if quick else 1500
    n_conc = 640 if quick else 6400
    mib = 8 if quick else 64
    samples = 1 if quick else 5
    rust: dict[str, list[Figures]] = {runtime: [] for runtime in RUNTIMES}
    seq: list[list[float]] = []
    conc: list[Conc] = []
    up: list[float] = []
    raw_seq: list[list[float]] = []
    raw_conc: list[Conc] = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-rust-") as tmp:
        # Alternate Rust and Python samples so machine noise hits both alike.
        for _ in range(samples):
            for runtime, options in RUNTIMES.items():
                figures = await asyncio.to_thread(bench_local, binary, options, n_seq, n_conc, mib)
                rust[runtime].append(figures)
            s, c, u = await python_sample(Path(tmp), n_seq, n_conc, mib << 20)
            seq.append(s)
            conc.append(c)
            up.append(u)
            rs, rc = await raw_sample(Path(tmp), n_seq, n_conc)
            raw_seq.append(rs)
            raw_conc.append(rc)
    rows: list[Row] = []
    for runtime in RUNTIMES:
        rows += rows_for(runtime, rust[runtime], seq, conc, up, mib)
    rows += ceiling_rows(rust["current-thread"], seq, conc, (raw_seq, raw_conc))
    return rows


def run(quick: bool) -> list[Row]:
    """Benchmark entry point for ``python -m bench`` (see the module docstring)."""
    try:
        ref = locate(quick)
    except RustRefUnavailable as exc:
        print(f"[bench.rust] Rust reference unavailable: {exc}", file=sys.stderr)
        reason = str(exc).splitlines()[0]
        return [
            error_row("rust", f"Rust reference unavailable: {reason}", name="rust: unavailable")
        ]
    return asyncio.run(measure(ref.binary("bench"), quick))


def main() -> None:
    parser = argparse.ArgumentParser(description="the Rust crate beside the Python session")
    parser.add_argument("--quick", action="store_true", help="small run (smoke test)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
