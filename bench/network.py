"""``make bench-network``: aiortc calls through emulated bad links, with and without the patches.

Each cell is one 20 s call in a child process (so that aiortc as released and
aiortc as patched never share a process): two ``Call``s in two namespaces
(tests/inprocess.py), the patient sending the 640x480 30 fps stamped pattern
and the tone, the practitioner the tone only, the patient's interface
impaired both ways by tests/netem.py. Measured at the practitioner, from the
stamps: frames per second, freezes (W3C definition) and their total, the
longest gap, how far behind the call's best delay frames were shown (p95 and
max), audio frames missing or concealed (of the media time), the last
resolution received, and this process's own event-loop stalls (the machine's
load). The outage cell adds the time from the link's return to the first
frame. Figures are printed, never asserted: see docs/benchmarks.md.

Not here yet (issue 13, slice 6): the Chromium<->Chromium reference column and
both mixed directions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

from peers import aiortc_patches
from peers.netns import Network, netns_missing
from tests import netem
from tests.inprocess import LocalPair
from tests.netem import Impairment, Link, percentile

LINKS: dict[str, Impairment] = {
    "clean": Impairment(),
    "2 % loss": Impairment(loss=0.02),
    "5 % loss, 75 ms": Impairment(delay_ms=75, loss=0.05),
    "300 kbit/s, 40 ms": Impairment(delay_ms=40, rate_kbit=300, queue_ms=100),
    "3 s outage": Impairment(),
}
VARIANTS = ("patched", "aiortc 1.16")
OUTAGE_AT_S, OUTAGE_S = 8.0, 3.0


async def cell(link: str, variant: str, seconds: float) -> dict[str, Any]:
    if variant != "patched":
        aiortc_patches.steady_media = lambda: None
    stalls: list[float] = []

    async def watch_loop() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            if (lag := time.monotonic() - before - 0.01) > 0.02:
                stalls.append(lag)

    async with Network("bnet") as net:
        a, b, dev = await netem.pair(net)
        pair = LocalPair(namespaces=(a, b), width=640, height=480, fps=30, video=(True, False))
        async with contextlib.aclosing(pair):
            await pair.connect()
            await asyncio.wait_for(pair.b.receiver.frames(10, 10), 20)
            got = pair.b.receiver.received
            watcher = asyncio.create_task(watch_loop())
            back: float | None = None
            async with Link(a, dev, both=LINKS[link]) as emulator:
                start = time.monotonic()
                base = (got.audio_pts or 0) // 960, got.audio_missing, got.audio_concealed
                freezes, frozen = got.freezes, got.frozen_s
                if link == "3 s outage":
                    await asyncio.sleep(OUTAGE_AT_S)
                    await emulator.update(outage=True)
                    await asyncio.sleep(OUTAGE_S)
                    await emulator.update(outage=False)
                    back = time.monotonic()
                    await asyncio.sleep(seconds - OUTAGE_AT_S - OUTAGE_S)
                else:
                    await asyncio.sleep(seconds)
                end = time.monotonic()
            watcher.cancel()
            frames = [entry for entry in got.history if start <= entry[0] <= end]
            best = min(latency for _, latency, _ in got.history)
            behind = [latency - best for _, latency, _ in frames]
            media = (got.audio_pts or 0) // 960 - base[0]
            bad = got.audio_missing - base[1] + got.audio_concealed - base[2]
            times = [t for t, _, _ in frames]
            after = [t for t in times if back is not None and t >= back]
            return {
                "link": link,
                "variant": variant,
                "fps": round(len(frames) / (end - start), 1),
                "freezes": got.freezes - freezes,
                "frozen_s": round(got.frozen_s - frozen, 1),
                "longest_gap_s": round(
                    max((y - x for x, y in itertools.pairwise(times)), default=0), 2
                ),
                "behind_p95_ms": round(percentile(behind, 95)),
                "behind_max_ms": round(max(behind, default=0)),
                "audio_bad_pct": round(100 * bad / media, 1) if media else None,
                "resolution": f"{got.width}x{got.height}",
                "back_after_s": round(after[0] - back, 2) if after and back else None,
                "stalls_s": round(sum(stalls), 1),
            }


COLUMNS = [
    ("link", 18), ("variant", 12), ("fps", 5), ("freezes", 8), ("frozen_s", 9),
    ("longest_gap_s", 14), ("behind_p95_ms", 14), ("behind_max_ms", 14),
    ("audio_bad_pct", 14), ("resolution", 11), ("back_after_s", 13), ("stalls_s", 9),
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--links", nargs="*", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--cell", nargs=2, metavar=("LINK", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        link, variant = args.cell
        print(json.dumps(asyncio.run(cell(link, variant, args.seconds))))
        return
    if reason := netns_missing():
        sys.exit(f"bench-network: {reason}")
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores shared)")
    print("  ".join(name.ljust(width) for name, width in COLUMNS))
    for link in args.links:
        for variant in VARIANTS:  # back to back, so that both see the same load
            argv_ = [sys.executable, "-m", "bench.network", "--seconds", str(args.seconds)]
            done = subprocess.run(
                [*argv_, "--cell", link, variant], capture_output=True, text=True, check=False
            )
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                print(f"{link} / {variant}: failed ({done.stderr.strip().splitlines()[-1:]})")
                continue
            row = json.loads(lines[-1])
            print("  ".join(str(row[name]).ljust(width) for name, width in COLUMNS), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
