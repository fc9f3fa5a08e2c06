"""aiortc's VP8 sender made to fit a narrow link (imported by peers/aiortc_patches.py).

A sibling of ``aiortc_patches`` (like ``aiortc_receive``): it wraps the
encoder as a whole. Against aiortc 1.16.0:

- The floor: ``MIN_BITRATE = 250000`` (codecs/vpx.py:17), which the encoder's
  ``target_bitrate`` setter (vpx.py:254) clamps every estimate to, so that on a
  300 kbit/s link video alone overruns what audio leaves. Here ``FLOOR_BPS``.
- Resolution, then frame rate, from the target bitrate: aiortc encodes every
  frame at the source's size whatever the estimate (``Vp8Encoder.encode``,
  vpx.py:180). Here ``Ladder`` picks a rung (scale, frame-rate divisor) whose
  need, ``width x height x fps x BITS_PER_PIXEL``, fits the target: down at once,
  up only after the target has held ``UP_MARGIN`` above the next rung's need
  for ``UP_AFTER_S`` (each change costs a keyframe), then to the highest rung the
  target covers (after a probe, 320x240 to 640x480 in one step).

Upstream, both would be ``Vp8Encoder`` options (a minimum bitrate, and a
``degradation_preference`` as in WebRTC's ``RTCRtpSendParameters``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiortc.codecs import vpx
from av import VideoFrame

__all__ = [
    "BITS_PER_PIXEL",
    "FLOOR_BPS",
    "RUNGS",
    "Ladder",
    "Sent",
    "install",
    "ladder_of",
    "last_sent",
    "sent_video",
]

FLOOR_BPS = 30_000
BITS_PER_PIXEL = 0.03  # per frame: 640x480 at 30 fps needs 276 kbit/s, 320x240 69 kbit/s
RUNGS = ((1.0, 1), (0.75, 1), (0.5, 1), (0.5, 2), (0.5, 3))  # (scale, keep 1 frame in n)
UP_MARGIN = 1.0  # the next rung needs 1.8-2.25 x the pixels: hysteresis enough
UP_AFTER_S = 3.0


@dataclass
class Ladder:
    """The rung a video sender is on, from its target bitrate."""

    width: int = 0
    height: int = 0
    fps: float = 30.0
    rung: int = 0
    above_since: float | None = None
    changes: int = 0
    frames: int = 0  # frames offered, for the frame-rate divisor
    history: list[tuple[float, int]] = field(default_factory=list)  # (when, rung) at each change

    def need(self, rung: int) -> float:
        scale, divisor = RUNGS[rung]
        return self.width * self.height * scale * scale * self.fps / divisor * BITS_PER_PIXEL

    def update(self, target_bps: float, now: float) -> int:
        """The rung for ``target_bps`` now (hysteresis upwards)."""
        rung = self.rung
        while rung < len(RUNGS) - 1 and target_bps < self.need(rung):
            rung += 1
        if rung == self.rung and rung > 0 and target_bps >= UP_MARGIN * self.need(rung - 1):
            self.above_since = self.above_since if self.above_since is not None else now
            if now - self.above_since >= UP_AFTER_S:
                rung -= 1  # and on, to the highest rung the target covers (a probe's jump)
                while rung > 0 and target_bps >= UP_MARGIN * self.need(rung - 1):
                    rung -= 1
        else:
            self.above_since = None
        if rung != self.rung:
            self.rung = rung
            self.above_since = None
            self.changes += 1
            self.history.append((now, rung))
        return rung

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


# The last frame this process encoded (a peer's command line has one call at a time; the
# stats read it when the call is already closed and its encoder gone).
last_sent: list[Sent] = []
_installed: list[bool] = []


def install() -> None:
    """Lower the VP8 floor and wrap ``Vp8Encoder.encode`` with the ladder (once per process)."""
    if _installed:
        return
    _installed.append(True)
    vpx.MIN_BITRATE = FLOOR_BPS  # read by the target_bitrate setter (vpx.py:254)
    original = vpx.Vp8Encoder.encode

    def encode(
        self: vpx.Vp8Encoder, frame: Any, force_keyframe: bool = False
    ) -> tuple[list[bytes], int]:
        ladder: Ladder | None = self.__dict__.get("_epc_ladder")
        if ladder is None:
            ladder = self.__dict__["_epc_ladder"] = Ladder()
        if isinstance(frame, VideoFrame):
            if (frame.width, frame.height) != (ladder.width, ladder.height):
                ladder.width, ladder.height = frame.width, frame.height
            ladder.update(self.target_bitrate, time.monotonic())
            if not ladder.keep() and not force_keyframe:
                return [], 0  # the sender sends nothing for an empty list (rtcrtpsender.py:326)
            width, height = ladder.size()
            if (width, height) != (frame.width, frame.height):
                scaled = frame.reformat(width=width, height=height, format="yuv420p")
                scaled.pts, scaled.time_base = frame.pts, frame.time_base
                frame = scaled
            last_sent[:] = [Sent(width, height, self.target_bitrate, RUNGS[ladder.rung][1])]
        payloads, timestamp = original(self, frame, force_keyframe)
        return payloads, timestamp

    vpx.Vp8Encoder.encode = encode  # type: ignore[method-assign]


def ladder_of(pc: Any) -> Ladder | None:
    """The ladder of an RTCPeerConnection's video encoder (None before it encodes)."""
    for sender in pc.getSenders():
        encoder = getattr(sender, "_RTCRtpSender__encoder", None)
        if sender.kind == "video" and encoder is not None:
            ladder: Ladder | None = getattr(encoder, "_epc_ladder", None)
            return ladder
    return None


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
        width, height = ladder.size()
        return Sent(width, height, int(encoder.target_bitrate), RUNGS[ladder.rung][1])
    return last_sent[-1] if last_sent and pc.connectionState == "closed" else None
