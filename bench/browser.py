"""``make bench-browser``: the browser client against itself and against the aiortc peers.

Inside a private network namespace (as root), with the real relay, Debian's
Chromium under Playwright (fake camera: 640x480) and the aiortc peers' command
lines (the stamped pattern at the configured 640x480). For browser <->
browser, browser patient -> aiortc practitioner and aiortc patient -> browser
practitioner: the time from join to the first presented remote frame
(``requestVideoFrameCallback`` in the page; for an aiortc receiver, its
``first_frame_ms``), and after a few seconds the resolution and bitrate
received in each direction. The Chromium -> aiortc direction is measured with
the page's default sender and with ``degradationPreference:
maintain-resolution`` (what web/js/call.js sets). Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from playwright.async_api import Page

from peers.netns import Netns, Network, netns_missing
from tests.browser import Browsers, chromium_missing, join, wait_state, write_config
from tests.processes import peer_argv, relay_process, spawn

# Run in the page before joining: note the join click, and the first presented remote frame.
WATCH = """() => {
  const video = document.getElementById('remote-video');
  window.benchT0 = null;
  window.benchFirst = null;
  const join = document.getElementById('join');
  const mark = () => { window.benchT0 = performance.now(); };
  join.addEventListener('click', mark, { once: true });
  video.requestVideoFrameCallback(() => { window.benchFirst = performance.now(); });
}"""
PREFER_RESOLUTION = """async () => {
  for (const sender of epedicare.call.pc.getSenders()) {
    if (!sender.track || sender.track.kind !== 'video') continue;
    const parameters = sender.getParameters();
    parameters.degradationPreference = 'maintain-resolution';
    await sender.setParameters(parameters);
  }
  return epedicare.call.pc.getSenders().map((s) => s.getParameters().degradationPreference);
}"""


@dataclass
class Result:
    scenario: str
    first_frame_ms: float
    forward: str  # patient -> practitioner: resolution @ kbit/s
    backward: str  # practitioner -> patient


async def first_frame(page: Page) -> float:
    for _ in range(200):
        value = await page.evaluate(
            "() => window.benchFirst && window.benchT0 ? window.benchFirst - window.benchT0 : null"
        )
        if value is not None:
            return float(value)
        await asyncio.sleep(0.05)
    return float("nan")


async def page_stats(page: Page) -> dict[str, Any]:
    stats: dict[str, Any] = await page.evaluate("() => epedicare.stats")
    return stats


def shown(width: Any, height: Any, bitrate: Any) -> str:
    kbps = f"{bitrate / 1000:.0f}" if bitrate else "?"
    return f"{width}x{height} @ {kbps} kbit/s"


async def open_page(browsers: Browsers, browser: Any, url: str, role: str, session: str) -> Page:
    page = await browsers.open(f"{role}-{session}", url, browser=browser, locale="en-US")
    await page.evaluate(WATCH)
    await join(page, session, role)
    return page


async def browser_pair(
    browsers: Browsers, browser: Any, url: str, session: str, hold: float
) -> Result:
    practitioner = await open_page(browsers, browser, url, "practitioner", session)
    await wait_state(practitioner, "waiting")
    patient = await open_page(browsers, browser, url, "patient", session)
    await patient.bring_to_front()
    first = await first_frame(patient)
    await asyncio.sleep(hold)
    stats = await page_stats(patient)
    inv, out = stats["inVideo"], stats["outVideo"]
    for page in (patient, practitioner):
        await page.close()
    return Result(
        "browser <-> browser",
        first,
        shown(out["width"], out["height"], out["bitrate"]),
        shown(inv["width"], inv["height"], inv["bitrate"]),
    )


async def mixed(
    browsers: Browsers,
    browser: Any,
    relay: Any,
    lan: Netns,
    tmp: Path,
    *,
    browser_role: str,
    session: str,
    hold: float,
    prefer_resolution: bool,
) -> Result:
    relay_url, http_url = relay.url, relay.http_url
    peer_role = "practitioner" if browser_role == "patient" else "patient"
    config = tmp / "peer.yaml"
    config.write_text(
        yaml.safe_dump({"media": {"video": {"width": 640, "height": 480, "fps": 30}}})
    )
    stats_file = tmp / f"{session}.json"
    argv = peer_argv(
        peer_role, config, "--relay", relay_url, "--session", session, "--video", "pattern",
        "--audio", "tone", "--duration", str(hold + 4), "--stats-json", str(stats_file),
    )  # fmt: skip
    peer = await spawn(peer_role, argv, lan.command())
    await asyncio.sleep(0.5)
    page = await open_page(browsers, browser, http_url, browser_role, session)
    await page.bring_to_front()
    browser_first = await first_frame(page)
    if prefer_resolution:
        await page.evaluate(PREFER_RESOLUTION)
    await asyncio.sleep(hold)
    stats = await page_stats(page)
    await peer.wait(hold + 30)
    await page.close()
    got = json.loads(stats_file.read_text())
    inv, out = stats["inVideo"], stats["outVideo"]
    from_browser = shown(out["width"], out["height"], out["bitrate"])
    to_browser = shown(inv["width"], inv["height"], inv["bitrate"])
    if browser_role == "patient":
        name = "browser patient -> aiortc" + (" (maintain-resolution)" if prefer_resolution else "")
        return Result(name, float(got["first_frame_ms"] or 0), from_browser, to_browser)
    return Result("aiortc patient -> browser", browser_first, to_browser, from_browser)


async def main(args: argparse.Namespace) -> int:
    if reason := netns_missing() or chromium_missing():
        print(f"bench-browser: {reason}", file=sys.stderr)
        return 2
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="epc-bench-browser-") as name:
        tmp = Path(name)
        async with Browsers(tmp) as browsers, Network("epc-bb") as net:
            lan = await net.lan("198.18.0.2/24")
            async with relay_process(write_config(tmp / "relay.yaml"), netns=lan.name) as relay:
                browser = await browsers.launch(netns=lan.name)
                for n in range(args.runs):
                    results.append(
                        await browser_pair(browsers, browser, relay.http_url, f"bb{n}", args.hold)
                    )
                    for role, prefer in (
                        ("patient", False),
                        ("patient", True),
                        ("practitioner", False),
                    ):
                        results.append(
                            await mixed(
                                browsers,
                                browser,
                                relay,
                                lan,
                                tmp,
                                browser_role=role,
                                session=f"m{n}{role[:2]}{int(prefer)}",
                                hold=args.hold,
                                prefer_resolution=prefer,
                            )
                        )
                    print(f"  run {n + 1} done", flush=True)
    heads = (
        "scenario",
        "join -> first frame",
        "patient -> practitioner",
        "practitioner -> patient",
    )
    print(f"| {heads[0]:<48} | {heads[1]:>19} | {heads[2]:>26} | {heads[3]:>26} |")
    print(f"|{'-' * 50}|{'-' * 21}|{'-' * 28}|{'-' * 28}|")
    for scenario in dict.fromkeys(r.scenario for r in results):
        rows = [r for r in results if r.scenario == scenario]
        first = statistics.median(r.first_frame_ms for r in rows)
        last = rows[-1]
        print(f"| {scenario:<48} | {first:>16.0f} ms | {last.forward:>26} | {last.backward:>26} |")
    print("(first frame: median of runs, from the join click, or for an aiortc receiver")
    print(" from both seats taken;")
    print(f" resolution and bitrate: the last run, after {args.hold:g} s)")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Browser client vs itself and the aiortc peers.")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--hold", type=float, default=8, help="seconds before reading bitrates")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
