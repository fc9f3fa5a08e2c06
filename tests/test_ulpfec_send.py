"""The aiortc sender's RED + ULPFEC (peers/aiortc_send.py): negotiation, grouping, calls.

The negotiation tests need no root: aiortc's offer and answer are read as SDP, and Chromium
(when installed) answers and offers on a blank page without a network. The call runs as
bench/network.py runs one (root: namespaces and the link emulator).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.rtp import RtpPacket

from bench import network
from peers import aiortc_patches, aiortc_send, ulpfec
from peers.aiortc_rate import ReportedLoss
from peers.aiortc_send import Protection
from peers.call import Call, CallOptions
from peers.config import PeerSettings
from peers.netns import Netns
from tests.browser import Browsers, chromium_missing
from tests.inprocess import LocalPair
from tests.mediacheck import needs_root
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


def test_the_setting_is_read_and_on_by_default() -> None:
    """media.video.fec is true unless set (the receive path takes RED, peers/aiortc_receive.py);
    what is set reaches the call's options."""
    assert PeerSettings.from_mapping({}).video.fec is True
    assert CallOptions.from_settings(PeerSettings.from_mapping({})).fec is True
    settings = PeerSettings.from_mapping({"media": {"video": {"fec": False}}})
    assert settings.video.fec is False
    assert CallOptions.from_settings(settings).fec is False


@pytest.mark.asyncio
async def test_red_and_ulpfec_are_offered_only_when_asked() -> None:
    """Off, aiortc's offer has no red nor ulpfec; on, it offers red with an
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


# -- how much FEC, over which packets (pure) ------------------------------------------------------


def raw(seq: int, size: int = 1000) -> bytes:
    """A media packet's bytes as sent: a 12-byte header with ``seq``, then ``size`` bytes."""
    return bytes([0x80, 97]) + seq.to_bytes(2, "big") + bytes(8) + bytes([seq & 0xFF]) * size


def fed(
    protection: Protection, frames: list[int], keyframes: frozenset[int] = frozenset()
) -> list[tuple[int, int]]:
    """Frames of so many packets, sent 1/30 s apart: (media, FEC) of each piece protected."""
    seq, out = 0, []
    for n, packets in enumerate(frames):
        now = n / 30
        for media, count in protection.before_frame(packets, n in keyframes):
            out.append((len(media), count))
        for _ in range(packets):
            protection.add(raw(seq), now)
            seq += 1
        for media, count in protection.end_of_frame(now):
            out.append((len(media), count))
    return out


def lossy(loss: float = 0.05, rtt_s: float = 0.15) -> Protection:
    protection = Protection()
    protection.on_report(loss, rtt_s)
    return protection


def test_no_fec_on_a_clean_link_nor_a_short_round_trip_nor_before_a_report() -> None:
    """No report yet, under 1 % lost, or a round trip under 20 ms (a retransmission is in time):
    no FEC, nothing held back, the whole target to the encoder."""
    for protection in (Protection(), lossy(0.005), lossy(0.05, rtt_s=0.01)):
        assert protection.span() == 0
        assert fed(protection, [3] * 30) == []
        assert protection.media_share() == 1.0


def test_the_span_follows_the_loss_and_keyframes_get_twice_the_fec() -> None:
    """One FEC packet per 4 media packets at 5 % (a loss shares its group with another at most
    a fifth of the time), 10 at 2 % (the most), 2 at 10 % and more; half the span for a
    keyframe."""
    assert [lossy(p).span() for p in (0.02, 0.05, 0.10, 0.3)] == [10, 4, 2, 2]
    assert lossy(0.05).span(keyframe=True) == 2
    for p in (0.02, 0.05, 0.10):
        span = lossy(p).span()
        assert (1 - p) ** span >= 1 - aiortc_send.FEC_RESIDUAL > (1 - p) ** (span + 1) or span in (
            2,
            10,
        )


def test_a_frame_of_span_packets_is_its_own_group_and_small_frames_are_grouped() -> None:
    """At 5 % (span 4): frames of 4 and 8 packets get 1 and 2 FEC packets right after them;
    frames of 1 packet are grouped 4 at a time (1 FEC per 4, not per frame), and at most for
    until they span half a round trip: at 100 ms, 3 frames (67 ms)."""
    assert fed(lossy(0.05, 0.3), [4, 8]) == [(4, 1), (8, 2)]
    assert fed(lossy(0.05, 0.3), [5, 6]) == [(5, 1), (6, 2)]  # n / span, rounded
    assert fed(lossy(0.05, 0.3), [1] * 8) == [(4, 1), (4, 1)]
    assert fed(lossy(0.05, 0.1), [1] * 6) == [(3, 1), (3, 1)]
    assert fed(lossy(0.05, 1.0), [1, 1, 2]) == [(4, 1)]


def test_a_keyframe_is_grouped_alone_and_big_frames_in_pieces_of_48() -> None:
    """A keyframe closes the group before it and is protected alone, at twice the FEC; a frame
    of 60 packets is protected in pieces of 48 and 12 (ULPFEC's mask), all after the frame; a
    group that a frame would take past 48 packets is protected before it."""
    assert fed(lossy(0.05, 1.0), [1, 10, 1], keyframes=frozenset({1})) == [(1, 1), (10, 5)]
    assert fed(lossy(0.05, 1.0), [60]) == [(48, 12), (12, 3)]
    protection = lossy(0.05, 1.0)
    assert fed(protection, [2]) == []  # held for more frames
    assert protection.before_frame(47, keyframe=False) == [([raw(0), raw(1)], 1)]


def test_the_fec_share_comes_out_of_the_encoders_target() -> None:
    """With RED + ULPFEC the encoder gets span / (span + 1) of the target before any FEC was
    sent, then what the groups sent measure (bytes): 4/5 at 5 %; 1 FEC of a group of 3 (a short
    round trip's group) leaves it 3/4. Without them, the whole target."""
    protection = lossy(0.05, 0.3)
    assert protection.media_share() == 1.0  # a call without RED + ULPFEC sends no FEC
    protection.red = True
    assert protection.media_share() == pytest.approx(4 / 5)
    media = [raw(seq) for seq in range(3)]
    protection.sent(media, [raw(9)])
    assert protection.media_share() == pytest.approx(3 / 4)
    assert (protection.fec_packets, protection.media_packets, protection.groups) == (1, 3, 1)


def test_the_loss_is_taken_over_10_packets_at_least_from_the_cumulative_counts() -> None:
    """Chromium's reports come several a second, some over 2-3 packets (1 lost of 2 said 50 %):
    the loss is taken from the cumulative lost count once 10 packets are expected since the
    last update; mod 2**16 for a receiver that reports no cycles."""
    counter = ReportedLoss()
    assert counter.add(1000, 10) is None  # the first report: the base
    assert counter.add(1002, 11) is None  # 2 packets: wait
    assert counter.add(1040, 12) == pytest.approx(2 / 40)
    assert counter.add(1050, 12) == 0.0
    assert counter.whole() == pytest.approx(2 / 50)  # over the call: 2 lost of 50
    assert counter.add(65_530, 12) is None  # reordered / far off: ignored
    wrapping = ReportedLoss(highest=65_530, lost=0)
    assert wrapping.whole() is None
    assert wrapping.add(14, 1) == pytest.approx(1 / 20)


# -- a call to Chromium through 5 % loss and 75 ms each way (root, Chromium) ----------------------


@needs_root
@pytest.mark.netns
@pytest.mark.asyncio
async def test_aiortc_to_chromium_at_5_percent_and_75_ms_sends_fec_and_freezes_under_2_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13's link (5 % loss, 75 ms each way), 30 s, an aiortc patient with RED + ULPFEC
    (media.video.fec) to a Chromium practitioner (bench/network.py's call): at most 2 s frozen
    as Chromium counts it (1.4-2.6 s without the FEC, 5 of 7 calls over 2 s), FEC sent for
    most media packets, and the loss it was chosen from read near the link's."""
    if reason := chromium_missing():
        pytest.skip(reason)
    video = {**network.VIDEO, "fec": True}
    monkeypatch.setitem(network.SETTINGS, "media", {"video": video})
    done = await network.cell("5 % loss, 75 ms", "aiortc->Chromium", 30.0, tmp_path)
    sending = json.loads((tmp_path / "patient.json").read_text(encoding="utf-8"))["sending"]
    fec = sending["fec"]
    print("aiortc->Chromium with FEC:", done.row, fec, f"load {done.load}")  # for `pytest -s`
    assert fec is not None and fec["fec_packets"] > 0, fec
    assert fec["protected"] >= 0.5 * done.row["repair"]["packetsReceived"], fec  # FEC and RTX too
    # The loss over the call: the filtered loss's last value swings (13.5 % once, in CI).
    assert 2.0 <= fec["call_loss_pct"] <= 10.0, fec
    assert done.row["fps"] >= 20, done.row
    assert done.row["frozen_s"] <= 2.0, done.row


# -- what the sender puts on the wire (root: two namespaces) --------------------------------------


@needs_root
@pytest.mark.netns
@pytest.mark.asyncio
async def test_the_fec_sent_rebuilds_lost_packets_byte_for_byte(
    link_pair: tuple[Netns, Netns, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The video an aiortc sender puts on the wire with RED + ULPFEC, at a planned 5 % loss and
    150 ms round trip, taken as a receiver would (``ulpfec.from_red``, ``ulpfec.Recovery``)
    with one media packet in 20 dropped: every packet is RED (VP8 inside), the FEC packets
    follow their frames' last packets in the same sequence space, and the dropped packets are
    rebuilt as they were sent (abs-send-time zeroed): the bytes protected are the bytes sent."""
    a, b, _ = link_pair
    aiortc_patches.steady_media()  # installed first: the patch below wraps the receive path
    monkeypatch.setattr(Protection, "on_report", lambda self, loss, rtt: None)
    handle = RTCRtpReceiver._handle_rtp_packet

    async def no_red(self: RTCRtpReceiver, packet: RtpPacket, arrival_time_ms: int) -> None:
        if packet.payload_type != aiortc_send.RED_PT:  # the sender is under test, not this side
            await handle(self, packet, arrival_time_ms)

    monkeypatch.setattr(RTCRtpReceiver, "_handle_rtp_packet", no_red)
    sent: list[bytes] = []
    fec = (CallOptions(fec=True), CallOptions(fec=True))
    async with contextlib.aclosing(LocalPair(fec, (a, b), fps=30)) as pair:
        await within(pair.connect(), 2)
        sender = next(s for s in pair.a.pc.getSenders() if s.kind == "video")
        protection = aiortc_send.protection_of(sender)
        protection.loss, protection.rtt_s = 0.05, 0.15
        transport = sender.transport
        original = transport._send_rtp

        async def capture(data: bytes) -> None:
            if len(data) > 12 and data[1] & 0x7F == aiortc_send.RED_PT:
                sent.append(data)
            await original(data)

        monkeypatch.setattr(transport, "_send_rtp", capture)
        await asyncio.sleep(5)
    assert len(sent) > 150, len(sent)
    media: list[bytes] = []
    fec_at: list[int] = []
    recovery = ulpfec.Recovery(
        sender._ssrc, mutable_ids={3}
    )  # abs-send-time (codecs/__init__.py:59)
    dropped: dict[int, bytes] = {}
    rebuilt: list[bytes] = []
    for n, data in enumerate(sent):
        block_pt, inner = ulpfec.from_red(data)
        if block_pt == aiortc_send.ULPFEC_PT:
            fec_at.append(n)
            rebuilt += recovery.fec(inner[ulpfec.header_length(inner) :])
            continue
        assert block_pt == 97  # VP8
        media.append(inner)
        if len(media) % 20 == 7:
            dropped[ulpfec.sequence_number(inner)] = ulpfec.zero_mutable(inner, {3})
        else:
            rebuilt += recovery.media(inner)
    print(
        "sent", len(media), "media", len(fec_at), "FEC; rebuilt", len(rebuilt), "of", len(dropped)
    )
    seqs = [ulpfec.sequence_number(ulpfec.from_red(d)[1]) for d in sent]
    assert all((y - x) & 0xFFFF == 1 for x, y in itertools.pairwise(seqs))  # one sequence space
    assert fec_at and all(
        ulpfec.from_red(sent[n - 1])[1][1] & 0x80 or n - 1 in fec_at for n in fec_at
    )
    assert 0.15 <= len(fec_at) / len(media) <= 0.5, (len(fec_at), len(media))
    assert len(dropped) >= 7
    assert len(rebuilt) >= 0.8 * len(dropped), (len(rebuilt), len(dropped))
    for packet in rebuilt:
        assert dropped[ulpfec.sequence_number(packet)] == packet
