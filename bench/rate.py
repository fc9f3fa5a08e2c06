"""``make bench-rate``: an aiortc call on a narrow link, then the link widens; the receiver's
estimate as released and as patched, back to back.

Each variant is one call in a child process (so that the two estimators never share a
process): two ``Call``s in two namespaces (tests/inprocess.py), the patient sending the
640x480 30 fps stamped pattern and the tone, the practitioner the tone only, the patient's
interface impaired both ways by tests/netem.py: ``--narrow`` seconds at 300 kbit/s with
40 ms each way (a 100 ms queue), then ``--wide`` seconds on a clean link. Both variants
carry every other patch of peers/aiortc_patches.py; "aiortc estimate" only leaves out
peers/aiortc_rate.py, "no probing" only its sender's probes (``Prober``). Printed per
variant: frames per second received over the last 15 s of
the narrow phase (median of 1 s windows), the resolution sent then, audio frames missing or
concealed, the encoder's target, the time from the link widening to 640x480 sent again, and
with ``--trace`` one line per second.

``--chromium``: instead, a Chromium patient (the project's page, Chromium's fake
camera at 640x480) on a clean link to each receiver in turn, back to back: a
Chromium practitioner (the reference), and an aiortc practitioner with each
estimate of ``PEER_VARIANTS`` (aiortc's REMB, the previous session's patched
REMB, with libwebrtc's probe detection on aiortc's arrival times, the same on
the kernel's arrival times, transport-cc). Printed per call: the seconds sampled,
those at 640 wide, the page's mean ``targetBitrate`` over the call and over its
second half, and the samples whose ``qualityLimitationReason`` was "bandwidth".
``--start clean`` (or ``300``): instead, calls from their start on that link, with the
sender's start probe and without it (``aiortc_rate.START_PROBE``), back to back: seconds
from the practitioner's first frame to the patient's ladder at 640x480, its first rung
changes, the practitioner's first REMB values, the longest gap and the most behind.
``--stalls``: instead, 30 s calls on the 300 kbit/s link while this process's event loop is
blocked ``--stall-ms`` every ``--every`` s (tests/mediacheck.py ``Stalls``; both peers are in
it), the sender's variants of ``--variants`` interleaved (``SKIP_LATE`` and ``PACING`` of
peers/aiortc_send.py on or off): fps, freezes and the longest gap, most behind and frames
over 500 ms behind (each less the stalls), packets the emulator tail-dropped, frames skipped.

Figures are printed, never asserted: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from aiortc import clock

from bench.network import SETTINGS, Side, first_frame, open_page, start_side
from peers import aiortc_rate, aiortc_send
from peers.media import WARMUP_S
from peers.netns import Network, netns_missing
from tests import netem
from tests.browser import Browsers, chromium_missing
from tests.inprocess import LocalPair
from tests.mediacheck import LoopLag, Stalls, after, longest_gap, most_behind
from tests.netem import Impairment, Link
from tests.processes import Process, RelayProcess, spawn
from tests.recovery import RELAY_ADDRESS, recovery_network

NARROW = Impairment(delay_ms=40, rate_kbit=300, queue_ms=100)
VARIANTS = ("patched", "no probing", "aiortc estimate")
LAST_S = 15


@contextlib.asynccontextmanager
async def bench_call(name: str, link: Impairment) -> AsyncIterator[tuple[LocalPair, LoopLag, Link]]:
    """A 640x480 call at 30 fps in namespaces of its own (``name``), video from the patient
    only, through ``link`` both ways on the patient's side, its first 10 frames shown."""
    async with Network(name) as net:
        a, b, dev = await netem.pair(net)
        pair = LocalPair(namespaces=(a, b), width=640, height=480, fps=30, video=(True, False))
        async with (
            contextlib.aclosing(pair),
            LoopLag() as lag,
            Link(a, dev, both=link) as shaped,
        ):
            await pair.connect()
            await asyncio.wait_for(pair.b.receiver.frames(1, 10), 20)
            yield pair, lag, shaped


async def cell(variant: str, narrow_s: float, wide_s: float) -> dict[str, Any]:
    if variant == "no probing":
        aiortc_rate.PROBING = False
    elif variant != "patched":
        aiortc_rate.install = lambda: None
    async with bench_call("brate", NARROW) as (pair, _, link):
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
            probes = getattr(video_sender, "_epc_prober", None)
            if probes is not None and isinstance(estimator, aiortc_rate.SteadyEstimator):
                row["probes"] = f"{probes.sent} sent, {len(estimator.probed)} taken"
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


# -- the start: from the first frame to 640x480 (issue 13, session 5) --------------------------

START_VARIANTS = ("start probe", "no start probe")
START_LINKS = {"clean": Impairment(), "300": NARROW}


async def start_cell(variant: str, link_name: str, seconds: float) -> dict[str, Any]:
    """One call from its start on ``link_name``: when the patient's ladder reached 640x480,
    from the practitioner's first frame, and what the practitioner's estimator sent first."""
    if variant == "no start probe":
        aiortc_rate.START_PROBE = False
    async with bench_call("bstart", START_LINKS[link_name]) as (pair, lag, _):
        got = pair.b.receiver.received
        await asyncio.sleep(seconds)
        first = got.first_video or 0.0
        ladder = aiortc_send.ladder_of(pair.a.pc)
        history = ladder.history if ladder is not None else []
        at_640 = next((when for when, rung in history if rung == 0), None)
        estimator = next(
            (
                getattr(r, "_RTCRtpReceiver__remote_bitrate_estimator", None)
                for r in pair.b.pc.getReceivers()
                if r.track is not None and r.track.kind == "video"
            ),
            None,
        )
        estimates = getattr(estimator, "estimates", [])
        probed = getattr(estimator, "probed", [])
        origin = estimates[0][0] if estimates else 0
        shown = after(got, first + WARMUP_S)
        return {
            "variant": variant,
            "link": link_name,
            "to_640_s": round(at_640 - first, 2) if at_640 is not None else None,
            "rungs": " ".join(f"{when - first:.2f}:{rung}" for when, rung in history[:6]),
            "first_rembs": " ".join(
                f"{(at - origin) / 1000:.2f}:{bps // 1000}" for at, bps in estimates[:4]
            ),
            "probes_taken": len(probed),
            "longest_gap_s": round(longest_gap(after(got, first), lag), 2),
            "behind_max_ms": round(most_behind(got, shown, lag)) if shown else None,
            "load": round(os.getloadavg()[0], 1),
        }


START_COLUMNS = [("variant", 15), ("link", 6), ("to_640_s", 9), ("longest_gap_s", 14),
                 ("behind_max_ms", 14), ("probes_taken", 13), ("load", 5), ("rungs", 30),
                 ("first_rembs", 40)]  # fmt: skip


def run_cell(
    argv: list[str], variant: str, columns: list[tuple[str, int]]
) -> dict[str, Any] | None:
    """``python -m bench.rate ARGV`` (one cell, in a process of its own): its row printed in
    ``columns`` and returned, or a line saying it failed and None."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.rate", *argv], capture_output=True, text=True, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"{variant}: failed ({done.stderr.strip().splitlines()[-1:]})")
        return None
    row: dict[str, Any] = json.loads(lines[-1])
    print("  ".join(str(row[name]).ljust(width) for name, width in columns), flush=True)
    return row


def start_main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores shared)")
    print("  ".join(name.ljust(width) for name, width in START_COLUMNS))
    for _ in range(args.runs):
        for variant in START_VARIANTS:  # back to back, so that both see the same load
            run_cell(
                ["--start", args.start, "--seconds", str(args.seconds), "--cell", variant],
                variant,
                START_COLUMNS,
            )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


# -- the sender after its own event loop's stalls (issue 13, session 6) ------------------------

# What each variant leaves on (peers/aiortc_send.py): "today" none, as the code was.
STALL_VARIANTS: dict[str, dict[str, bool]] = {
    "today": {"SKIP_LATE": False, "PACING": False},
    "skip": {"SKIP_LATE": True, "PACING": False},
    "pacer": {"SKIP_LATE": False, "PACING": True},
    "both": {"SKIP_LATE": True, "PACING": True},
}


async def stall_cell(
    variant: str, seconds: float, stall_s: float, every_s: float
) -> dict[str, Any]:
    """One call on the 300 kbit/s link with this process's event loop stalled ``stall_s`` every
    ``every_s`` (``Stalls``: both peers are in this process): the practitioner's frames, judged
    as the 300 kbit/s test judges them (less the stalls themselves), and the link's drops."""
    for name, value in STALL_VARIANTS[variant].items():
        setattr(aiortc_send, name, value)
    async with bench_call("bstall", NARROW) as (pair, lag, link):
        got = pair.b.receiver.received
        first = got.first_video or time.monotonic()
        async with Stalls(stall_s, every_s) as stalls:
            await asyncio.sleep(seconds)
        counters = (await link.stats())["directions"]["egress"]
        shown = after(got, first + WARMUP_S)
        best = min(latency for _, latency, _ in got.history)
        behind = [
            latency - best - 1000 * lag.between(t - latency / 1000, t) for t, latency, _ in shown
        ]
        sent = aiortc_send.sent_video(pair.a.pc)
        ladder = aiortc_send.ladder_of(pair.a.pc)
        times = [t for t, _, _ in after(got, first)]
        gaps = [b - a - lag.between(a, b) for a, b in itertools.pairwise(times)]
        frozen = [gap for gap in gaps if gap >= FROZEN_GAP_S]
        return {
            "variant": variant,
            "fps": round(len(times) / (time.monotonic() - first), 1),
            "freezes": len(frozen),
            "frozen_s": round(sum(frozen), 1),
            "longest_gap_s": round(longest_gap(after(got, first), lag), 2),
            "behind_max_ms": round(max(behind, default=0)),
            "over_500": sum(1 for ms in behind if ms > 500),
            "drops": counters["overflow"],
            "stalls": len(stalls.made),
            "skipped": getattr(ladder, "late_skipped", 0),
            "size": f"{sent.width}x{sent.height}/{sent.frame_divisor}" if sent else "-",
            "load": round(os.getloadavg()[0], 1),
        }


FROZEN_GAP_S = 0.2  # a gap, less the stalls within it, this long is a freeze (W3C: 183 ms at 30)
STALL_COLUMNS = [("variant", 8), ("fps", 5), ("freezes", 8), ("frozen_s", 9),
                 ("longest_gap_s", 14), ("behind_max_ms", 14), ("over_500", 9), ("drops", 6),
                 ("stalls", 7), ("skipped", 8), ("size", 10), ("load", 5)]  # fmt: skip


def stall_main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores shared)")
    print(f"stalls: {args.stall_ms} ms every {args.every} s; {args.seconds} s per call")
    print("  ".join(name.ljust(width) for name, width in STALL_COLUMNS))
    for _ in range(args.runs):
        for variant in args.variants:  # interleaved, so that all see the same load
            run_cell(
                ["--stalls", "--seconds", str(args.seconds), "--stall-ms", str(args.stall_ms),
                 "--every", str(args.every), "--cell", variant],
                variant,
                STALL_COLUMNS,
            )  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}")


# -- Chromium sending to an aiortc practitioner on a clean link (issue 13, slice 5) -----------

PEER_VARIANTS: dict[str, str] = {
    "aiortc REMB": "aiortc 1.16's RemoteBitrateEstimator (aiortc_rate off)",
    "patched REMB": "SteadyEstimator's REMB without probe detection (the previous session's)",
    "probed REMB": "SteadyEstimator's REMB with libwebrtc's probe detection, aiortc's stamps",
    "stamped REMB": "SteadyEstimator's REMB with probe detection, the kernel's stamps",
    "transport-cc": "transport-cc feedback (Chromium's own estimate)",
}
RECEIVERS = ("Chromium", *PEER_VARIANTS)

# The patient page's outbound video and the pair's available bitrate, every second.
OUTBOUND = """(async () => {
  const call = epedicare.call;
  const out = {};
  if (!call) return out;
  for (const s of (await call.pc.getStats()).values()) {
    if (s.type === "outbound-rtp" && s.kind === "video") {
      out.width = s.frameWidth; out.target = s.targetBitrate; out.bytes = s.bytesSent;
      out.limit = s.qualityLimitationReason;
    } else if (s.type === "candidate-pair" && s.nominated && s.availableOutgoingBitrate) {
      out.available = s.availableOutgoingBitrate;
    }
  }
  return out;
})()"""


def peer_variant(variant: str) -> None:
    """Set this process's estimate to ``variant`` (before the call starts)."""
    if variant == "aiortc REMB":
        aiortc_rate.install = lambda: None
    else:
        aiortc_rate.PROBES = variant != "patched REMB"
        aiortc_rate.KERNEL_STAMPS = variant in ("stamped REMB", "transport-cc")
        aiortc_rate.TRANSPORT_CC = variant == "transport-cc"


async def chromium_cell(receiver: str, seconds: float, tmp: Path) -> dict[str, Any]:
    """A Chromium patient sending to ``receiver`` on a clean link: its outbound video."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(SETTINGS), encoding="utf-8")
    processes: list[Process] = []
    async with recovery_network("epc-brc") as net, Browsers(tmp) as browsers:
        relay = RelayProcess(tmp / "config.yaml", net.hub.name, host=RELAY_ADDRESS)
        await relay.start()
        try:
            patient = await open_page("patient", net, relay, browsers)
            if receiver == "Chromium":
                page = await open_page("practitioner", net, relay, browsers)
                seeing = await start_side("practitioner", page, net, relay, tmp)
            else:
                stats_json = tmp / "practitioner.json"
                argv = [
                    sys.executable, "-m", "bench.rate", "--peer", receiver, "--",
                    "--config", str(tmp / "config.yaml"), "--relay", relay.url,
                    "--session", "bench", "--audio", "tone", "--stats-json", str(stats_json),
                ]  # fmt: skip
                command = net.side("practitioner").command()
                processes.append(process := await spawn("practitioner", argv, command))
                seeing = Side(process=process, stats_json=stats_json)
            await start_side("patient", patient, net, relay, tmp)
            await first_frame(seeing)
            start = time.monotonic()
            samples: list[dict[str, Any]] = []
            while (elapsed := time.monotonic() - start) < seconds:
                sample = await patient.evaluate(OUTBOUND)
                sample["t"] = round(elapsed, 1)
                samples.append(sample)
                await asyncio.sleep(max(0.0, len(samples) - (time.monotonic() - start)))
            return chromium_row(receiver, samples)
        finally:
            for process in processes:
                await process.stop()
            await relay.stop()


def chromium_row(receiver: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one Chromium patient's samples."""
    targets = [s["target"] for s in samples if s.get("target")]
    widths = [s.get("width") for s in samples]
    wide = [i for i, w in enumerate(widths) if w == 640]
    tail = [s["target"] for s in samples[len(samples) // 2 :] if s.get("target")]
    return {
        "receiver": receiver,
        "samples": len(samples),
        "at_640": len(wide),
        "target_mean": round(statistics.mean(targets) / 1000) if targets else None,
        "target_2nd_half": round(statistics.mean(tail) / 1000) if tail else None,
        "limited": sum(1 for s in samples if s.get("limit") == "bandwidth"),
        "trace": samples,
    }


CHROMIUM_COLUMNS = [("receiver", 14), ("samples", 8), ("at_640", 7), ("target_mean", 12),
                    ("target_2nd_half", 16), ("limited", 8)]  # fmt: skip


def chromium_main(args: argparse.Namespace) -> None:
    if reason := netns_missing() or chromium_missing():
        sys.exit(f"bench-rate: {reason}")
    receivers = [r for r in RECEIVERS if not args.receivers or r in args.receivers]
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")
    print(f"Chromium patient on a clean link, {args.seconds:g} s from the first frame decoded;")
    print("target kbit/s: the page's outbound-rtp targetBitrate, sampled every second")
    print("  ".join(name.ljust(width) for name, width in CHROMIUM_COLUMNS), flush=True)
    for _ in range(args.runs):
        for receiver in receivers:  # back to back, so that the rows see the same load
            with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
                try:
                    row = asyncio.run(chromium_cell(receiver, args.seconds, Path(tmp)))
                except Exception as exc:  # one failed call: said, and the table goes on
                    print(f"{receiver}: failed ({type(exc).__name__}: {exc})", flush=True)
                    continue
            print("  ".join(str(row[n]).ljust(w) for n, w in CHROMIUM_COLUMNS), flush=True)
            if args.trace:
                for s in row["trace"]:
                    print("    " + " ".join(f"{k}={v}" for k, v in s.items()))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


COLUMNS = [("variant", 16), ("fps_last_15s", 13), ("sent", 12), ("target_kbps", 12),
           ("audio_bad_pct", 14), ("to_640_s", 9)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:  # an aiortc practitioner with one estimate (chromium_cell)
        from peers.cli import main as peer_main

        peer_variant(argv[1])
        sys.exit(peer_main("practitioner", argv[3:]))
    parser = argparse.ArgumentParser(prog="python -m bench.rate", description=__doc__)
    parser.add_argument("--narrow", type=float, default=40.0, help="seconds at 300 kbit/s")
    parser.add_argument("--wide", type=float, default=20.0, help="seconds on a clean link")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="one line per second")
    parser.add_argument("--cell", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--chromium",
        action="store_true",
        help="instead: a Chromium patient on a clean link to each receiver of --receivers",
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="--chromium, --start: each call"
    )
    parser.add_argument(
        "--start",
        choices=sorted(START_LINKS),
        help="instead: calls from their start on this link, with and without the start probe",
    )
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="instead: 300 kbit/s calls with this process's loop stalled on a schedule",
    )
    parser.add_argument("--stall-ms", type=float, default=250.0, help="--stalls: each stall")
    parser.add_argument("--every", type=float, default=2.5, help="--stalls: seconds between")
    parser.add_argument(
        "--variants", nargs="*", choices=sorted(STALL_VARIANTS), default=["today", "both"],
        help="--stalls: the sender's variants, interleaved",
    )  # fmt: skip
    parser.add_argument("--receivers", nargs="*", choices=RECEIVERS, help="--chromium: default all")
    args = parser.parse_args(argv)
    if args.chromium:
        chromium_main(args)
        return
    if args.cell and args.stalls:
        cell_row = stall_cell(args.cell, args.seconds, args.stall_ms / 1000, args.every)
        print(json.dumps(asyncio.run(cell_row)))
        return
    if args.cell and args.start:
        print(json.dumps(asyncio.run(start_cell(args.cell, args.start, args.seconds))))
        return
    if args.cell:
        print(json.dumps(asyncio.run(cell(args.cell, args.narrow, args.wide))))
        return
    if reason := netns_missing():
        sys.exit(f"bench-rate: {reason}")
    if args.start:
        start_main(args)
        return
    if args.stalls:
        stall_main(args)
        return
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores shared)")
    print("  ".join(name.ljust(width) for name, width in COLUMNS))
    for _ in range(args.runs):
        for variant in VARIANTS:  # back to back, so that both see the same load
            row = run_cell(
                ["--narrow", str(args.narrow), "--wide", str(args.wide), "--cell", variant],
                variant,
                COLUMNS,
            )
            if row is not None and args.trace:
                for step in row["trace"]:
                    print("    " + " ".join(f"{k}={v}" for k, v in step.items()))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
