"""``make netem-probe``: what the probe measures through the link emulator, per setting.

Two namespaces joined by one veth (tests/netem.py's ``pair``); the probe sends
call-sized traffic (by default 300 packets/s of 1000 bytes, about 2.5 Mbit/s,
answered by as much the other way) from a to an echo in b. Each setting is
one row, the bare link (no emulator at all) first: one-way delay a -> b
(p50/p95/p99/max, kernel timestamps), what the emulator adds over the bare
link's median, loss each way, throughput at b, packets reordered, the
emulator's CPU (percent of one core while the probe ran) and how late its
latest packet left after its time to send. Figures are printed, never
asserted: see docs/benchmarks.md, "Link emulation".
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass

from peers.netns import Netns, Network, netns_missing
from tests.netem import GilbertElliott, Impairment, Link, percentile, probe


@dataclass(frozen=True)
class Setting:
    name: str
    egress: Impairment | None  # a -> b
    ingress: Impairment | None = None  # b -> a
    rate_pps: float | None = None  # overrides the default offered load
    payload: int | None = None


SETTINGS = [
    Setting("bare link (no emulator)", None),
    Setting("emulator, nothing set", Impairment(), Impairment()),
    Setting("delay 50 ms", Impairment(delay_ms=50)),
    Setting("delay 75 ms, jitter 10 ms", Impairment(delay_ms=75, jitter_ms=10)),
    Setting("loss 2 %", Impairment(loss=0.02)),
    Setting("loss 5 %, 75 ms, both ways", Impairment(delay_ms=75, loss=0.05),
            Impairment(delay_ms=75, loss=0.05)),
    Setting("GE loss p=1 % r=25 % (3.8 %)", Impairment(burst=GilbertElliott(p=0.01, r=0.25))),
    Setting("300 kbit/s, 100 ms buffer, 40 ms", Impairment(delay_ms=40, rate_kbit=300,
            queue_ms=100), rate_pps=75, payload=1000),
]  # fmt: skip


async def row(
    a: Netns, b: Netns, dev: str, setting: Setting, args: argparse.Namespace
) -> dict[str, float]:
    rate = setting.rate_pps or args.rate_pps
    payload = setting.payload or args.payload
    count = int(rate * args.seconds)
    kwargs = {"count": count, "rate_pps": rate, "payload": payload, "reply_payload": payload}
    if setting.egress is None:
        result = await probe(a, b, **kwargs)  # type: ignore[arg-type]
        cpu, late = math.nan, math.nan
    else:
        async with Link(a, dev, egress=setting.egress, ingress=setting.ingress) as link:
            before = await link.stats()
            started = time.monotonic()
            result = await probe(a, b, **kwargs)  # type: ignore[arg-type]
            after = await link.stats()
            cpu = 100 * (after["cpu_s"] - before["cpu_s"]) / (time.monotonic() - started)
            late = max(d["late_ns_max"] for d in after["directions"].values()) / 1e6
    forward = result.forward_ms
    return {
        "p50": percentile(forward, 50), "p95": percentile(forward, 95),
        "p99": percentile(forward, 99), "max": max(forward, default=math.nan),
        "fwd_loss": 100 * result.forward_loss, "back_loss": 100 * result.backward_loss,
        "offered": result.offered_kbit, "through": result.throughput_kbit,
        "reordered": result.reordered, "cpu": cpu, "late": late,
    }  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    print(
        f"netem-probe: {args.rate_pps:g} packets/s of {args.payload} bytes each way unless said, "
        f"{args.seconds:g} s per row; one-way a -> b in ms; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    header = (
        f"{'setting':34} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} {'added':>6} "
        f"{'loss→':>6} {'loss←':>6} {'kbit/s':>14} {'reord':>5} {'CPU%':>5} {'late':>5}"
    )
    print(header)
    async with Network("netem") as net:
        from tests.netem import pair

        a, b, dev = await pair(net)
        bare_p50 = math.nan
        for setting in SETTINGS:
            r = await row(a, b, dev, setting, args)
            if setting.egress is None:
                bare_p50 = r["p50"]
            added = r["p50"] - bare_p50
            print(
                f"{setting.name:34} {r['p50']:7.2f} {r['p95']:7.2f} {r['p99']:7.2f} "
                f"{r['max']:7.2f} {added:6.2f} {r['fwd_loss']:5.1f}% {r['back_loss']:5.1f}% "
                f"{r['through']:6.0f}/{r['offered']:<6.0f}  {r['reordered']:5.0f} "
                f"{r['cpu']:5.1f} {r['late']:5.2f}",
                flush=True,
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.netem", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per setting (default 5)")
    parser.add_argument("--rate-pps", type=float, default=300.0, help="packets/s each way")
    parser.add_argument("--payload", type=int, default=1000, help="UDP payload bytes")
    return parser.parse_args()


if __name__ == "__main__":
    if reason := netns_missing():
        sys.exit(f"netem-probe: {reason}")
    asyncio.run(main(parse_args()))
