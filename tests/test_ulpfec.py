"""peers/ulpfec.py, the RED and ULPFEC core, on packets built by aiortc's own RtpPacket."""

from __future__ import annotations

import random

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import given
from hypothesis import strategies as st

from peers import ulpfec

SSRC = 0x1234ABCD
VP8, RED, FEC = 96, 118, 120
ABS_SEND_TIME, MID = 2, 1
EXTENSIONS = HeaderExtensionsMap()
EXTENSIONS.configure(
    RTCRtpParameters(
        headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=MID, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
            RTCRtpHeaderExtensionParameters(
                id=ABS_SEND_TIME, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
            ),
        ]
    )
)


def packet(seq: int, size: int, *, marker: bool = False, sent: int = 0, csrc: int = 0) -> bytes:
    """A VP8 packet as aiortc serializes it: mid and abs-send-time extensions, ``size`` bytes of
    payload that depend on ``seq``."""
    rng = random.Random(seq * 7919 + size)
    p = RtpPacket(
        payload_type=VP8, marker=int(marker), sequence_number=seq & 0xFFFF,
        timestamp=(3000 * (seq // 3)) & 0xFFFFFFFF, ssrc=SSRC,
        payload=bytes(rng.getrandbits(8) for _ in range(size)),
    )  # fmt: skip
    p.csrc = [0x11111111 * (i + 1) for i in range(csrc)]
    p.extensions.mid = "0"
    p.extensions.abs_send_time = sent
    return p.serialize(EXTENSIONS)


def zeroed(raw: bytes) -> bytes:
    return ulpfec.zero_mutable(raw, {ABS_SEND_TIME})


def test_red_wraps_and_unwraps_a_packet_with_extensions_and_csrcs() -> None:
    media = packet(7, 300, marker=True, sent=0x123456, csrc=2)
    red = ulpfec.to_red(media, RED)
    assert len(red) == len(media) + 1
    parsed = RtpPacket.parse(red, EXTENSIONS)
    assert (parsed.payload_type, parsed.marker, parsed.payload[0]) == (RED, 1, VP8)
    assert parsed.extensions.abs_send_time == 0x123456
    assert ulpfec.from_red(red) == (VP8, media)


def test_from_red_takes_the_primary_block_after_redundant_ones() -> None:
    media = packet(9, 40)
    head = ulpfec.header_length(media)
    redundant = b"old-block"
    header = bytes((0x80 | VP8, 0, 0, len(redundant), VP8))  # F=1 (offset 0, length 9), then F=0
    red = media[:1] + bytes((RED,)) + media[2:head] + header + redundant + media[head:]
    assert ulpfec.from_red(red) == (VP8, media)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x80" * 11, bytes((0x90,)) + bytes(12), ulpfec.to_red(packet(1, 10), RED)[:-11]],
)
def test_malformed_red_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"^(not an RTP packet|RTP header|RED header)"):
        ulpfec.from_red(raw)


def test_one_lost_packet_is_rebuilt_with_its_mutable_extensions_zeroed() -> None:
    media = [packet(100 + i, 200 + 37 * i, marker=i == 4, sent=1000 + i) for i in range(5)]
    (fec,) = ulpfec.protect(media, 1, {ABS_SEND_TIME})
    recovery = ulpfec.Recovery(SSRC, {ABS_SEND_TIME})
    for i in (0, 1, 3, 4):  # the receiver's copies were stamped again by a retransmission
        resent = packet(100 + i, 200 + 37 * i, marker=i == 4, sent=99999 + i)
        assert recovery.media(resent) == []
    assert recovery.fec(fec) == [zeroed(media[2])]
    rebuilt = RtpPacket.parse(zeroed(media[2]), EXTENSIONS)
    assert rebuilt.sequence_number == 102 and rebuilt.extensions.mid == "0"
    assert recovery.recovered == 1


def test_fec_that_came_first_rebuilds_when_all_but_one_came() -> None:
    media = [packet(i, 500 + i) for i in range(8)]
    fecs = ulpfec.protect(media, 2)
    recovery = ulpfec.Recovery(SSRC)
    assert [recovery.fec(f) for f in fecs] == [[], []]
    got = []
    for i in (0, 1, 2, 3, 4, 6, 7):  # 5 lost
        got += recovery.media(media[i])
    # 6 is rebuilt once 0, 2 and 4 came (before it comes itself, then taken as a duplicate),
    # 5 once 1, 3 and 7 came
    assert got == [media[6], media[5]]


def test_two_losses_in_one_set_are_not_rebuilt_until_one_comes() -> None:
    media = [packet(i, 100) for i in range(4)]
    (fec,) = ulpfec.protect(media, 1)
    recovery = ulpfec.Recovery(SSRC)
    recovery.media(media[0])
    recovery.media(media[1])
    assert recovery.fec(fec) == []
    assert recovery.media(media[3]) == [media[2]]


def test_a_rebuilt_packet_completes_another_fec() -> None:
    media = [packet(i, 120 + i) for i in range(6)]
    first = ulpfec.protect(media[:3], 1)[0]  # 0-2
    second = ulpfec.protect(media, 1)[0]  # 0-5
    recovery = ulpfec.Recovery(SSRC)
    for i in (0, 1, 3, 4):  # 2 and 5 lost
        recovery.media(media[i])
    assert recovery.fec(second) == []
    assert sorted(recovery.fec(first)) == sorted([media[2], media[5]])


def test_a_long_mask_across_the_sequence_wrap() -> None:
    media = [packet(65530 + i, 90) for i in range(0, 40, 2)]  # every other number, 65530 to 3
    fecs = ulpfec.protect(media, 3)
    assert all(f[0] & 0x40 for f in fecs)  # L: 48-bit masks
    recovery = ulpfec.Recovery(SSRC)
    lost = {0, 1, 2}  # one in each set
    for i, m in enumerate(media):
        if i not in lost:
            recovery.media(m)
    assert sorted(p for f in fecs for p in recovery.fec(f)) == sorted(media[i] for i in lost)


def test_protect_refuses_packets_out_of_the_masks_reach() -> None:
    with pytest.raises(ValueError, match="up to 48"):
        ulpfec.protect([packet(0, 10), packet(48, 10)], 1)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes(13),
        bytes(14),
        bytes(10) + b"\x00\x64\x80\x00" + bytes(99),
        bytes((0x40,)) + bytes(14),
    ],
)
def test_malformed_fec_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError, match=r"^ULPFEC"):
        ulpfec.Recovery(SSRC).fec(payload)


def test_fec_whose_packets_all_came_is_dropped() -> None:
    media = [packet(i, 60) for i in range(3)]
    recovery = ulpfec.Recovery(SSRC)
    for m in media:
        recovery.media(m)
    assert recovery.fec(ulpfec.protect(media, 1)[0]) == []
    assert recovery.useless == 1


@given(
    sizes=st.lists(st.integers(1, 1200), min_size=1, max_size=48),
    fec_count=st.integers(1, 8),
    first=st.integers(0, 65535),
    lost=st.sets(st.integers(0, 47)),
    fec_first=st.booleans(),
)
def test_every_set_with_one_loss_is_rebuilt_exactly(
    sizes: list[int], fec_count: int, first: int, lost: set[int], fec_first: bool
) -> None:
    media = [
        packet(first + i, size, marker=i == len(sizes) - 1, sent=i) for i, size in enumerate(sizes)
    ]
    fecs = ulpfec.protect(media, fec_count, {ABS_SEND_TIME})
    lost = {i for i in lost if i < len(media)}
    recovery = ulpfec.Recovery(SSRC, {ABS_SEND_TIME})
    got: list[bytes] = []
    if fec_first:
        got += [p for f in fecs for p in recovery.fec(f)]
    for i, m in enumerate(media):
        if i not in lost:
            got += recovery.media(packet(first + i, sizes[i], marker=m[1] & 0x80 != 0, sent=7))
    if not fec_first:
        got += [p for f in fecs for p in recovery.fec(f)]
    sets = min(fec_count, len(media))
    expected = {i for i in lost if sum(1 for j in lost if j % sets == i % sets) == 1}
    originals = [zeroed(m) for m in media]
    assert len(got) == len(set(got)) and all(p in originals for p in got)
    if fec_first:  # a set's last packet to come may be rebuilt before it comes
        assert {originals[i] for i in expected} <= set(got)
    else:
        assert sorted(got) == sorted(originals[i] for i in expected)
