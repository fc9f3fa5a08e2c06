"""``make bench-network``: issue 13's table, every bad link x every pairing, in one run.

    make bench-network                                  # as root: 30 s calls, one run each
    make bench-network ARGS="--seconds 10 --links 2 --pairings aiortc"   # quick

Each cell is one call in tests/recovery.py's network (the relay in the hub,
the patient and the practitioner in their own namespaces), the patient's
interface impaired both ways by tests/netem.py from before the call starts
(for the outage: a clean link, everything dropped for ``OUTAGE_S`` from
``OUTAGE_AT_S`` after the first frame). The patient sends 640x480 at 30 fps
(Chromium's fake camera, or the aiortc peer's stamped pattern), and what the
practitioner receives is measured, from its first video frame to the end of
the call:

- an aiortc practitioner (``python -m peers.practitioner --stats-json``):
  frames per second, freezes and their total (peers/media.py, counted as
  Chromium counts them), the longest gap, time behind the call's best delay
  from the stamps (p95 and max; a Chromium patient sends no stamps: ``-``),
  audio frames missing or concealed of the media time, those rebuilt from the
  next packet's in-band FEC (``audio_fec_pct``: not concealed, as Chromium
  does not count them either), the resolution last received;
- a Chromium practitioner (the project's page, getStats() of its inbound
  streams): ``framesDecoded`` per second, ``freezeCount`` and
  ``totalFreezesDuration``, the longest gap between two reads of
  ``framesDecoded`` 50 ms apart, the mean jitter-buffer delay in the
  ``behind`` columns (``jitterBufferDelay / jitterBufferEmittedCount``: its
  frames are not stamped), ``concealedSamples / totalSamplesReceived``,
  ``audio_rx_pct`` (audio ``packetsReceived`` x 20 ms of the call's length: a
  sender that falls behind real time shows below 100 with no packet lost), and
  ``frameWidth x frameHeight``.

Chromium<->Chromium is the reference column: compare ratios within one run
(the machine is shared; the load average is printed before and after, and
with each row: ``load``, the 1-minute load average at the end of the last
call, and ``runnable``, the mean number of runnable tasks during the measured
part of the calls, read from /proc/stat every 0.5 s). ``--cpu-load N`` runs
each call beside N busy-loop processes at nice 0 (bench/cpuload.py: started
once the pages are loaded and the link impaired, stopped by PID at the call's
end). After each call a ``cpu`` line gives, over the measured part, in % of a
core: the whole machine's busy time and steal (/proc/stat), then what each
kind of process got on a CPU and how long it waited for one (``on/waiting``,
busiest first; Chromium's processes and the aiortc peers named by the role
whose namespace they run in, ``others'`` for processes not the bench's;
processes that ended meanwhile count in the machine's figure only). The
calls' ``call.media_timeout_s`` is above the outage, so that it is one freeze
of one call on every side, not a recovery. Printed, never asserted: see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from playwright.async_api import Page

from bench.cpuload import (
    busy,
    cpu_load,
    machine_line,
    machine_ticks,
    netns_inodes,
    shares,
    shares_line,
    snapshot,
)
from peers.netns import netns_missing
from tests.browser import Browsers, chromium_missing, join, routed_flags, wait_state
from tests.netem import Impairment, Link
from tests.processes import Process, RelayProcess, peer_argv, spawn
from tests.recovery import RELAY_ADDRESS, RecoveryNetwork, recovery_network

LINKS: dict[str, Impairment] = {
    "clean": Impairment(),
    "2 % loss": Impairment(loss=0.02),
    "5 % loss, 75 ms": Impairment(delay_ms=75, loss=0.05),
    "300 kbit/s, 40 ms": Impairment(delay_ms=40, rate_kbit=300, queue_ms=100),
    "3 s outage": Impairment(),
}
PAIRINGS: dict[str, tuple[str, str]] = {  # (patient, practitioner)
    "Chromium<->Chromium": ("chromium", "chromium"),
    "aiortc<->aiortc": ("aiortc", "aiortc"),
    "Chromium->aiortc": ("chromium", "aiortc"),
    "aiortc->Chromium": ("aiortc", "chromium"),
}
ROLES = ("patient", "practitioner")
OUTAGE_AT_S, OUTAGE_S = 8.0, 3.0
VIDEO = {"width": 640, "height": 480, "fps": 30}
SETTINGS: dict[str, Any] = {
    "auth": {"open": True},
    "media": {"video": VIDEO},
    "call": {"media_timeout_s": 10},
}
POLL_S = 0.05
# Chromium's fake camera runs at 20 fps unless told (media/capture's FakeVideoCaptureDevice):
# the reference would send two thirds of the frames of an aiortc patient, each a third less
# likely to meet a loss, and its freeze threshold (at least 150 ms over the mean interval)
# longer. Until 2026-12-02 the bench ran it at 20 fps (docs/benchmarks.md says which rows).
FAKE_CAMERA_30 = "--use-fake-device-for-media-stream=fps=30"
RUNNABLE_POLL_S = 0.5
# Run as root, Chromium raises its own threads (IO, compositor, GPU: nice -8; audio: SCHED_RR);
# without CAP_SYS_NICE they stay at nice 0, as the aiortc peers' threads are.
NO_SYS_NICE = ("setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice")
# The video's loss and its repair at a Chromium practitioner, on each call's line.
REPAIR = (
    "packetsReceived",
    "packetsLost",
    "nackCount",
    "fecPacketsReceived",
    "fecPacketsDiscarded",
    "retransmittedPacketsReceived",
    "pliCount",
)
AUDIO_PTIME_S = 0.02  # one Opus packet per 20 ms, from aiortc and from Chromium

# The practitioner page's inbound streams, summed by kind (one call at a time).
INBOUND = """(async () => {
  const call = epedicare.call;
  const out = {video: {}, audio: {}};
  if (!call) return out;
  for (const s of (await call.pc.getStats()).values()) {
    if (s.type !== "inbound-rtp") continue;
    const into = out[s.kind];
    for (const key of ["framesDecoded", "freezeCount", "totalFreezesDuration",
                       "jitterBufferDelay", "jitterBufferEmittedCount", "concealedSamples",
                       "totalSamplesReceived", "packetsReceived", "frameWidth", "frameHeight",
                       "packetsLost", "nackCount", "fecPacketsReceived", "fecPacketsDiscarded",
                       "retransmittedPacketsReceived", "pliCount"]) {
      if (typeof s[key] === "number") into[key] = (into[key] || 0) + s[key];
    }
  }
  return out;
})()"""


@dataclass
class Side:
    """One seat: a page or an aiortc command line (with its --stats-json file)."""

    page: Page | None = None
    process: Process | None = None
    stats_json: Path | None = None


async def open_page(
    role: str, net: RecoveryNetwork, relay: RelayProcess, browsers: Browsers
) -> Page:
    """A Chromium in ``role``'s namespace with the project's page loaded (not joined yet)."""
    browser = await browsers.launch(
        netns=net.side(role).name, extra_args=(*routed_flags(relay.http_url), FAKE_CAMERA_30)
    )
    page = await browsers.open(role, f"{relay.http_url}/", browser=browser)
    await page.bring_to_front()
    return page


async def start_side(
    role: str, page: Page | None, net: RecoveryNetwork, relay: RelayProcess, tmp: Path
) -> Side:
    """The page joins; or the aiortc command line starts (and joins)."""
    if page is not None:
        await join(page, "bench", role)
        return Side(page=page)
    stats_json = tmp / f"{role}.json"
    argv = peer_argv(
        role, tmp / "config.yaml", "--relay", relay.url, "--session", "bench",
        "--video", "pattern", "--audio", "tone", "--stats-json", str(stats_json),
    )  # fmt: skip
    return Side(process=await spawn(role, argv, net.side(role).command()), stats_json=stats_json)


async def first_frame(side: Side, wait: float = 60.0) -> None:
    """Until the practitioner decoded its first video frame."""
    if side.process is not None:
        await side.process.expect("call 1: media flowing", wait)
        return
    assert side.page is not None
    await wait_state(side.page, "connected", units=6)
    async with asyncio.timeout(wait):  # polled: getStats() has no event to wait for
        while True:
            stats = await side.page.evaluate(INBOUND)
            if stats["video"].get("framesDecoded"):
                return
            await asyncio.sleep(POLL_S)


async def watch_page(page: Page, until: float) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Reads getStats() every POLL_S until ``until``: the longest gap, first and last reads."""
    first = last = await page.evaluate(INBOUND)
    frames, since, longest = first["video"].get("framesDecoded", 0), time.monotonic(), 0.0
    while time.monotonic() < until:
        await asyncio.sleep(POLL_S)
        last = await page.evaluate(INBOUND)
        now = time.monotonic()
        if last["video"].get("framesDecoded", 0) > frames:
            longest = max(longest, now - since)
            frames, since = last["video"]["framesDecoded"], now
    return max(longest, time.monotonic() - since), first, last


def page_row(
    seconds: float, longest: float, first: dict[str, Any], last: dict[str, Any]
) -> dict[str, Any]:
    def delta(kind: str, key: str) -> float:
        return float(last[kind].get(key, 0) - first[kind].get(key, 0))

    video = last["video"]
    emitted = delta("video", "jitterBufferEmittedCount")
    jitter = round(1000 * delta("video", "jitterBufferDelay") / emitted) if emitted else None
    samples = delta("audio", "totalSamplesReceived")
    return {
        "fps": round(delta("video", "framesDecoded") / seconds, 1),
        "freezes": round(delta("video", "freezeCount")),
        "frozen_s": round(delta("video", "totalFreezesDuration"), 1),
        "longest_gap_s": round(longest, 2),
        "behind_p95_ms": f"jb {jitter}" if jitter is not None else "-",
        "behind_max_ms": "-",
        "audio_bad_pct": round(100 * delta("audio", "concealedSamples") / samples, 1)
        if samples
        else None,
        "audio_rx_pct": round(100 * delta("audio", "packetsReceived") * AUDIO_PTIME_S / seconds),
        "audio_fec_pct": "-",
        "resolution": f"{video.get('frameWidth', 0)}x{video.get('frameHeight', 0)}",
        "video_fec": "-",
        # Not columns: the video's loss and its repair, on the call's own line (``--repair``).
        "repair": {key: round(delta("video", key)) for key in REPAIR},
    }


def aiortc_row(summary: dict[str, Any]) -> dict[str, Any]:
    video, audio = summary["video"], summary["audio"]
    due = audio["frames"] + audio["missing"]
    stamped = video.get("stamped", 0) > 0
    return {
        "fps": video["fps"],
        "freezes": video["freezes"],
        "frozen_s": round(video["frozen_s"], 1),
        "longest_gap_s": video["longest_gap_s"],
        "behind_p95_ms": round(video["behind_p95_ms"]) if stamped else "-",
        "behind_max_ms": round(video["max_behind_ms"]) if stamped else "-",
        "audio_bad_pct": round(100 * (audio["missing"] + audio["concealed"]) / due, 1)
        if due
        else None,
        "audio_rx_pct": "-",
        "audio_fec_pct": round(100 * audio.get("recovered", 0) / due, 1) if due else None,
        "resolution": f"{video['width']}x{video['height']}",
        "video_fec": video.get("fec_recovered", "-"),
    }


def runnable_now() -> int:
    """Tasks runnable at this instant, this reader included (``procs_running``, /proc/stat)."""
    for line in Path("/proc/stat").read_text(encoding="ascii").splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return 0


async def count_runnable(until: float, into: list[int]) -> None:
    """``procs_running`` every RUNNABLE_POLL_S until ``until``, appended to ``into``."""
    while time.monotonic() < until:
        into.append(runnable_now())
        await asyncio.sleep(RUNNABLE_POLL_S)


@dataclass
class Call:
    """One call's row, and the machine while it ran."""

    row: dict[str, Any]
    runnable: float
    load: float
    cpu: str
    summary: dict[str, Any] | None = None  # an aiortc practitioner's --stats-json


async def cell(
    link: str, pairing: str, seconds: float, tmp: Path, *, load: int = 0, unprivileged: bool = False
) -> Call:
    """One call through ``link`` between ``pairing``'s sides: the practitioner's figures.

    ``load`` busy loops run from the link's impairment (the pages loaded) to the call's end;
    ``unprivileged``: Chromium runs without CAP_SYS_NICE (NO_SYS_NICE).
    """
    (tmp / "config.yaml").write_text(yaml.safe_dump(SETTINGS), encoding="utf-8")
    kinds = dict(zip(ROLES, PAIRINGS[pairing], strict=True))
    processes: list[Process] = []
    prefix = NO_SYS_NICE if unprivileged else ()
    async with recovery_network("epc-bnet") as net, Browsers(tmp, prefix) as browsers:
        roles = netns_inodes({role: net.side(role).name for role in ROLES} | {"hub": net.hub.name})
        relay = RelayProcess(tmp / "config.yaml", net.hub.name, host=RELAY_ADDRESS)
        await relay.start()
        try:
            # The pages load before the link turns bad (at 300 kbit/s the page alone takes
            # seconds): the patient opened the link, then the network degraded.
            pages = {
                role: await open_page(role, net, relay, browsers)
                for role in ROLES
                if kinds[role] == "chromium"
            }
            dev = net.links["patient"][0]
            async with contextlib.AsyncExitStack() as stack:
                emulator = await stack.enter_async_context(Link(net.patient, dev, both=LINKS[link]))
                busy_pids, sides = frozenset(stack.enter_context(busy(load))), {}
                for role in reversed(ROLES):  # the practitioner waits for the patient
                    sides[role] = side = await start_side(role, pages.get(role), net, relay, tmp)
                    if side.process is not None:
                        processes.append(side.process)
                seeing = sides["practitioner"]
                await first_frame(seeing)
                start, tasks, runnable = time.monotonic(), snapshot(busy_pids), list[int]()
                ticks = machine_ticks()

                def machine(row: dict[str, Any]) -> Call:
                    took = time.monotonic() - start
                    cpu = shares(tasks, snapshot(busy_pids), took, roles)
                    return Call(
                        row,
                        round(statistics.fmean(runnable), 1) if runnable else 0.0,
                        round(os.getloadavg()[0], 1),
                        f"{machine_line(ticks, machine_ticks(), took)}; {shares_line(cpu)}",
                    )

                async def outage() -> None:
                    if link == "3 s outage":
                        await asyncio.sleep(OUTAGE_AT_S)
                        await emulator.update(outage=True)
                        await asyncio.sleep(OUTAGE_S)
                        await emulator.update(outage=False)

                counting = count_runnable(start + seconds, runnable)
                if seeing.page is not None:
                    watched, *_ = await asyncio.gather(
                        watch_page(seeing.page, start + seconds), outage(), counting
                    )
                    return machine(page_row(time.monotonic() - start, *watched))
                await asyncio.gather(asyncio.sleep(seconds), outage(), counting)
                assert seeing.process is not None and seeing.stats_json is not None
                done = machine({})
                await seeing.process.stop()
                done.summary = json.loads(seeing.stats_json.read_text(encoding="utf-8"))
                done.row = aiortc_row(done.summary)
                return done
        finally:
            for process in processes:
                await process.stop()
            await relay.stop()
            sent = tmp / "patient.json"
            if kinds["patient"] == "aiortc" and sent.exists():
                sending = json.loads(sent.read_text(encoding="utf-8")).get("sending") or {}
                print(f"  aiortc patient's FEC: {sending.get('fec')}", flush=True)


COLUMNS = [
    ("link", 18), ("pairing", 20), ("fps", 5), ("freezes", 8), ("frozen_s", 9),
    ("longest_gap_s", 14), ("behind_p95_ms", 14), ("behind_max_ms", 14),
    ("audio_bad_pct", 14), ("audio_rx_pct", 13), ("audio_fec_pct", 14), ("resolution", 11),
    ("video_fec", 10),
    ("runnable", 9), ("load", 5),
]  # fmt: skip

RUN_FIELDS = (  # each run's, with --runs
    "fps", "freezes", "frozen_s", "longest_gap_s", "behind_p95_ms", "behind_max_ms",
    "audio_bad_pct", "video_fec",
)  # fmt: skip


def video_size(text: str) -> dict[str, int]:
    """``--video WxH@FPS`` as the config's ``media.video`` mapping."""
    try:
        size, fps = text.split("@")
        width, height = size.split("x")
        video = {"width": int(width), "height": int(height), "fps": int(fps)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH@FPS, e.g. 320x240@15") from None
    if min(video.values()) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width, height and fps must be positive")
    return video


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric column over runs (the other columns: the last run's)."""
    out = dict(rows[-1])
    for name in out:
        values = [r[name] for r in rows]
        if all(isinstance(v, int | float) for v in values):
            out[name] = round(statistics.median(values), 2)
    return out


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="each call's length")
    parser.add_argument("--runs", type=int, default=1, help="calls per cell (median printed)")
    parser.add_argument(
        "--links",
        nargs="*",
        default=list(LINKS),
        help="links whose name contains one of these words (default: all five; e.g. 75 or outage)",
    )
    parser.add_argument(
        "--pairings",
        nargs="*",
        default=list(PAIRINGS),
        help="pairings whose name contains one of these words (default: all four)",
    )
    parser.add_argument(
        "--video",
        type=video_size,
        default=VIDEO,
        metavar="WxH@FPS",
        help="what an aiortc patient sends (default 640x480@30; the page always sends 640x480)",
    )
    parser.add_argument(
        "--cpu-load",
        type=cpu_load,
        default=0,
        metavar="N",
        help="run each call beside N busy-loop processes at nice 0, stopped by PID after it"
        " (default 0)",
    )
    parser.add_argument(
        "--chromium-no-sys-nice",
        action="store_true",
        help="Chromium without CAP_SYS_NICE: its threads cannot raise their priority above"
        " nice 0 (as root it runs IO, compositor and GPU threads at nice -8, audio SCHED_RR)",
    )
    parser.add_argument(
        "--fec",
        action="store_true",
        help="the aiortc peers offer and answer RED + ULPFEC (media.video.fec: true, the default)",
    )
    parser.add_argument(
        "--no-fec",
        action="store_true",
        help="the aiortc peers neither offer nor answer RED + ULPFEC (media.video.fec: false)",
    )
    parser.add_argument(
        "--no-retransmit",
        action="store_true",
        help="the aiortc peers answer no NACK for video (EPEDICARE_NO_RETRANSMIT=1): with --fec,"
        " what the practitioner decodes of a lossy link is what the FEC rebuilt",
    )
    args = parser.parse_args(argv)
    if args.no_retransmit:
        os.environ["EPEDICARE_NO_RETRANSMIT"] = "1"  # read by the peers this starts
    SETTINGS["media"]["video"] = {**args.video, "fec": args.fec or not args.no_fec}
    if reason := netns_missing() or chromium_missing():
        print(f"bench-network: {reason}", file=sys.stderr)
        return 2
    pairings = [p for p in PAIRINGS if any(word in p for word in args.pairings)]
    links = [link for link in LINKS if any(word in link for word in args.links)]
    if not links or not pairings:
        print(
            f"bench-network: --links or --pairings names none of {list(LINKS)} or {list(PAIRINGS)}",
            file=sys.stderr,
        )
        return 2
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores shared)")
    video = args.video
    print(
        f"{args.seconds:g} s calls, {args.runs} run(s) per cell, measured at the practitioner;"
        f" the patient sends {video['width']}x{video['height']}@{video['fps']};"
        f" {args.cpu_load} busy loop(s) beside each call"
        + ("; the aiortc peers without RED + ULPFEC" if args.no_fec else "")
        + ("; no retransmission of video by the aiortc peers" if args.no_retransmit else "")
        + ("; Chromium without CAP_SYS_NICE" if args.chromium_no_sys_nice else "")
    )
    print("  ".join(name.ljust(width) for name, width in COLUMNS), flush=True)
    for link in links:
        for pairing in pairings:  # back to back, so that the columns see the same load
            rows = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
                    try:
                        done = await cell(
                            link,
                            pairing,
                            args.seconds,
                            Path(tmp),
                            load=args.cpu_load,
                            unprivileged=args.chromium_no_sys_nice,
                        )
                    except Exception as exc:  # one failed call: said, and the table goes on
                        print(f"{link} / {pairing}: failed ({type(exc).__name__}: {exc})")
                        continue
                repair = done.row.pop("repair", None)
                rows.append({**done.row, "runnable": done.runnable, "load": done.load})
                if repair is not None:
                    said = ", ".join(f"{key} {value}" for key, value in repair.items())
                    print(f"  video at the page: {said}", flush=True)
                if args.runs > 1:
                    print(
                        "  run: " + ", ".join(f"{n} {done.row.get(n)}" for n in RUN_FIELDS),
                        flush=True,
                    )
                print(
                    f"  cpu, % of a core on/waiting (runnable {done.runnable}, load"
                    f" {done.load}): {done.cpu}",
                    flush=True,
                )
            if rows:
                row = {"link": link, "pairing": pairing, **median_row(rows)}
                print("  ".join(str(row[n]).ljust(w) for n, w in COLUMNS), flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
