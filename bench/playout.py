"""The playout delay's cap at 5 % loss and 75 ms each way, in one process (issue 13).

    sudo .venv/bin/python -m bench.playout                     # caps 250 and 350 ms, 2 runs
    sudo .venv/bin/python -m bench.playout --caps 250 350 --runs 3 --video 640x480@30

Two ``Call``s in two namespaces (tests/inprocess.py), the patient sending the
stamped pattern and the tone, the practitioner the tone only; the patient's
interface impaired both ways by tests/netem.py. Each call runs with one value of
``aiortc_receive.PLAYOUT_MAX_S``, the caps alternating run by run so that they
see the same load. Measured at the practitioner over ``--seconds`` after 1 s of
the impaired link: the seconds frozen (freezes as Chromium counts them), the
time behind the call's best delay from the stamps (p95 and max), both as they
are and less this process's own event-loop stalls (tests/mediacheck.py's
``LoopLag``: what the machine's load costs, which no receive path can help);
the round trip the receive path measured (NACK to retransmission) and the
playout delay it chose, sampled every 0.5 s; packets recovered, holes given up
and late frames dropped. Printed, never asserted: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

from bench.network import video_size
from peers import aiortc_receive, media
from peers.media import Received
from peers.netns import Network, netns_missing
from tests import netem
from tests.inprocess import LocalPair
from tests.mediacheck import LoopLag
from tests.netem import Impairment, Link
from tests.support import within

LINK = Impairment(delay_ms=75, loss=0.05)


def frozen_s(times: list[float], lag: LoopLag | None) -> float:
    """Seconds frozen between frames shown, as Chromium counts freezes (peers/media.py)."""
    gaps = [b - a - (lag.between(a, b) if lag else 0.0) for a, b in itertools.pairwise(times)]
    return media.frozen_seconds(gaps)


def behind_ms(got: Received, since: float, lag: LoopLag | None) -> list[float]:
    """Each frame's time behind the call's best delay (ms), less the stalls while it travelled."""
    best = min(latency for _, latency, _ in got.history)
    return sorted(
        latency - best - (1000 * lag.between(t - latency / 1000, t) if lag else 0.0)
        for t, latency, _ in got.history
        if t >= since
    )


async def run(cap_s: float, seconds: float, video: dict[str, int]) -> dict[str, Any]:
    """One call at ``cap_s``: the practitioner's figures."""
    aiortc_receive.PLAYOUT_MAX_S = cap_s
    before = asdict(aiortc_receive.counters)
    async with Network("playout") as net:
        a, b, dev = await netem.pair(net)
        pair = LocalPair(
            namespaces=(a, b),
            width=video["width"],
            height=video["height"],
            fps=video["fps"],
            video=(True, False),
        )
        async with contextlib.aclosing(pair):
            await within(pair.connect(), 2)
            await within(pair.b.receiver.frames(video["fps"], 10), 4)
            async with LoopLag() as lag, Link(a, dev, both=LINK):
                await asyncio.sleep(1)  # the first NACKs measure the new round trip
                start, rtts, delays = time.monotonic(), [], []
                while time.monotonic() < start + seconds:
                    await asyncio.sleep(0.5)
                    rtts.append(aiortc_receive.nack_rtt_s(pair.b.pc) or 0.0)
                    delays.append(aiortc_receive.playout_delay_s(pair.b.pc) or 0.0)
            got = pair.b.receiver.received
            times = [t for t, _, _ in got.history if t >= start]
            raw, net_of_stalls = behind_ms(got, start, None), behind_ms(got, start, lag)
            after = asdict(aiortc_receive.counters)

    def p95(values: list[float]) -> float:
        return values[min(len(values) - 1, int(len(values) * 0.95))] if values else 0.0

    return {
        "cap_ms": round(cap_s * 1000),
        "fps": round(len(times) / seconds, 1),
        "frozen_s": round(frozen_s(times, None), 2),
        "frozen_less_stalls_s": round(frozen_s(times, lag), 2),
        "behind_p95_max_ms": f"{p95(raw):.0f} / {raw[-1] if raw else 0:.0f}",
        "less_stalls_ms": f"{p95(net_of_stalls):.0f} / {net_of_stalls[-1] if raw else 0:.0f}",
        "rtt_ms": f"{1000 * min(rtts):.0f}-{1000 * max(rtts):.0f}"
        f" (median {1000 * statistics.median(rtts):.0f})",
        "playout_ms": f"{1000 * statistics.median(delays):.0f} (max {1000 * max(delays):.0f})",
        "stalls_s": round(lag.between(start, start + seconds), 1),
        "recovered": after["recovered"] - before["recovered"],
        "holes_skipped": after["holes_skipped"] - before["holes_skipped"],
        "late_dropped": after["late_dropped"] - before["late_dropped"],
    }


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.playout", description=__doc__)
    parser.add_argument("--caps", type=int, nargs="+", default=[250, 350], metavar="MS")
    parser.add_argument("--runs", type=int, default=2, help="calls per cap (alternating)")
    parser.add_argument("--seconds", type=float, default=20.0, help="each call's measured time")
    parser.add_argument(
        "--video",
        type=video_size,
        default={"width": 320, "height": 240, "fps": 15},
        metavar="WxH@FPS",
        help="what the patient sends (default 320x240@15, as tests/test_media.py)",
    )
    args = parser.parse_args(argv)
    if reason := netns_missing():
        print(f"bench-playout: {reason}", file=sys.stderr)
        return 2
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores shared)")
    v = args.video
    print(f"5 % loss, 75 ms each way; {v['width']}x{v['height']}@{v['fps']}, {args.seconds:g} s")
    for _ in range(args.runs):
        for cap in args.caps:
            row = await run(cap / 1000, args.seconds, args.video)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
