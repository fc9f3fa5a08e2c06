"""Calls that come back (issue 12) with Chromium: a network change and a 3 s outage.

Each side runs in its own namespace behind a hub where the relay listens
(tests/recovery.py); the patient's network changes or goes silent under the
call. Chromium on both sides, then Chromium with an aiortc command line, each
role both ways. Frames decoded are counted across calls (a new RTCPeerConnection
counts from 0 again), and an init script counts the page's RTCPeerConnections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from playwright.async_api import Page

from peers.netns import command_missing, netns_missing
from tests.browser import Browsers, join, notice, routed_flags, wait_state
from tests.processes import Process, RelayProcess, peer_argv, spawn
from tests.recovery import (
    FRAMES_SHOWN,
    RELAY_ADDRESS,
    RecoveryNetwork,
    first_shown,
    media_back,
    recovery_network,
    stalled,
)
from tests.support import within

pytestmark = pytest.mark.netns

PEER_VIDEO = {"width": 320, "height": 240, "fps": 15}  # the aiortc peers' pattern
MEDIA_TIMEOUT_S = 2  # below the 3 s outage, so that the outage is noticed (and rides it out)

# Counts the page's RTCPeerConnections: every one made, and those not closed.
COUNT_PEER_CONNECTIONS = """
(() => {
  const Native = globalThis.RTCPeerConnection;
  if (!Native) return;
  const made = [];
  globalThis.RTCPeerConnection = class extends Native {
    constructor(...args) {
      super(...args);
      made.push(this);
    }
  };
  globalThis.epcPeerConnections = () => ({
    made: made.length,
    open: made.filter((pc) => pc.signalingState !== "closed").length,
  });
})();
"""


# While the page says "reconnecting", samples what shows the other person every 100 ms: the
# remote video, or the drawing of its last frame over it (#remote-frozen) once the page has
# found the path lost (a recovery may close the old connection, whose video then turns black).
# Its size, whether it is shown, and the brightest pixel of a small copy of it (0: black).
WATCH_LAST_FRAME = """
(() => {
  const canvas = document.createElement("canvas");
  canvas.width = 32;
  canvas.height = 24;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  globalThis.epcLastFrame = [];
  setInterval(() => {
    if (document.getElementById("status").dataset.state !== "recovering") return;
    const frozen = document.getElementById("remote-frozen");
    const video = frozen.hidden ? document.getElementById("remote-video") : frozen;
    context.clearRect(0, 0, 32, 24);
    context.drawImage(video, 0, 0, 32, 24);
    const pixels = context.getImageData(0, 0, 32, 24).data;
    let brightest = 0;
    for (let i = 0; i < pixels.length; i += 4) {
      brightest = Math.max(brightest, pixels[i], pixels[i + 1], pixels[i + 2]);
    }
    const box = video.getBoundingClientRect();
    const style = getComputedStyle(video);
    const shown = !video.hidden && style.display !== "none" && style.visibility !== "hidden"
      && Number(style.opacity) > 0 && box.width > 0 && box.height > 0;
    const size = frozen.hidden ? `${video.videoWidth}x${video.videoHeight}`
      : `${frozen.width}x${frozen.height}`;
    epcLastFrame.push({ size, shown, brightest, frozen: !frozen.hidden });
  }, 100);
})()
"""


@dataclass
class Rec:
    net: RecoveryNetwork
    relay: RelayProcess
    browsers: Browsers
    config: Path
    tmp: Path

    async def page(self, role: str, session: str, query: str = "") -> Page:
        browser = await self.browsers.launch(
            netns=self.net.side(role).name, extra_args=routed_flags(self.relay.http_url)
        )
        page = await self.browsers.open(
            role,
            self.relay.http_url + "/" + query,
            browser=browser,
            locale="en-US",
            init_script=COUNT_PEER_CONNECTIONS,
        )
        await join(page, session, role)
        return page


@pytest_asyncio.fixture
async def rec(
    browsers: Browsers, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Rec]:
    """The network and the relay; ``call:`` values overridden by an indirect parameter."""
    call = {"media_timeout_s": MEDIA_TIMEOUT_S, "recovery_timeout_s": 60}
    call.update(getattr(request, "param", {}))
    if reason := netns_missing() or command_missing("iptables", "iptables"):
        pytest.skip(reason)
    config = tmp_path / "config.yaml"
    settings = {
        "auth": {"open": True},
        "relay": {"open_timeout_s": 2, "join_timeout_s": 3, "reconnect_max_s": 1},
        "media": {"video": PEER_VIDEO},
        "call": call,
    }
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    async with recovery_network() as net:
        relay = RelayProcess(config, net.hub.name, host=RELAY_ADDRESS)
        await relay.start()
        try:
            yield Rec(net, relay, browsers, config, tmp_path)
        finally:
            await relay.stop()


async def connected_pair(rec: Rec, session: str, query: str = "") -> tuple[Page, Page]:
    practitioner = await rec.page("practitioner", session, query)
    await wait_state(practitioner, "waiting")
    patient = await rec.page("patient", session, query)
    for page in (patient, practitioner):
        await wait_state(page, "connected", units=3)
    return patient, practitioner


FRAMES = "epedicare.stats ? epedicare.stats.inVideo.framesDecoded : 0"


async def frames_back(page: Page, count: int, units: float) -> tuple[float, float]:
    """Wait for ``count`` more decoded frames, across calls; when (time.time(), polled every
    0.1 s from epedicare.stats, itself updated every 250 ms) the first and the last came."""

    async def poll() -> tuple[float, float]:
        previous: int = await page.evaluate(FRAMES)
        got, first = 0, 0.0
        while got < count:
            await asyncio.sleep(0.1)
            now: int = await page.evaluate(FRAMES)
            delta = now - previous if now >= previous else now  # a new call counts from 0
            if delta > 0 and got == 0:
                first = time.time()
            got, previous = got + delta, now
        return first, time.time()

    return await within(poll(), units)


async def more_frames(page: Page, count: int, units: float) -> float:
    """Wait for ``count`` more decoded frames, across calls; the time the first one came."""
    first, _ = await frames_back(page, count, units)
    return first


async def shown_after(page: Page, at: float, units: float) -> float:
    """When (time.time()) the page's remote video first presented a frame after ``at``, as
    the page timed it (FRAMES_SHOWN, evaluated there before ``at``); polled, not timed, here."""

    async def poll() -> float:
        while (frame := await first_shown(page, at)) is None:  # noqa: ASYNC110 (the page's)
            await asyncio.sleep(0.1)
        return frame[0]

    return await within(poll(), units)


async def late_by(
    page: Page, restored: float, at: float, pages: tuple[Page, ...]
) -> tuple[float, float]:
    """Seconds from ``restored`` to ``at`` (a side's first frame again), and how long the
    ``pages`` (the call's) were stalled meanwhile, added up (tests.recovery.stalled)."""
    stalls = [await stalled(other, restored, at) for other in pages]
    return round(at - restored, 3), round(sum(stalls), 3)


async def peer_connections(page: Page) -> dict[str, int]:
    counts: dict[str, int] = await page.evaluate("epcPeerConnections()")
    return counts


async def watch_last_frame(page: Page) -> str:
    """Start sampling the remote video during "reconnecting"; its size now (e.g. 640x480)."""
    await page.evaluate(WATCH_LAST_FRAME)
    size: str = await page.evaluate(
        "(() => { const v = document.getElementById('remote-video');"
        " return `${v.videoWidth}x${v.videoHeight}`; })()"
    )
    return size


async def last_frame_kept(page: Page, size: str | None) -> None:
    """Every sample taken during "reconnecting" showed a frame of ``size``, shown, not black
    (size None: of one size, whichever the last frame had)."""
    samples: list[dict[str, Any]] = await page.evaluate("epcLastFrame")
    assert samples, "no sample taken while reconnecting"
    if size is None:
        size = samples[0]["size"]
        assert not size.startswith("0x"), samples[:3]
    kept = {"size": size, "shown": True}
    bad = [s for s in samples if {k: s[k] for k in kept} != kept or s["brightest"] < 16]
    assert bad == [], f"{len(bad)} of {len(samples)} samples: {bad[:3]}"


async def recoveries(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.evaluate("epedicare.recoveries")
    return found


def quiet(problems: list[str]) -> list[str]:
    """Console problems, less the relay connection's own failures while the network is away."""
    return [line for line in problems if "WebSocket connection to" not in line]


RECOVERING = re.compile(r"^Connection lost, reconnecting… \(\d+ s\)$")


async def status_mark(page: Page) -> tuple[int, int]:
    """The page's status log's last entry number now (0: none), and the page's clock (ms)."""
    mark: list[int] = await page.evaluate(
        "[epedicare.statusLog.length ? epedicare.statusLog.at(-1).n : 0, Date.now()]"
    )
    return mark[0], mark[1]


async def said(page: Page, mark: int) -> list[dict[str, Any]]:
    """What the page's status line said after entry ``mark`` (epedicare.statusLog)."""
    entries: list[dict[str, Any]] = await page.evaluate(
        "(mark) => epedicare.statusLog.filter((entry) => entry.n > mark)", mark
    )
    return entries


async def wait_said(page: Page, mark: int, states: list[str], units: float) -> None:
    """Wait until the status line has said ``states`` in this order after entry ``mark``, past
    the "connected" it said until then (read from its log: a state shorter than a poll is
    not missed)."""

    async def poll() -> None:
        while True:
            if states_after(await said(page, mark))[: len(states)] == states:
                return
            await asyncio.sleep(0.1)

    try:
        await within(poll(), units)
    except TimeoutError:
        raise AssertionError(f"not {states}: {await said(page, mark)}") from None


def states_of(entries: list[dict[str, Any]]) -> list[str]:
    """The call states of status log entries, each repeat of one state said once."""
    states: list[str] = []
    for entry in entries:
        if not states or states[-1] != entry["state"]:
            states.append(entry["state"])
    return states


def states_after(entries: list[dict[str, Any]]) -> list[str]:
    """states_of() less the "connected" said first (until the page finds the path lost)."""
    states = states_of(entries)
    return states[1:] if states[:1] == ["connected"] else states


async def said_reconnecting(page: Page, mark: int, since: int, limit_ms: int) -> None:
    """After entry ``mark`` the page said "reconnecting" (with the seconds) within ``limit_ms``
    of ``since`` (the page's clock), then "connected", and nothing else."""
    entries = await said(page, mark)
    assert states_after(entries) == ["recovering", "connected"], entries
    recovering = [e for e in entries if e["state"] == "recovering"]
    assert all(RECOVERING.match(e["text"]) for e in recovering), recovering
    assert recovering[0]["at"] - since < limit_ms, (recovering[0]["at"] - since, entries)


def frame_shown(browsers: Browsers, role: str, mark: int) -> None:
    """After console line ``mark``, the page saw a video frame again (not the wait's bound)."""
    lines = browsers.logs[role][mark:]
    assert any("video shown again" in line for line in lines), lines
    assert not any("no video frame shown" in line for line in lines), lines


@pytest.mark.asyncio
async def test_network_change_brings_video_back_on_a_new_connection(rec: Rec) -> None:
    """The patient's link is replaced (new address, old gone): last frame kept, then video."""
    patient, practitioner = await connected_pair(rec, "change")
    sizes, marks, logs = {}, {}, {}
    for role, page in (("patient", patient), ("practitioner", practitioner)):
        await more_frames(page, 10, units=2)
        sizes[page] = await watch_last_frame(page)
        marks[page] = await status_mark(page)
        logs[page] = (role, len(rec.browsers.logs[role]))
    changed = time.time()
    await rec.net.change("patient")
    back = await asyncio.gather(
        *(more_frames(page, 10, units=4) for page in (patient, practitioner))
    )
    for page in (patient, practitioner):
        await wait_said(page, marks[page][0], ["recovering", "connected"], units=3)
        # Each page said so to its user from the loss (found by either side first) until the
        # video showed a frame of the new call: within 10 s of the change (twice issue 12's
        # 5 s budget, for a loaded test machine), and nothing else (not "connecting").
        await said_reconnecting(page, *marks[page], limit_ms=10_000)
        frame_shown(rec.browsers, *logs[page])
        assert await peer_connections(page) == {"made": 2, "open": 1}
        assert [r["method"] for r in await recoveries(page)] == ["new-connection"]
        assert await page.inner_text('[data-stat="recoveries"]') == "1"
        assert await page.evaluate("document.getElementById('remote-video').srcObject.active")
        # The old connection closed, the new one not flowing yet: the last frame stayed.
        await last_frame_kept(page, sizes[page])
    # Issue 12's budget is 5 s from the change; twice that on a loaded test machine.
    assert max(back) - changed < 10, [round(t - changed, 1) for t in back]
    for role in ("patient", "practitioner"):
        assert quiet(rec.browsers.problems(role)) == []


@contextlib.asynccontextmanager
async def patient_deaf(rec: Rec) -> AsyncIterator[None]:
    """No UDP reaches the patient during the block: its media path dies on its side only (the
    practitioner still receives), and its relay connection (TCP) lives on."""
    rule = ["FORWARD", "-o", rec.net.links["patient"][1], "-p", "udp", "-j", "DROP"]
    await rec.net.net.run(rec.net.hub, "iptables", "-w", "-I", *rule)
    try:
        yield
    finally:
        await rec.net.net.run(rec.net.hub, "iptables", "-w", "-D", *rule)


PATH_LOST = re.compile(r"call 1: path lost \(nothing received for (\d+) ms\)")


@pytest.mark.asyncio
async def test_an_offer_while_the_call_still_flows_is_a_recovery(rec: Rec) -> None:
    """The patient's new offer reaches a practitioner page whose media still flows: it says
    "reconnecting", keeps the last frame, closes the old connection, counts one recovery."""
    patient, practitioner = await connected_pair(rec, "offer-first")
    marks = {}
    for page in (patient, practitioner):
        await more_frames(page, 10, units=2)
        await watch_last_frame(page)
        marks[page] = await status_mark(page)
    logged = len(rec.browsers.logs["practitioner"])
    async with patient_deaf(rec):
        # The patient finds its path lost (media_timeout_s) and offers: the practitioner,
        # still receiving, takes the offer as the loss.
        await wait_said(practitioner, marks[practitioner][0], ["recovering"], units=4)
    await asyncio.gather(*(more_frames(page, 10, units=4) for page in (patient, practitioner)))
    lines = rec.browsers.logs["practitioner"][logged:]
    lost = [int(m.group(1)) for line in lines if (m := PATH_LOST.search(line))]
    assert len(lost) == 1 and lost[0] < MEDIA_TIMEOUT_S * 1000, lines  # not found by itself
    for role, page in (("patient", patient), ("practitioner", practitioner)):
        await wait_said(page, marks[page][0], ["recovering", "connected"], units=3)
        await said_reconnecting(page, *marks[page], limit_ms=15_000)
        assert await peer_connections(page) == {"made": 2, "open": 1}
        assert [r["method"] for r in await recoveries(page)] == ["new-connection"]
        assert await page.inner_text('[data-stat="recoveries"]') == "1"
        # Its size is the one at the loss: the patient's encoder may scale down while it
        # hears nothing (no feedback), before it offers (480x360 from 640x480, seen once).
        await last_frame_kept(page, None)
        assert quiet(rec.browsers.problems(role)) == []


@pytest.mark.asyncio
async def test_muted_side_is_not_lost_and_a_3s_outage_comes_back_on_the_old_path(
    rec: Rec,
) -> None:
    """Muting is not a lost path; a 3 s outage keeps the last frame, back on the same path."""
    patient, practitioner = await connected_pair(rec, "outage")
    for page in (patient, practitioner):
        await more_frames(page, 10, units=2)
    # The patient mutes both: RTCP (and black frames) keep the path alive.
    muted = await status_mark(practitioner)
    await patient.click("#camera")
    await patient.click("#mic")
    await asyncio.sleep(MEDIA_TIMEOUT_S + 1.5)  # longer than the media timeout
    assert await recoveries(practitioner) == []
    assert await practitioner.get_attribute("#status", "data-state") == "connected"
    assert states_of(await said(practitioner, muted[0])) in ([], ["connected"])  # not once lost
    await patient.click("#camera")
    await patient.click("#mic")
    await more_frames(practitioner, 10, units=2)  # the camera's pattern again, not black
    sizes = {page: await watch_last_frame(page) for page in (patient, practitioner)}
    marks = {page: await status_mark(page) for page in (patient, practitioner)}
    for page in (patient, practitioner):
        await page.evaluate(FRAMES_SHOWN)

    async with rec.net.outage("patient"):
        began = time.monotonic()
        await wait_said(practitioner, marks[practitioner][0], ["recovering"], units=2)
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - began)))  # the outage itself
    restored = rec.net.restored_at  # its rules' removal began (one commit)
    back = await asyncio.gather(
        *(shown_after(page, restored, units=3) for page in (patient, practitioner))
    )
    await asyncio.gather(*(more_frames(page, 10, units=3) for page in (patient, practitioner)))
    for page in (patient, practitioner):
        await wait_said(page, marks[page][0], ["recovering", "connected"], units=3)
        await said_reconnecting(page, *marks[page], limit_ms=10_000)
        await wait_state(page, "connected", units=3)
        assert await peer_connections(page) == {"made": 1, "open": 1}  # no new negotiation
        assert [r["method"] for r in await recoveries(page)] == ["same-path"]
        await last_frame_kept(page, sizes[page])
    # Issue 12's budget: 1 s from the network's return to the first frame shown again, on both
    # sides, timed by each page (FRAMES_SHOWN); plus the time the pages were stalled meanwhile
    # (their timers 100 ms late or more): a page starved of CPU is late by that much, whatever
    # it does. Measured (docs/benchmarks.md, session 5): the later side 0.16-0.47 s, 15 runs
    # at load 1.5 to 8.7, no stall in those that counted them; with the whole call held to 0.6
    # CPU (a cgroup), 0.87-1.20 s with 0.36-1.67 s of stalls (4 runs): 1 s alone would fail
    # there. What brought it there is tested on its own: test_web_stale_frames.py and
    # test_both_pages_video_frames_go_through_the_worker.
    pages = (patient, practitioner)
    late = [await late_by(page, restored, at, pages) for page, at in zip(pages, back, strict=True)]
    assert all(seconds < 1.0 + stalls for seconds, stalls in late), late
    assert max(back) - restored < 5, late  # stalled or not
    for role in ("patient", "practitioner"):
        assert quiet(rec.browsers.problems(role)) == []


# The fmtp lines of a description's video section: {payload type: parameters}, for the video
# codecs (not rtx, red, ulpfec, flexfec).
VIDEO_FMTP = """
(sdp) => {
  const video = sdp.split(/^m=/m).find((section) => section.startsWith("video "));
  const notCodec = /^a=rtpmap:(\\d+) (rtx|red|ulpfec|flexfec-03)\\//gim;
  const rtx = new Set([...video.matchAll(notCodec)].map((m) => m[1]));
  const codecs = [...video.matchAll(/^a=rtpmap:(\\d+) /gm)].map((m) => m[1])
    .filter((pt) => !rtx.has(pt));
  const fmtp = Object.fromEntries([...video.matchAll(/^a=fmtp:(\\d+) (.*)$/gm)]
    .map((m) => [m[1], m[2].trim()]));
  return Object.fromEntries(codecs.map((pt) => [pt, fmtp[pt] ?? ""]));
}
"""


async def video_fmtp(page: Page, which: str) -> dict[str, str]:
    """The video codecs' fmtp parameters of the page's ``which`` description (local, remote)."""
    sdp: str = await page.evaluate(f"epedicare.call.pc.{which}Description.sdp")
    found: dict[str, str] = await page.evaluate(VIDEO_FMTP, sdp)
    return found


@pytest.mark.asyncio
async def test_bitrate_floor_goes_into_the_remote_description_only(rec: Rec) -> None:
    """Each page applies x-google-min-bitrate=200 to the other's video codecs, sends its own
    SDP as Chromium made it, and the call flows."""
    patient, practitioner = await connected_pair(rec, "floor")
    for page in (patient, practitioner):
        remote = await video_fmtp(page, "remote")
        assert remote and all("x-google-min-bitrate=200" in p for p in remote.values()), remote
        local = await video_fmtp(page, "local")  # what the other side got
        assert local and not any("x-google" in p for p in local.values()), local
        # Not asserted: the video's targetBitrate through an outage. It is the estimate's floor
        # less the audio, not a hard one: measured 400-850 kbit/s at its lowest after a 3 s
        # outage with it, 130-550 without, and once 68 in this test (docs/benchmarks.md).
        await more_frames(page, 10, units=2)


@pytest.mark.asyncio
async def test_a_page_asks_the_other_for_a_key_frame(rec: Rec) -> None:
    """Call.requestKeyFrame(): the other page encodes a key frame, counted as a PLI received."""
    patient, practitioner = await connected_pair(rec, "key")
    await more_frames(practitioner, 10, units=2)
    outbound = (
        "(async () => { for (const x of (await epedicare.call.pc.getStats()).values())"
        " if (x.type === 'outbound-rtp' && x.kind === 'video')"
        " return [x.keyFramesEncoded, x.pliCount]; })()"
    )
    keys, plis = await patient.evaluate(outbound)
    assert await practitioner.evaluate("epedicare.call.requestKeyFrame()") is True

    async def answered() -> list[int]:
        while True:
            now: list[int] = await patient.evaluate(outbound)
            if now[0] > keys and now[1] > plis:
                return now
            await asyncio.sleep(0.1)

    await within(answered(), 2)
    assert await patient.evaluate("epedicare.call.requestKeyFrame()") is True  # both ways
    await more_frames(practitioner, 10, units=2)


# The video frames the page's worker saw (keyframe-worker.js): {passed, dropped}.
WORKER_FRAMES = """
new Promise((ok) => {
  const call = epedicare.call;
  call.addEventListener("framecount", ({ detail }) => ok(detail), { once: true });
  call.keyFramePort.postMessage("count");
})
"""


@pytest.mark.asyncio
async def test_both_pages_video_frames_go_through_the_worker(rec: Rec) -> None:
    """The offerer's received video passes through keyframe-worker.js as the answerer's does
    (a transform set in ontrack on the offerer got no frames: its stale frames were kept)."""
    patient, practitioner = await connected_pair(rec, "worker")
    for page in (patient, practitioner):
        decoded = await page.evaluate(FRAMES)
        await more_frames(page, 10, units=2)
        seen = await within(page.evaluate(WORKER_FRAMES), 1)
        # Not asserted: dropped == 0. Under load a call's first frames can come 1 s later than
        # its very first (once, at load 13: one frame dropped as stale at the start).
        assert seen["passed"] >= decoded + 10, (decoded, seen)


@pytest.mark.asyncio
@pytest.mark.parametrize("rec", [{"recovery_timeout_s": 4}], indirect=True)
async def test_gives_up_with_a_message_keeps_the_seat_and_comes_back_with_the_network(
    rec: Rec,
) -> None:
    """recovery_timeout_s without media: a clear message, seats kept; the network returns: video."""
    patient, practitioner = await connected_pair(rec, "give-up")
    async with rec.net.outage("patient"):
        await wait_state(practitioner, "gave-up", units=3)
        assert await practitioner.inner_text("#status .status-call") == (
            "Connection lost with the patient"
        )
        assert await notice(practitioner) == (
            "The connection with the patient could not be restored in 4 s. You are still in"
            " the consultation: the call resumes if the patient comes back, or reload the page."
        )
        assert await practitioner.evaluate("epedicare.call") is None  # closed, for sure
        assert (await peer_connections(practitioner))["open"] == 0
    # The seats stayed: the patient's relay connection rejoins and it offers again.
    await asyncio.gather(*(more_frames(page, 10, units=4) for page in (patient, practitioner)))
    for page in (patient, practitioner):
        await wait_state(page, "connected")
        assert (await peer_connections(page))["open"] == 1


# -- Chromium and an aiortc command line ---------------------------------------------------


async def aiortc_peer(rec: Rec, role: str, session: str) -> Process:
    argv = peer_argv(
        role, rec.config, "--relay", rec.relay.url, "--session", session, "--video", "pattern",
        "--audio", "tone", "--stats-json", str(rec.tmp / f"{role}.json"),
    )  # fmt: skip
    return await spawn(role, argv, rec.net.side(role).command())


async def peer_back(peer: Process, mark: int) -> str:
    """The aiortc side's recovery method, from its `media back` line after line ``mark``."""
    try:
        _, _, method = await media_back(peer, mark, 20)
    except TimeoutError:
        raise AssertionError("no `media back` line:\n" + "\n".join(peer.lines[mark:])) from None
    return method


@pytest.mark.asyncio
@pytest.mark.parametrize("browser_role", ["patient", "practitioner"])
async def test_browser_and_aiortc_come_back_after_a_network_change_and_a_3s_outage(
    rec: Rec, browser_role: str
) -> None:
    """Chromium and aiortc: the patient's network changes, then a 3 s outage; video both ways."""
    peer_role = "practitioner" if browser_role == "patient" else "patient"
    session = f"mixed-{browser_role}"
    peer = await aiortc_peer(rec, peer_role, session)
    try:
        page = await rec.page(browser_role, session)
        await wait_state(page, "connected", units=4)
        await peer.expect("call 1: media flowing", 20)
        await more_frames(page, 10, units=2)

        mark = len(peer.lines)
        status = await status_mark(page)
        changed = time.time()
        await rec.net.change("patient")
        page_back = await more_frames(page, 10, units=4)
        method = await peer_back(peer, mark)
        assert method == "new-connection", "\n".join(peer.lines[mark:])
        assert page_back - changed < 10, round(page_back - changed, 1)  # 5 s budget, loaded CI
        await wait_said(page, status[0], ["recovering", "connected"], units=2)
        await said_reconnecting(page, *status, limit_ms=10_000)

        mark = len(peer.lines)
        status = await status_mark(page)
        await page.evaluate(FRAMES_SHOWN)
        async with rec.net.outage("patient"):
            await asyncio.sleep(3)
        restored = rec.net.restored_at  # its rules' removal began (one commit)
        # Back and flowing: the first frame (timed by the page) and 20 more (over a second of
        # the 15 fps pattern, polled from here) within 5 s of the network's return.
        page_back = await shown_after(page, restored, units=3)
        _, flowing = await frames_back(page, 20, units=3)
        peer_at, _, method = await media_back(peer, mark, 20)  # its first frame again
        assert method == "same-path", "\n".join(peer.lines[mark:])
        # Issue 12's 1 s on each side, the Chromium one timed by the page, the aiortc one by
        # its log line (written at its first frame decoded again, to the millisecond); plus
        # the time the page was stalled meanwhile, as in the test between two pages.
        back = {
            browser_role: await late_by(page, restored, page_back, (page,)),
            peer_role: await late_by(page, restored, peer_at, (page,)),
        }
        assert all(seconds < 1.0 + stalls for seconds, stalls in back.values()), back
        assert max(page_back, peer_at) - restored < 5, back  # stalled or not
        assert flowing - restored < 5, round(flowing - restored, 1)
        assert [r["method"] for r in await recoveries(page)] == ["new-connection", "same-path"]
        assert await peer_connections(page) == {"made": 2, "open": 1}
        await wait_said(page, status[0], ["recovering", "connected"], units=2)
        await said_reconnecting(page, *status, limit_ms=10_000)
        await more_frames(page, 10, units=2)
    finally:
        assert await peer.stop() == 0, peer.log()
    got = json.loads((rec.tmp / f"{peer_role}.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in got["recoveries"]] == ["new-connection", "same-path"], got
    assert got["video_per_call"][-1]["frames"] > 10, got
    assert quiet(rec.browsers.problems(browser_role)) == []
