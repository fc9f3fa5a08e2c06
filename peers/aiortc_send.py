"""aiortc's VP8 sender made to fit a narrow link (imported by peers/aiortc_patches.py).

A sibling of ``aiortc_patches`` (like ``aiortc_receive``): it wraps the
encoder as a whole. Against aiortc 1.16.0:

- The floor: ``MIN_BITRATE = 250000`` (codecs/vpx.py:17), which the encoder's
  ``target_bitrate`` setter (vpx.py:254) clamps every estimate to, so that on a
  300 kbit/s link video alone overruns what audio leaves. Here ``FLOOR_BPS``.
- The start: ``DEFAULT_BITRATE = 500000`` (vpx.py:16), the target of a new encoder
  (vpx.py:178) until the first REMB, which an aiortc receiver sends after its first
  overuse, a start probe or 3 s of throughput. 500 kbit/s puts 640x480 on the ladder's
  top rung: the pattern's 290 kbit/s and the audio overran a 300 kbit/s link with a
  100 ms buffer, 48-61 % of the packets were dropped (the NACKs' retransmissions too)
  and video froze 0.9-1.6 s, in the calls where no early estimate came (8 of 13, traced:
  docs/benchmarks.md, "The start on a narrow link"). Here ``START_BPS``, which the
  ladder maps to 480x360 (a link of unknown capacity: libwebrtc starts at 300 kbit/s
  with a pacer and probes of its own); the estimate and the probes (peers/aiortc_rate.py)
  take it to 640x480 on a wider link.
- Resolution, then frame rate, from the target bitrate: aiortc encodes every
  frame at the source's size whatever the estimate (``Vp8Encoder.encode``,
  vpx.py:180). Here ``Ladder`` picks a rung (scale, frame-rate divisor) whose
  need, ``width x height x fps x BITS_PER_PIXEL`` (``fps`` the source's, from the
  frames' media time), fits the target: down at once,
  up only after the target has held ``UP_MARGIN`` above the next rung's need
  for ``UP_AFTER_S`` (each change costs a keyframe), then to the highest rung the
  target covers (after a probe, 320x240 to 640x480 in one step). While the answer to
  the start probe may come (``Ladder.climb_until``), at once: libwebrtc's encoder is at
  its full resolution within the first second when its initial probes find the link
  (its ``ProbeController`` probes at 3 and 6 x the start rate as the transport becomes
  writable), where the hold would keep 480x360 for 3 s more.

- CPU overuse: aiortc has no signal that encoding is too slow for the frame
  rate. ``RTCRtpSender._next_encoded_frame`` (rtcrtpsender.py:318) awaits
  ``Vp8Encoder.encode`` in the loop's thread executor and sends whatever comes
  back, however late: a starved process keeps encoding 640x480 at 30 fps, and
  its frames leave late and in bursts. Here ``CpuOveruse``, after libwebrtc's
  ``OveruseFrameDetector``, measures the time each encode takes (wall clock, in
  the executor's thread, scaling included) against the time it covers: above
  ``HIGH_USAGE`` for ``OVER_CHECKS`` checks in a row, one rung down; below
  ``LOW_USAGE`` for ``CPU_UP_AFTER_S``, one rung up (that wait doubles when a
  climb is followed by an overuse within ``OSCILLATION_S``). It moves the same
  ladder as the bitrate; the lower of the two wins. It takes resolution only
  (down to ``CPU_MAX_RUNG``), as Chromium does for a camera
  (``DegradationPreference::MAINTAIN_FRAMERATE``); the frame rate is left to
  the bitrate. ``Sent.limitation`` says which one holds the sender down (the
  W3C ``qualityLimitationReason``: ``cpu``, ``bandwidth`` or ``none``).

- After a stall of the sender's event loop (80-360 ms on the shared machine at load 4-8):
  the source owes the frames that fell due meanwhile and hands them over at once
  (``PatternTrack.recv`` catches up on its schedule, a camera's queue would too), aiortc
  encodes each (``RTCRtpSender._next_encoded_frame``, rtcrtpsender.py:294) and sends its
  packets as soon as they are built (rtcrtpsender.py:401): after 250 ms, 8-12 frames,
  6-7.5 kB within 120 ms, where a 300 kbit/s link with a 100 ms buffer holds 3.75 kB. The
  buffer tail-drops, the retransmissions come a round trip later, and frames play 500-900 ms
  behind. Here, as libwebrtc does: the encoder skips a frame that comes over
  ``LATE_FRAMES`` intervals later than the best offset between media time and the clock
  (the next one is already due), as ``VideoStreamEncoder`` takes only the newest frame
  waiting (``Ladder.late``), and hides the skipped time from libvpx, whose rate control
  would spend it on the next frame (``Ladder.pts_shift``); and a packet pacer (``Pacer``,
  in ``paced_run_rtp`` in place of ``RTCRtpSender._run_rtp``, rtcrtpsender.py:357-424)
  sends each video packet at ``PACE_FACTOR`` x the target, stamping its abs-send-time as
  it leaves, with no credit for the time the loop stood still (libwebrtc's
  ``PacingController``). The skip does most of the work; the pacer's share is small
  (docs/benchmarks.md, "The sender after its own event loop's stalls").

- Each new target: aiortc rebuilds its encoder when the target moves by over 10 %
  (vpx.py:183-190), a keyframe each time (14 in 30 s at 5 % loss + 75 ms); here the running
  encoder takes the new rate (``vp8_encode``, peers/aiortc_vp8.py, as libwebrtc's
  ``SetRates``).

Audio is not held behind video encoding: each sender runs its own task
(``RTCRtpSender._run_rtp``) and each encode is a separate executor job; FFmpeg's
``avcodec_send_frame`` and ``sws_scale`` run without the GIL (av 18.1
``codec/context.py:541``, ``video/reformatter.py``), so a slow VP8 encode holds
neither the event loop nor the Opus encode (tests/test_media.py checks it with
an encoder slowed to a third of real time).

Upstream, these would be ``Vp8Encoder`` options (a minimum bitrate, and a
``degradation_preference`` as in WebRTC's ``RTCRtpSendParameters``) and an
overuse detector in ``RTCRtpSender``.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import clock, codecs
from aiortc.codecs import vpx
from aiortc.mediastreams import VIDEO_TIME_BASE, MediaStreamError, convert_timebase
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpsender import RTCRtpSender, random_sequence_number
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket
from aiortc.utils import random32, uint16_add, uint32_add
from av import VideoFrame

from peers import aiortc_vp8

__all__ = [
    "BITS_PER_PIXEL",
    "CPU_MAX_RUNG",
    "CPU_UP_AFTER_S",
    "FLOOR_BPS",
    "HIGH_USAGE",
    "LOW_USAGE",
    "RUNGS",
    "START_BPS",
    "CpuOveruse",
    "Ladder",
    "Pacer",
    "Sent",
    "encoder_ladder",
    "fec_codecs",
    "install",
    "ladder_of",
    "last_sent",
    "negotiate_fec",
    "sent_video",
    "vp8_encode",
]

FLOOR_BPS = 30_000
START_BPS = 200_000  # 480x360 (needs 155 kbit/s), ~180 kbit/s sent: fits 300 with the audio
BITS_PER_PIXEL = 0.03  # per frame: 640x480 at 30 fps needs 276 kbit/s, 320x240 69 kbit/s
RUNGS = ((1.0, 1), (0.75, 1), (0.5, 1), (0.5, 2), (0.5, 3))  # (scale, keep 1 frame in n)
UP_MARGIN = 1.0  # the next rung needs 1.8-2.25 x the pixels: hysteresis enough
UP_AFTER_S = 3.0

# CPU overuse, after libwebrtc's OveruseFrameDetector (overuse_frame_detector.cc): the encode
# usage thresholds are its own (high_encode_usage_threshold_percent 85, low 42: one rung down
# needs 0.56 x the pixels, so a usage just above 85 % lands between the two); it checks every
# 5 s (kCheckForOveruseIntervalMs) and climbs after 10 s (kQuickRampUpDelayMs), which on a
# call of 30 s is most of it: here every second, and 5 s.
HIGH_USAGE = 0.85  # encode time / time covered
LOW_USAGE = 0.42
CPU_CHECK_S = 1.0
OVER_CHECKS = 2  # libwebrtc: high_threshold_consecutive_count
CPU_UP_AFTER_S = 5.0
CPU_UP_AFTER_MAX_S = 40.0  # libwebrtc: kMaxRampUpDelayMs is 240 s
OSCILLATION_S = 30.0  # an overuse this soon after a climb doubles the next climb's wait
CPU_MAX_RUNG = 2  # resolution only: 320x240 of 640x480 at the full frame rate

# After a stall of the sender's event loop (see the module docstring, "After a stall").
SKIP_LATE = True  # off: bench/rate.py --stalls' "today" and "pacer"
LATE_FRAMES = 1.5  # a frame this many intervals behind its best offset: the next one is due
SKIP_MAX = 8  # frames skipped in a row at most (0.27 s at 30 fps): the picture still moves
BEST_DRIFT_S = 0.0005  # per frame: the best offset may rise by this (a source's clock drifts)
PACING = True  # off: bench/rate.py --stalls' "today" and "skip"
PACE_FACTOR = 2.5  # x the encoder's target: libwebrtc's kDefaultPaceMultiplier
PACE_BURST_S = 0.01  # credit an idle pacer keeps (libwebrtc's pacer: one 5 ms process interval)
PACE_MAX_QUEUE_S = 0.5  # a frame's packets all leave within this (libwebrtc: 2 s for its queue)
PACKET_OVERHEAD = 60  # bytes a VP8 payload carries on the wire: RTP, extensions, SRTP, UDP, IPv4


# RED + ULPFEC (RFC 2198 + RFC 5109) on video, as Chromium negotiates them: ``red/90000`` with
# an rtx of its own (libwebrtc retransmits a RED-wrapped packet on RTX with apt=red) and
# ``ulpfec/90000``. aiortc's video payload types are 97-102 (VP8, H264 x 2, each with its rtx:
# codecs/__init__.py:66-104), Opus 96 (codecs/__init__.py:34); these follow them. Offered and
# answered only where ``negotiate_fec(True)`` was called (``CallOptions.fec``, the config's
# ``media.video.fec``): the receive half must take RED packets first.
RED_MIME, ULPFEC_MIME, RTX_MIME = "video/red", "video/ulpfec", "video/rtx"
RED_PT, RED_RTX_PT, ULPFEC_PT = 103, 104, 105


def fec_codecs() -> list[RTCRtpCodecParameters]:
    """video/red, its rtx and video/ulpfec, as ``negotiate_fec(True)`` adds them."""
    return [
        RTCRtpCodecParameters(mimeType=RED_MIME, clockRate=90_000, payloadType=RED_PT),
        RTCRtpCodecParameters(
            mimeType=RTX_MIME, clockRate=90_000, payloadType=RED_RTX_PT, parameters={"apt": RED_PT}
        ),
        RTCRtpCodecParameters(mimeType=ULPFEC_MIME, clockRate=90_000, payloadType=ULPFEC_PT),
    ]


def _is_fec_codec(codec: RTCRtpCodecParameters) -> bool:
    mime = codec.mimeType.lower()
    return mime in (RED_MIME, ULPFEC_MIME) or (
        mime == RTX_MIME and codec.parameters.get("apt") == RED_PT
    )


def negotiate_fec(on: bool) -> None:
    """Offer and answer video/red (with its rtx) and video/ulpfec, or no longer (process-wide).

    Upstream: entries of ``CODECS["video"]`` (aiortc codecs/__init__.py:40, filled by
    ``init_codecs``, :65-104, with VP8 and H264 only), which ``createOffer`` offers
    (rtcpeerconnection.py:648), ``setRemoteDescription`` answers when the other side offers them
    (``find_common_codecs``, rtcpeerconnection.py:920, red's rtx through its ``apt``) and
    ``getCapabilities`` lists (codecs/__init__.py:116, for ``setCodecPreferences``). They come
    after VP8 and H264: ``RTCRtpSender.send`` sends the first codec negotiated
    (rtcrtpsender.py:227), Chromium's offer lists red after its video codecs, and its answer
    keeps the offer's order.
    """
    video = codecs.CODECS["video"]
    video[:] = [codec for codec in video if not _is_fec_codec(codec)]
    if on:
        video.extend(fec_codecs())


@dataclass
class CpuOveruse:
    """The rung a video sender's encode time asks for (0: none; see the module docstring)."""

    rung: int = 0
    usage: float = 0.0  # at the last check
    window_start: float | None = None
    busy_s: float = 0.0
    over: int = 0  # checks in a row above HIGH_USAGE
    under_since: float | None = None  # below LOW_USAGE since
    up_after_s: float = CPU_UP_AFTER_S
    last_climb: float | None = None
    overuses: int = 0

    def reset(self) -> None:
        """Start measuring again (the encoder's size changed: its cost did too)."""
        self.window_start, self.busy_s, self.over, self.under_since = None, 0.0, 0, None

    def sample(self, start: float, end: float) -> int:
        """Note one encode that ran from ``start`` to ``end`` (monotonic s); the rung asked for."""
        if self.window_start is None:
            self.window_start = start
        self.busy_s += max(end - start, 0.0)
        elapsed = end - self.window_start
        if elapsed >= CPU_CHECK_S:
            self.usage = self.busy_s / elapsed
            self._check(self.window_start, end)
            self.window_start, self.busy_s = end, 0.0
        return self.rung

    def _check(self, since: float, now: float) -> None:
        if self.usage > HIGH_USAGE:
            self.under_since = None
            self.over += 1
            if self.over >= OVER_CHECKS and self.rung < CPU_MAX_RUNG:
                if self.last_climb is not None and now - self.last_climb < OSCILLATION_S:
                    self.up_after_s = min(2 * self.up_after_s, CPU_UP_AFTER_MAX_S)
                    self.last_climb = None  # once per climb
                self.rung += 1
                self.overuses += 1
                self.over = 0
        elif self.usage < LOW_USAGE:
            self.over = 0
            self.under_since = since if self.under_since is None else self.under_since
            if self.rung > 0 and now - self.under_since >= self.up_after_s:
                self.rung -= 1
                self.last_climb = now
                self.under_since = None
        else:
            self.over, self.under_since = 0, None


@dataclass
class Ladder:
    """The rung a video sender is on: the lower of its target bitrate's and its CPU's."""

    width: int = 0
    height: int = 0
    fps: float = 30.0
    rung: int = 0  # the one encoded: max(rate_rung, cpu.rung)
    rate_rung: int = 0  # the target bitrate's
    cpu: CpuOveruse = field(default_factory=CpuOveruse)
    above_since: float | None = None
    last_pts_s: float | None = None  # media time of the last frame offered
    fps_learnt: bool = False  # ``fps`` is the source's (from a first interval), not the default
    changes: int = 0
    frames: int = 0  # frames offered, for the frame-rate divisor
    history: list[tuple[float, int]] = field(default_factory=list)  # (when, rung) at each change
    # Until then (monotonic s), a target that covers a higher rung takes the ladder there at
    # once, without ``UP_AFTER_S``: set while the answer to the start probe may come
    # (peers/aiortc_rate.py, ``Prober.start``).
    climb_until: float | None = None
    # Frames skipped because the next one was already due (``late``).
    best_offset_s: float | None = None  # the least (monotonic - media time) seen
    late_in_row: int = 0
    late_skipped: int = 0
    prev_pts: int | None = None  # of the frame offered before, in its time base
    # The media time the skipped frames covered, taken out of the timeline libvpx sees: its
    # rate control gives a frame the budget of the time since the one before (after 8
    # skipped frames at 50 kbit/s, 2,455 bytes where the frames around it are 200-330; in
    # the stalled calls 2.7-4.1 kB, 4 packets in one burst), where libwebrtc gives libvpx a
    # timestamp of its own that grows by one frame's duration per frame encoded
    # (``LibvpxVp8Encoder::Encode``).
    pts_shift: int = 0

    def __post_init__(self) -> None:
        # A ladder made on a rung (``Ladder(rung=2)``) is there for its bitrate.
        self.rate_rung = max(self.rate_rung, self.rung)

    def need(self, rung: int) -> float:
        scale, divisor = RUNGS[rung]
        return self.width * self.height * scale * scale * self.fps / divisor * BITS_PER_PIXEL

    def update(self, target_bps: float, now: float) -> int:
        """The rung for ``target_bps`` now (hysteresis upwards), or the CPU's if lower."""
        rung = self.rate_rung
        while rung < len(RUNGS) - 1 and target_bps < self.need(rung):
            rung += 1
        if rung == self.rate_rung and rung > 0 and target_bps >= UP_MARGIN * self.need(rung - 1):
            self.above_since = self.above_since if self.above_since is not None else now
            quick = self.climb_until is not None and now < self.climb_until
            if quick or now - self.above_since >= UP_AFTER_S:
                rung -= 1  # and on, to the highest rung the target covers (a probe's jump)
                while rung > 0 and target_bps >= UP_MARGIN * self.need(rung - 1):
                    rung -= 1
        else:
            self.above_since = None
        if rung != self.rate_rung:
            self.rate_rung = rung
            self.above_since = None
        return self._settle(now)

    def offered(self, pts_s: float) -> None:
        """Note a frame's media time: ``fps`` follows the source's frame rate (a 15 fps camera
        needs half the bitrate of a 30 fps one at the same size)."""
        if self.last_pts_s is not None and 0 < pts_s - self.last_pts_s < 1:
            if self.fps_learnt:
                self.fps += (1 / (pts_s - self.last_pts_s) - self.fps) / 8
            else:  # the first interval: the source's rate at once, not 30 fps for a second
                self.fps, self.fps_learnt = 1 / (pts_s - self.last_pts_s), True
        self.last_pts_s = pts_s

    def late(self, pts_s: float, now: float) -> bool:
        """Whether to skip the frame of media time ``pts_s`` offered at ``now`` (monotonic s)
        because the next one is already due: it comes over ``LATE_FRAMES`` intervals later
        than the best offset between the two clocks, at most ``SKIP_MAX`` in a row."""
        offset = now - pts_s
        if self.best_offset_s is None or offset < self.best_offset_s:
            self.best_offset_s = offset
        late = offset - self.best_offset_s > LATE_FRAMES / max(self.fps, 1.0)
        self.best_offset_s += BEST_DRIFT_S
        if late and self.late_in_row < SKIP_MAX:
            self.late_in_row += 1
            self.late_skipped += 1
            return True
        self.late_in_row = 0
        return False

    def encoded(self, start: float, end: float) -> int:
        """Note how long one frame's encode took (monotonic s); the rung from now on."""
        self.cpu.sample(start, end)
        return self._settle(end)

    def _settle(self, now: float) -> int:
        rung = max(self.rate_rung, self.cpu.rung)
        if rung != self.rung:
            self.rung = rung
            self.changes += 1
            self.history.append((now, rung))
            self.cpu.reset()
        return rung

    def limitation(self) -> str:
        """What holds the sender below the top rung: ``cpu``, ``bandwidth`` or ``none``
        (the W3C ``RTCOutboundRtpStreamStats.qualityLimitationReason``)."""
        if self.rung == 0:
            return "none"
        return "cpu" if self.cpu.rung >= self.rate_rung else "bandwidth"

    def size(self) -> tuple[int, int]:
        scale = RUNGS[self.rung][0]
        return max(2, int(self.width * scale) // 2 * 2), max(2, int(self.height * scale) // 2 * 2)

    def keep(self) -> bool:
        """Whether to encode the frame just offered (the rung's frame-rate divisor)."""
        self.frames += 1
        return self.frames % RUNGS[self.rung][1] == 0


@dataclass(frozen=True)
class Sent:
    """What a video encoder sends now."""

    width: int
    height: int
    target_bps: int
    frame_divisor: int
    limitation: str = "none"  # the W3C qualityLimitationReason: cpu, bandwidth or none


# The last frame this process encoded (a peer's command line has one call at a time; the
# stats read it when the call is already closed and its encoder gone).
last_sent: list[Sent] = []
_installed: list[bool] = []

# ``Vp8Encoder.encode`` (vpx.py:180) on libvpx itself (peers/aiortc_vp8.py: a new target is a
# new rate of the running encoder, not a new encoder and a keyframe): the ladder's wrapper
# calls and times it. A test may put a slower one in its place, to starve the encoder alone.
vp8_encode: Callable[..., tuple[list[bytes], int]] = aiortc_vp8.encode


def install() -> None:
    """Lower the VP8 floor and start, and wrap ``Vp8Encoder.encode`` with the ladder (once per
    process)."""
    if _installed:
        return
    _installed.append(True)
    vpx.MIN_BITRATE = FLOOR_BPS  # read by the target_bitrate setter (vpx.py:254)
    vpx.DEFAULT_BITRATE = START_BPS  # read by Vp8Encoder.__init__ (vpx.py:178)

    def encode(
        self: vpx.Vp8Encoder, frame: Any, force_keyframe: bool = False
    ) -> tuple[list[bytes], int]:
        ladder: Ladder | None = self.__dict__.get("_epc_ladder")
        if ladder is None:
            ladder = self.__dict__["_epc_ladder"] = Ladder()
        start = time.monotonic()  # in the executor's thread, as aiortc calls it
        if isinstance(frame, VideoFrame):
            if (frame.width, frame.height) != (ladder.width, ladder.height):
                ladder.width, ladder.height = frame.width, frame.height
            if frame.pts is not None and frame.time_base is not None:
                pts_s = float(frame.pts * frame.time_base)
                ladder.offered(pts_s)
                step = frame.pts - ladder.prev_pts if ladder.prev_pts is not None else 0
                ladder.prev_pts = frame.pts
                if SKIP_LATE and not force_keyframe and ladder.late(pts_s, start):
                    ladder.pts_shift += max(step, 0)
                    return [], 0  # the sender sends nothing for an empty list (as below)
            ladder.update(self.target_bitrate, time.monotonic())
            if not ladder.keep() and not force_keyframe:
                return [], 0  # the sender sends nothing for an empty list (rtcrtpsender.py:326)
            width, height = ladder.size()
            if (width, height) != (frame.width, frame.height):
                scaled = frame.reformat(width=width, height=height, format="yuv420p")
                scaled.pts, scaled.time_base = frame.pts, frame.time_base
                frame = scaled
        real_pts, real_base = frame.pts, frame.time_base  # PyAV's encode rebases both
        shifted = isinstance(frame, VideoFrame) and real_pts is not None and ladder.pts_shift
        if shifted:
            frame.pts = real_pts - ladder.pts_shift  # what libvpx sees (``Ladder.pts_shift``)
        payloads, timestamp = vp8_encode(self, frame, force_keyframe)
        if shifted:  # the RTP timestamp stays the media time (vpx.py:235)
            frame.pts, frame.time_base = real_pts, real_base
            timestamp = convert_timebase(real_pts, real_base, VIDEO_TIME_BASE)
        if isinstance(frame, VideoFrame):
            ladder.encoded(start, time.monotonic())
            last_sent[:] = [sent_by(self, ladder)]
        return payloads, timestamp

    vpx.Vp8Encoder.encode = encode  # type: ignore[method-assign]
    original_run_rtp = RTCRtpSender._run_rtp

    async def _run_rtp(self: RTCRtpSender, codec: Any) -> None:
        if PACING and self.kind == "video":
            await paced_run_rtp(self, codec)
        else:
            await original_run_rtp(self, codec)

    RTCRtpSender._run_rtp = _run_rtp  # type: ignore[method-assign]


@dataclass
class Pacer:
    """When each packet of a video sender may leave: ``PACE_FACTOR`` x the encoder's target.

    libwebrtc's ``PacingController`` in one sender's task: a packet leaves when the budget
    allows, an idle pacer keeps at most ``PACE_BURST_S`` of credit (a stall of the event loop
    earns none: what was encoded meanwhile leaves at the pacing rate, not in one burst), and a
    frame's packets all leave within ``PACE_MAX_QUEUE_S`` (libwebrtc raises its rate to empty
    its queue within ``kMaxExpectedQueueLength``). The queue is the frame being sent: while it
    waits the sender reads no new frame, and the encoder skips what has become late
    (``Ladder.late``), as libwebrtc's encoder drops frames while its pacer is behind.
    """

    next_at: float | None = None  # monotonic s: when the next packet may leave
    waited_s: float = 0.0  # in all
    packets: int = 0

    def wait(self, size: int, target_bps: float, frame_bytes: int, now: float) -> float:
        """Seconds to wait before a packet of ``size`` bytes leaves, of a frame of
        ``frame_bytes`` on the wire; the budget is taken at once."""
        rate = max(PACE_FACTOR * target_bps, frame_bytes * 8 / PACE_MAX_QUEUE_S, 1.0)
        at = now - PACE_BURST_S if self.next_at is None else max(self.next_at, now - PACE_BURST_S)
        self.next_at = at + size * 8 / rate
        self.packets += 1
        delay = max(0.0, at - now)
        self.waited_s += delay
        return delay


def pacer_of(sender: Any) -> Pacer:
    """The video sender's ``Pacer`` (made on first use)."""
    pacer: Pacer = sender.__dict__.setdefault("_epc_pacer", Pacer())
    return pacer


async def paced_run_rtp(self: RTCRtpSender, codec: Any) -> None:
    """aiortc 1.16's ``RTCRtpSender._run_rtp`` (rtcrtpsender.py:357-424) with each video packet
    waiting for its ``Pacer`` and stamped with its abs-send-time when it leaves.

    aiortc sends a frame's packets as soon as it is encoded (rtcrtpsender.py:401), each
    stamped as it is built (:388): after a stall of the event loop, every frame the source
    caught up on leaves in one burst, more than a 100 ms drop-tail buffer of a 300 kbit/s link
    holds (docs/benchmarks.md, "The sender after its own event loop's stalls"). The rest is
    aiortc's, line for line; audio senders keep aiortc's own (libwebrtc paces audio too, first).
    """
    sender: Any = self  # the name-mangled attributes of aiortc's sender
    log_debug = sender._RTCRtpSender__log_debug
    log_debug("- RTP started")
    sender._RTCRtpSender__rtp_started.set()
    pacer = pacer_of(self)

    sequence_number = random_sequence_number()
    timestamp_origin = random32()
    try:
        while True:
            if not sender._RTCRtpSender__track:
                await asyncio.sleep(0.02)
                continue
            enc_frame = await self._next_encoded_frame(codec)
            if enc_frame is None:
                continue
            timestamp = uint32_add(timestamp_origin, enc_frame.timestamp)
            frame_bytes = sum(len(payload) + PACKET_OVERHEAD for payload in enc_frame.payloads)
            for i, payload in enumerate(enc_frame.payloads):
                packet = RtpPacket(
                    payload_type=codec.payloadType,
                    sequence_number=sequence_number,
                    timestamp=timestamp,
                )
                packet.ssrc = self._ssrc
                packet.payload = payload
                packet.marker = ((i == len(enc_frame.payloads) - 1) and 1) or 0
                packet.extensions.mid = sender._RTCRtpSender__mid
                if enc_frame.audio_level is not None:
                    packet.extensions.audio_level = (False, -enc_frame.audio_level)
                # In the history before it waits: a NACK for it may come meanwhile.
                sender._RTCRtpSender__rtp_history[packet.sequence_number % RTP_HISTORY_SIZE] = (
                    packet
                )
                encoder = sender._RTCRtpSender__encoder
                target = float(getattr(encoder, "target_bitrate", 0) or 0)
                delay = pacer.wait(
                    len(payload) + PACKET_OVERHEAD, target, frame_bytes, time.monotonic()
                )
                if delay > 0:
                    await asyncio.sleep(delay)
                packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
                log_debug("> %s", packet)
                packet_bytes = packet.serialize(sender._RTCRtpSender__rtp_header_extensions_map)
                await self.transport._send_rtp(packet_bytes)

                sender._RTCRtpSender__ntp_timestamp = clock.current_ntp_time()
                sender._RTCRtpSender__rtp_timestamp = packet.timestamp
                sender._RTCRtpSender__octet_count += len(payload)
                sender._RTCRtpSender__packet_count += 1
                sequence_number = uint16_add(sequence_number, 1)
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:
        sender._RTCRtpSender__log_warning(traceback.format_exc())

    if sender._RTCRtpSender__track:
        sender._RTCRtpSender__track.stop()
        sender._RTCRtpSender__track = None
    sender._RTCRtpSender__encoder = None
    log_debug("- RTP finished")
    sender._RTCRtpSender__rtp_exited.set()


def ladder_of(pc: Any) -> Ladder | None:
    """The ladder of an RTCPeerConnection's video encoder (None before it encodes)."""
    for sender in pc.getSenders():
        encoder = getattr(sender, "_RTCRtpSender__encoder", None)
        if sender.kind == "video" and encoder is not None:
            return encoder_ladder(encoder)
    return None


def encoder_ladder(encoder: Any) -> Ladder | None:
    """The ladder of a ``Vp8Encoder`` (None before it encodes)."""
    ladder: Ladder | None = getattr(encoder, "_epc_ladder", None)
    return ladder


def sent_video(pc: Any) -> Sent | None:
    """The video encoder's size and target of an RTCPeerConnection.

    None before it encodes; once the connection is closed, the last frame this
    process encoded (``last_sent``), if any.

    Upstream: the W3C ``outbound-rtp`` stats ``frameWidth``, ``frameHeight`` and
    ``targetBitrate``; aiortc keeps its encoder in ``RTCRtpSender.__encoder``
    (rtcrtpsender.py:105) and reports none of them.
    """
    for sender in pc.getSenders():
        if sender.kind != "video":
            continue
        encoder = getattr(sender, "_RTCRtpSender__encoder", None)
        ladder = getattr(encoder, "_epc_ladder", None)
        if encoder is None or ladder is None or not ladder.width:
            continue
        return sent_by(encoder, ladder)
    return last_sent[-1] if last_sent and pc.connectionState == "closed" else None


def sent_by(encoder: Any, ladder: Ladder) -> Sent:
    """What ``encoder`` sends now, on ``ladder``'s rung."""
    width, height = ladder.size()
    return Sent(
        width, height, int(encoder.target_bitrate), RUNGS[ladder.rung][1], ladder.limitation()
    )
