"""What Chromium does around a recovery (issue 12): getStats() every 50 ms in both pages.

    python -m bench.recovery_trace --event outage --runs 8      # as root
    python -m bench.recovery_trace --event change --runs 4
    python -m bench.recovery_trace --event both --runs 4        # change, outage, change...
    python -m bench.recovery_trace --aiortc patient            # that side an aiortc peer
    python -m bench.recovery_trace --query "?stale-frames=keep" --chrome-log DIR

Chromium<->Chromium in tests/recovery.py's network, as ``make bench-recovery``;
each run is a 3 s outage of the patient (or a network change). Both pages
sample their current RTCPeerConnection every 50 ms (the transport's bytes, the
selected pair, inbound and outbound video), and each run prints, per side,
seconds from the network's return (the outage's end; the change itself):
when bytes arrived again, when frames decoded again and when steadily (4 or
more within 0.6 s), when that side sent a PLI, received one, encoded and
decoded a key frame, the lowest target bitrate of its video sender in the
first second, and the longest gap between two samples (a page starved of
CPU: its own figures are late by about that much); then ``shown``, the first
frame its remote video presented after the network's return, timed by the
page itself (tests.recovery.FRAMES_SHOWN: not late when the sampler is), and
``its packets``, when that frame's last packet arrived. Each event's line
gives the load average, and an outage's how long the removal of its rules
took. The pages' console lines follow, timed the same way. With ``--aiortc
ROLE`` that side is an aiortc command line (the pattern and the tone) and its
log lines follow instead.
Printed, not asserted; ``--json DIR`` keeps the samples, ``--chrome-log DIR``
each Chromium's libwebrtc lines (INFO and VERBOSE1: the receiver's key frame
requests, the first packet after a gap and its RTP timestamp, the sender's
pacer and encoder; about 1 MB a minute per side).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from playwright.async_api import ConsoleMessage, Page

import tests.browser
from bench.recovery import MEDIA_TIMEOUT_S, OUTAGE_S, VIDEO
from peers.netns import netns_missing
from tests.browser import CHROMIUM, Browsers, chromium_missing, join, routed_flags, wait_state
from tests.processes import Process, RelayProcess, peer_argv, spawn
from tests.recovery import FRAMES_SHOWN, RELAY_ADDRESS, log_time, recovery_network

ROLES = ("patient", "practitioner")
# libwebrtc's own lines in Chromium's log (--chrome-log): its INFO level is VLOG 1 there.
WEBRTC_VMODULE = "*/webrtc/*=1"
SAMPLER = """
(() => {
  globalThis.trace = [];
  setInterval(async () => {
    const call = epedicare.call;
    if (!call) return;
    call.traceId ??= Math.random();
    const report = await call.pc.getStats();
    const s = { t: Date.now(), call: call.traceId, ice: call.pc.iceConnectionState };
    let pair = null;
    for (const x of report.values()) {
      if (x.type === "transport") {
        s.bytesIn = x.bytesReceived;
        if (x.selectedCandidatePairId) pair = report.get(x.selectedCandidatePairId);
      } else if (x.type === "inbound-rtp" && x.kind === "video") {
        Object.assign(s, { frames: x.framesDecoded, keyIn: x.keyFramesDecoded, pliSent: x.pliCount,
          received: x.framesReceived, dropped: x.framesDropped, packetsIn: x.packetsReceived,
          nackSent: x.nackCount, jbDelay: x.jitterBufferDelay, jbTarget: x.jitterBufferTargetDelay,
          jbEmitted: x.jitterBufferEmittedCount, freezes: x.freezeCount });
      } else if (x.type === "outbound-rtp" && x.kind === "video") {
        Object.assign(s, { keyOut: x.keyFramesEncoded, pliIn: x.pliCount,
          target: x.targetBitrate, encoded: x.framesEncoded, sent: x.framesSent,
          packetsOut: x.packetsSent, resent: x.retransmittedPacketsSent,
          limit: x.qualityLimitationReason });
      }
    }
    if (pair) Object.assign(s, { pair: pair.state, outgoing: pair.availableOutgoingBitrate });
    trace.push(s);
  }, 50);
})()
"""

Sample = dict[str, Any]


def first(samples: list[Sample], since: Sample, test: Callable[[Sample], bool]) -> float | None:
    return next((s["t"] for s in samples if s["t"] > since["t"] and test(s)), None)


def summary(samples: list[Sample], event_ms: float, quiet_ms: float) -> dict[str, Any]:
    """Seconds from ``event_ms`` to each of a side's moments (None: not seen), counted from the
    last sample before ``quiet_ms`` (a moment when nothing arrives: what was on its way before
    the outage, or the change, has arrived)."""
    before = [s for s in samples if s["t"] <= quiet_ms] or samples[:1]
    base = before[-1]

    def grew(key: str) -> Callable[[Sample], bool]:
        return lambda s: s["call"] != base["call"] or s.get(key, 0) > base.get(key, 0)

    def steady() -> float | None:
        for i, s in enumerate(samples):
            if s["t"] <= base["t"]:
                continue
            later = [x for x in samples[i:] if x["t"] <= s["t"] + 600 and x["call"] == s["call"]]
            if (
                later[-1]["t"] - s["t"] >= 400
                and later[-1].get("frames", 0) - s.get("frames", 0) >= 4
            ):
                return float(s["t"])
        return None

    moments = {
        "bytes": first(samples, base, grew("bytesIn")),
        "frames": first(samples, base, grew("frames")),
        "steady": steady(),
        "pli sent": first(samples, base, grew("pliSent")),
        "pli in": first(samples, base, grew("pliIn")),
        "key out": first(samples, base, grew("keyOut")),
        "key in": first(samples, base, grew("keyIn")),
    }
    out: dict[str, Any] = {
        k: None if v is None else round((v - event_ms) / 1000, 2) for k, v in moments.items()
    }
    window = [s for s in samples if event_ms <= s["t"] <= event_ms + 1000 and "target" in s]
    out["min target kbit/s"] = min((s["target"] // 1000 for s in window), default=None)
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(samples)]
    out["max gap ms"] = max(gaps, default=None)
    return out


def shown_after(shown: list[list[float | None]], at: float) -> dict[str, float | None]:
    """Seconds from ``at`` to the first frame the page presented after it (timed by the page:
    FRAMES_SHOWN), and to the arrival of that frame's last packet."""
    frame = next((f for f in shown if f[0] is not None and f[0] > at * 1000), None)
    if frame is None:
        return {"shown": None, "its packets": None}
    presented, received = frame
    assert presented is not None
    return {
        "shown": round(presented / 1000 - at, 3),
        "its packets": None if received is None else round(received / 1000 - at, 3),
    }


def timed(line: str, at: float) -> str:
    """An aiortc peer's log line timed from ``at`` (a line without a time as is)."""
    try:
        return f"{log_time(line) - at:+6.2f} {line[24:]}"
    except ValueError:
        return line


def console_line(into: list[tuple[float, str]], message: ConsoleMessage) -> None:
    into.append((time.time(), message.text))


def logged_chromium(folder: Path, role: str, tmp: Path) -> tuple[str, ...]:
    """The flags for libwebrtc's lines in ``folder/ROLE.log``, and the next Chromium launched
    (tests.browser.CHROMIUM) a wrapper that writes its stderr there: the renderer, where
    libwebrtc runs, writes its log to stderr only (--log-file keeps the browser process's)."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = tmp / f"chromium-logged-{role}"
    log = folder.resolve() / f"{role}.log"
    wrapper.write_text(f'#!/bin/sh\nexec {CHROMIUM} "$@" 2>>{log}\n', encoding="utf-8")
    wrapper.chmod(0o755)
    tests.browser.CHROMIUM = wrapper
    return ("--enable-logging=stderr", "--v=0", f"--vmodule={WEBRTC_VMODULE}")


def keep_run(path: Path, dump: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dump), encoding="utf-8")


async def run(
    event: str,
    runs: int,
    query: str,
    keep: Path | None,
    *,
    aiortc: str | None = None,
    chrome_log: Path | None = None,
    settle: float = 3.0,
    after: float = 8.0,
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="recovery-trace-"))
    config = tmp / "config.yaml"
    settings: dict[str, Any] = {
        "auth": {"open": True},
        "call": {"media_timeout_s": MEDIA_TIMEOUT_S},
    }
    if aiortc is not None:
        settings["media"] = {"video": VIDEO}  # the aiortc peer's pattern, as in bench-recovery
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    lines: dict[str, list[tuple[float, str]]] = {role: [] for role in ROLES}
    async with recovery_network("epc-trace") as net, Browsers(tmp) as browsers:
        relay = RelayProcess(config, net.hub.name, host=RELAY_ADDRESS)
        await relay.start()
        peer: Process | None = None
        try:
            pages: dict[str, Page] = {}
            for role in ("practitioner", "patient"):
                if role == aiortc:
                    argv = peer_argv(
                        role, config, "--relay", relay.url, "--session", "trace",
                        "--video", "pattern", "--audio", "tone",
                    )  # fmt: skip
                    peer = await spawn(role, argv, net.side(role).command())
                    continue
                extra = routed_flags(relay.http_url)
                if chrome_log is not None:
                    extra += logged_chromium(chrome_log, role, tmp)
                browser = await browsers.launch(netns=net.side(role).name, extra_args=extra)
                page = await browsers.open(
                    role, f"{relay.http_url}/{query}", browser=browser, locale="en-US"
                )
                page.on("console", functools.partial(console_line, lines[role]))
                await join(page, "trace", role)
                pages[role] = page
            if peer is not None:
                await peer.expect("call 1: media flowing", 60)
            for page in pages.values():
                await wait_state(page, "connected", units=6)
                await page.evaluate(SAMPLER)
                await page.evaluate(FRAMES_SHOWN)
            for number in range(runs):
                # both: a change, then an outage on the new connection, and so on
                kind = event if event != "both" else ("change", "outage")[number % 2]
                await asyncio.sleep(settle)
                for role, page in pages.items():
                    await page.evaluate("trace.length = 0")
                    lines[role].clear()
                mark = len(peer.lines) if peer is not None else 0
                began = time.time()
                if kind == "outage":
                    async with net.outage("patient"):
                        await asyncio.sleep(OUTAGE_S)
                    at = net.restored_at
                else:
                    at = await net.change("patient")
                await asyncio.sleep(after)
                load = " ".join(f"{x:.1f}" for x in os.getloadavg())
                removal = (
                    f", rules removed in {net.restored_by - at:.2f} s" if kind == "outage" else ""
                )
                print(f"\n{kind} {number + 1}: began {began - at:+.2f} s{removal}, load {load}")
                dump: dict[str, Any] = {"event": at, "began": began}
                if peer is not None:
                    print(f"  {aiortc} (aiortc)")
                    for line in peer.lines[mark:]:
                        print(f"    {timed(line, at)}")
                for role, page in pages.items():
                    samples: list[Sample] = await page.evaluate("trace")
                    dump[role] = samples
                    quiet = at - 1.0 if kind == "outage" else at + 0.5
                    got = summary(samples, at * 1000, quiet * 1000)
                    shown: list[list[float | None]] = await page.evaluate("epcShown")
                    dump[f"{role} shown"] = shown
                    got.update(shown_after(shown, at))
                    print(f"  {role:<12} " + ", ".join(f"{k} {v}" for k, v in got.items()))
                    for stamp, text in lines[role]:
                        print(f"    {stamp - at:+6.2f} {text}")
                if keep is not None:
                    keep_run(keep / f"{kind}-{number + 1}.json", dump)
                for page in pages.values():
                    await wait_state(page, "connected", units=6)
        finally:
            if peer is not None:
                await peer.stop()
            await relay.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--event", choices=("outage", "change", "both"), default="outage")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--query", default="", help="the pages' URL query (?recovery=ice-restart)")
    parser.add_argument("--json", type=Path, help="keep each run's samples in this folder")
    parser.add_argument("--aiortc", choices=ROLES, help="this side is an aiortc command line")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds of media before each event"
    )
    parser.add_argument("--after", type=float, default=8.0, help="seconds sampled after each event")
    parser.add_argument(
        "--chrome-log", type=Path, help="each Chromium's log (libwebrtc's lines) in this folder"
    )
    args = parser.parse_args(argv)
    if reason := netns_missing() or chromium_missing():
        print(f"recovery_trace: {reason}", file=sys.stderr)
        return 2
    asyncio.run(
        run(
            args.event,
            args.runs,
            args.query,
            args.json,
            aiortc=args.aiortc,
            chrome_log=args.chrome_log,
            settle=args.settle,
            after=args.after,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
