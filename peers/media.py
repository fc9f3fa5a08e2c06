"""Media sources and sinks of the peers.

Sources: the camera and microphone where they exist, else a generated test
pattern and a tone. The pattern stamps every frame with its send time and a
counter, drawn as large black and white blocks that survive VP8 and H.264, so
the receiver can measure glass-to-glass latency and prove that the frames it
decodes are the ones that were sent.

Sinks: ``Receiver`` counts what arrives (frames, resolution, first-frame time,
latency from the stamps) and can record it to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaPlayer, MediaRecorder
from aiortc.mediastreams import AUDIO_PTIME, AudioStreamTrack, MediaStreamError, VideoStreamTrack
from av import AudioFrame, VideoFrame

from peers import aiortc_receive
from peers.errors import MediaError

logger = logging.getLogger(__name__)

# The stamp: 64 bits in 4 rows of 16 blocks across the top of the frame.
STAMP_COLUMNS, STAMP_ROWS = 16, 4
STAMP_BITS = STAMP_COLUMNS * STAMP_ROWS
COUNTER_BITS, TIME_BITS, CHECK_BITS = 20, 36, 8
TIME_MASK = (1 << TIME_BITS) - 1

FREEZE_MEAN_OF = 30
FREEZE_MIN_GAPS = 5
WARMUP_S = 2.0  # the first keyframe's own delay is not "behind"

CAMERA = Path("/dev/video0")
MICROPHONE = Path("/dev/snd/pcmC0D0c")


# -- the stamp ---------------------------------------------------------------------------


def _check(value: int) -> int:
    total = 0
    for shift in range(0, COUNTER_BITS + TIME_BITS, 8):
        total ^= (value >> shift) & 0xFF
    return total ^ 0xA5


def stamp_bits(counter: int, millis: int) -> int:
    """The 64 bits of one stamp: counter, time (ms, wrapped), check byte."""
    value = (counter & ((1 << COUNTER_BITS) - 1)) | ((millis & TIME_MASK) << COUNTER_BITS)
    return value | (_check(value) << (COUNTER_BITS + TIME_BITS))


def read_stamp(frame: VideoFrame) -> tuple[int, int] | None:
    """(counter, send time in ms, wrapped) from a decoded frame, or None if unstamped."""
    width, height = frame.width, frame.height
    block_w, block_h = width // STAMP_COLUMNS, height // 4 // STAMP_ROWS
    if block_w < 4 or block_h < 4:
        return None
    plane = frame.planes[0] if frame.format.name in {"yuv420p", "yuvj420p", "gray"} else None
    if plane is None:
        frame = frame.reformat(format="gray")
        plane = frame.planes[0]
    luma, stride = bytes(plane), plane.line_size
    value = 0
    for bit in range(STAMP_BITS):
        row, column = divmod(bit, STAMP_COLUMNS)
        y = row * block_h + block_h // 2
        x = column * block_w + block_w // 2
        if luma[y * stride + x] > 128:
            value |= 1 << bit
    payload = value & ((1 << (COUNTER_BITS + TIME_BITS)) - 1)
    if value >> (COUNTER_BITS + TIME_BITS) != _check(payload):
        return None
    return payload & ((1 << COUNTER_BITS) - 1), payload >> COUNTER_BITS


def latency_ms(sent_millis: int, now: float | None = None) -> float:
    """Milliseconds from a stamp's (wrapped) send time to ``now`` (wall clock)."""
    now_ms = (time.time() if now is None else now) * 1000
    return (now_ms - sent_millis) % (1 << TIME_BITS) if now_ms >= 0 else math.nan


# -- generated sources -----------------------------------------------------------------------


class PatternTrack(VideoStreamTrack):
    """A moving test pattern, each frame stamped with its send time and counter."""

    def __init__(self, width: int, height: int, fps: int) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self.counter = 0
        self._begin: float | None = None
        self._time_base = fractions.Fraction(1, 90_000)
        self._background = [bytes([16 + (x * 200 // width) for x in range(width)])]

    async def recv(self) -> VideoFrame:
        if self._begin is None:
            self._begin = time.monotonic()
        due = self._begin + self.counter / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = self._draw(self.counter, int(time.time() * 1000))
        frame.pts = int(self.counter * 90_000 / self.fps)
        frame.time_base = self._time_base
        self.counter += 1
        return frame

    def _draw(self, counter: int, millis: int) -> VideoFrame:
        width, height = self.width, self.height
        bits = stamp_bits(counter, millis)
        block_w, block_h = width // STAMP_COLUMNS, height // 4 // STAMP_ROWS
        rows = []
        for row in range(STAMP_ROWS):
            line = b"".join(
                (b"\xeb" if bits >> (row * STAMP_COLUMNS + column) & 1 else b"\x10") * block_w
                for column in range(STAMP_COLUMNS)
            ).ljust(width, b"\x80")
            rows.append(line * block_h)
        stamp = b"".join(rows)
        # Below the stamp: a gradient with a bar that moves one step per frame.
        bar = (counter * 4) % width
        body = bytearray(self._background[0])
        body[bar : bar + 8] = b"\xeb" * len(body[bar : bar + 8])
        image = stamp + bytes(body) * (height - len(stamp) // width)
        gray = VideoFrame(width, height, "gray")
        gray.planes[0].update(image)
        return gray.reformat(format="yuv420p")


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone pulsed 4 times a second, as syllables are, 48 kHz mono, in 20 ms frames.

    Pulsed because a steady tone is taken for noise by libopus's voice activity
    detection within half a second, after which the encoder sends no in-band
    FEC (0 of 450 packets); pulsed, 84 % of its packets carry FEC, as speech's do.
    """

    RATE, FREQUENCY, PULSES = 48_000, 440, 4

    def __init__(self) -> None:
        super().__init__()
        samples = int(self.RATE * AUDIO_PTIME)
        period = [  # one pulse: 440 Hz repeats every 1/4 s at 48 kHz (110 periods)
            int(
                8000
                * math.sin(2 * math.pi * self.FREQUENCY * n / self.RATE)
                * (0.5 - 0.5 * math.cos(2 * math.pi * self.PULSES * n / self.RATE))
            )
            for n in range(self.RATE // self.PULSES)
        ]
        self._period = len(period)
        # s16 little-endian, twice over: a frame is one slice, wherever in the pulse it starts.
        self._pcm = b"".join(s.to_bytes(2, "little", signed=True) for s in period) * 2
        self._samples = samples
        self._pts = 0
        self._begin: float | None = None
        self._time_base = fractions.Fraction(1, self.RATE)

    async def recv(self) -> AudioFrame:
        if self._begin is None:
            self._begin = time.monotonic()
        due = self._begin + self._pts / self.RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        return self._next()

    def due_frames(self, limit: int) -> list[AudioFrame]:
        """The frames whose time has come (at most ``limit``), at once: what a microphone's
        buffer holds after the reader was held up. ``recv`` would hand them out one per turn
        of the event loop; the audio sender takes them all in one (peers/aiortc_opus.py)."""
        frames: list[AudioFrame] = []
        now = time.monotonic()
        while (
            self._begin is not None
            and len(frames) < limit
            and self._begin + self._pts / self.RATE <= now
        ):
            frames.append(self._next())
        return frames

    def _next(self) -> AudioFrame:
        offset = 2 * (self._pts % self._period)
        frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(self._pcm[offset : offset + 2 * self._samples])
        frame.sample_rate = self.RATE
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += self._samples
        return frame


@dataclass
class Sources:
    video: MediaStreamTrack | None
    audio: MediaStreamTrack | None
    players: list[MediaPlayer] = field(default_factory=list)
    description: str = ""

    def stop(self) -> None:
        for track in (self.video, self.audio):
            if track is not None:
                track.stop()


def open_sources(video: str, audio: str, width: int, height: int, fps: int) -> Sources:
    """The tracks to send for ``--video`` and ``--audio`` (see the CLI's help)."""
    sources = Sources(None, None)
    names = []
    choice = video
    if choice == "auto":
        choice = "camera" if CAMERA.exists() else "pattern"
    if choice == "pattern":
        sources.video = PatternTrack(width, height, fps)
    elif choice != "none":
        device = str(CAMERA) if choice == "camera" else choice
        options = {"video_size": f"{width}x{height}", "framerate": str(fps)}
        player = _player("--video", device, "v4l2" if device.startswith("/dev/") else None, options)
        sources.video = player.video
        sources.players.append(player)
    names.append(f"video={choice}")
    choice = audio
    if choice == "auto":
        choice = "mic" if MICROPHONE.exists() else "tone"
    if choice == "tone":
        sources.audio = ToneTrack()
    elif choice != "none":
        if choice == "mic":
            player = _player("--audio", "default", "pulse", {})
        else:
            player = _player("--audio", choice, None, {})
        sources.audio = player.audio
        sources.players.append(player)
    names.append(f"audio={choice}")
    sources.description = " ".join(names)
    return sources


def _player(flag: str, source: str, fmt: str | None, options: dict[str, str]) -> MediaPlayer:
    try:
        return MediaPlayer(source, format=fmt, options=options)
    except Exception as exc:  # av raises many kinds; each one means "cannot open it"
        raise MediaError(f"{flag} {source}: cannot open it ({exc})") from exc


# -- what arrives ------------------------------------------------------------------------------


def is_freeze(gap: float, recent: Sequence[float]) -> bool:
    """Chromium's rule (video_quality_observer2.cc): ``recent`` are the last gaps, ``gap`` last."""
    mean = sum(recent) / len(recent)
    return len(recent) >= FREEZE_MIN_GAPS and gap >= max(3 * mean, mean + 0.150)


def frozen_seconds(gaps: Sequence[float]) -> float:
    """Seconds frozen among these gaps between frames shown, as Received counts them."""
    return sum(
        gap
        for i, gap in enumerate(gaps)
        if is_freeze(gap, gaps[max(0, i + 1 - FREEZE_MEAN_OF) : i + 1])
    )


@dataclass
class Received:
    """Counters of one direction's received media."""

    video_frames: int = 0
    audio_frames: int = 0
    width: int = 0
    height: int = 0
    first_video: float | None = None  # time.monotonic() of the first decoded video frame
    first_audio: float | None = None
    stamped: int = 0
    counters: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # monotonic times of recent video frames
    # What a viewer feels, by the W3C webrtc-stats definition of a freeze: a gap between
    # two frames of at least max(3 x the mean gap, the mean gap + 150 ms), the mean over
    # the last FREEZE_MEAN_OF gaps, this one included.
    freezes: int = 0
    frozen_s: float = 0.0
    longest_gap_s: float = 0.0
    gaps: list[float] = field(default_factory=list)
    # Time behind real time: a frame's stamped latency above the best seen in this call.
    best_latency_ms: float | None = None
    behind_ms: float = 0.0  # of the last stamped frame
    max_behind_ms: float = 0.0  # over the frames after the first WARMUP_S of video
    # (monotonic arrival, latency ms, counter) of the recent stamped frames
    history: deque[tuple[float, float, int]] = field(default_factory=lambda: deque(maxlen=5000))
    last_video: float | None = None
    # Audio: frames never played (gaps in the decoded timestamps), frames made up for lost
    # packets (peers/aiortc_receive.py conceals up to 200 ms in a row) and, not counted as
    # concealed (as Chromium counts them), lost frames rebuilt from the next packet's FEC.
    audio_missing: int = 0
    audio_concealed: int = 0
    audio_recovered: int = 0
    audio_pts: int | None = None  # where the next audio frame should start

    def _audio(self, frame: AudioFrame, concealed: int, recovered: int = 0) -> None:
        self.audio_concealed = concealed
        self.audio_recovered = recovered
        if frame.pts is None:
            return
        if self.audio_pts is not None and frame.pts > self.audio_pts and frame.samples:
            self.audio_missing += round((frame.pts - self.audio_pts) / frame.samples)
        self.audio_pts = max(self.audio_pts or 0, frame.pts + frame.samples)

    def audio_expected(self) -> int:
        """Frames due so far: received, plus missing, less those concealed (not due twice)."""
        return self.audio_frames + self.audio_missing

    def _video_gap(self, now: float) -> None:
        last, self.last_video = self.last_video, now
        if last is None:
            return
        gap = now - last
        self.longest_gap_s = max(self.longest_gap_s, gap)
        # As Chromium counts them (video_quality_observer2.cc, getStats' freezeCount): the gap
        # is in the mean it is judged against, and nothing is judged before 5 gaps.
        self.gaps.append(gap)
        del self.gaps[:-FREEZE_MEAN_OF]
        if is_freeze(gap, self.gaps):
            self.freezes += 1
            self.frozen_s += gap

    def _stamped(self, now: float, latency: float, counter: int) -> None:
        if self.best_latency_ms is None or latency < self.best_latency_ms:
            self.best_latency_ms = latency
        self.behind_ms = latency - self.best_latency_ms
        if self.first_video is not None and now - self.first_video >= WARMUP_S:
            self.max_behind_ms = max(self.max_behind_ms, self.behind_ms)
        self.history.append((now, latency, counter))

    def behind_p95_ms(self) -> float:
        """The 95th percentile of how far behind the best delay the recent stamped frames were."""
        if self.best_latency_ms is None or not self.history:
            return 0.0
        ordered = sorted(latency for _, latency, _ in self.history)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] - self.best_latency_ms

    def fps(self, now: float, seconds: float = 2.0) -> float:
        recent = [t for t in self.window if t > now - seconds]
        self.window = recent
        return len(recent) / seconds

    def latency_summary(self) -> dict[str, float] | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return {
            "p50": round(statistics.median(ordered), 1),
            "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 1),
        }


RECORD_VIDEO_WAIT_S = 10.0  # a recording's audio waits this long for its first video frame


class Receiver:
    """Consumes the remote tracks: counts, decodes stamps, records if asked."""

    def __init__(self, record_to: Path | None = None) -> None:
        self.received = Received()
        self.record_to = record_to
        self.recorder: MediaRecorder | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.tees: list[_Tee] = []
        self.first_frame = asyncio.Event()
        self._counted = asyncio.Event()  # set after every frame counted

    def add(self, track: MediaStreamTrack) -> None:
        if self.record_to is not None:
            if self.recorder is None:
                self.recorder = MediaRecorder(str(self.record_to))
            tee = _Tee(track, self)
            self.tees.append(tee)
            self.recorder.addTrack(tee)
            return
        self.tasks.append(asyncio.create_task(self._consume(track)))

    async def start(self) -> None:
        if self.recorder is not None:
            if any(tee.kind == "video" for tee in self.tees):
                for tee in self.tees:
                    if tee.kind == "audio":
                        tee.after = self.first_frame
            await self.recorder.start()

    async def _consume(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                self.count(await track.recv(), track)

    async def frames(self, video: int = 1, audio: int = 0) -> Received:
        """Wait until at least ``video`` video and ``audio`` audio frames have arrived."""
        got = self.received
        while got.video_frames < video or got.audio_frames < audio:
            self._counted.clear()
            await self._counted.wait()
        return got

    def count(self, frame: Any, track: MediaStreamTrack | None = None) -> None:
        now = time.monotonic()
        got = self.received
        self._counted.set()
        if isinstance(frame, VideoFrame):
            got.video_frames += 1
            got.width, got.height = frame.width, frame.height
            got.window.append(now)
            if got.first_video is None:
                got.first_video = now
                self.first_frame.set()
            got._video_gap(now)
            stamp = read_stamp(frame)
            if stamp is not None:
                got._stamped(now, latency_ms(stamp[1]), stamp[0])
                got.stamped += 1
                got.counters.append(stamp[0])
                got.latencies_ms.append(got.history[-1][1])
                del got.counters[:-1000]
                del got.latencies_ms[:-5000]
        else:
            got.audio_frames += 1
            if got.first_audio is None:
                got.first_audio = now
            if isinstance(frame, AudioFrame):
                got._audio(frame, aiortc_receive.concealed(track), aiortc_receive.recovered(track))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()
        if self.recorder is not None:
            await self.recorder.stop()
            self.recorder = None


class _Tee(MediaStreamTrack):
    """Passes a track's frames to a recorder, counting them on the way.

    An audio tee of a recording with video holds its first frame until the first video frame
    went through (``after``), ``RECORD_VIDEO_WAIT_S`` at most: aiortc's ``MediaRecorder`` sizes
    the video stream from its first frame (contrib/media.py:506-511), and an audio packet
    muxed before it opens the container's codecs, the video one at its default 640x480; the
    first video frame then fails ("Cannot change width after codec is open"), which ends the
    recorder's video task silently: a recording with no video at all. Which stream came first
    was a race (4 recordings of 6 lost their video when the video's first frame came a little
    later than the audio's).
    """

    def __init__(self, track: MediaStreamTrack, receiver: Receiver) -> None:
        super().__init__()
        self.kind = track.kind
        self.track = track
        self.receiver = receiver
        self.after: asyncio.Event | None = None

    async def recv(self) -> Any:
        frame = await self.track.recv()
        self.receiver.count(frame, self.track)
        if self.after is not None and not self.after.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECORD_VIDEO_WAIT_S):
                    await self.after.wait()
        return frame
