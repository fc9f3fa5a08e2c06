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
- RED + ULPFEC (RFC 2198 + RFC 5109), when negotiated (``negotiate_fec``, the config's
  ``media.video.fec``) and the codec is VP8: aiortc offers neither and sends the first codec
  only (rtcrtpsender.py:227), so at 5 % loss and 75 ms each way every lost packet costs a
  round trip of NACK, and a lost retransmission a freeze (aiortc->Chromium 1.4-2.6 s frozen
  per 30 s where Chromium<->Chromium, with its FEC, froze 0.1-0.5 s). Here, as libwebrtc's
  ``RtpSenderVideo`` with its ``UlpfecGenerator``: every media packet leaves RED-wrapped
  (``ulpfec.to_red``; the history keeps the RED form, retransmitted on red's RTX), and after
  a frame's last packet, FEC packets (``ulpfec.protect`` over the group's packets as they were
  sent, non-RED, abs-send-time zeroed as libwebrtc does) go out as RED packets of block type
  ulpfec on the media's SSRC and sequence numbers, never retransmitted. How many and over
  which packets: ``Protection``, from the loss the receiver reports (``peers/aiortc_rate.py``,
  ``ReportedLoss``) and the round trip; none on a clean link; its share comes out of the
  encoder's target.

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
import math
import os
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

from peers import aiortc_vp8, ulpfec
from peers.aiortc_receive import is_keyframe_start, with_payload

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
    "Protection",
    "RedTypes",
    "Sent",
    "encoder_ladder",
    "fec_codecs",
    "fec_sent",
    "install",
    "ladder_of",
    "last_sent",
    "negotiate_fec",
    "protection_of",
    "red_of",
    "red_packet",
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
# For measurement only (bench/network.py --no-retransmit sets the variable for the peers it
# starts): the video sender answers no NACK (rtcrtpsender.py:274-276), so what the receiver
# still decodes of a lossy link is what the FEC rebuilt.
RETRANSMIT = os.environ.get("EPEDICARE_NO_RETRANSMIT") != "1"
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


# How much FEC (``Protection``): after libwebrtc's ``VCMNackFecMethod`` (media_opt_util.cc) and
# ``UlpfecGenerator`` (ulpfec_generator.cc); see ``Protection``.
FEC_MIN_LOSS = 0.01  # filtered loss below this: no FEC (a clean link; libwebrtc: 0)
FEC_MIN_RTT_S = 0.02  # round trip below this: NACK alone (libwebrtc's kLowRttNackMs, 20 ms)
FEC_RESIDUAL = 0.2  # a lost packet's chance of sharing its FEC packet with another loss
FEC_MAX_SPAN = 10  # media packets per FEC packet at most (libwebrtc: 20 % protection at least)
FEC_MIN_SPAN = 2  # at most one FEC packet per two media packets (libwebrtc: 50 % at most)
FEC_MAX_FRAMES = 6  # frames in one group at most (libwebrtc's kUpperLimitFramesFec)
FEC_MAX_MEDIA = 48  # media packets one ULPFEC packet covers at most (its 48-bit mask)
LOSS_FILTER = 0.25  # weight of a new receiver report in the filtered loss
SHARE_DECAY = 0.9  # per group: the weight of the past in the measured FEC share


@dataclass
class Protection:
    """Which media packets one video sender's next FEC packets protect, and how many.

    From the receiver's reports: the loss (each report's fraction lost, filtered) and the
    round trip. No FEC below ``FEC_MIN_LOSS`` (a clean link) nor below ``FEC_MIN_RTT_S`` (a
    retransmission comes in time: libwebrtc's hybrid NACK/FEC does the same). Otherwise each
    FEC packet covers ``span()`` media packets (interleaved: ``ulpfec.protect``), as many as
    leave a lost packet at most ``FEC_RESIDUAL`` chance that another one of them, or the FEC
    packet, is lost too: ``(1 - loss) ** span >= 1 - FEC_RESIDUAL``, 4 at 5 % loss (25 %
    overhead; libwebrtc's table gives 20-50 % there), 11 at 2 % (held to ``FEC_MAX_SPAN``),
    2 at 10 %; a group of n packets gets n / span FEC packets, rounded, at least one. What
    is left (a fifth of the losses) NACK recovers as before. A keyframe gets twice the FEC
    (half the span): a lost one freezes until the next.

    Groups (``UlpfecGenerator``): the FEC goes out after the last packet of a frame (never
    inside one: the receiver assembles a frame from consecutive sequence numbers). A frame of
    ``span()`` packets or more is a group of its own; small frames (1-2 packets at low rates)
    are grouped until the group has ``span()`` packets, ``FEC_MAX_FRAMES`` frames, or spans half
    a round trip (later, a NACK's retransmission would come first), so that the overhead stays
    near ``1 / span`` and not one FEC packet per frame. A keyframe starts a group of its own.
    ``FEC_MAX_MEDIA`` packets at most per FEC packet's mask: a group that a frame would take
    past it is protected first, a frame that has more is protected in pieces.

    The FEC's bitrate comes out of the encoder's target (``media_share``), as libwebrtc takes
    its protection overhead out of the video's (``ProtectionBitrateCalculator``).
    """

    red: bool = False  # the sender sends RED + ULPFEC (negotiated)
    loss: float | None = None  # filtered fraction lost
    call_loss: float | None = None  # over the whole call so far (``ReportedLoss.whole``)
    rtt_s: float = 0.2
    group: list[bytes] = field(default_factory=list)  # raw media packets, as sent, non-RED
    frames: int = 0  # in the group
    keyframe: bool = False  # the group is a keyframe
    started: float | None = None  # when the group's first packet left (monotonic s)
    on: bool = False  # the frame being sent is protected
    media_acc: float = 0.0  # bytes, decayed per group (the measured share)
    fec_acc: float = 0.0
    media_packets: int = 0  # protected, in all
    fec_packets: int = 0  # made, in all
    groups: int = 0

    def on_report(
        self, fraction_lost: float, rtt_s: float | None, call_loss: float | None = None
    ) -> None:
        """A receiver report of this sender's stream: its fraction lost, the round trip now, and
        the fraction lost over the call so far (reported, not used: the filtered loss is)."""
        self.call_loss = call_loss if call_loss is not None else self.call_loss
        if self.loss is None:
            self.loss = fraction_lost
        else:
            self.loss += LOSS_FILTER * (fraction_lost - self.loss)
        if rtt_s is not None:
            self.rtt_s = rtt_s

    def span(self, keyframe: bool = False) -> int:
        """Media packets per FEC packet now; 0: no FEC."""
        loss = self.loss
        if loss is None or loss < FEC_MIN_LOSS or self.rtt_s < FEC_MIN_RTT_S:
            return 0
        span = int(math.log(1 - FEC_RESIDUAL) / math.log(1 - min(loss, 0.5)))
        span = min(max(span, FEC_MIN_SPAN), FEC_MAX_SPAN)
        return max(FEC_MIN_SPAN, span // 2) if keyframe else span

    def media_share(self) -> float:
        """The share of the sender's target left to the encoder (1.0 without FEC: also for a
        sender whose call did not negotiate RED + ULPFEC, whose reports are read all the same)."""
        span = self.span()
        if not span or not self.red:
            return 1.0
        if self.media_acc <= 0:
            return span / (span + 1)
        return max(
            self.media_acc / (self.media_acc + self.fec_acc), FEC_MIN_SPAN / (FEC_MIN_SPAN + 1)
        )

    def before_frame(self, packets: int, keyframe: bool) -> list[tuple[list[bytes], int]]:
        """A frame of ``packets`` packets is about to be sent: the groups to protect first
        (the group so far, when this frame starts a new one), each piece with its FEC count."""
        due: list[tuple[list[bytes], int]] = []
        span = self.span(keyframe)
        if self.group and (not span or keyframe or len(self.group) + packets > FEC_MAX_MEDIA):
            due = self._close()
        self.on = span > 0
        if self.on and not self.group:
            self.keyframe = keyframe
        return due

    def add(self, raw: bytes, now: float) -> None:
        """One media packet of the frame, as sent (non-RED form)."""
        if self.on:
            if not self.group:
                self.started = now
            self.group.append(raw)

    def end_of_frame(self, now: float) -> list[tuple[list[bytes], int]]:
        """The frame's last packet has left: the pieces to protect now, with their FEC counts."""
        if not self.on or not self.group:
            return []
        self.frames += 1
        span = self.span(self.keyframe)
        started = self.started if self.started is not None else now
        if (
            self.keyframe
            or len(self.group) >= span
            or self.frames >= FEC_MAX_FRAMES
            or now - started >= self.rtt_s / 2
        ):
            return self._close()
        return []

    def _close(self) -> list[tuple[list[bytes], int]]:
        """The group, in pieces of ``FEC_MAX_MEDIA`` packets, each with its FEC packet count."""
        group, self.group, self.frames, self.started = self.group, [], 0, None
        span = self.span(self.keyframe) or FEC_MAX_SPAN  # FEC turned off: the group still goes
        pieces = [group[i : i + FEC_MAX_MEDIA] for i in range(0, len(group), FEC_MAX_MEDIA)]
        # libwebrtc's rounding (``ForwardErrorCorrection::NumFecPackets``), at least one.
        return [(piece, max(1, int(len(piece) / span + 0.5))) for piece in pieces]

    def sent(self, media: list[bytes], fec: list[bytes]) -> None:
        """Note a group protected: its media packets and the FEC packets made for it."""
        self.media_acc = SHARE_DECAY * self.media_acc + sum(map(len, media))
        self.fec_acc = SHARE_DECAY * self.fec_acc + sum(map(len, fec))
        self.media_packets += len(media)
        self.fec_packets += len(fec)
        self.groups += 1


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
    original_send = RTCRtpSender.send

    async def send(self: RTCRtpSender, parameters: Any) -> None:
        # RTCRtpSender.send hands _run_rtp the first codec only (rtcrtpsender.py:227): red and
        # ulpfec's payload types are kept for ``red_of``.
        self.__dict__.setdefault("_epc_codecs", list(parameters.codecs))
        self.__dict__.setdefault("_epc_extensions", list(parameters.headerExtensions))
        await original_send(self, parameters)

    RTCRtpSender.send = send  # type: ignore[method-assign]
    original_retransmit = RTCRtpSender._retransmit

    async def _retransmit(self: RTCRtpSender, sequence_number: int) -> None:
        if RETRANSMIT or self.kind != "video":
            await original_retransmit(self, sequence_number)

    RTCRtpSender._retransmit = _retransmit  # type: ignore[method-assign]


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


@dataclass(frozen=True)
class RedTypes:
    """The payload types of RED and ULPFEC a video sender uses."""

    red: int
    ulpfec: int
    rtx: int | None  # red's rtx
    mutable_ids: frozenset[int]  # header extensions stamped as a packet leaves (abs-send-time)


def red_of(sender: RTCRtpSender, codec: Any) -> RedTypes | None:
    """RED + ULPFEC's payload types when the call negotiated both and sends VP8, else None.

    With RED, a retransmission is of the RED form (libwebrtc stores RED packets in its
    history and maps the RTX payload type by the original's, red): the sender's RTX payload
    type becomes red's rtx (aiortc takes the rtx of the first codec, rtcrtpsender.py:219-225,
    and wraps what its history holds, :339), or none (the RED packet again, on the media SSRC).
    H.264 keeps NACK alone: without picture IDs a receiver cannot tell a lost FEC packet from
    a lost media packet (libwebrtc turns ULPFEC off for it: ``ShouldDisableRedAndUlpfec``).
    """
    codecs_: list[Any] = sender.__dict__.get("_epc_codecs", [])
    if codec.mimeType.lower() != "video/vp8":
        return None
    red = next((c.payloadType for c in codecs_ if c.mimeType.lower() == RED_MIME), None)
    fec = next((c.payloadType for c in codecs_ if c.mimeType.lower() == ULPFEC_MIME), None)
    if red is None or fec is None:
        return None
    rtx = next(
        (
            c.payloadType
            for c in codecs_
            if c.mimeType.lower() == RTX_MIME and c.parameters.get("apt") == red
        ),
        None,
    )
    sender._RTCRtpSender__rtx_payload_type = rtx  # type: ignore[attr-defined]
    extensions: list[Any] = sender.__dict__.get("_epc_extensions", [])
    mutable = frozenset(e.id for e in extensions if e.uri in ulpfec.MUTABLE_EXTENSIONS)
    return RedTypes(red, fec, rtx, mutable)


def red_packet(packet: RtpPacket, red_pt: int) -> RtpPacket:
    """``packet`` in RED form (RFC 2198, one block): PT red, its own PT in the RED header, the
    same header extensions (the object itself: stamped as the packet leaves)."""
    return with_payload(packet, red_pt, bytes([packet.payload_type & 0x7F]) + packet.payload)


def protection_of(sender: Any) -> Protection:
    """The video sender's ``Protection`` (made on first use)."""
    protection: Protection = sender.__dict__.setdefault("_epc_protection", Protection())
    return protection


# The protection of the last video sender that sent RED (one call at a time, as ``last_sent``).
last_protection: list[Protection] = []


def fec_sent(pc: Any) -> dict[str, Any] | None:
    """What an RTCPeerConnection's video sender sent as FEC (None without RED + ULPFEC): the FEC
    packets, the media packets they protect, the loss and round trip they were chosen from;
    once the connection is closed, the last sender's of this process."""
    protection: Protection | None = next(
        (
            found
            for sender in pc.getSenders()
            if sender.kind == "video"
            and (found := sender.__dict__.get("_epc_protection")) is not None
            and found.red
        ),
        None,
    )
    if protection is None and last_protection and pc.connectionState == "closed":
        protection = last_protection[-1]
    if protection is None:
        return None
    return {
        "fec_packets": protection.fec_packets,
        "protected": protection.media_packets,
        "groups": protection.groups,
        "loss_pct": round(100 * (protection.loss or 0.0), 1),  # filtered, the last
        "call_loss_pct": round(100 * (protection.call_loss or 0.0), 1),
        "rtt_ms": round(1000 * protection.rtt_s),
        "span": protection.span(),
    }


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
    holds (docs/benchmarks.md, "The sender after its own event loop's stalls"). With RED +
    ULPFEC negotiated (``red_of``), each packet leaves RED-wrapped and each group of frames is
    followed by its FEC packets (``Protection``, the module docstring). The rest is aiortc's,
    line for line; audio senders keep aiortc's own (libwebrtc paces audio too, first).
    """
    sender: Any = self  # the name-mangled attributes of aiortc's sender
    log_debug = sender._RTCRtpSender__log_debug
    log_debug("- RTP started")
    sender._RTCRtpSender__rtp_started.set()
    pacer = pacer_of(self)

    sequence_number = random_sequence_number()
    timestamp_origin = random32()
    protection_timestamp = [0]  # of the last frame sent: a group's FEC carries it
    red = red_of(self, codec)  # RED + ULPFEC negotiated: every packet RED-wrapped
    protection = protection_of(self)
    if red is not None:
        protection.red = True
        last_protection[:] = [protection]
    extensions_map = sender._RTCRtpSender__rtp_header_extensions_map

    async def send(packet: RtpPacket, size: int, frame_bytes: int) -> bytes:
        """Pace, stamp, serialize and send one packet (RED-wrapped when ``red``): the bytes
        sent in their non-RED form (what the FEC protects, ``Protection``)."""
        encoder = sender._RTCRtpSender__encoder
        target = float(getattr(encoder, "target_bitrate", 0) or 0)
        delay = pacer.wait(size + PACKET_OVERHEAD, target, frame_bytes, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)
        packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
        log_debug("> %s", packet)
        raw = packet.serialize(extensions_map)
        await self.transport._send_rtp(raw if red is None else ulpfec.to_red(raw, red.red))
        sender._RTCRtpSender__ntp_timestamp = clock.current_ntp_time()
        sender._RTCRtpSender__rtp_timestamp = packet.timestamp
        sender._RTCRtpSender__octet_count += size
        sender._RTCRtpSender__packet_count += 1
        return raw

    def new_packet(payload_type: int, payload: bytes, timestamp: int) -> RtpPacket:
        """The next packet of this sender's SSRC and sequence (rtcrtpsender.py:378-384)."""
        packet = RtpPacket(
            payload_type=payload_type, sequence_number=sequence_number, timestamp=timestamp
        )
        packet.ssrc = self._ssrc
        packet.payload = payload
        packet.extensions.mid = sender._RTCRtpSender__mid
        return packet

    async def send_fec(
        pieces: list[tuple[list[bytes], int]], timestamp: int, frame_bytes: int
    ) -> None:
        """The FEC packets of each piece: RED packets (block PT ulpfec) on the media's SSRC and
        sequence numbers, the timestamp of the frame just sent, marker 0, never kept for
        retransmission (libwebrtc's ``RtpSenderVideo`` / ``UlpfecGenerator``)."""
        nonlocal sequence_number
        assert red is not None
        for media, count in pieces:
            payloads = ulpfec.protect(media, count, red.mutable_ids)
            protection.sent(media, payloads)
            for payload in payloads:
                await send(new_packet(red.ulpfec, payload, timestamp), len(payload), frame_bytes)
                sequence_number = uint16_add(sequence_number, 1)

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
            if red is not None:
                keyframe = is_keyframe_start(codec.mimeType, enc_frame.payloads[0])
                due = protection.before_frame(len(enc_frame.payloads), keyframe)
                await send_fec(due, protection_timestamp[0], frame_bytes)
            for i, payload in enumerate(enc_frame.payloads):
                packet = new_packet(codec.payloadType, payload, timestamp)
                packet.marker = ((i == len(enc_frame.payloads) - 1) and 1) or 0
                if enc_frame.audio_level is not None:
                    packet.extensions.audio_level = (False, -enc_frame.audio_level)
                # In the history before it waits: a NACK for it may come meanwhile. With RED,
                # the RED form (rtcrtpsender.py:339 wraps it in RTX apt=red: ``red_of``), its
                # header extensions the packet's own (stamped as it leaves).
                kept = packet if red is None else red_packet(packet, red.red)
                sender._RTCRtpSender__rtp_history[packet.sequence_number % RTP_HISTORY_SIZE] = kept
                raw = await send(packet, len(payload), frame_bytes)
                if red is not None:
                    protection.add(raw, time.monotonic())
                sequence_number = uint16_add(sequence_number, 1)
            if red is not None:
                protection_timestamp[0] = timestamp
                due = protection.end_of_frame(time.monotonic())
                await send_fec(due, timestamp, frame_bytes)
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:
        sender._RTCRtpSender__log_warning(traceback.format_exc())

    if sender._RTCRtpSender__track:
        sender._RTCRtpSender__track.stop()
        sender._RTCRtpSender__track = None
    if (sent := encoder_sent(sender._RTCRtpSender__encoder)) is not None:
        self.__dict__["_epc_sent"] = sent  # for ``sent_video`` from now on
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


def encoder_sent(encoder: Any) -> Sent | None:
    """What a ``Vp8Encoder`` (or None) encodes now; None before its first frame."""
    ladder = encoder_ladder(encoder)
    return (
        None if encoder is None or ladder is None or not ladder.width else sent_by(encoder, ladder)
    )


def sent_video(pc: Any) -> Sent | None:
    """The video encoder's size and target of an RTCPeerConnection.

    None before it encodes; once the sender's RTP loop has ended (aiortc then
    drops its encoder, rtcrtpsender.py:421), the last frame it encoded; once the
    connection is closed, the last frame this process encoded (``last_sent``),
    if any. (A summary written between the loop's end and the connection's
    close read None: a CI failure of tests/test_cluster.py.)

    Upstream: the W3C ``outbound-rtp`` stats ``frameWidth``, ``frameHeight`` and
    ``targetBitrate``; aiortc keeps its encoder in ``RTCRtpSender.__encoder``
    (rtcrtpsender.py:105) and reports none of them.
    """
    for sender in pc.getSenders():
        if sender.kind != "video":
            continue
        sent = encoder_sent(getattr(sender, "_RTCRtpSender__encoder", None))
        sent = sent if sent is not None else sender.__dict__.get("_epc_sent")
        if sent is not None:
            return sent
    return last_sent[-1] if last_sent and pc.connectionState == "closed" else None


def sent_by(encoder: Any, ladder: Ladder) -> Sent:
    """What ``encoder`` sends now, on ``ladder``'s rung."""
    width, height = ladder.size()
    return Sent(
        width, height, int(encoder.target_bitrate), RUNGS[ladder.rung][1], ladder.limitation()
    )
