"""The path lab itself: what the delay line does to packets, partitions, the veth mode,
and that nothing the lab creates outlives it (also after a failure)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time

import pytest
from pathlab import Lab, LabError, _pid_alive, cleanup_stale, lab_namespaces
from pathlab.measure import python_command, tcp_throughput

from tests.support.timing import MS

pytestmark = pytest.mark.faults

QUIET = 500 * MS  # nothing more arrives after this much silence (delays here are <= 50 ms)


def _udp_pair(lab: Lab) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    (rx,) = lab.socket(lab.edge_ns, socket.AF_INET, socket.SOCK_DGRAM)
    (tx,) = lab.socket(lab.relay_ns, socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((lab.edge_ns.address, 0))
    rx.settimeout(QUIET)
    return rx, tx, rx.getsockname()


def _blast(lab: Lab, count: int, size: int = 200) -> list[int]:
    """Send ``count`` numbered datagrams relay -> edge; return the numbers received
    (read by a thread while sending, so the receive buffer never overflows)."""
    rx, tx, dest = _udp_pair(lab)
    got: list[int] = []

    def receive() -> None:
        deadline = time.monotonic() + 30_000 * MS
        while time.monotonic() < deadline:
            try:
                data = rx.recv(65536)
            except TimeoutError:
                return
            got.append(int.from_bytes(data[:4], "big"))

    with rx, tx:
        reader = threading.Thread(target=receive)
        reader.start()
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big") + b"x" * (size - 4), dest)
            if i % 50 == 49:
                time.sleep(1 * MS)
        reader.join()
    return got


def test_seeded_loss_rate_and_reproducibility() -> None:
    patterns = []
    for seed in (11, 11, 12):
        with Lab(loss=0.2, seed=seed) as lab:
            got = _blast(lab, 2000)
            stats = lab.stats()["to_edge"]
        assert stats["rx"] == 2000 and stats["tx"] == len(got)
        assert stats["loss"] == 2000 - len(got)
        # Binomial(2000, 0.2): mean 400, sd 17.9; 5 sd either way.
        assert 310 <= stats["loss"] <= 490, stats
        assert got == sorted(got), "the line must not reorder"
        patterns.append(got)
    assert patterns[0] == patterns[1], "the same seed must drop the same packets"
    assert patterns[0] != patterns[2]


def test_gilbert_elliott_losses_come_in_bursts() -> None:
    with Lab(ge_p=0.05, ge_r=0.5, seed=5) as lab:
        got = set(_blast(lab, 4000))
    lost = [i for i in range(4000) if i not in got]
    runs = sum(1 for i in lost if i - 1 not in lost)
    # Stationary loss p/(p+r) = 9.1 %; mean burst 1/r = 2 packets (Bernoulli: ~1.1).
    assert 200 <= len(lost) <= 560, len(lost)
    assert len(lost) / runs > 1.5, (len(lost), runs)


def test_delay_applies_each_way() -> None:
    delay_ms = 30
    with Lab(delay_ms=delay_ms) as lab:
        (listener,) = lab.socket(lab.edge_ns)
        (client,) = lab.socket(lab.relay_ns)
        with listener, client:
            listener.bind((lab.edge_ns.address, 0))
            listener.listen()
            client.settimeout(5000 * MS)
            started = time.monotonic()
            client.connect(listener.getsockname())  # SYN there, SYN-ACK back
            rtt = time.monotonic() - started
    assert rtt >= 0.95 * 2 * delay_ms / 1000, f"round trip {rtt * 1e3:.1f} ms < 2 x {delay_ms} ms"


def test_partition_drops_everything_until_healed() -> None:
    with Lab() as lab:
        assert len(_blast(lab, 50)) == 50
        lab.partition()
        assert lab.partitioned
        assert _blast(lab, 50) == []
        lab.heal()
        assert len(_blast(lab, 50)) == 50
        stats = lab.stats()["to_edge"]
        assert stats["partition"] == 50 and stats["tx"] == 100
        # The same switch by signal (for `python -m pathlab -- CMD` users).
        assert lab.line_pid is not None
        os.kill(lab.line_pid, 10)  # SIGUSR1
        deadline = time.monotonic() + 5000 * MS
        while lab.stats()["to_edge"]["partition"] == 50 and time.monotonic() < deadline:
            _blast(lab, 1)
        assert lab.stats()["to_edge"]["partition"] > 50


def test_path_mtu_drops_bigger_packets_silently() -> None:
    with Lab(mtu=1500, path_mtu=1200) as lab:
        rx, tx, dest = _udp_pair(lab)
        with rx, tx:
            tx.sendto(b"s" * 1100, dest)  # 1128 bytes of IP: passes
            tx.sendto(b"b" * 1300, dest)  # 1328 > 1200: dropped, no ICMP, no error
            tx.sendto(b"t" * 1100, dest)
            got = []
            try:
                while True:
                    got.append(rx.recv(65536)[:1])
            except TimeoutError:
                pass
        stats = lab.stats()["to_edge"]
    assert got == [b"s", b"t"]
    assert stats["mtu"] == 1


def test_rate_limit_paces_a_transfer() -> None:
    with Lab(rate_mbit=40) as lab:
        result = tcp_throughput(lab, 4 << 20, sender="relay", timeout=60_000 * MS)
    assert result.intact
    # 4 MiB at 40 Mbit/s is 0.84 s; the bucket lets at most 64 KiB through early.
    assert result.seconds >= 0.7 * (4 << 20) * 8 / 40e6, result


def test_settings_change_at_run_time_and_bad_values_are_refused() -> None:
    with Lab() as lab:
        lab.set(loss=1.0, direction="to_relay")
        assert len(_blast(lab, 20)) == 20  # to_edge untouched
        lab.set(loss=1.0)
        assert _blast(lab, 20) == []
        lab.set(loss=0.0)
        assert len(_blast(lab, 20)) == 20
        with pytest.raises(ValueError, match="probability"):
            lab.set(loss=1.5)
        with pytest.raises(ValueError, match="direction"):
            lab.set(loss=0.1, direction="sideways")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            lab.set(bogus=1)  # type: ignore[call-arg]


def test_veth_mode_carries_traffic_and_partitions_by_link_down() -> None:
    with Lab(emulate=False, mtu=1500) as lab:
        result = tcp_throughput(lab, 8 << 20, sender="edge", timeout=60_000 * MS)
        assert result.intact
        lab.partition()
        (client,) = lab.socket(lab.relay_ns)
        with client, pytest.raises(OSError):
            client.settimeout(1000 * MS)
            client.connect((lab.edge_ns.address, 9))
        lab.heal()
        assert len(_blast(lab, 20)) == 20
        with pytest.raises(LabError):
            lab.set(loss=0.1)


def test_everything_is_removed_even_after_a_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        names = (lab.relay_ns.name, lab.edge_ns.name)
        line = lab.line_pid
        sleeper = lab.popen(lab.edge_ns, ["sleep", "600"])
        other = Lab()  # a second lab at the same time: different names, both work
        with other:
            assert {other.relay_ns.name, other.edge_ns.name}.isdisjoint(names)
            assert len(_blast(other, 5)) == 5
        raise RuntimeError("boom")
    assert not set(names) & set(lab_namespaces())
    assert sleeper.poll() is not None
    assert line is not None and not _pid_alive(line)


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    pid = 4_000_000
    while _pid_alive(pid):
        pid += 1
    name = f"pathlab-{pid}-abcdef-relay"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10_000 * MS)
    try:
        removed = cleanup_stale()  # (a parallel run's Lab() may have removed it first)
        assert name not in lab_namespaces(), removed
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_command_line_runs_a_command_in_a_lab_and_cleans_up() -> None:
    script = (
        'ip netns exec "$PATHLAB_EDGE_NS" ip -br addr show ple; '
        'echo "relay=$PATHLAB_RELAY_NS line=$PATHLAB_LINE_PID"; exit 3'
    )
    done = subprocess.run(
        [*python_command("pathlab", "--delay-ms", "5", "--"), "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert "10.99.0.2" in done.stdout
    m = re.search(r"relay=(\S+) line=(\d+)", done.stdout)
    assert m, done.stdout
    assert m.group(1) not in lab_namespaces()
    assert not _pid_alive(int(m.group(2)))
    bad = subprocess.run(
        python_command("pathlab", "--loss", "2", "--", "true"),
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        check=False,
    )
    assert bad.returncode == 2 and "probability" in bad.stderr, bad.stderr


def test_queue_limit_tail_drops_behind_a_slow_rate() -> None:
    # 1 Mbit/s with a 2 KiB bucket and a 10-packet queue: a burst of 100 datagrams
    # (200 bytes each) overflows the queue; what was queued is delivered in order.
    with Lab(rate_mbit=1, burst_bytes=2048, limit=10) as lab:
        got = _blast(lab, 100)
        stats = lab.stats()["to_edge"]
    assert stats["queue"] > 0, stats
    assert stats["tx"] == len(got) and stats["rx"] == 100
    assert got == sorted(got)
