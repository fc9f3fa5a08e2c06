"""The receiver's Opus decode cost per 20 ms frame: aiortc's decoder against FecOpusDecoder.

    .venv/bin/python -m bench.opus                 # 3 rounds of 10 s of the patient's tone
    .venv/bin/python -m bench.opus --rounds 5

The patient's tone (peers/media.py) is encoded once as the sender encodes it
(peers/aiortc_patches.opus_settings), then decoded, in alternating rounds in one
process, by aiortc 1.16's ``OpusDecoder`` (FFmpeg's libopus) and by
``peers/aiortc_opus.FecOpusDecoder`` (Debian's libopus through opuslib-next):
every packet; and every 10th packet lost, rebuilt from the next one's FEC or
concealed. Printed: microseconds of CPU per frame (thread time, so that other
processes on the shared machine count less), the median of the rounds, and
the ratio to aiortc's. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable

from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame

from peers import aiortc_opus, aiortc_patches
from peers.media import ToneTrack

FRAMES = 500  # 10 s of 20 ms packets


def tone_packets(frames: int) -> list[tuple[bytes, int]]:
    """``frames`` of the patient's tone as the sender encodes them (no waiting for real time)."""
    aiortc_patches.opus_settings()
    encoder, tone = OpusEncoder(), ToneTrack()
    tone._begin = time.monotonic() - 3600  # every frame already due
    loop = asyncio.new_event_loop()
    packets: list[tuple[bytes, int]] = []
    try:
        for _ in range(frames):
            payloads, timestamp = encoder.encode(loop.run_until_complete(tone.recv()))
            packets += [(payload, timestamp) for payload in payloads]
    finally:
        loop.close()
    return packets


def every_packet(packets: list[tuple[bytes, int]]) -> list[JitterFrame]:
    return [JitterFrame(payload, timestamp) for payload, timestamp in packets]


def tenth_lost(packets: list[tuple[bytes, int]], recover: bool) -> list[JitterFrame]:
    """Every 10th packet lost: rebuilt from the next one's FEC (``recover``) or concealed."""
    out: list[JitterFrame] = []
    for i, (payload, timestamp) in enumerate(packets[:-1]):
        if i % 10 == 5:
            following = packets[i + 1][0]
            fec = recover and aiortc_opus.has_fec(following)
            out.append(aiortc_opus.LostFrame(following if fec else b"", timestamp, 960, fec=fec))
        else:
            out.append(JitterFrame(payload, timestamp))
    return out


def cost_us(make: Callable[[], object], frames: list[JitterFrame]) -> float:
    """Thread CPU microseconds per frame to decode ``frames`` with a new decoder."""
    decoder = make()
    decode = decoder.decode  # type: ignore[attr-defined]
    start = time.thread_time()
    for frame in frames:
        decode(frame)
    return (time.thread_time() - start) / len(frames) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.opus", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each decoder")
    args = parser.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores shared)")
    packets = tone_packets(FRAMES)
    ours = aiortc_opus.FecOpusDecoder
    cases: list[tuple[str, Callable[[], object], list[JitterFrame]]] = [
        ("aiortc OpusDecoder, every packet", OpusDecoder, every_packet(packets)),
        ("FecOpusDecoder, every packet", ours, every_packet(packets)),
        ("FecOpusDecoder, 1 in 10 lost, FEC", ours, tenth_lost(packets, recover=True)),
        ("FecOpusDecoder, 1 in 10 lost, PLC", ours, tenth_lost(packets, recover=False)),
    ]
    figures: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):  # alternating, so that each sees the same load
        for name, make, frames in cases:
            figures[name].append(cost_us(make, frames))
    base = statistics.median(figures[cases[0][0]])
    print(f"{len(packets)} packets of 20 ms, {args.rounds} rounds; us of CPU per frame")
    for name, values in figures.items():
        median = statistics.median(values)
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"  {name:36s} {median:6.0f} us ({spread})  x{median / base:.2f}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
