"""The real relay/edge CLIs over a lossy, long path (pathlab delay line): every byte
arrives intact both ways, with each QUIC stack (aioquic with this library's
delivery-rate congestion control, qh3 with its native one). Speed is measured in
``bench.paths``, never asserted here; this checks that loss recovery delivers exactly
the bytes sent, through the same harness the benchmark uses.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bench import paths as bench_paths
from pathlab import Lab

from tests.support.timing import LONG, MS

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


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
def test_lossy_path_hint_in_the_edge_log(tmp_path: Path, stack: str) -> None:
    """The lossy-path hint (tunnel/losshint.py) on a real lossy path: an edge sending a
    download over a line losing 2 % each way logs, with qh3 (loss-based controller),
    one warning naming the loss, the RTT and ``--stack aioquic``; with aioquic (the
    delivery-rate controller) none. The edge judges its session at its keep-alive
    events (every 5 s by default), so a download of ~13 s covers the 10 s window."""
    with Lab(delay_ms=10, loss=0.02, seed=5) as lab:
        bench_paths.start_services(lab)
        with bench_paths.tunnel(lab, tmp_path, stack) as (_sink, source):
            # Read for a while (the cap ends it): the edge is the bulk sender here.
            down = bench_paths.download(lab, source, 1 << 30, 13_000 * MS, seed=13)
            log = tmp_path / f"tunnel-{stack}" / "edge.log"
            hints: list[str] = []
            for _ in range(20 if stack == "qh3" else 1):  # written as the window closes
                hints = [ln for ln in log.read_text().splitlines() if "QUIC packets lost" in ln]
                if hints:
                    break
                time.sleep(100 * MS)  # another process's log file: nothing to wait on
        stats = lab.stats()
    assert down.nbytes > 0
    assert stats["to_relay"]["loss"] > 0
    if stack == "aioquic":
        assert hints == []
        return
    assert len(hints) == 1, hints
    (hint,) = hints
    assert "WARNING" in hint and f"relay {lab.relay_ns.address}:" in hint
    assert "RTT " in hint and "--stack aioquic" in hint and "qh3-reno" in hint
