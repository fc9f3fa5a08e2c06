"""Calls that come back (issue 12): time to the first frame again, printed, not asserted.

    make bench-recovery          # as root: namespaces, Chromium, the aiortc command lines

For each pairing, one call in tests/recovery.py's network, then RUNS times: the
patient's network changes (new interface and address, old one gone), and the
time from the change to the first video frame decoded again is read on both
sides; then a 3 s outage (everything to and from the patient dropped at the
hub), and the time from its end (its rules removed, one commit) to
the first frame again. A page times its frames itself: each frame its remote
video presents (requestVideoFrameCallback, tests.recovery.FRAMES_SHOWN), read
from it after the event; the first one after a stall counts
(``frame_after_stall``). An aiortc side's from its log line `media back after
N ms`, written at its first video frame again. Median and worst per pairing and
side, with Chromium<->Chromium (a new RTCPeerConnection, the protocol's
recovery) first as the anchor, in the same run; then restartIce() between the
two pages, and the pages with ``?stale-frames=keep`` (the stale frames after an
outage reach Chromium's receiver: the page as it was before it dropped them).
call.media_timeout_s is 2 (below the outage, so that every side notices it),
call.heartbeat_s 1 (the default).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from tests.recovery import (
    FRAMES_SHOWN,
    RELAY_ADDRESS,
    RecoveryNetwork,
    media_back,
    recovery_network,
)

OUTAGE_S = 3.0
LIMIT_S = 30.0  # a side not back after this counts as never
STALL_S = 0.3  # a page without a new frame for this long has lost its video
# Below the 3 s outage, as in the tests: every side (aiortc's too) notices the outage and
# logs its end (an aiortc side's frames are read from that line).
MEDIA_TIMEOUT_S = 2
ROLES = ("patient", "practitioner")
VIDEO = {"width": 320, "height": 240, "fps": 15}  # the aiortc peers' pattern

# The times (ms since the epoch) of the frames a page's remote video presented after T (ms):
# timed by the page itself (tests.recovery.FRAMES_SHOWN), whenever the bench reads them.
SHOWN_AFTER = "(after) => epcShown.filter(([at]) => at > after).map(([at]) => at)"


@dataclass
class Pairing:
    name: str
    kinds: dict[str, str]  # role: "chromium" | "aiortc"
    query: str = ""  # the pages' URL query
    change: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    outage: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    methods: list[str] = field(default_factory=list)
    # event ("change", "outage"): role: each event's recoveries on that side, e.g. "same-path"
    by_event: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: {e: {r: [] for r in ROLES} for e in ("change", "outage")}
    )
    events: list[str] = field(default_factory=list)  # what happened when (for --logs)


def pairings() -> list[Pairing]:
    def kinds(patient: str, practitioner: str) -> dict[str, str]:
        return {"patient": patient, "practitioner": practitioner}

    c, a = "chromium", "aiortc"
    return [
        Pairing("Chromium<->Chromium, new RTCPeerConnection (anchor)", kinds(c, c)),
        Pairing("Chromium<->Chromium, restartIce()", kinds(c, c), "?recovery=ice-restart"),
        # The anchor as the page was before it dropped the stale frames after an outage.
        Pairing("Chromium<->Chromium, stale frames kept", kinds(c, c), "?stale-frames=keep"),
        Pairing("Chromium patient<->aiortc practitioner", kinds(c, a)),
        Pairing("aiortc patient<->Chromium practitioner", kinds(a, c)),
        Pairing("aiortc<->aiortc", kinds(a, a)),
    ]


Sample = tuple[float, int, float]  # time.time(), frames decoded by the call, the call's identity


def frame_after_stall(samples: list[Sample], since: float, quiet_from: float) -> float | None:
    """The time of the first new frame after ``since`` that follows a stall, or None yet.

    A stall is STALL_S without a new frame from ``quiet_from`` on, or a new call (it
    counts from 0). After a change, ``quiet_from`` is ``since``: frames already on
    their way still decode just after it. During an outage nothing arrives, so it is
    the outage's start: a page back within STALL_S of the outage's end is back then,
    not at its next hiccup (the rule of 02:18 waited for one, and read a page back in
    0.1-0.2 s as 10 s or never).
    """
    if not samples:
        return None
    last_new, new_call = max(samples[0][0], quiet_from), False
    for (_, frames_before, call_before), (at, frames, call) in itertools.pairwise(samples):
        if call != call_before:
            new_call = True
        if frames > (0 if call != call_before else frames_before):
            if at > since and (new_call or at - last_new >= STALL_S):
                return at
            last_new, new_call = max(at, quiet_from), False
    return None


class Side:
    """One seat of the call: a page or an aiortc command line."""

    def __init__(self, page: Page | None = None, process: Process | None = None) -> None:
        self.page, self.process = page, process
        self.mark = 0
        self.began = 0.0

    async def before(self) -> None:
        """Called just before the event: an aiortc side's log mark, a page's frames timed."""
        self.began = time.time()
        if self.process is not None:
            self.mark = len(self.process.lines)
        if self.page is not None:
            await self.page.evaluate(FRAMES_SHOWN)  # once per page; it keeps timing

    def samples(self, shown: list[float]) -> list[Sample]:
        """The page's frames since ``before()`` as samples: one new frame at each time."""
        start = (self.began, 0, 0.0)
        return [start, *((at / 1000, n, 0.0) for n, at in enumerate(shown, start=1))]

    async def first_frame_after(self, since: float, quiet_from: float) -> float:
        """Seconds from ``since`` (time.time()) to this side's next video frame.

        A page's frame counts after a stall from ``quiet_from`` on (``frame_after_stall``).
        """
        if self.process is not None:
            try:
                at, _, _ = await media_back(self.process, self.mark, LIMIT_S)
            except (TimeoutError, RuntimeError):
                return float("inf")
            return at - since
        assert self.page is not None
        # Frames already on their way still decode just after a change: the first frame
        # that follows a stall (timed by the page from before the event on) is the one that
        # counts. Read here every 0.1 s; the times are the page's own.
        while time.time() - since < LIMIT_S:
            shown: list[float] = await self.page.evaluate(SHOWN_AFTER, self.began * 1000)
            if (back := frame_after_stall(self.samples(shown), since, quiet_from)) is not None:
                return back - since
            await asyncio.sleep(0.1)
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
    sides: dict[str, Side],
    event: Callable[[], Awaitable[tuple[float, float]]],
    into: dict[str, list[float]],
    methods: dict[str, list[str]],
) -> None:
    """``event()`` returns (when a stall may begin, when the network is usable again)."""
    counts = {role: len(await side.methods()) for role, side in sides.items()}
    for side in sides.values():
        await side.before()
    quiet_from, since = await event()
    times = await asyncio.gather(
        *(side.first_frame_after(since, quiet_from) for side in sides.values())
    )
    for role, seconds in zip(sides, times, strict=True):
        into[role].append(seconds)
    for role, side in sides.items():
        methods[role].append("+".join(await recorded_since(side, counts[role])) or "none")


async def recorded_since(side: Side, count: int, wait: float = 3.0) -> list[str]:
    """The recoveries ``side`` recorded after its first ``count`` (a page records one at its
    next 250 ms sample, possibly after the frame that ended the measure): waits for one."""
    deadline = time.monotonic() + wait
    # Polled: a page's list is read through evaluate().
    while len(got := await side.methods()) <= count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    return got[count:]


async def run_pairing(pairing: Pairing, runs: int, tmp: Path, logs: Path | None = None) -> None:
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

                async def change() -> tuple[float, float]:
                    changed = await net.change("patient")
                    pairing.events.append(f"{stamp(changed)} network change")
                    return changed, changed

                await measure(sides, change, pairing.change, pairing.by_event["change"])
                await settle(sides)

                async def outage() -> tuple[float, float]:
                    began = time.time()
                    async with net.outage("patient"):
                        await asyncio.sleep(OUTAGE_S)
                    pairing.events.append(f"{stamp(began)} outage from")
                    pairing.events.append(f"{stamp(net.restored_at)} outage to")
                    # When its rules' removal began (one commit: both ways at once).
                    return began, net.restored_at

                await measure(sides, outage, pairing.outage, pairing.by_event["outage"])
            for side in sides.values():
                pairing.methods.extend(await side.methods())
        finally:
            for process in processes:
                await process.stop()
            await relay.stop()
            if logs is not None:
                keep_logs(logs, pairing, processes, relay, browsers)


def stamp(at: float) -> str:
    """``at`` (time.time()) as the peers' log lines write it."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f",{int(at % 1 * 1000):03d}"


def keep_logs(
    folder: Path,
    pairing: Pairing,
    processes: list[Process],
    relay: RelayProcess,
    browsers: Browsers,
) -> None:
    """Every log line of the pairing's run under ``folder``: aiortc sides, pages, the relay."""
    name = "".join(c if c.isalnum() else "-" for c in pairing.name.split(",")[0]).strip("-")
    folder.mkdir(parents=True, exist_ok=True)
    texts = {f"{process.name}.log": process.lines for process in processes}
    texts |= {f"{role}.console.log": lines for role, lines in browsers.logs.items()}
    texts["relay.log"] = relay.log
    texts["events.log"] = pairing.events
    for file, lines in texts.items():
        (folder / f"{name}.{file}").write_text("\n".join(lines) + "\n", encoding="utf-8")


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
        for event, sides in pairing.by_event.items():
            for role, methods in sides.items():
                tally = {m: methods.count(m) for m in sorted(set(methods))}
                print(f"  each {event}, {role}: {tally}")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", help="run the pairings whose name contains this text")
    parser.add_argument(
        "--logs", type=Path, help="keep every log (aiortc sides, pages, relay) in this folder"
    )
    args = parser.parse_args(argv)
    if reason := netns_missing() or chromium_missing():
        print(f"bench-recovery: {reason}", file=sys.stderr)
        return 2
    chosen = [p for p in pairings() if args.only is None or args.only in p.name]
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for pairing in chosen:
            print(f"{pairing.name}: {args.runs} runs...", flush=True)
            await run_pairing(pairing, args.runs, Path(tmp), args.logs)
    report(chosen, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
