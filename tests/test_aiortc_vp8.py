"""peers/aiortc_vp8.py: aiortc's VP8 encoder on libvpx, retuned in place when its target moves."""

from __future__ import annotations

import fractions
import itertools
import random

import pytest
from aiortc.codecs import vpx
from aiortc.jitterbuffer import JitterFrame
from av import VideoFrame

from peers import aiortc_vp8

FPS = 30
STEP = 90000 // FPS
random.seed(5)
NOISE = bytes(random.getrandbits(8) for _ in range(640 * 480 * 3))


def moving(i: int, width: int = 640, height: int = 480) -> VideoFrame:
    """A picture that changes every frame (noise sliding sideways): libvpx spends its budget."""
    frame = VideoFrame(width, height, "rgb24")
    k = (i * 9) % (width * height * 3)
    frame.planes[0].update((NOISE[k:] + NOISE[:k])[: width * height * 3])
    out = frame.reformat(format="yuv420p")
    out.pts, out.time_base = i * STEP, fractions.Fraction(1, 90000)
    return out


def test_the_pinned_libvpx_is_laid_out_as_written() -> None:
    aiortc_vp8.check()


def test_a_new_target_is_a_new_rate_without_a_keyframe() -> None:
    encoder = aiortc_vp8.Vp8(640, 480, 1_000_000)
    sizes: list[int] = []
    for i in range(150):
        if i == 50:
            encoder.rate(200_000)
        if i == 100:
            encoder.rate(1_000_000)
        sizes.append(len(encoder.encode(moving(i), i * STEP)))
    assert encoder.keyframes == 1  # the first frame only

    def mean(a: int, b: int) -> float:
        return sum(sizes[a:b]) / (b - a)

    # each part's second half, in bytes per frame, against the targets' 4,167 and 833 (the
    # first part pays back the keyframe: 1.8 kB measured; after it 0.86 and 3.3 kB)
    high, low, again = mean(25, 50), mean(75, 100), mean(125, 150)
    assert low < 1200 and high > 1.5 * low and again > 2.5 * low, (high, low, again)


def test_aiortc_rebuilt_its_encoder_and_sent_a_keyframe_for_the_same_moves() -> None:
    """The baseline: aiortc 1.16's own encode (vpx.py:180) under the same target moves."""
    encoder = vpx.Vp8Encoder()
    encoder.target_bitrate = 1_000_000
    keyframes = 0
    for i in range(150):
        if i in (50, 100):
            encoder.target_bitrate = 200_000 if i == 50 else 1_000_000
        payloads, _ = aiortc_vp8.AIORTC_ENCODE(encoder, moving(i))
        _, data = vpx.VpxPayloadDescriptor.parse(payloads[0])
        keyframes += not data[0] & 1  # VP8's frame tag: P = 0 on a keyframe
    assert keyframes == 3


def test_vp8encoder_frames_decode_and_a_new_size_is_a_new_encoder() -> None:
    encoder, decoder = vpx.Vp8Encoder(), vpx.Vp8Decoder()
    sizes, picture_ids = [], list[int]()
    for i in range(40):
        width, height = (640, 480) if i < 20 else (320, 240)
        frame = moving(i).reformat(width=width, height=height)
        frame.pts, frame.time_base = i * STEP, fractions.Fraction(1, 90000)
        payloads, timestamp = aiortc_vp8.encode(encoder, frame, force_keyframe=i == 10)
        assert timestamp == i * STEP
        picture_id = vpx.VpxPayloadDescriptor.parse(payloads[0])[0].picture_id
        assert picture_id is not None
        picture_ids.append(picture_id)
        data = b"".join(vpx.vp8_depayload(p) for p in payloads)
        (decoded,) = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        assert isinstance(decoded, VideoFrame)
        sizes.append((decoded.width, decoded.height))
    assert sizes == [(640, 480)] * 20 + [(320, 240)] * 20
    assert (
        getattr(aiortc_vp8.running(encoder), "keyframes", None) == 1
    )  # the 320x240 encoder's first frame
    assert all((b - a) % (1 << 15) == 1 for a, b in itertools.pairwise(picture_ids))


def test_a_frame_of_another_size_is_refused() -> None:
    encoder = aiortc_vp8.Vp8(320, 240, 300_000)
    with pytest.raises(ValueError, match="640x480 frame for a 320x240 encoder"):
        encoder.encode(moving(0), 0)
