"""The aiortc sender's RED + ULPFEC (peers/aiortc_send.py): negotiation, grouping, calls.

The negotiation tests need no root: aiortc's offer and answer are read as SDP, and Chromium
(when installed) answers and offers on a blank page without a network.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from peers import aiortc_patches, aiortc_send
from peers.call import Call, CallOptions
from peers.config import PeerSettings
from tests.browser import Browsers, chromium_missing
from tests.support import within


@pytest.fixture
def fec_on() -> Iterator[None]:
    """RED + ULPFEC negotiated for the test (process-wide), off again after it."""
    aiortc_patches.steady_media()
    aiortc_send.negotiate_fec(True)
    try:
        yield
    finally:
        aiortc_send.negotiate_fec(False)


def rtpmap(sdp: str) -> dict[int, str]:
    """The video section's payload types: 'VP8', 'red', 'rtx' (apt ...), ..."""
    video = sdp.split("m=video", 1)[1].split("\r\nm=", 1)[0]
    names = {
        int(pt): name
        for pt, name in re.findall(r"a=rtpmap:(\d+) ([^/\s]+)/90000", video, flags=re.IGNORECASE)
    }
    for pt, apt in re.findall(r"a=fmtp:(\d+) apt=(\d+)", video):
        names[int(pt)] = f"rtx apt={names.get(int(apt), apt)}"
    return names


def fec_lines(names: dict[int, str]) -> set[str]:
    return {name for name in names.values() if name.lower() in {"red", "ulpfec", "rtx apt=red"}}


async def aiortc_offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def test_the_setting_is_read_and_off_by_default() -> None:
    """media.video.fec is false unless set; true reaches the call's options."""
    assert PeerSettings.from_mapping({}).video.fec is False
    settings = PeerSettings.from_mapping({"media": {"video": {"fec": True}}})
    assert settings.video.fec is True
    assert CallOptions.from_settings(settings).fec is True


@pytest.mark.asyncio
async def test_red_and_ulpfec_are_offered_only_when_asked() -> None:
    """Off (today's default), aiortc's offer has no red nor ulpfec; on, it offers red with an
    rtx of its own and ulpfec, after VP8 (the codec sent stays the first)."""
    aiortc_patches.steady_media()
    aiortc_send.negotiate_fec(False)
    assert fec_lines(rtpmap(await aiortc_offer())) == set()
    aiortc_send.negotiate_fec(True)
    try:
        names = rtpmap(await aiortc_offer())
    finally:
        aiortc_send.negotiate_fec(False)
    assert fec_lines(names) == {"red", "rtx apt=red", "ulpfec"}
    assert next(iter(names.values())) == "VP8"
    assert names[aiortc_send.RED_PT] == "red" and names[aiortc_send.ULPFEC_PT] == "ulpfec"


@pytest.mark.asyncio
async def test_a_call_with_fec_on_offers_red_and_keeps_vp8_first(fec_on: None) -> None:
    """A Call made with ``CallOptions(fec=True)`` offers red and ulpfec after VP8, also with the
    codec preferences it sets (``setCodecPreferences`` keeps red's rtx)."""

    async def send(_: object) -> None:
        return None

    call = Call(CallOptions(fec=True), send)
    try:
        call._add_media()
        await within(call.pc.setLocalDescription(await call.pc.createOffer()), 4)
        names = rtpmap(call.pc.localDescription.sdp)
    finally:
        await call.close()
    assert fec_lines(names) == {"red", "rtx apt=red", "ulpfec"}
    assert next(iter(names.values())) == "VP8"


CHROMIUM_ANSWER = """async (offer) => {
  const pc = new RTCPeerConnection();
  await pc.setRemoteDescription({type: "offer", sdp: offer});
  const answer = await pc.createAnswer();
  pc.close();
  return answer.sdp;
}"""

CHROMIUM_OFFER = """async () => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", {direction: "sendrecv"});
  const offer = await pc.createOffer();
  pc.close();
  return offer.sdp;
}"""


@pytest.mark.asyncio
async def test_chromium_answers_red_and_ulpfec_and_aiortc_answers_chromiums(
    browsers: Browsers, fec_on: None
) -> None:
    """Chromium's answer to aiortc's offer keeps red (with its rtx) and ulpfec, VP8 first; and
    aiortc's answer to Chromium's offer takes them with Chromium's payload types."""
    if reason := chromium_missing():
        pytest.skip(reason)
    browser = await browsers.launch()
    page = await browser.new_page()
    offer = await aiortc_offer()
    answer = rtpmap(await page.evaluate(CHROMIUM_ANSWER, offer))
    assert fec_lines(answer) == {"red", "rtx apt=red", "ulpfec"}, answer
    assert next(iter(answer.values())) == "VP8", answer

    chromium = await page.evaluate(CHROMIUM_OFFER)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(chromium, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        ours = rtpmap(pc.localDescription.sdp)
    finally:
        await pc.close()
    theirs = rtpmap(chromium)
    assert fec_lines(ours) == {"red", "rtx apt=red", "ulpfec"}, ours
    for pt, name in ours.items():
        assert theirs[pt] == name  # Chromium's payload types
    assert next(iter(ours.values())) == "VP8", ours
