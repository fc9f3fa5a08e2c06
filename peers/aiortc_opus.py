"""The receiver's Opus decoder, with libopus's in-band FEC and loss concealment (imported by
peers/aiortc_receive.py); and the audio sender's catch-up after its event loop was held up.

A sibling of ``aiortc_receive`` (which installs it; ``check_versions()`` still
guards it). Against aiortc 1.16.0, ``OpusDecoder`` (codecs/opus.py:17-29),
which ``get_decoder`` (codecs/__init__.py:153-154) hands the receiver's decoder
thread (rtcrtpreceiver.py:72), decodes through FFmpeg's ``libopus`` decoder:
it has neither in-band FEC decoding (``opus_decode`` with ``decode_fec=1`` on
the packet after a loss) nor libopus's own loss concealment (``opus_decode``
with no data), and av 18.1 exposes neither. ``FecOpusDecoder`` takes its
place for Opus: one libopus decoder state per stream, through ``opuslib_next``
(ctypes on Debian's ``libopus0``), so that packets, FEC recoveries and
concealments are decoded in order on the state that decodes the stream, as
libopus requires. Its frames are the ones aiortc's decoder gives (s16 stereo
48 kHz, ``pts`` the RTP timestamp, ``time_base`` 1/48000).

The receive path asks for a lost packet with a ``LostFrame`` in its slot:
with the next packet's bytes when that packet carries FEC (``has_fec``: its
SILK layer's LBRR flag), else with none, for libopus's concealment.

Why opuslib-next and not opuslib 3.0.1 (2018): the latter's ``is not 0``
(api/decoder.py:73) is a SyntaxWarning since Python 3.8, an import error under
the project's ``filterwarnings = error`` wherever its bytecode is not cached.
And its ``decode()`` copies the PCM through a Python list (about 240 us per
20 ms frame here, more than the decoding): this module calls the binding's own
``libopus_decode`` (its ctypes prototype) into one buffer per decoder instead.

Upstream, ``OpusDecoder`` would decode with libopus directly and take a lost
frame (FEC or concealment) from the jitter buffer.

The audio sender (``install_sender``): aiortc 1.16's ``RTCRtpSender._next_encoded_frame``
(rtcrtpsender.py:298 and :318-320) reads one frame from the track, computes its audio
level on the event loop (rtp.py:314, a Python loop over the samples: 60-100 us a frame
here) and encodes it as one executor job, so each 20 ms frame costs the sender several
turns of the loop (the track's sleep, the job's completion, the task's wake-up). On a
loaded machine a turn waits for a CPU (10 ms and more at load 10-20): the sender then
reads fewer than 50 frames a second and falls behind real time for good, however little
CPU the audio itself needs; the video sender, at 15-30 frames a second, still keeps up
(docs/benchmarks.md, "Audio when the event loop is slow"). Here a track that can say
which of its frames are already due (``due_frames(limit)``, as a microphone's buffer
holds what came while the reader was held up; ``peers.media.ToneTrack``) has them all
read, leveled and encoded in one executor job, at most ``CATCH_UP_FRAMES``, and sent one
per call without waiting: one round of turns per batch, not per frame. A track without
``due_frames`` goes aiortc's way. Upstream, ``MediaStreamTrack`` would have a way to read
what is already buffered, and the sender would use it.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fractions
import logging
from typing import Any

from aiortc import rtcrtpreceiver, rtcrtpsender, rtp
from aiortc.codecs import get_decoder as aiortc_get_decoder
from aiortc.codecs.base import Decoder, Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpsender import RTCEncodedFrame, RTCRtpSender
from av import AudioFrame
from av.frame import Frame
from opuslib_next.api import c_int16_pointer, libopus  # type: ignore[import-untyped]
from opuslib_next.api import decoder as binding

__all__ = [
    "CATCH_UP_FRAMES",
    "CHANNELS",
    "MAX_SAMPLES",
    "SAMPLE_RATE",
    "FecOpusDecoder",
    "LostFrame",
    "fec_samples",
    "has_fec",
    "install",
    "install_sender",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
CHANNELS = 2  # as aiortc's decoder: stereo whatever was sent (codecs/opus.py:21)
MAX_SAMPLES = 5760  # 120 ms, the longest Opus packet
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
SILK_FRAME = 960  # 20 ms at 48 kHz
CATCH_UP_FRAMES = 25  # frames read and encoded in one job at most (0.5 s of 20 ms frames)
CATCH_UP = True  # off: aiortc's one frame per job (bench/slowloop.py's "today")


class LostFrame(JitterFrame):
    """A lost packet's slot: ``samples`` at ``timestamp``, rebuilt from the next packet's FEC
    (``data``, when ``fec``) or concealed by libopus (no data)."""

    def __init__(self, data: bytes, timestamp: int, samples: int, *, fec: bool) -> None:
        super().__init__(data=data, timestamp=timestamp)
        self.samples = samples
        self.fec = fec


# libopus's own packet parser (RFC 6716 3.2, every frame-count code, padding included):
# int opus_packet_parse(const unsigned char *data, opus_int32 len, unsigned char *out_toc,
#                       const unsigned char *frames[48], opus_int16 size[48], int *payload_offset)
_packet_parse = libopus.opus_packet_parse
_packet_parse.argtypes = (
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_int16),
    ctypes.c_void_p,
)
_packet_parse.restype = ctypes.c_int
MAX_FRAMES = 48  # an Opus packet's most frames (RFC 6716 3.2.5)


def _first_frame(packet: bytes) -> bytes:
    """The first Opus frame of a packet, empty if libopus finds the packet malformed."""
    data = (ctypes.c_ubyte * len(packet)).from_buffer_copy(packet)
    frames = (ctypes.c_void_p * MAX_FRAMES)()
    sizes = (ctypes.c_int16 * MAX_FRAMES)()
    if _packet_parse(data, len(packet), None, frames, sizes, None) < 1 or frames[0] is None:
        return b""
    offset = frames[0] - ctypes.addressof(data)
    return packet[offset : offset + sizes[0]]


def has_fec(packet: bytes) -> bool:
    """Whether an Opus packet carries in-band FEC for the packet before it: a SILK or hybrid
    packet whose first frame has its LBRR flag set (RFC 6716 4.2.3; libopus 1.5's
    ``opus_packet_has_lbrr``, which Debian's libopus 1.3 lacks; the first frame from libopus's
    ``opus_packet_parse``, which 1.3 has)."""
    if len(packet) < 2:
        return False
    config = packet[0] >> 3
    if config >= 16:  # CELT only: no SILK layer, no LBRR
        return False
    samples = (480, 960, 1920, 2880)[config % 4] if config < 12 else (480, 960)[config % 2]
    frames = max(1, samples // SILK_FRAME)  # SILK frames of 20 ms in an Opus frame
    first = _first_frame(packet)
    if not first:
        return False
    # The first bits of the range coder: each SILK frame's VAD flag, then the LBRR flag, for
    # the mid channel, then the same for the side channel of a stereo packet.
    lbrr = (first[0] >> (7 - frames)) & 1
    if packet[0] & 0x4:
        lbrr |= (first[0] >> (6 - 2 * frames)) & 1
    return bool(lbrr)


def fec_samples(step: int) -> int:
    """The duration (samples at 48 kHz) to rebuild or conceal for a slot ``step`` long: libopus
    takes multiples of 2.5 ms up to 120 ms; anything else is taken for 20 ms."""
    return step if 0 < step <= MAX_SAMPLES and step % 120 == 0 else SILK_FRAME


class FecOpusDecoder(Decoder):
    """One stream's libopus decoder: packets, FEC recoveries and concealments on one state."""

    def __init__(self) -> None:
        self._binding: Any = binding  # kept for __del__, which may run at interpreter exit
        self._state: Any = binding.create_state(SAMPLE_RATE, CHANNELS)
        self._pcm = (ctypes.c_int16 * (MAX_SAMPLES * CHANNELS))()
        self._out = ctypes.cast(self._pcm, c_int16_pointer)
        self.errors = 0

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            self._state = None
            self._binding.destroy(state)

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        data: bytes | None = encoded_frame.data
        frame_size, fec = MAX_SAMPLES, 0
        if isinstance(encoded_frame, LostFrame):
            frame_size = encoded_frame.samples
            fec = int(encoded_frame.fec)
            data = encoded_frame.data if fec else None  # no data: libopus conceals
        samples = self._binding.libopus_decode(
            self._state, data, len(data) if data else 0, self._out, frame_size, fec
        )
        if samples < 0:
            self.errors += 1
            logger.warning(
                "Opus packet at %s not decoded: libopus error %s", encoded_frame.timestamp, samples
            )
            return []
        if not samples:
            return []
        frame = AudioFrame(format="s16", layout="stereo", samples=samples)
        frame.planes[0].update(ctypes.string_at(self._pcm, samples * CHANNELS * 2))
        frame.sample_rate = SAMPLE_RATE
        frame.pts = encoded_frame.timestamp
        frame.time_base = TIME_BASE
        return [frame]


_installed: list[bool] = []


def install() -> None:
    """Have each receiver's decoder thread decode Opus with ``FecOpusDecoder`` (once)."""
    if _installed:
        return
    _installed.append(True)

    def get_decoder(codec: Any) -> Decoder:
        if codec.mimeType.lower() == "audio/opus":
            return FecOpusDecoder()
        return aiortc_get_decoder(codec)

    # rtcrtpreceiver.py:16 imports get_decoder; its decoder thread calls it at :72.
    rtcrtpreceiver.get_decoder = get_decoder  # type: ignore[attr-defined]


def encode_frames(encoder: Encoder, frames: list[Any]) -> list[RTCEncodedFrame]:
    """``frames`` encoded in order as aiortc's sender encodes one (rtcrtpsender.py:313-330):
    its audio level (rtp.py:314) and the encoder's payloads; none for what the encoder
    buffered."""
    encoded = []
    for frame in frames:
        level = rtp.compute_audio_level_dbov(frame)
        payloads, timestamp = encoder.encode(frame, False)
        if payloads:
            encoded.append(RTCEncodedFrame(payloads, timestamp, level))
    return encoded


_sender_installed: list[bool] = []


def install_sender() -> None:
    """Have an audio sender read, encode and send the frames its track has already due in one
    go (``due_frames``; see the module docstring), once."""
    if _sender_installed:
        return
    _sender_installed.append(True)
    original = RTCRtpSender._next_encoded_frame

    async def _next_encoded_frame(self: RTCRtpSender, codec: Any) -> RTCEncodedFrame | None:
        track = self._RTCRtpSender__track  # type: ignore[attr-defined]
        due = getattr(track, "due_frames", None)
        if self.kind != "audio" or due is None or not CATCH_UP:
            return await original(self, codec)
        pending: collections.deque[RTCEncodedFrame] = self.__dict__.setdefault(
            "_epc_encoded", collections.deque()
        )
        if pending:  # encoded with the frame before: sent on this turn, no wait
            return pending.popleft()
        # rtcrtpsender.py:298: one frame; here the ones already due with it.
        frames = [await track.recv(), *due(CATCH_UP_FRAMES - 1)]
        if not self._enabled:  # rtcrtpsender.py:303: read and dropped
            return None
        encoder = self._RTCRtpSender__encoder  # type: ignore[attr-defined]
        if encoder is None:  # rtcrtpsender.py:308-309
            encoder = self._RTCRtpSender__encoder = rtcrtpsender.get_encoder(codec)  # type: ignore[attr-defined]
        # rtcrtpsender.py:314-320: the level and the encode of one frame, each frame's here.
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(None, encode_frames, encoder, frames)
        pending.extend(encoded[1:])
        return encoded[0] if encoded else None

    # rtcrtpsender.py:294, called by _run_rtp for each frame (rtcrtpsender.py:371).
    RTCRtpSender._next_encoded_frame = _next_encoded_frame  # type: ignore[method-assign]
