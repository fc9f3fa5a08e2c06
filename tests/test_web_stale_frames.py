"""The page's rule for the stale video frames after an outage (web/js/stale-frames.js).

The module runs in Chromium as the page's worker runs it, fed made-up frames:
(key, RTP timestamp, receive time). A stream at 20 fps whose frames arrive 20 ms
after their RTP time; what the outage of docs/benchmarks.md does to it (frames
that waited in the sender's pacer arrive together, about 2.6 s late).
"""

from __future__ import annotations

from typing import Any

import pytest

import relay
from tests.browser import Browsers

# Feeds StaleFrames a list of [key, rtp, receivedMs]; its verdicts, and the burst reported
# after each frame that passed (null if none).
JUDGE = """
async (frames) => {
  const { StaleFrames } = await import("./js/stale-frames.js");
  const stale = new StaleFrames();
  const verdicts = [];
  const bursts = [];
  for (const [key, rtp, received] of frames) {
    verdicts.push(stale.judge(key, rtp >>> 0, received));
    const burst = stale.takeBurst();
    if (burst) bursts.push(burst);
  }
  return { verdicts, bursts };
}
"""


def steady(first_ms: int, count: int, *, late_ms: int = 20, every_ms: int = 50) -> list[Any]:
    """``count`` delta frames from RTP time ``first_ms``, each arriving ``late_ms`` after it."""
    return [
        [False, (first_ms + i * every_ms) * 90, first_ms + i * every_ms + late_ms]
        for i in range(count)
    ]


def queued(first_ms: int, count: int, at_ms: int) -> list[Any]:
    """``count`` delta frames from RTP time ``first_ms`` that all leave the sender's pacer at
    ``at_ms``, 2 ms apart (as after an outage)."""
    return [[False, (first_ms + k * 50) * 90, at_ms + k * 2] for k in range(count)]


async def judge(browsers: Browsers, url: str, frames: list[Any]) -> dict[str, Any]:
    page = await browsers.open("stale", url)
    verdicts: dict[str, Any] = await page.evaluate(JUDGE, frames)
    return verdicts


@pytest.mark.asyncio
async def test_frames_queued_through_an_outage_are_dropped_until_fresh_ones(
    relay_server: relay.RunningRelay, browsers: Browsers
) -> None:
    """After a 3 s outage, the 13 frames that waited in the pacer (2.6 s late) are dropped
    with one key frame asked for; the first fresh frame passes and reports the burst."""
    frames = steady(0, 40) + queued(2350, 13, 5000) + steady(5000, 3)
    got = await judge(browsers, relay_server.http_url, frames)
    assert got["verdicts"] == ["pass"] * 40 + ["drop+ask"] + ["drop"] * 12 + ["pass"] * 3
    assert got["bursts"] == [{"dropped": 13, "worstMs": 2600}]


@pytest.mark.asyncio
async def test_a_long_burst_asks_again_and_a_key_frame_always_passes(
    relay_server: relay.RunningRelay, browsers: Browsers
) -> None:
    """Stale frames 100 ms apart: a key frame asked for at the first and every 300 ms after;
    a stale key frame passes, ends the burst and the asking."""
    stale = [[False, (2000 + k * 100) * 90, 5000 + k * 100] for k in range(7)]
    key = [[True, 2700 * 90, 5700]]
    frames = steady(0, 40) + stale + key + steady(5700, 2)
    got = await judge(browsers, relay_server.http_url, frames)
    tail = ["drop+ask", "drop", "drop"] * 2 + ["drop+ask", "pass", "pass", "pass"]
    assert got["verdicts"] == ["pass"] * 40 + tail
    assert got["bursts"] == [{"dropped": 7, "worstMs": 2950}]


@pytest.mark.asyncio
async def test_a_lasting_change_of_delay_passes_after_two_seconds(
    relay_server: relay.RunningRelay, browsers: Browsers
) -> None:
    """Every frame 1.5 s later than before, for good (no key frame comes): dropped for 2 s,
    then taken as the stream's new delay; every frame after passes, and a key frame is asked
    for every 300 ms, 10 times in all."""
    frames = steady(0, 40) + steady(2000, 60, late_ms=1500)
    got = await judge(browsers, relay_server.http_url, frames)
    dropped = 40  # 2 s of frames at 20 fps
    assert got["verdicts"][:40] == ["pass"] * 40
    # Asked every 300 ms (6 frames) while dropping and after, 10 times in all.
    asking = ["drop+ask"] + (["drop"] * 5 + ["drop+ask"]) * 6 + ["drop"] * 3
    after = ["pass", "pass", "pass+ask"] + (["pass"] * 5 + ["pass+ask"]) * 2 + ["pass"] * 5
    assert got["verdicts"][40:] == asking + after
    assert got["bursts"] == [{"dropped": dropped, "worstMs": 1465}]


@pytest.mark.asyncio
async def test_jitter_a_muted_camera_and_a_timestamp_wrap_pass(
    relay_server: relay.RunningRelay, browsers: Browsers
) -> None:
    """Frames 0 to 900 ms late by turns, one frame a second (a muted camera's), and RTP
    timestamps wrapping past 2^32 are not stale."""
    base = 2**32 - 3000 * 90  # the RTP timestamps wrap 3 s in, during the muted second
    jitter = [[False, base + i * 50 * 90, i * 50 + (900 if i % 3 == 0 else 0)] for i in range(30)]
    muted = [[False, base + (1500 + i * 1000) * 90, 1520 + i * 1000] for i in range(5)]
    wrap = [[False, base + (6000 + i * 50) * 90, 6020 + i * 50] for i in range(20)]
    got = await judge(browsers, relay_server.http_url, jitter + muted + wrap)
    assert got["verdicts"] == ["pass"] * 55
    assert got["bursts"] == []


@pytest.mark.asyncio
async def test_fresh_frames_after_a_burst_ask_until_a_key_frame(
    relay_server: relay.RunningRelay, browsers: Browsers
) -> None:
    """Fresh delta frames after a dropped burst still ask every 300 ms (they refer to what was
    dropped); a key frame ends it, and the next burst asks again at once."""
    burst = queued(2350, 3, 5000)
    fresh = steady(5000, 12)  # 5020 to 5570 ms
    key = [[True, 5600 * 90, 5620]]
    later = steady(5650, 4) + queued(6000, 2, 8000)
    frames = steady(0, 40) + burst + fresh + key + later
    got = await judge(browsers, relay_server.http_url, frames)
    expected = ["drop+ask", "drop", "drop"]
    expected += ["pass"] * 6 + ["pass+ask"] + ["pass"] * 5  # 5320 ms: 300 after the ask
    expected += ["pass"] + ["pass"] * 4 + ["drop+ask", "drop"]  # the key frame, then
    assert got["verdicts"] == ["pass"] * 40 + expected
    assert got["bursts"] == [{"dropped": 3, "worstMs": 2600}]
