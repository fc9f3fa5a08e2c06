"""Calls that come back (issue 12): time to the first frame again, printed, not asserted.

    make bench-recovery          # as root: namespaces, Chromium, the aiortc command lines

For each pairing, one call in tests/recovery.py's network, then RUNS times: the
patient's network changes (new interface and address, old one gone), and the
time from the change to the first video frame decoded again is read on both
sides; then a 3 s outage (everything to and from the patient dropped at the
hub), and the time from its end to the first frame again. Chromium's frames
are read from getStats() (framesDecoded of the page's current RTCPeerConnection)
every 50 ms; an aiortc side's from its log line `media back after N ms`, written
at its first video frame again. Median and worst per pairing and side, with
Chromium<->Chromium (a new RTCPeerConnection, the protocol's recovery) first as
the anchor, in the same run. call.media_timeout_s is 2 (below the outage, so
that every side notices it), call.heartbeat_s 1 (the default).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from playwright.async_api import Page

from peers.netns import netns_missing
from tests.browser import Browsers, chromium_missing, join, routed_flags, wait_state
from tests.processes import Process, RelayProcess, peer_argv, spawn
from tests.recovery import RELAY_ADDRESS, RecoveryNetwork, media_back, recovery_network

OUTAGE_S = 3.0
LIMIT_S = 30.0  # a side not back after this counts as never
STALL_S = 0.3  # a page without a new frame for this long has lost its video
# Below the 3 s outage, as in the tests: every side (aiortc's too) notices the outage and
# logs its end (an aiortc side's frames are read from that line).
MEDIA_TIMEOUT_S = 2
ROLES = ("patient", "practitioner")
VIDEO = {"width": 320, "height": 240, "fps": 15}  # the aiortc peers' pattern

# Frames decoded by the page's current call, and that call's identity (a new one counts from 0).
FRAMES_NOW = """(async () => {
  const call = epedicare.call;
  if (!call) return [0, 0];
  call.benchId ??= Math.random();
  let frames = 0;
  for (const stat of (await call.pc.getStats()).values()) {
    if (stat.type === "inbound-rtp" && stat.kind === "video") frames += stat.framesDecoded || 0;
  }
  return [frames, call.benchId];
})()"""


@dataclass
class Pairing:
    name: str
    kinds: dict[str, str]  # role: "chromium" | "aiortc"
    query: str = ""  # the pages' URL query
    change: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    outage: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    methods: list[str] = field(default_factory=list)


def pairings() -> list[Pairing]:
    def kinds(patient: str, practitioner: str) -> dict[str, str]:
        return {"patient": patient, "practitioner": practitioner}

    c, a = "chromium", "aiortc"
    return [
        Pairing("Chromium<->Chromium, new RTCPeerConnection (anchor)", kinds(c, c)),
        Pairing("Chromium<->Chromium, restartIce()", kinds(c, c), "?recovery=ice-restart"),
        Pairing("Chromium patient<->aiortc practitioner", kinds(c, a)),
        Pairing("aiortc patient<->Chromium practitioner", kinds(a, c)),
        Pairing("aiortc<->aiortc", kinds(a, a)),
    ]


class Side:
    """One seat of the call: a page or an aiortc command line."""

    def __init__(self, page: Page | None = None, process: Process | None = None) -> None:
        self.page, self.process = page, process
        self.mark = 0

    def before(self) -> None:
        if self.process is not None:
            self.mark = len(self.process.lines)

    async def first_frame_after(self, since: float) -> float:
        """Seconds from ``since`` (time.time()) to this side's next video frame."""
        if self.process is not None:
            try:
                at, _, _ = await media_back(self.process, self.mark, LIMIT_S)
            except (TimeoutError, RuntimeError):
                return float("inf")
            return at - since
        assert self.page is not None
        # Frames already on their way still decode just after a change: first the stall
        # (no new frame for STALL_S, or a new call), then the first frame after it.
        frames, call = await self.page.evaluate(FRAMES_NOW)
        stalled, still = False, time.time()
        while time.time() - since < LIMIT_S:
            await asyncio.sleep(0.05)
            now, now_call = await self.page.evaluate(FRAMES_NOW)
            if now_call != call:
                stalled, frames, call = True, 0, now_call
            if now > frames:
                if stalled:
                    return time.time() - since
                frames, still = now, time.time()
            elif time.time() - still >= STALL_S:
                stalled = True
        return float("inf")

    async def settled(self) -> None:
        if self.page is not None:
            await wait_state(self.page, "connected", units=6)

    async def methods(self) -> list[str]:
        if self.page is not None:
            return [r["method"] for r in await self.page.evaluate("epedicare.recoveries")]
        assert self.process is not None
        return [
            m
            for line in self.process.lines
            for m in ("new-connection", "same-path")
            if f"({m};" in line
        ]


async def measure(
    sides: dict[str, Side], event: Callable[[], Awaitable[float]], into: dict[str, list[float]]
) -> None:
    for side in sides.values():
        side.before()
    since = await event()
    times = await asyncio.gather(*(side.first_frame_after(since) for side in sides.values()))
    for role, seconds in zip(sides, times, strict=True):
        into[role].append(seconds)


async def run_pairing(pairing: Pairing, runs: int, tmp: Path) -> None:
    config = tmp / "config.yaml"
    settings = {
        "auth": {"open": True},
        "media": {"video": VIDEO},
        "call": {"media_timeout_s": MEDIA_TIMEOUT_S},
    }
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    processes: list[Process] = []
    async with recovery_network("epc-brec") as net, Browsers(tmp) as browsers:
        relay = RelayProcess(config, net.hub.name, host=RELAY_ADDRESS)
        await relay.start()
        try:
            sides = {}
            for role in ("practitioner", "patient"):
                sides[role] = await start_side(
                    pairing, role, net=net, relay=relay, browsers=browsers, config=config
                )
                if (process := sides[role].process) is not None:
                    processes.append(process)
            for process in processes:
                await process.expect("call 1: media flowing", 60)
            for side in sides.values():
                await side.settled()
            for _ in range(runs):
                await settle(sides)

                async def change() -> float:
                    return await net.change("patient")

                await measure(sides, change, pairing.change)
                await settle(sides)

                async def outage() -> float:
                    async with net.outage("patient"):
                        await asyncio.sleep(OUTAGE_S)
                    return time.time()

                await measure(sides, outage, pairing.outage)
            for side in sides.values():
                pairing.methods.extend(await side.methods())
        finally:
            for process in processes:
                await process.stop()
            await relay.stop()


async def start_side(
    pairing: Pairing,
    role: str,
    *,
    net: RecoveryNetwork,
    relay: RelayProcess,
    browsers: Browsers,
    config: Path,
) -> Side:
    if pairing.kinds[role] == "aiortc":
        argv = peer_argv(
            role, config, "--relay", relay.url, "--session", "bench", "--video", "pattern",
            "--audio", "tone",
        )  # fmt: skip
        return Side(process=await spawn(role, argv, net.side(role).command()))
    browser = await browsers.launch(
        netns=net.side(role).name, extra_args=routed_flags(relay.http_url)
    )
    page = await browsers.open(role, f"{relay.http_url}/{pairing.query}", browser=browser)
    await page.bring_to_front()
    await join(page, "bench", role)
    return Side(page=page)


async def settle(sides: dict[str, Side]) -> None:
    """Both sides connected again, then two seconds of media before the next event."""
    for side in sides.values():
        await side.settled()
    await asyncio.sleep(2.0)


def row(name: str, values: list[float]) -> str:
    finite = [v for v in values if v != float("inf")]
    lost = len(values) - len(finite)
    if not finite:
        return f"  {name:<30} never back within {LIMIT_S:g} s"
    text = f"  {name:<30} median {statistics.median(finite):5.2f} s   worst {max(finite):5.2f} s"
    return text + (f"   ({lost} of {len(values)} never back within {LIMIT_S:g} s)" if lost else "")


def report(done: list[Pairing], runs: int) -> None:
    print(f"\nTime to the first video frame again, {runs} runs per pairing")
    for pairing in done:
        print(f"\n{pairing.name}")
        for role in ROLES:
            print(row(f"network change -> {role}", pairing.change[role]))
        for role in ROLES:
            print(row(f"3 s outage's end -> {role}", pairing.outage[role]))
        counts = {m: pairing.methods.count(m) for m in sorted(set(pairing.methods))}
        print(f"  recoveries logged by both sides: {counts}")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", help="run the pairings whose name contains this text")
    args = parser.parse_args(argv)
    if reason := netns_missing() or chromium_missing():
        print(f"bench-recovery: {reason}", file=sys.stderr)
        return 2
    chosen = [p for p in pairings() if args.only is None or args.only in p.name]
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for pairing in chosen:
            print(f"{pairing.name}: {args.runs} runs...", flush=True)
            await run_pairing(pairing, args.runs, Path(tmp))
    report(chosen, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
