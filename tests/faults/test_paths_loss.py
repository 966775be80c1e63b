"""The real relay/edge CLIs over a lossy, long path (pathlab delay line): every byte
arrives intact both ways, with each QUIC stack (aioquic with this library's
delivery-rate congestion control, qh3 with its native one). Speed is measured in
``bench.paths``, never asserted here; this checks that loss recovery delivers exactly
the bytes sent, through the same harness the benchmark uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench import paths as bench_paths
from pathlab import Lab

from tests.support.timing import LONG

#: Bytes per direction: small enough for qh3's loss-limited rate (~0.1 MiB/s at 5 %).
SIZE = {"aioquic": 2 << 20, "qh3": 256 << 10}


@pytest.mark.parametrize("stack", ["aioquic", "qh3"])
def test_tunnel_over_lossy_long_path_delivers_intact(tmp_path: Path, stack: str) -> None:
    size = SIZE[stack]
    with Lab(delay_ms=10, loss=0.05, seed=3) as lab:
        bench_paths.start_services(lab)
        with bench_paths.tunnel(lab, tmp_path, stack) as (sink, source):
            # A transfer that cannot finish within the cap stops early, so ask for
            # completion: the cap is far beyond what these sizes need.
            up = bench_paths.upload(lab, sink, size, LONG * 6, seed=11)
            down = bench_paths.download(lab, source, size, LONG * 6, seed=12)
        stats = lab.stats()
    # Both raise on a sha256 mismatch; here: everything arrived, and loss happened.
    assert up.nbytes == size
    assert down.nbytes == size
    assert stats["to_edge"]["loss"] > 0
    assert stats["to_relay"]["loss"] > 0
