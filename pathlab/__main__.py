"""``python -m pathlab [SETTINGS] [--measure BYTES] [-- CMD ...]``: build a lab, run CMD.

CMD runs in the current namespace with the lab described in its environment:
``PATHLAB_RELAY_NS``/``PATHLAB_EDGE_NS`` (namespace names, for ``ip netns exec``),
``PATHLAB_RELAY_ADDR``/``PATHLAB_EDGE_ADDR`` and ``PATHLAB_LINE_PID`` (send it SIGUSR1
to partition, SIGUSR2 to heal). The exit status is CMD's; the lab is deleted afterwards,
whatever happens. ``--measure BYTES`` first blasts BYTES over TCP each way between the
namespaces and prints one JSON line per direction. See pathlab/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Literal

from . import Lab, LabError, LinkSettings
from .measure import tcp_throughput


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pathlab",
        description="Two network namespaces joined by an emulated path (delay, loss, rate, "
        "MTU, partition); runs CMD with the lab in its environment.",
    )
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="extra delay in [0, J]")
    p.add_argument("--loss", type=float, default=0.0, help="random loss probability (0..1)")
    p.add_argument("--ge-p", type=float, default=0.0, help="Gilbert-Elliott P(good->bad)")
    p.add_argument("--ge-r", type=float, default=0.0, help="Gilbert-Elliott P(bad->good)")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="rate limit (0: none)")
    p.add_argument("--mtu", type=int, default=1500, help="interface MTU (default 1500)")
    p.add_argument("--path-mtu", type=int, default=0, help="drop bigger packets silently")
    p.add_argument("--seed", type=int, default=1, help="loss generator seed")
    p.add_argument("--veth", action="store_true", help="plain veth pair, no emulation")
    p.add_argument("--tcp-buffer-max", type=int, help="tcp_rmem/tcp_wmem max in the lab")
    p.add_argument("--tcp-congestion", help="--measure: sender's TCP congestion control")
    p.add_argument("--measure", type=int, metavar="BYTES", help="TCP blast each way first")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd and args.measure is None:
        _parser().error("give --measure BYTES and/or -- CMD")
    try:
        settings = LinkSettings(
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            loss=args.loss,
            ge_p=args.ge_p,
            ge_r=args.ge_r,
            rate_mbit=args.rate_mbit,
            path_mtu=args.path_mtu,
        )
        kwargs = {} if args.veth else dataclasses.asdict(settings)
        with Lab(
            mtu=args.mtu,
            seed=args.seed,
            emulate=not args.veth,
            tcp_buffer_max=args.tcp_buffer_max,
            **kwargs,
        ) as lab:
            if args.measure is not None:
                senders: tuple[Literal["edge", "relay"], ...] = ("edge", "relay")
                for sender in senders:
                    t = tcp_throughput(
                        lab, args.measure, sender=sender, congestion=args.tcp_congestion
                    )
                    row = {
                        "from": sender,
                        "congestion": args.tcp_congestion or "default",
                        "bytes": t.nbytes,
                        "seconds": round(t.seconds, 3),
                        "MiB/s": round(t.mib_per_s, 2),
                        "intact": t.intact,
                    }
                    print(json.dumps(row), flush=True)
            if not cmd:
                return 0
            env = dict(
                os.environ,
                PATHLAB_RELAY_NS=lab.relay_ns.name,
                PATHLAB_EDGE_NS=lab.edge_ns.name,
                PATHLAB_RELAY_ADDR=lab.relay_ns.address,
                PATHLAB_EDGE_ADDR=lab.edge_ns.address,
                PATHLAB_LINE_PID=str(lab.line_pid or ""),
            )
            return subprocess.run(cmd, env=env, check=False).returncode
    except (LabError, ValueError) as exc:
        print(f"pathlab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
