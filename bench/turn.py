"""``make bench-turn``: direct versus TURN (UDP, TCP), side by side in one run (root only).

Two hosts on a routed network (tests/nat.py, ``none``: a direct path exists)
and coturn in the public namespace, started as ``make turn`` starts it. Each
call is a real aiortc call placed in this process (tests/nat.py ``call``):
video (stamped with its frame number) and audio both ways. Printed per path:
time from the answer to the first video frame at each side, glass-to-glass
latency of the video (frame produced to frame decoded, same clock), and the
CPU that coturn spent per relayed call. Also: TURN over UDP without the early
channel binding of peers/turnclient.py, to show what it saves. The answer
reaches the offerer ``--answer-delay`` after the answerer starts its checks,
as it would through the relay. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Literal

from peers.netns import netns_missing
from tests import nat
from tests.nat import World, start_coturn, stop

CASES: list[tuple[str, str | None, Literal["all", "relay"], bool]] = [
    ("direct (host)", None, "all", True),
    ("TURN over UDP", "udp", "relay", True),
    ("TURN over TCP", "tcp", "relay", True),
    ("TURN over TLS", "tls", "relay", True),
    ("TURN/UDP, no early channels", "udp", "relay", False),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.0f} (max {max(values):4.0f})"


async def run(calls: int, media_s: float, answer_delay: float) -> None:
    with tempfile.TemporaryDirectory() as directory:
        async with nat.topology("none") as topology:
            tls = nat.make_tls_files(Path(directory), topology.public_address)
            wrapper = await start_coturn(topology, tls, Path(directory))
            try:
                world = World(topology, tls, wrapper)
                [coturn] = children(wrapper.pid)
                print(
                    f"{calls} calls per path, {media_s:g} s of media each, answer delay "
                    f"{1000 * answer_delay:g} ms; medians in ms (max)\n"
                )
                print(
                    f"{'path':<30} {'first frame A':>18} {'first frame B':>18} "
                    f"{'glass-to-glass':>18} {'coturn CPU/call':>16}"
                )
                for label, kind, policy, early in CASES:
                    first_a: list[float] = []
                    first_b: list[float] = []
                    latency: list[float] = []
                    failed = 0
                    cpu_before = cpu_seconds(coturn)
                    for _ in range(calls):
                        result = await nat.call(
                            topology,
                            world.servers(kind),
                            policy=policy,
                            ca_file=tls.ca,
                            wait=15,
                            media_s=media_s,
                            early_channels=early,
                            answer_delay=answer_delay,
                        )
                        if not result.connected:
                            failed += 1
                            continue
                        first_a.append(result.first_frame_ms(0) or 0.0)
                        first_b.append(result.first_frame_ms(1) or 0.0)
                        latency += [ms for side in result.latencies_ms for ms in side]
                    cpu = (cpu_seconds(coturn) - cpu_before) / calls
                    note = f"  ({failed} failed)" if failed else ""
                    print(
                        f"{label:<30} {ms(first_a):>18} {ms(first_b):>18} {ms(latency):>18} "
                        f"{1000 * cpu:13.0f} ms{note}"
                    )
            finally:
                await stop(wrapper)
    print(f"\ncoturn: {coturn_version()}; machine: {os.cpu_count()} CPUs")


def coturn_version() -> str:
    import subprocess

    argv = ["turnserver", "--version"]
    out = subprocess.run(argv, check=False, capture_output=True, text=True).stdout
    match = re.search(r"\S+", out)
    return f"coturn {match.group(0) if match else '?'}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn", description=__doc__)
    parser.add_argument("--calls", type=int, default=5, help="calls per path")
    parser.add_argument("--media", type=float, default=3.0, help="seconds of media per call")
    parser.add_argument("--answer-delay", type=float, default=0.03, help="seconds")
    args = parser.parse_args()
    if reason := netns_missing() or nat.iptables_missing():
        print(f"bench-turn: {reason}", file=sys.stderr)
        return 1
    asyncio.run(run(args.calls, args.media, args.answer_delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
