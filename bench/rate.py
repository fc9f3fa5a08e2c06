"""``make bench-rate``: an aiortc call on a narrow link, then the link widens; the receiver's
estimate as released and as patched, back to back.

Each variant is one call in a child process (so that the two estimators never share a
process): two ``Call``s in two namespaces (tests/inprocess.py), the patient sending the
640x480 30 fps stamped pattern and the tone, the practitioner the tone only, the patient's
interface impaired both ways by tests/netem.py: ``--narrow`` seconds at 300 kbit/s with
40 ms each way (a 100 ms queue), then ``--wide`` seconds on a clean link. Both variants
carry every other patch of peers/aiortc_patches.py; "aiortc estimate" only leaves out
peers/aiortc_rate.py. Printed per variant: frames per second received over the last 15 s of
the narrow phase (median of 1 s windows), the resolution sent then, audio frames missing or
concealed, the encoder's target, the time from the link widening to 640x480 sent again, and
with ``--trace`` one line per second. Figures are printed, never asserted: see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from aiortc import clock

from peers import aiortc_rate, aiortc_send
from peers.netns import Network, netns_missing
from tests import netem
from tests.inprocess import LocalPair
from tests.netem import Impairment, Link

NARROW = Impairment(delay_ms=40, rate_kbit=300, queue_ms=100)
VARIANTS = ("patched", "aiortc estimate")
LAST_S = 15


async def cell(variant: str, narrow_s: float, wide_s: float) -> dict[str, Any]:
    if variant != "patched":
        aiortc_rate.install = lambda: None
    async with Network("brate") as net:
        a, b, dev = await netem.pair(net)
        pair = LocalPair(namespaces=(a, b), width=640, height=480, fps=30, video=(True, False))
        async with contextlib.aclosing(pair), Link(a, dev, both=NARROW) as link:
            await pair.connect()
            await asyncio.wait_for(pair.b.receiver.frames(1, 10), 20)
            got = pair.b.receiver.received
            start = time.monotonic()
            trace: list[dict[str, Any]] = []
            widened: float | None = None
            back_at: float | None = None
            seen = got.video_frames
            audio = (got.audio_pts or 0) // 960, got.audio_missing + got.audio_concealed
            narrow_audio: tuple[int, int] | None = None
            while (elapsed := time.monotonic() - start) < narrow_s + wide_s:
                await asyncio.sleep(1.0)
                if widened is None and elapsed >= narrow_s:
                    narrow_audio = (
                        (got.audio_pts or 0) // 960 - audio[0],
                        got.audio_missing + got.audio_concealed - audio[1],
                    )
                    await link.update(both=Impairment())
                    widened = time.monotonic()
                sent = aiortc_send.sent_video(pair.a.pc)
                estimator = next(
                    (
                        getattr(r, "_RTCRtpReceiver__remote_bitrate_estimator", None)
                        for r in pair.b.pc.getReceivers()
                        if r.track is not None and r.track.kind == "video"
                    ),
                    None,
                )
                video_sender = next(s for s in pair.a.pc.getSenders() if s.kind == "video")
                loss = getattr(video_sender, "_epc_loss_based", None)
                row = {
                    "t": round(time.monotonic() - start),
                    "fps": got.video_frames - seen,
                    "size": f"{sent.width}x{sent.height}/{sent.frame_divisor}" if sent else "-",
                    "target_kbps": round(sent.target_bps / 1000) if sent else None,
                }
                if estimator is not None:
                    control = estimator.rate_control
                    incoming = estimator.incoming_bitrate.rate(clock.current_ms())
                    row["in_kbps"] = round(incoming / 1000) if incoming else None
                    row["remb_kbps"] = round(control.current_bitrate / 1000)
                    row["detector"] = estimator.detector.state().name.lower()
                    if isinstance(control, aiortc_rate.SteadyAimd):
                        row["decreases"] = f"{control.decreases}+{control.gentle}"
                        row["held"] = estimator.held
                if loss is not None:
                    row["cap_kbps"] = round(loss.cap_bps / 1000) if loss.cap_bps else None
                    row["loss_cuts"] = loss.decreases
                seen = got.video_frames
                trace.append(row)
                if widened is not None and back_at is None and sent and sent.width == 640:
                    back_at = time.monotonic()
            narrow = [r for r in trace if narrow_s - LAST_S < r["t"] <= narrow_s]
            media, bad = narrow_audio or (1, 0)
            return {
                "variant": variant,
                "fps_last_15s": statistics.median(r["fps"] for r in narrow) if narrow else None,
                "sent": narrow[-1]["size"] if narrow else None,
                "target_kbps": narrow[-1]["target_kbps"] if narrow else None,
                "audio_bad_pct": round(100 * bad / media, 1) if media else None,
                "to_640_s": round(back_at - widened, 1) if back_at and widened else None,
                "trace": trace,
            }


COLUMNS = [("variant", 16), ("fps_last_15s", 13), ("sent", 12), ("target_kbps", 12),
           ("audio_bad_pct", 14), ("to_640_s", 9)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rate", description=__doc__)
    parser.add_argument("--narrow", type=float, default=40.0, help="seconds at 300 kbit/s")
    parser.add_argument("--wide", type=float, default=20.0, help="seconds on a clean link")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="one line per second")
    parser.add_argument("--cell", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(asyncio.run(cell(args.cell, args.narrow, args.wide))))
        return
    if reason := netns_missing():
        sys.exit(f"bench-rate: {reason}")
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores shared)")
    print("  ".join(name.ljust(width) for name, width in COLUMNS))
    for _ in range(args.runs):
        for variant in VARIANTS:  # back to back, so that both see the same load
            argv_ = [sys.executable, "-m", "bench.rate", "--narrow", str(args.narrow)]
            done = subprocess.run(
                [*argv_, "--wide", str(args.wide), "--cell", variant],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                print(f"{variant}: failed ({done.stderr.strip().splitlines()[-1:]})")
                continue
            row = json.loads(lines[-1])
            print("  ".join(str(row[name]).ljust(width) for name, width in COLUMNS), flush=True)
            if args.trace:
                for step in row["trace"]:
                    print("    " + " ".join(f"{k}={v}" for k, v in step.items()))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
