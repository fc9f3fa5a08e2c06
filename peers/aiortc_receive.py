"""aiortc's video receive path made to hold on lossy links (imported by peers/aiortc_patches.py).

A sibling of ``aiortc_patches`` because it is a replacement of whole parts
(two classes and a timer), not accessors and hooks; only ``aiortc_patches``
installs it, and ``check_versions()`` still guards it. Against aiortc 1.16.0:

- ``NackList`` replaces ``NackGenerator`` (rtcrtpreceiver.py:97-138), which
  NACKs a lost packet once, when the hole is first seen, and never again: here
  each missing packet is NACKed again ``NACK_REPEAT_S`` later whatever the
  round trip, then every round trip, until it arrives, is older than the
  sender's history (``RTP_HISTORY_SIZE``, rtp.py:13), or was asked for
  ``NACK_RETRIES`` times. The round trip is the median time from a packet's
  first NACK to its arrival.
- ``FrameBuffer`` replaces the video ``JitterBuffer(capacity=512,
  is_video=True)`` (rtcrtpreceiver.py:299; jitterbuffer.py), which holds every
  frame behind a hole until 512 packets pile up (seconds), then releases one
  frame per arriving packet. Here a frame is released as soon as it is
  complete (its marker bit) and in order; a hole is waited for at most
  ``hole_wait_s()`` (three NACK tries, 150-600 ms), then skipped, and
  nothing is decoded until the next keyframe, which is asked for at once
  (PLI) and again every ``KEYFRAME_RETRY_S`` (or two round trips) until it
  comes. A hole in that keyframe is not given up the same way (it would ask
  for one more keyframe, that loses a packet in turn: at 5 % loss and 75 ms
  each way this cycle froze 9.7 s of 30): it is waited for while another
  keyframe is asked for, and the first of the two that completes is decoded.
- ``RemoteStreamTrack.recv`` (rtcrtpreceiver.py:217) passes on every decoded
  frame, however late. Here a video frame more than ``LATE_S`` behind the best
  delay seen in the last ``BASELINE_S`` is dropped when a newer frame already
  waits behind it (it was decoded, so the frames after it still decode): a
  backlog released at once is skipped to real time instead of played fast.
  And while packets are being recovered by NACK, frames are shown later than
  the best delay (a playout delay; libwebrtc's jitter estimate adds a round
  trip): by what the frames that waited on a retransmission were late, less
  the gap that is not yet a freeze. Without it each retransmission (150 ms
  away at 75 ms each way) held the frames behind it for a freeze of 0.3 s,
  about one a second at 5 % loss.
- RED + ULPFEC (RFC 2198, RFC 5109; aiortc 1.16 has neither): ``RedFront``
  stands where aiortc calls its jitter buffer (rtcrtpreceiver.py:551), unwraps
  RED and rebuilds lost packets from ULPFEC (peers/ulpfec.py) out of the bytes
  each packet came with (``install_raw``: rtp.py:671 ``RtpPacket.parse`` keeps
  them); the frame buffer passes over the FEC packets' sequence numbers, and
  over the holes lost FEC packets leave, by VP8 picture IDs. Chromium protects
  its video so when the answer lists red and ulpfec: at 5 % loss + 75 ms each
  way, Chromium->aiortc froze 0.0-0.9 s per 30 s instead of 2.4-2.8 s
  (docs/benchmarks.md, "RED + ULPFEC in the aiortc receiver").

Upstream, ``NackList`` and ``FrameBuffer`` would take the place of the two
classes, with ``RTCRtpReceiver`` running their timer; the late-frame rule would
be an option of ``RemoteStreamTrack``; RED and ULPFEC would be codecs of their own
in ``aiortc.codecs`` with the receiver unwrapping them before its jitter buffer.

And the socket (``install_drain``): aioice's ``StunProtocol`` (ice.py:284) is given one
datagram per turn of the event loop (asyncio's datagram transport reads one per readiness
event, selector_events.py ``_SelectorDatagramTransport._read_ready``). On a loaded
machine a turn waits for a CPU (10 ms and more at load 10-20), so a peer read at most
100 datagrams a second, fewer than a call's audio (50) and 640x480 video bring: the rest
waited in the kernel, later and later (docs/benchmarks.md, "Audio when the event loop is
slow"). Here each datagram handed to the protocol is followed by those already waiting on
the same socket, up to ``DRAIN_MAX``, each through the protocol as asyncio would have
passed it (its kernel stamp, peers/aiortc_rate.py, read after its own ``recvfrom``).
Upstream: aioice's protocols would read what is waiting (``recvmmsg``) in one go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from aioice.ice import StunProtocol
from aiortc.codecs import depayload
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver
from aiortc.rtp import RTP_HISTORY_SIZE, HeaderExtensionsMap, RtpPacket
from av import VideoFrame

from peers import aiortc_opus, ulpfec

__all__ = [
    "AudioBuffer",
    "FrameBuffer",
    "NackList",
    "ReceiveCounters",
    "RedFront",
    "concealed",
    "counters",
    "fec_recovered",
    "install",
    "install_drain",
    "is_keyframe_start",
    "nack_rtt_s",
    "playout_delay_s",
    "recovered",
    "vp8_picture_id",
    "with_payload",
]

logger = logging.getLogger(__name__)

NACK_RETRIES = 10  # as libwebrtc's NackRequester (kMaxNackRetries)
# When a missing packet is asked for again (libwebrtc's NackRequester::GetNackBatch: once
# ``now - sent_at >= rtt``, its rtt 100 ms until RTCP gives one). Here a second NACK follows
# the first after NACK_REPEAT_S whatever the round trip: a lost NACK or a lost retransmission
# (about 10 % of them at 5 % loss each way) then costs 50 ms, not a whole round trip, which
# at 75 ms each way made each such packet a freeze. Later ones every round trip, at least
# NACK_RETRY_MIN_S.
NACK_REPEAT_S = 0.05
NACK_RETRY_MIN_S = 0.1
RTT_DEFAULT_S = 0.1  # libwebrtc's kDefaultRtt, until a retransmission has answered
RTT_SAMPLES = 15  # the round trip is the median of the last answers (first NACK to packet)
TICK_S = 0.01
STALL_S = 0.05  # a tick this much later than due: the event loop stood still
KEYFRAME_RETRY_S = 0.3  # at least; 2 round trips when longer (the keyframe is on its way)
# A hole is waited for three rounds of NACKs (at 0 and NACK_REPEAT_S, then each round trip)
# before it is given up: giving up costs more (a keyframe's round trip, and at 5 % loss a
# 640x480 keyframe of ~25 packets loses one 70 % of the time).
HOLE_WAIT_RTTS = 3
HOLE_WAIT_MIN_S, HOLE_WAIT_MAX_S = 0.15, 0.6
KEY_HOLE_MAX_S = 1.5  # a keyframe's hole is waited for this long while no newer keyframe starts
MAX_SPAN_S = 1.0  # a hole spanning more media time than this is given up at once (an outage;
# above HOLE_WAIT_MAX_S with room for a stall of the sender: 0.45 gave up holes that NACKs at
# 150 ms RTT were still filling)
AUDIO_WAIT_S = 0.03  # a missing audio packet waited for this long (reordering), then filled
MAX_CONCEAL = 10  # at most this many audio packets in a row (200 ms) made up
MAX_HELD = 2000  # packets held while waiting for a keyframe, at most
DRAIN_MAX = 64  # datagrams read from a socket in one turn of the event loop, at most
DRAIN = True  # off: asyncio's one datagram per turn (bench/slowloop.py's "today")
MAX_ARRIVALS = 300  # arrival times of frames kept for LateFrames, at most
LATE_S = 0.15  # a frame this much later than it is due is skipped if a newer one waits
LATE_MAX_S = 0.3  # ... and one this much later than the best recent delay, whatever the delay
LATE_ALONE_GAP_S = 0.5  # a late frame released alone is still shown after this long without one
# ... unless it is later than this: a frame is never shown this far behind while a newer one's
# packets are here (the bound is 500 ms; the decoder and the picture's own path need
# the rest). After a keyframe on a 300 kbit/s link, holes that each waited 0.2-0.6 s released
# a frame 692 ms late after 578 ms without one, and it was shown (1 call in 27).
LATE_HARD_S = 0.4
BASELINE_S = 10.0  # how long recovered frames keep the playout delay up
# The best delay (arrival against media time) is the best of the last BEST_DELAY_S: long
# enough to hold a frame that came at once, short enough that a path that became slower
# (75 ms more each way, a queue) is the new best within seconds, not taken for lateness.
BEST_DELAY_S = 3.0
# Playout delay. libwebrtc's jitter estimate adds one round trip once NACKs have been needed
# (VCMJitterEstimator, kNackLimit = 3): here the delay is what the frames that waited on a
# retransmission in the last BASELINE_S were late by (PLAYOUT_QUANTILE of them), less the gap
# that is not yet a freeze as Chromium counts one (video_quality_observer2.cc: at least
# max(3 x mean, mean + 150 ms)), plus a margin. A whole round trip (and the wait to see the
# hole, a frame interval) put every frame 300 ms behind at 75 ms each way; this is 150 ms less
# behind, and a recovered packet is a short stutter, not a freeze.
PLAYOUT_QUANTILE = 0.8
PLAYOUT_MARGIN_S = 0.04
PLAYOUT_MAX_S = 0.2  # with LATE_MAX_S, a frame waiting behind another is never shown later
FREEZE_OVER_MEAN_S = 0.15  # Chromium's freeze rule (peers/media.py's is_freeze)
# A picture still for longer than this is frozen (Chromium's rule at 30 fps: max(3 x 33 ms,
# 33 + 150 ms) = 183 ms): the frame that ends it is shown at once, not held for the playout
# delay. On a 300 kbit/s link whose queue overflowed, a keyframe that ended a 1.1 s freeze
# was held 119 ms more, and the gap went over 1 s.
FROZEN_S = 0.2


@dataclass
class ReceiveCounters:
    """What the patched receive path did in this process (read by the stats)."""

    nacks: int = 0  # sequence numbers asked for, retries included
    nack_retries: int = 0
    recovered: int = 0  # NACKed packets that arrived
    keyframe_requests: int = 0
    holes_skipped: int = 0
    late_dropped: int = 0
    audio_concealed: int = 0  # lost audio packets concealed (libopus's PLC)
    audio_recovered: int = 0  # lost audio packets rebuilt from the next one's in-band FEC
    fec_recovered: int = 0  # lost video packets rebuilt from ULPFEC
    fec_holes: int = 0  # holes between two frames that follow each other (lost FEC) passed over


counters = ReceiveCounters()


class _Unwrapper:
    """16-bit sequence numbers to a monotonic extended count."""

    def __init__(self) -> None:
        self.last: int | None = None

    def __call__(self, seq: int) -> int:
        if self.last is None:
            self.last = seq + (1 << 16)  # room below the first one for reordering
            return self.last
        delta = (seq - self.last) & 0xFFFF
        if delta >= 0x8000:
            delta -= 0x10000
        ext = self.last + delta
        self.last = max(self.last, ext)
        return ext


class _InOrder:
    """A buffer that releases packets in sequence order from ``next_seq`` (frames, audio)."""

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self._unwrap = _Unwrapper()

    def _arrival(self, packet: RtpPacket, now: float | None) -> tuple[float, int | None]:
        """The time (``now``, or the clock) and the packet's extended number; None for a packet
        before the next one due (too late, or a duplicate)."""
        now = time.monotonic() if now is None else now
        ext = self._unwrap(packet.sequence_number)
        if self.next_seq is None:
            self.next_seq = ext
        return now, (None if ext < self.next_seq else ext)


# -- NACKs ----------------------------------------------------------------------------------------


@dataclass
class _Missing:
    seen: float
    sent: float | None = None
    first: float | None = None  # when the first NACK went
    tries: int = 0


class NackList:
    """Missing packets, each NACKed twice at once then every round trip, until it arrives or
    is given up; the round trip learnt from the answers."""

    def __init__(self, history: int = RTP_HISTORY_SIZE, retries: int = NACK_RETRIES) -> None:
        self.history = history
        self.retries = retries
        self.rtt_s = RTT_DEFAULT_S
        self.answers: collections.deque[float] = collections.deque(maxlen=RTT_SAMPLES)
        self.max_seq: int | None = None
        self.missing: dict[int, _Missing] = {}
        self._unwrap = _Unwrapper()
        self._now: Callable[[], float] = time.monotonic

    def add(self, packet: RtpPacket, rebuilt: bool = False) -> bool:
        """Mark a packet received and note the holes before it; ``rebuilt``: from FEC, not an
        answer to a NACK (no round trip learnt from it).

        Returns False: NACKs go out from ``due()`` (aiortc's call site then sends nothing).
        """
        now = self._now()
        ext = self._unwrap(packet.sequence_number)
        if self.max_seq is None:
            self.max_seq = ext
            return False
        if ext > self.max_seq:
            for seq in range(max(self.max_seq + 1, ext - self.history), ext):
                self.missing[seq] = _Missing(now)
            self.max_seq = ext
        else:
            entry = self.missing.pop(ext, None)
            if entry is not None and entry.first is not None and not rebuilt:
                counters.recovered += 1
                # From the first NACK: the answer to the repeat when the first was lost (the
                # median keeps those out), and no Karn ambiguity to leave the estimate unlearnt
                # (aiortc 1.16's NackGenerator learns none; retrying at 1.2 RTT, before any
                # answer, a sample only from packets NACKed once never came at 75 ms each way).
                self.answers.append(min(max(now - entry.first, 0.005), 1.0))
                self.rtt_s = statistics.median(self.answers)
        return False

    def forget_below(self, ext: int) -> None:
        """Stop asking for packets before ``ext`` (the frame buffer gave up on them)."""
        for seq in [s for s in self.missing if s < ext]:
            del self.missing[seq]

    def forget_before(self, ext: int) -> None:
        """Stop asking for packets before another count's extended number ``ext`` (the frame
        buffer's: the two differ by a constant, compared mod 2**16)."""
        lowest = ext & 0xFFFF
        for seq in list(self.missing):
            if (lowest - (seq & 0xFFFF)) & 0xFFFF < 0x8000 and seq & 0xFFFF != lowest:
                del self.missing[seq]

    def due(self, now: float) -> list[int]:
        """The 16-bit sequence numbers to NACK now (each marked sent)."""
        if self.max_seq is None:
            return []
        later = max(self.rtt_s, NACK_RETRY_MIN_S)
        out = []
        for seq, entry in list(self.missing.items()):
            if self.max_seq - seq > self.history or entry.tries >= self.retries:
                del self.missing[seq]
            elif entry.sent is None or now - entry.sent >= (
                NACK_REPEAT_S if entry.tries == 1 else later
            ):
                if entry.sent is not None:
                    counters.nack_retries += 1
                entry.sent = now
                if entry.first is None:
                    entry.first = now
                entry.tries += 1
                out.append(seq)
        counters.nacks += len(out)
        return [seq & 0xFFFF for seq in sorted(out)]


# -- frames ---------------------------------------------------------------------------------------


def is_keyframe_start(mime_type: str, payload: bytes) -> bool:
    """Whether an RTP payload begins a keyframe (VP8, H.264; any other codec: yes)."""
    if not payload:
        return False
    name = mime_type.lower()
    if name == "video/vp8":
        try:
            descriptor, rest = VpxPayloadDescriptor.parse(payload)
        except ValueError:
            return False
        first = descriptor.partition_start and descriptor.partition_id == 0
        return bool(first and rest and not rest[0] & 0x01)  # P bit 0: a keyframe (RFC 7741)
    if name == "video/h264":
        kind = payload[0] & 0x1F
        if kind in (5, 7):  # IDR slice, SPS
            return True
        if kind == 24:  # STAP-A: any IDR or SPS inside
            offset = 1
            while offset + 2 < len(payload):
                size = int.from_bytes(payload[offset : offset + 2], "big")
                if payload[offset + 2] & 0x1F in (5, 7):
                    return True
                offset += 2 + size
            return False
        if kind == 28 and len(payload) > 1:  # FU-A: the start of an IDR slice
            return bool(payload[1] & 0x80) and payload[1] & 0x1F == 5
        return False
    return True


def vp8_picture_id(payload: bytes) -> tuple[int, int] | None:
    """The picture ID of a VP8 payload that begins a frame (S = 1, partition 0) and its modulus
    (128 or 32768, RFC 7741 ``M``); None for any other payload or one without a picture ID."""
    if len(payload) < 3 or payload[0] & 0x9F != 0x90 or not payload[1] & 0x80:
        return None  # X, S, PID 0 and I wanted (N and the reserved bit ignored)
    if payload[2] & 0x80:
        if len(payload) < 4:
            return None
        return int.from_bytes(payload[2:4], "big") & 0x7FFF, 1 << 15
    return payload[2], 1 << 7


class _MediaTime:
    """32-bit RTP timestamps to seconds of media time from the first one."""

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.last: tuple[int, float] | None = None

    def __call__(self, timestamp: int) -> float:
        if self.last is None:
            self.last = (timestamp, 0.0)
            return 0.0
        delta = (timestamp - self.last[0]) & 0xFFFFFFFF
        if delta >= 0x80000000:
            delta -= 0x100000000
        seconds = self.last[1] + delta / self.clock_rate
        self.last = (timestamp, seconds)
        return seconds


class FrameBuffer(_InOrder):
    """Encoded video frames out as soon as complete and in order; a hole waited for a bounded time.

    ``deliver(frame, packet)`` gets each frame (with its first packet, for the
    codec); ``request_keyframe()`` is called when a hole is given up (and again,
    every ``keyframe_retry_s()``, while no keyframe comes); ``forget(ext)`` when
    packets before ``ext`` are no longer wanted; ``keyframe(packet)`` says
    whether a packet starts a keyframe.

    A hole in the keyframe decoding waits on is not given up after
    ``hole_wait_s()`` like any other: nothing else would decode. Another
    keyframe is asked for then, and whichever is complete first is decoded
    (the held one once its retransmission comes, or a newer one), up to
    ``KEY_HOLE_MAX_S``.

    Each frame released after waiting on a hole is timed against the best delay
    (release time against media time) of the last ``BEST_DELAY_S``: what those
    were late by sets ``playout_delay_s()``.

    Sequence numbers that carry no media (ULPFEC packets sent in the media's
    sequence space, RED-wrapped: common.md) are given by ``filler(packet)`` when
    they arrive, and passed over. Those lost leave holes that nobody
    retransmits: a hole between the frame last released and a packet that
    begins the frame right after it (``picture_id(packet)``: VP8's picture ID,
    one more than the last frame's) holds no media and is passed over at once,
    neither waited for nor given up (libwebrtc: its packet buffer assembles each
    frame on its own, and ``RtpVp8RefFinder`` tells by picture IDs that frames
    follow each other).
    """

    def __init__(
        self,
        deliver: Callable[[JitterFrame, RtpPacket], None],
        request_keyframe: Callable[[], None],
        keyframe: Callable[[RtpPacket], bool],
        *,
        hole_wait_s: Callable[[], float] = lambda: HOLE_WAIT_MAX_S,
        keyframe_retry_s: Callable[[], float] = lambda: KEYFRAME_RETRY_S,
        forget: Callable[[int], None] = lambda ext: None,
        superseded: Callable[[int], None] = lambda timestamp: None,
        picture_id: Callable[[RtpPacket], tuple[int, int] | None] = lambda packet: None,
        clock_rate: int = 90_000,
    ) -> None:
        super().__init__()
        self.keyframe_retry_s = keyframe_retry_s
        self.deliver = deliver
        self.request_keyframe = request_keyframe
        self.keyframe = keyframe
        self.hole_wait_s = hole_wait_s
        self.forget = forget
        self.superseded = superseded
        self.picture_id = picture_id
        self.fillers: set[int] = set()  # sequence numbers that came with no media (FEC)
        self.last_picture: tuple[int, int] | None = None  # of the last frame released
        self._burst: list[tuple[int, float]] = []  # (timestamp, late by) of frames released
        self.packets: dict[int, RtpPacket] = {}
        self.need_keyframe = True  # nothing decodes before a keyframe
        self.hole_since: float | None = None
        self.last_request: float | None = None
        self.newest: tuple[int, int] | None = None  # (sequence, timestamp) of the newest packet
        self.last_timestamp: int | None = None  # of the last frame released
        self.released_at: float | None = None  # when the last frame was released
        self.clock_rate = clock_rate
        self.key_at: int | None = None  # the keyframe decoding resumes at, until it is released
        self._media_time = _MediaTime(clock_rate)
        self.interval_s = 1 / 30  # between frames, in media time (a running mean)
        self._last_media_s: float | None = None
        self._timed_any = False  # an interval measured (the first replaces the guess)
        self.offsets: collections.deque[tuple[float, float]] = collections.deque()  # best first
        self.waited: collections.deque[tuple[float, float]] = collections.deque()  # (when, late)

    # aiortc's call site: ``pli_flag, encoded_frame = self.__jitter_buffer.add(packet)``
    def add(self, packet: RtpPacket, now: float | None = None) -> tuple[bool, None]:
        now, ext = self._arrival(packet, now)
        if ext is None:
            return False, None  # too late, or a duplicate
        assert self.next_seq is not None
        if ext - self.next_seq > MAX_HELD:  # a jump (the sender restarted): start over
            self.packets.clear()
            self.next_seq = ext
            self._give_up(now)
        if self.newest is None or ext > self.newest[0]:
            self.newest = (ext, packet.timestamp)
        if self._stale(packet.timestamp):
            return False, None  # from before an outage (a retransmission): never shown
        self.packets[ext] = packet
        self._release(now)
        return False, None

    def filler(self, packet: RtpPacket, now: float | None = None) -> None:
        """A packet that holds no media (an FEC packet) came: its sequence number is no hole."""
        now, ext = self._arrival(packet, now)
        if ext is None:
            return
        assert self.next_seq is not None
        if ext - self.next_seq > MAX_HELD:
            return  # a jump: the next media packet tells (``add``)
        self.fillers.add(ext)
        if len(self.fillers) > MAX_HELD:
            self.fillers = set(sorted(self.fillers)[-MAX_HELD // 2 :])
        self._release(now)

    def _behind(self, timestamp: int | None) -> int:
        """How far (clock units) media time ``timestamp`` is behind the newest packet's; 0 when
        it is not behind, or nothing has come."""
        if timestamp is None or self.newest is None:
            return 0
        behind = (self.newest[1] - timestamp) & 0xFFFFFFFF
        return behind if behind < 0x80000000 else 0

    def _stale(self, timestamp: int | None) -> bool:
        """Whether media time ``timestamp`` is more than MAX_SPAN_S older than the newest packet."""
        return self._behind(timestamp) > self.clock_rate * MAX_SPAN_S

    def _skip(self, now: float, ask: bool = True) -> None:
        """Give up the awaited frame and anything stale; decode again from a keyframe."""
        assert self.next_seq is not None
        counters.holes_skipped += 1
        self.next_seq += 1  # a frame with a hole is no use: find the next keyframe
        for seq in [s for s, p in self.packets.items() if self._stale(p.timestamp)]:
            del self.packets[seq]
        self.next_seq = max(self.next_seq, min(self.packets, default=self.next_seq))
        self._drop_fillers()
        self.forget(self.next_seq)
        self.last_picture = None
        self.last_timestamp = (
            None  # no reference left: the age of a hole counts from the next frame
        )
        self.key_at = None
        if ask:
            self._give_up(now)
        else:
            self.need_keyframe = True
            self.hole_since = None

    def tick(self, now: float) -> None:
        """Give up a hole waited for too long; ask again for a keyframe that does not come."""
        waited = None if self.hole_since is None else now - self.hole_since
        if waited is not None and waited >= self.hole_wait_s():
            if self.key_at is not None and self.key_at == self.next_seq:
                self._keyframe_hole(now, waited)
                return
            logger.debug("hole at %s given up after %.3f s", self.next_seq, waited)
            self._skip(now)
            self._release(now)
        elif self.need_keyframe and self.last_request is not None and self._retry_due(now):
            self._ask(now)  # (none asked yet: the first packets are waited for, above)

    def paused(self, seconds: float) -> None:
        """The receive path stood still ``seconds`` (its event loop stalled): that is no wait on
        a hole nor on a keyframe, whose packets may be read only now."""
        if self.hole_since is not None:
            self.hole_since += seconds
        if self.last_request is not None:
            self.last_request += seconds

    def _keyframe_hole(self, now: float, waited: float) -> None:
        """The keyframe waited on has a hole: a newer keyframe, once one starts, is taken instead;
        until then another is asked for while this one's retransmission may still come."""
        assert self.next_seq is not None
        newer = any(s > self.next_seq and self.keyframe(p) for s, p in self.packets.items())
        if newer or waited >= KEY_HOLE_MAX_S:
            logger.debug("keyframe at %s given up after %.3f s", self.next_seq, waited)
            self._skip(now, ask=not newer)
            self._release(now)
        elif self._retry_due(now):
            self._ask(now)

    def _retry_due(self, now: float) -> bool:
        return self.last_request is None or now - self.last_request >= self.keyframe_retry_s()

    def _give_up(self, now: float) -> None:
        self.need_keyframe = True
        self.hole_since = None
        self._ask(now)

    def _ask(self, now: float) -> None:
        self.last_request = now
        counters.keyframe_requests += 1
        self.request_keyframe()

    def _release(self, now: float) -> None:
        """Release what is complete; of the frames released together, those already later than
        LATE_MAX_S with a newer one behind them are ``superseded`` (decoded, never shown: the
        newer one is ready; the decoder, not yet done with it, must not let them show late).
        So is the last one released when packets of a newer frame are already here (it waited
        on a hole while they came) and that frame follows with no hole of its own
        (``_hole_ahead``), unless none was released for LATE_ALONE_GAP_S: a frame released
        alone 0.4 s late, shown, put the 300 kbit/s call 477-618 ms behind in 3 of 30 calls; a
        still picture past that is a freeze, and so is one until the next frame's hole is
        filled. Past LATE_HARD_S late it is superseded whatever the wait: the newer frame is
        the one to show, and the freeze lasts until it is complete, not 0.2-0.5 s less with
        the picture behind."""
        self._burst = []
        before = self.released_at
        self._release_frames(now)
        for timestamp, late in self._burst[:-1]:
            if late > LATE_MAX_S:
                self.superseded(timestamp)
        if not self._burst:
            return
        timestamp, late = self._burst[-1]
        if late <= LATE_MAX_S or self._behind(timestamp) == 0:  # no newer frame's packets came
            return
        recent = before is not None and now - before <= LATE_ALONE_GAP_S
        # Not while the newer frame waits on a hole of its own: this one is the picture till then.
        if late > LATE_HARD_S or (recent and not self._hole_ahead()):
            self.superseded(timestamp)

    def _hole_ahead(self) -> bool:
        """Whether a packet is missing between the next one due and the newest here (FEC
        packets' numbers count as here): the next frame waits on a retransmission (0.2-0.6 s
        on a full 300 kbit/s queue). Then the frame just released is the picture until that
        hole is filled (``_release``: superseded, one 320 ms late was followed by 0.9 s of
        nothing, a 1.2 s gap), and the hole is timed (``_release_frames``)."""
        assert self.next_seq is not None
        newest = max(self.packets, default=self.next_seq)
        if newest <= self.next_seq:
            return False
        here = sum(1 for s in self.packets if s >= self.next_seq)
        here += sum(1 for s in self.fillers if self.next_seq <= s < newest)
        return here <= newest - self.next_seq

    def _release_frames(self, now: float) -> None:
        assert self.next_seq is not None
        while True:
            if self.need_keyframe:
                starts = [
                    s for s, p in self.packets.items() if s >= self.next_seq and self.keyframe(p)
                ]
                if not starts:
                    for seq in sorted(self.packets)[:-MAX_HELD]:
                        del self.packets[seq]
                    # No keyframe asked for yet (its first packets were lost): ask after the wait.
                    if self.last_request is None and self.packets:
                        self.hole_since = self.hole_since or now
                    return
                start = min(starts)
                for seq in [s for s in self.packets if s < start]:
                    del self.packets[seq]
                self.forget(start)
                logger.debug("keyframe at %d (last asked %s)", start, self.last_request)
                self.next_seq = start
                self._drop_fillers()
                self.key_at = start
                self.need_keyframe = False
            while self.next_seq in self.fillers:  # FEC after the last frame
                self.fillers.discard(self.next_seq)
                self.next_seq += 1
            frame = self._complete()
            if frame is None:
                if self.next_seq not in self.packets and self._bridge():
                    continue
                # A packet after the one awaited (or after the frame's missing one): a hole.
                if not self._hole_ahead():
                    # Nothing after it, or all here up to the newest: a frame still coming (a
                    # sender that paces its packets, as Chromium does), no hole to wait on.
                    self.hole_since = None
                    return
                if not self._stale(self.last_timestamp):
                    self.hole_since = self.hole_since or now
                    return
                # The hole spans more media time than is worth waiting for (an outage): at once.
                logger.debug("hole at %s spans over %.1f s: given up", self.next_seq, MAX_SPAN_S)
                self._skip(now)
                continue
            late = self._timed(frame[0].timestamp, now, waited=self.hole_since is not None)
            self._burst.append((frame[0].timestamp, late))
            self.hole_since = None
            self.last_request = None
            self.key_at = None
            self.last_timestamp = frame[0].timestamp
            self.last_picture = self.picture_id(frame[0])
            # ``_data``: the depayloaded bytes aiortc sets at rtcrtpreceiver.py:543.
            data = b"".join(p._data for p in frame)  # type: ignore[attr-defined]
            self.released_at = now
            self.deliver(JitterFrame(data=data, timestamp=frame[0].timestamp), frame[0])

    def _drop_fillers(self) -> None:
        assert self.next_seq is not None
        self.fillers = {s for s in self.fillers if s >= self.next_seq}

    def _bridge(self) -> bool:
        """Pass over the hole at ``next_seq`` when the packet after it begins the frame that
        follows the last one released (picture IDs): the hole holds no media (lost FEC)."""
        assert self.next_seq is not None
        if self.last_picture is None:
            return False
        after = min((s for s in self.packets if s > self.next_seq), default=None)
        if after is None or (picture := self.picture_id(self.packets[after])) is None:
            return False
        last, modulus = self.last_picture
        if picture[1] != modulus or (picture[0] - last) % modulus != 1:
            return False
        logger.debug(
            "no media in %d-%d (picture %d after %d)", self.next_seq, after - 1, picture[0], last
        )
        counters.fec_holes += 1
        self.next_seq = after
        self._drop_fillers()
        self.forget(after)
        return True

    def _timed(self, timestamp: int, now: float, waited: bool) -> float:
        """Note a frame's release: the frame interval, the best delay, and how late it is if it
        waited on a hole; how late it is."""
        media_s = self._media_time(timestamp)
        if self._last_media_s is not None and 0 < media_s - self._last_media_s < 0.5:
            step = media_s - self._last_media_s
            self.interval_s += (step - self.interval_s) / (8 if self._timed_any else 1)
            self._timed_any = True
        self._last_media_s = media_s
        offset = now - media_s  # the sender's clock against ours, plus the path's delay
        while self.offsets and self.offsets[-1][1] >= offset:
            self.offsets.pop()
        self.offsets.append((now, offset))
        while self.offsets[0][0] < now - BEST_DELAY_S:
            self.offsets.popleft()
        late = offset - self.offsets[0][1]
        if waited:
            self.waited.append((now, late))
        return late

    def playout_delay_s(self, now: float) -> float:
        """How long after the best delay frames should be shown so that a frame that waits on a
        retransmission, as late as PLAYOUT_QUANTILE of them were in the last BASELINE_S, is not
        a freeze; none without such frames."""
        while self.waited and self.waited[0][0] < now - BASELINE_S:
            self.waited.popleft()
        if not self.waited:
            return 0.0
        late = sorted(seconds for _, seconds in self.waited)
        typical = late[min(len(late) - 1, int(PLAYOUT_QUANTILE * len(late)))]
        not_a_freeze = max(2 * self.interval_s, FREEZE_OVER_MEAN_S)
        return min(max(typical - not_a_freeze + PLAYOUT_MARGIN_S, 0.0), PLAYOUT_MAX_S)

    def _complete(self) -> list[RtpPacket] | None:
        """The frame at ``next_seq`` if all its packets are here (removed from the buffer)."""
        assert self.next_seq is not None
        first = self.packets.get(self.next_seq)
        if first is None:
            return None
        seq = self.next_seq
        frame = [first]
        while not frame[-1].marker:
            following = self.packets.get(seq + 1)
            if following is None:
                return None
            if following.timestamp != first.timestamp:  # the marker was lost with... nothing
                break
            frame.append(following)
            seq += 1
        for s in range(self.next_seq, self.next_seq + len(frame)):
            del self.packets[s]
        self.next_seq += len(frame)
        return frame


# -- RED and ULPFEC -------------------------------------------------------------------------------


class RedFront:
    """RED (RFC 2198) and ULPFEC (RFC 5109) in front of a video ``FrameBuffer``: what aiortc
    hands its jitter buffer (rtcrtpreceiver.py:551), after its statistics, RTX unwrapping and
    NACK list have seen the packet as it came.

    A RED packet's media block goes on as the packet it carries (the media's payload type),
    its bytes as sent (``packet._epc_raw``, kept by ``install_raw``) fed to
    ``ulpfec.Recovery``; an ULPFEC block goes to ``Recovery`` and its sequence number to the
    frame buffer as a filler; each packet rebuilt is parsed and goes where a received one
    goes (NACK list, frame buffer), counted. A RED packet that came by RTX (aiortc rebuilds
    it, rtp.py:757 ``unwrap_rtx``: no bytes as sent, and libwebrtc writes other header
    extensions into a retransmission) is unwrapped the same way but never fed to
    ``Recovery``, which rebuilds a packet from the others' bytes exactly as they were
    protected. Media that is not RED-wrapped passes as it is (libwebrtc's
    ``RtpVideoStreamReceiver2`` feeds its ULPFEC receiver RED packets only).
    """

    def __init__(self, buffer: FrameBuffer, nack: NackList, codecs: dict[int, Any]) -> None:
        self.buffer = buffer
        self.nack = nack
        self.codecs = codecs  # payload type -> RTCRtpCodecParameters (the receiver's, filled later)
        self.red_pt: int | None = None
        self.ulpfec_pt: int | None = None
        self.mutable_ids: frozenset[int] = frozenset()
        self.extensions = HeaderExtensionsMap()
        self.recovery: ulpfec.Recovery | None = None
        self.recovered = 0  # packets rebuilt from FEC that went on
        self.malformed = 0  # RED or ULPFEC packets that could not be read

    def configure(
        self, extensions: HeaderExtensionsMap, header_extensions: Collection[tuple[int, str]] = ()
    ) -> None:
        """Take the negotiated codecs (``codecs``, filled by now) and header extensions (id,
        uri): the mutable ones are zeroed by both sides of ULPFEC."""
        for pt, codec in self.codecs.items():
            if codec.mimeType.lower() == ulpfec.RED_MIME:
                self.red_pt = pt
            elif codec.mimeType.lower() == ulpfec.ULPFEC_MIME:
                self.ulpfec_pt = pt
        self.extensions = extensions
        self.mutable_ids = frozenset(
            ext_id for ext_id, uri in header_extensions if uri in ulpfec.MUTABLE_EXTENSIONS
        )

    def _media_codec(self, pt: int) -> Any:
        codec = self.codecs.get(pt)
        if codec is None or codec.mimeType.lower().split("/")[-1] in ("red", "ulpfec", "rtx"):
            return None
        return codec

    # aiortc's call site: ``pli_flag, encoded_frame = self.__jitter_buffer.add(packet)``
    def add(self, packet: RtpPacket, now: float | None = None) -> tuple[bool, None]:
        if self.red_pt is None or packet.payload_type not in (self.red_pt, self.ulpfec_pt):
            return self.buffer.add(packet, now)
        raw: bytes | None = getattr(packet, "_epc_raw", None)
        try:
            if packet.payload_type == self.ulpfec_pt:  # ULPFEC without RED (not libwebrtc's)
                block_pt, inner = packet.payload_type, raw
                payload = packet.payload
            elif raw is not None:
                block_pt, inner = ulpfec.from_red(raw)
                payload = inner[ulpfec.header_length(inner) : len(inner) - packet.padding_size]
            else:  # by RTX: the RED payload alone
                block_pt, bare = ulpfec.from_red(
                    bytes((0x80, packet.payload_type)) + bytes(10) + packet.payload
                )
                payload, inner = bare[12:], None
        except ValueError:
            self.malformed += 1
            return False, None
        if block_pt == self.ulpfec_pt:
            self.buffer.filler(packet, now)
            rebuilt: list[bytes] = []
            if inner is not None:
                try:
                    rebuilt = self._recovery(packet.ssrc).fec(payload)
                except ValueError:
                    self.malformed += 1
            self._rebuilt(rebuilt, now)
            return False, None
        codec = self._media_codec(block_pt)
        if codec is None:
            self.buffer.filler(packet, now)  # no media we know: no hole to wait on
            return False, None
        media = with_payload(packet, block_pt, payload)
        try:
            media._data = depayload(codec, payload)  # type: ignore[attr-defined]
        except ValueError:  # as rtcrtpreceiver.py:541-546
            return False, None
        rebuilt = [] if inner is None else self._recovery(packet.ssrc).media(inner)
        self.buffer.add(media, now)
        self._rebuilt(rebuilt, now)
        return False, None

    def _recovery(self, ssrc: int) -> ulpfec.Recovery:
        if self.recovery is None or self.recovery.ssrc != ssrc:
            self.recovery = ulpfec.Recovery(ssrc, self.mutable_ids)
        return self.recovery

    def _rebuilt(self, packets: list[bytes], now: float | None) -> None:
        for raw in packets:
            try:
                packet = RtpPacket.parse(raw, self.extensions)
                codec = self._media_codec(packet.payload_type)
                if codec is None:
                    continue
                packet._data = depayload(codec, packet.payload)  # type: ignore[attr-defined]
            except ValueError:
                self.malformed += 1
                continue
            self.recovered += 1
            counters.fec_recovered += 1
            self.nack.add(packet, rebuilt=True)
            self.buffer.add(packet, now)


def with_payload(packet: RtpPacket, payload_type: int, payload: bytes) -> RtpPacket:
    """``packet`` with another payload type and payload (its header otherwise, the header
    extensions the same object)."""
    out = RtpPacket(
        payload_type=payload_type,
        marker=packet.marker,
        sequence_number=packet.sequence_number,
        timestamp=packet.timestamp,
        ssrc=packet.ssrc,
        payload=payload,
    )
    out.csrc = packet.csrc
    out.extensions = packet.extensions
    return out


class AudioBuffer(_InOrder):
    """Audio packets to the decoder in order, none that arrived thrown away; a loss rebuilt from
    the next packet's FEC, or concealed.

    A packet is passed on as soon as the one before it was; behind a hole,
    packets wait ``AUDIO_WAIT_S`` for a reordered one, then each missing packet
    (up to ``MAX_CONCEAL`` in a row; beyond, an outage, nothing is made up)
    fills its slot: the last one before the packet that came is handed to
    ``recover(following, timestamp, samples)`` when ``has_fec(following)``
    (Opus in-band FEC: the packet carries a coarser copy of the one before it),
    every other one to ``conceal(previous, timestamp, samples)`` (libopus's
    loss concealment). As Chromium counts them (NetEq's concealedSamples counts
    only its expansion), a slot rebuilt from FEC is recovered, not concealed.
    Only a packet that comes after its slot was filled is dropped.
    """

    def __init__(
        self,
        deliver: Callable[[JitterFrame, RtpPacket], None],
        conceal: Callable[[RtpPacket, int, int], None],
        recover: Callable[[RtpPacket, int, int], None],
        has_fec: Callable[[RtpPacket], bool] = lambda packet: False,
    ) -> None:
        super().__init__()
        self.deliver = deliver
        self.conceal = conceal
        self.recover = recover
        self.has_fec = has_fec
        self.packets: dict[int, RtpPacket] = {}
        self.previous: RtpPacket | None = None
        self.hole_since: float | None = None
        self.late = 0  # packets that came after their slot was filled

    # aiortc's call site: ``pli_flag, encoded_frame = self.__jitter_buffer.add(packet)``
    def add(self, packet: RtpPacket, now: float | None = None) -> tuple[bool, None]:
        now, ext = self._arrival(packet, now)
        if ext is None:
            self.late += 1
            return False, None
        self.packets[ext] = packet
        self._release(now)
        return False, None

    def tick(self, now: float) -> None:
        """Fill a hole waited for ``AUDIO_WAIT_S``."""
        if self.hole_since is None or now - self.hole_since < AUDIO_WAIT_S:
            return
        assert self.next_seq is not None
        resume = min(self.packets)
        missing = resume - self.next_seq
        previous = self.previous
        if previous is not None and missing <= MAX_CONCEAL:
            following = self.packets[resume]
            step = ((following.timestamp - previous.timestamp) & 0xFFFFFFFF) // (missing + 1)
            samples = aiortc_opus.fec_samples(step)
            fec = self.has_fec(following)
            for k in range(1, missing + 1):
                timestamp = (previous.timestamp + k * step) & 0xFFFFFFFF
                if k == missing and fec:
                    self.recover(following, timestamp, samples)
                else:
                    self.conceal(previous, timestamp, samples)
            counters.audio_recovered += int(fec)
            counters.audio_concealed += missing - int(fec)
        self.next_seq = resume
        self.hole_since = None
        self._release(now)

    def _release(self, now: float) -> None:
        assert self.next_seq is not None
        while (packet := self.packets.pop(self.next_seq, None)) is not None:
            self.deliver(
                JitterFrame(data=packet._data, timestamp=packet.timestamp),  # type: ignore[attr-defined]
                packet,
            )
            self.previous = packet
            self.next_seq += 1
        self.hole_since = (self.hole_since or now) if self.packets else None


# -- late frames and playout delay ----------------------------------------------------------------


@dataclass
class LateFrames:
    """Drops a video frame that is late and already has a newer one waiting behind it; holds
    an early one until it is due.

    Late: shown more than ``target_s + late_s`` (at most ``LATE_MAX_S``) after
    the best delay (arrival against media time) seen in the last
    ``BEST_DELAY_S``. The newest frame (none decoded behind it) is always
    shown, so dropping never freezes the picture; it only skips a backlog, as a
    player catching up does, instead of playing it fast. (Frames still waiting
    for the decoder do not count: when the decoder is what is slow, dropping
    the frame before them only adds their decoding time to a gap; at 640x480
    on a loaded machine, 17 fps shown of 28 and 12 s frozen of 30.)

    Due (``hold_s``): ``target_s`` after the best delay, the playout delay the
    receive path sets (``FrameBuffer.playout_delay_s``): frames that came at
    once wait for it, so that a frame held behind a retransmitted packet is a
    stutter, not a freeze. The frame that ends a freeze (nothing shown for
    ``FROZEN_S``) is not held: the delay is there to keep a stutter from
    becoming a freeze, and that one already is (libwebrtc holds it to its
    render time too; here a freeze ends as soon as it can).
    """

    late_s: float = LATE_S
    target_s: float = 0.0
    recent: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    # When each frame (by pts) left the frame buffer, complete: its arrival (the receive path
    # fills it). The best delay is taken from arrivals, never from when ``recv`` got a frame,
    # which a frame held before it delays: that crept the best delay up by the playout delay.
    arrivals: dict[int, float] = field(default_factory=dict)
    # Frames (by pts) the frame buffer released already too late with a newer one.
    superseded: set[int] = field(default_factory=set)
    shown_at: float | None = None  # when the last frame kept is shown (set by ``recv``)

    def hold_s(self, media_s: float, now: float) -> float:
        """How long to hold a frame kept by ``keep`` before it is due (0 to ``target_s``; 0 for
        the frame that ends a freeze)."""
        if not self.recent or (self.shown_at is not None and now - self.shown_at > FROZEN_S):
            return 0.0
        due = media_s + self.recent[0][1] + self.target_s
        return min(max(due - now, 0.0), self.target_s)

    def keep(
        self, media_s: float, now: float, newer_waiting: bool, arrived: float | None = None
    ) -> bool:
        """Whether to show a frame of media time ``media_s`` now (``arrived``: when it came)."""
        # The sender's clock against ours, plus the path's delay.
        offset = (now if arrived is None else arrived) - media_s
        while self.recent and self.recent[-1][1] >= offset:
            self.recent.pop()
        self.recent.append((now, offset))
        while self.recent[0][0] < now - BEST_DELAY_S:
            self.recent.popleft()
        late = now - media_s - self.recent[0][1]
        if late <= min(self.target_s + self.late_s, LATE_MAX_S):
            return True
        if not newer_waiting:
            return True
        counters.late_dropped += 1
        return False


# -- installation ---------------------------------------------------------------------------------

_installed: list[bool] = []


def install() -> None:
    """Patch aiortc's RTCRtpReceiver (video) and RemoteStreamTrack once per process."""
    if _installed:
        return
    _installed.append(True)
    aiortc_opus.install()  # the Opus decoder that AudioBuffer's lost slots are decoded by
    original_init = RTCRtpReceiver.__init__
    original_handle = RTCRtpReceiver._handle_rtp_packet
    original_receive = RTCRtpReceiver.receive
    original_recv = RemoteStreamTrack.recv
    install_raw()

    def __init__(self: RTCRtpReceiver, kind: str, transport: Any) -> None:
        original_init(self, kind, transport)
        if kind == "video":
            _VideoPath(self)
        elif kind == "audio":
            _AudioPath(self)

    async def _handle_rtp_packet(
        self: RTCRtpReceiver, packet: RtpPacket, arrival_time_ms: int
    ) -> None:
        path: _VideoPath | _AudioPath | None = getattr(self, "_epc_path", None)
        if path is not None:
            path.seen(packet)
        await original_handle(self, packet, arrival_time_ms)

    async def receive(self: RTCRtpReceiver, parameters: Any) -> None:
        await original_receive(self, parameters)
        path = getattr(self, "_epc_path", None)
        if isinstance(path, _VideoPath):
            path.configure(parameters)

    async def recv(self: RemoteStreamTrack) -> Any:
        while True:
            frame = await original_recv(self)
            if not isinstance(frame, VideoFrame) or frame.pts is None or frame.time_base is None:
                return frame
            late: LateFrames = self.__dict__.setdefault("_epc_late", LateFrames())
            newer = any(f is not None for f in self._queue._queue)  # type: ignore[attr-defined]
            if frame.pts in late.superseded:
                late.superseded.discard(frame.pts)
                newer = True  # released with a newer frame, still being decoded
            media_s, now = float(frame.pts * frame.time_base), time.monotonic()
            if late.keep(media_s, now, newer, late.arrivals.pop(frame.pts, None)):
                hold = late.hold_s(media_s, now)
                late.shown_at = now + hold
                if hold > 0:
                    await asyncio.sleep(hold)
                return frame

    RTCRtpReceiver.__init__ = __init__  # type: ignore[method-assign]
    RTCRtpReceiver._handle_rtp_packet = _handle_rtp_packet  # type: ignore[method-assign]
    RTCRtpReceiver.receive = receive  # type: ignore[method-assign]
    RemoteStreamTrack.recv = recv  # type: ignore[method-assign]


def install_raw() -> None:
    """Keep each received RTP packet's bytes (after SRTP) as ``packet._epc_raw``: ULPFEC
    protects the bytes as sent, header extensions included, and aiortc's parse keeps only the
    extensions it knows (rtp.py:671 ``RtpPacket.parse``, called at rtcdtlstransport.py:616)."""
    if getattr(RtpPacket.parse, "_epc_raw", False):
        return
    original = RtpPacket.parse.__func__  # type: ignore[attr-defined]

    def parse(
        cls: type[RtpPacket], data: bytes, extensions_map: HeaderExtensionsMap = _NO_EXTENSIONS
    ) -> RtpPacket:
        packet: RtpPacket = original(cls, data, extensions_map)
        packet._epc_raw = data  # type: ignore[attr-defined]
        return packet

    parse._epc_raw = True  # type: ignore[attr-defined]
    RtpPacket.parse = classmethod(parse)  # type: ignore[method-assign,assignment]


_NO_EXTENSIONS = HeaderExtensionsMap()  # rtp.py:673's default


class _VideoPath:
    """One video receiver's NackList, FrameBuffer and their timer."""

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self.receiver = receiver
        self.nack = NackList()
        self.ssrc: int | None = None
        self.task: asyncio.Task[None] | None = None
        self._pending_pli = False
        self.buffer = FrameBuffer(
            self._deliver,
            self._request_keyframe,
            self._keyframe,
            hole_wait_s=self._hole_wait_s,
            keyframe_retry_s=self._keyframe_retry_s,
            forget=self.nack.forget_before,
            superseded=self._superseded,
            picture_id=self._picture_id,
        )
        codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        self.front = RedFront(self.buffer, self.nack, codecs)
        self.pts: dict[int, int] = {}  # RTP timestamp -> pts, of the frames just delivered
        receiver._epc_path = self  # type: ignore[attr-defined]
        # rtcrtpreceiver.py:299-300: the two parts replaced (used at :535 and :551); RED and
        # ULPFEC taken off in front of the frame buffer.
        receiver._RTCRtpReceiver__jitter_buffer = self.front  # type: ignore[attr-defined]
        receiver._RTCRtpReceiver__nack_generator = self.nack  # type: ignore[attr-defined]

    def configure(self, parameters: Any) -> None:
        """The receiver's parameters are set (rtcrtpreceiver.py:392 ``receive``)."""
        transport = self.receiver.transport
        self.front.configure(
            transport._rtp_header_extensions_map,
            [(ext.id, ext.uri) for ext in parameters.headerExtensions],
        )

    def _picture_id(self, packet: RtpPacket) -> tuple[int, int] | None:
        codec = self._codec(packet)
        if codec is None or codec.mimeType.lower() != "video/vp8":
            return None
        return vp8_picture_id(packet.payload)

    def _hole_wait_s(self) -> float:
        wait = NACK_REPEAT_S + HOLE_WAIT_RTTS * self.nack.rtt_s + 0.05
        return min(max(wait, HOLE_WAIT_MIN_S), HOLE_WAIT_MAX_S)

    def _keyframe_retry_s(self) -> float:
        return max(KEYFRAME_RETRY_S, 2 * self.nack.rtt_s)

    def _codec(self, packet: RtpPacket) -> Any:
        codecs: dict[int, Any] = self.receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        return codecs.get(packet.payload_type)

    def _keyframe(self, packet: RtpPacket) -> bool:
        codec = self._codec(packet)
        return codec is not None and is_keyframe_start(codec.mimeType, packet.payload)

    def seen(self, packet: RtpPacket) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        codec = self._codec(packet)
        if codec is not None and not codec.mimeType.lower().endswith("/rtx"):
            self.ssrc = packet.ssrc

    def _late(self) -> LateFrames | None:
        track = self.receiver._track
        return None if track is None else track.__dict__.setdefault("_epc_late", LateFrames())

    def _deliver(self, frame: JitterFrame, first: RtpPacket) -> None:
        timestamp = frame.timestamp
        if _decode(self.receiver, frame, first) and (late := self._late()) is not None:
            late.arrivals[frame.timestamp] = time.monotonic()  # the pts it decodes to
            self.pts[timestamp] = frame.timestamp
            for kept in (late.arrivals, self.pts):
                while len(kept) > MAX_ARRIVALS:  # frames that never decoded
                    del kept[next(iter(kept))]
            if len(late.superseded) > MAX_ARRIVALS:
                late.superseded.clear()

    def _superseded(self, timestamp: int) -> None:
        if (late := self._late()) is not None and (pts := self.pts.get(timestamp)) is not None:
            late.superseded.add(pts)

    def _request_keyframe(self) -> None:
        if self.ssrc is not None:
            self._pending_pli = True

    async def _run(self) -> None:
        receiver = self.receiver
        last = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            while receiver._RTCRtpReceiver__decoder_thread is not None:  # type: ignore[attr-defined]
                await asyncio.sleep(TICK_S)
                now = time.monotonic()
                # A stall of the loop: the packets that came meanwhile are read after this tick.
                if (stalled := now - last - STALL_S) > 0:
                    self.buffer.paused(stalled)
                last = now
                self.buffer.tick(now)
                track = receiver._track
                if track is not None:
                    late: LateFrames = track.__dict__.setdefault("_epc_late", LateFrames())
                    late.target_s = self.buffer.playout_delay_s(now)
                if self.ssrc is None:
                    continue
                lost = self.nack.due(now)
                while lost:  # one NACK per run that does not wrap (rtp.py:485 packs deltas)
                    run = next((i for i in range(1, len(lost)) if lost[i] < lost[i - 1]), len(lost))
                    await receiver._send_rtcp_nack(self.ssrc, lost[:run])
                    lost = lost[run:]
                if self._pending_pli:
                    self._pending_pli = False
                    await receiver._send_rtcp_pli(self.ssrc)


def nack_rtt_s(pc: Any) -> float | None:
    """The round trip a peer connection's video receive path uses (NACK to retransmission),
    None without a video receiver."""
    for receiver in pc.getReceivers():
        path = getattr(receiver, "_epc_path", None)
        if isinstance(path, _VideoPath):
            return path.nack.rtt_s
    return None


def fec_recovered(pc: Any) -> int:
    """Video packets a peer connection's receive path rebuilt from ULPFEC so far."""
    return sum(
        path.front.recovered
        for receiver in pc.getReceivers()
        if isinstance(path := getattr(receiver, "_epc_path", None), _VideoPath)
    )


def playout_delay_s(pc: Any) -> float | None:
    """The playout delay a peer connection's video is shown with now (beyond the best delay)."""
    for receiver in pc.getReceivers():
        late = getattr(receiver.track, "_epc_late", None) if receiver.track else None
        if isinstance(late, LateFrames):
            return late.target_s
    return None


def concealed(track: Any) -> int:
    """Audio frames made up for lost packets so far on a remote track (libopus's concealment;
    0 for any other track)."""
    return int(getattr(track, "_epc_concealed", 0))


def recovered(track: Any) -> int:
    """Audio frames rebuilt from the next packet's in-band FEC so far on a remote track (0 for
    any other track)."""
    return int(getattr(track, "_epc_recovered", 0))


class _AudioPath:
    """One audio receiver's AudioBuffer and its timer."""

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self.receiver = receiver
        self.task: asyncio.Task[None] | None = None
        self.buffer = AudioBuffer(self._deliver, self._conceal, self._recover, self._has_fec)
        receiver._epc_path = self  # type: ignore[attr-defined]
        # rtcrtpreceiver.py:295: JitterBuffer(capacity=16, prefetch=4), which drops packets
        # it received once 16 pile up behind a hole (smart_remove, jitterbuffer.py:53).
        receiver._RTCRtpReceiver__jitter_buffer = self.buffer  # type: ignore[attr-defined]

    def seen(self, packet: RtpPacket) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())

    def _deliver(self, frame: JitterFrame, packet: RtpPacket) -> None:
        _decode(self.receiver, frame, packet)

    def _opus(self, packet: RtpPacket) -> bool:
        codecs: dict[int, Any] = self.receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        codec = codecs.get(packet.payload_type)
        return codec is not None and codec.mimeType.lower() == "audio/opus"

    def _has_fec(self, packet: RtpPacket) -> bool:
        return self._opus(packet) and aiortc_opus.has_fec(packet._data)  # type: ignore[attr-defined]

    def _count(self, name: str) -> None:
        track = self.receiver._track
        if track is not None:
            setattr(track, name, int(getattr(track, name, 0)) + 1)

    def _conceal(self, previous: RtpPacket, timestamp: int, samples: int) -> None:
        frame: JitterFrame
        if self._opus(previous):  # aiortc_opus.FecOpusDecoder: libopus conceals
            frame = aiortc_opus.LostFrame(b"", timestamp, samples, fec=False)
        else:  # another codec has no concealment: the packet before, again, in the slot
            frame = JitterFrame(data=previous._data, timestamp=timestamp)  # type: ignore[attr-defined]
        if _decode(self.receiver, frame, previous):
            self._count("_epc_concealed")

    def _recover(self, following: RtpPacket, timestamp: int, samples: int) -> None:
        data = following._data  # type: ignore[attr-defined]
        frame = aiortc_opus.LostFrame(data, timestamp, samples, fec=True)
        if _decode(self.receiver, frame, following):
            self._count("_epc_recovered")

    async def _run(self) -> None:
        receiver = self.receiver
        with contextlib.suppress(asyncio.CancelledError):
            while receiver._RTCRtpReceiver__decoder_thread is not None:  # type: ignore[attr-defined]
                await asyncio.sleep(TICK_S)
                self.buffer.tick(time.monotonic())


def _decode(receiver: RTCRtpReceiver, frame: JitterFrame, packet: RtpPacket) -> bool:
    """Queue one encoded frame for the receiver's decoder, as rtcrtpreceiver.py:562-567 does."""
    if receiver._RTCRtpReceiver__decoder_thread is None:  # type: ignore[attr-defined]
        return False
    codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    codec = codecs.get(packet.payload_type)
    if codec is None:
        return False
    mapper = receiver._RTCRtpReceiver__timestamp_mapper  # type: ignore[attr-defined]
    frame.timestamp = mapper.map(frame.timestamp)
    receiver._RTCRtpReceiver__decoder_queue.put((codec, frame))  # type: ignore[attr-defined]
    return True


_drain_installed: list[bool] = []


def install_drain() -> None:
    """Have aioice's protocols read every datagram already waiting on their socket, not one
    per turn of the event loop (see the module docstring), once. Installed after
    peers/aiortc_rate.py's kernel stamps, which it calls for each datagram."""
    if _drain_installed:
        return
    _drain_installed.append(True)
    inner = StunProtocol.datagram_received

    def datagram_received(self: StunProtocol, data: bytes | str, addr: tuple[Any, ...]) -> None:
        inner(self, data, addr)
        # asyncio's transport keeps its socket in ``_sock`` (selector_events.py); the public
        # ``get_extra_info("socket")`` refuses ``recvfrom``.
        sock = getattr(self.transport, "_sock", None) if DRAIN else None
        for _ in range(DRAIN_MAX - 1):
            if sock is None or self.transport.is_closing():
                return
            try:
                data, addr = sock.recvfrom(self.transport.max_size)  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # what asyncio's _read_ready hands the protocol
                self.error_received(exc)
                return
            inner(self, data, addr)

    # aioice ice.py:284, called by asyncio for each datagram it reads.
    StunProtocol.datagram_received = datagram_received  # type: ignore[method-assign]
