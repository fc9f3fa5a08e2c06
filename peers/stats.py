"""What a seat reports: the periodic stats line and the ``--stats-json`` summary.

The line, logged every few seconds while a call is up::

    call 1: stats: path host -> host over udp; video in 640x480 29.9 fps; bitrate in 1203 kbit/s
    out 1187 kbit/s; rtt 2 ms; packets lost 3 (fec rebuilt 2); freezes 1 (0.4 s); behind 12 ms;
    audio missing 0 concealed 1 recovered 3; sending 640x480 at 500 kbit/s

The summary (JSON, written by the command line at exit) speaks of the last
call: its ICE path, time to first frame, frames, resolution, latency from the
stamps, what a user felt (``media_summary``: freezes by the W3C definition,
their total, the longest gap, time behind the call's best delay from the
stamps, video packets rebuilt from ULPFEC, audio frames missing, concealed and recovered from
FEC) and what this side sends (size and target bitrate of its VP8 encoder); and of the seat:
calls started, relay reconnections, why it exited, each recovery of a lost path
(``recoveries``: ``at_s`` since the start, ``outage_ms`` from the last byte received to the
first frame again, ``method`` "same-path" or "new-connection") and the video frames of each
call in turn (``video_per_call``: ``frames``, ``stamped``, ``in_order``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCRemoteOutboundRtpStreamStats,
)

from peers import aiortc_receive, aiortc_send
from peers.call import Call
from peers.seat import Seat

__all__ = ["STATS_EVERY_S", "StatsLine", "log_stats", "media_summary", "summary"]

logger = logging.getLogger(__name__)

STATS_EVERY_S = 5.0


class StatsLine:
    """The stats line of one call after another; bitrates against the previous sample."""

    def __init__(self) -> None:
        self._call: Call | None = None
        self._prev: tuple[float, int, int] | None = None

    async def line(self, call: Call) -> str:
        if call is not self._call:
            self._call, self._prev = call, None
        report = await call.pc.getStats()
        now = time.monotonic()
        received, sent, lost, rtt = 0, 0, 0, None
        for stat in report.values():
            if isinstance(stat, RTCOutboundRtpStreamStats):
                sent += stat.bytesSent
            elif isinstance(stat, RTCRemoteOutboundRtpStreamStats):
                received += stat.bytesSent  # what the other side reports having sent us
            elif isinstance(stat, RTCInboundRtpStreamStats):
                lost += max(0, stat.packetsLost)
            elif isinstance(stat, RTCRemoteInboundRtpStreamStats) and stat.kind == "video":
                rtt = stat.roundTripTime
        prev, self._prev = self._prev, (now, received, sent)
        bitrate = "bitrate -"  # the first line has no earlier sample to compare with
        if prev is not None and now > prev[0]:
            rate_in = (received - prev[1]) * 8 / (now - prev[0]) / 1000
            rate_out = (sent - prev[2]) * 8 / (now - prev[0]) / 1000
            bitrate = f"bitrate in {rate_in:.0f} kbit/s out {rate_out:.0f} kbit/s"
        got = call.receiver.received
        path = call.path
        rtt_text = f"{rtt * 1000:.0f} ms" if rtt is not None else "-"
        encoder = aiortc_send.sent_video(call.pc)
        sending = (
            f"sending {encoder.width}x{encoder.height} at {encoder.target_bps / 1000:.0f} kbit/s"
            + (f" (limited by {encoder.limitation})" if encoder.limitation != "none" else "")
            if encoder is not None
            else "sending -"
        )
        return (
            f"stats: path {path or '-'}; video in {got.width}x{got.height} "
            f"{got.fps(now):.1f} fps; {bitrate}; "
            f"rtt {rtt_text}; packets lost {lost} (fec rebuilt "
            f"{aiortc_receive.fec_recovered(call.pc)}); "
            f"freezes {got.freezes} ({got.frozen_s:.1f} s); behind {got.behind_ms:.0f} ms; "
            f"audio missing {got.audio_missing} concealed {got.audio_concealed} "
            f"recovered {got.audio_recovered}; {sending}"
        )


async def log_stats(seat: Seat, every_s: float = STATS_EVERY_S) -> None:
    """Log the stats line of the seat's call every ``every_s`` while it is connected."""
    stats = StatsLine()
    while True:
        await asyncio.sleep(every_s)
        call = seat.call
        if call is not None and call.connected_at is not None:
            logger.info("%s: %s", call.name, await stats.line(call))


def summary(seat: Seat, exit_reason: str) -> dict[str, Any]:
    """The ``--stats-json`` summary of the seat's last call."""
    call = seat.last_call
    out: dict[str, Any] = {
        "role": seat.role,
        "session": seat.settings.session,
        "exit_reason": exit_reason,
        "calls": seat.calls,
        "relay_reconnects": seat.relay.reconnects,
        "ice": None,
        "first_frame_ms": None,
        "video": {"frames": 0, "fps": 0.0, "width": 0, "height": 0, "stamped": 0},
        "audio": {"frames": 0},
        "latency_ms": None,
        "recoveries": list(seat.recoveries),
        "video_per_call": [
            {
                "frames": c.receiver.received.video_frames,
                "stamped": c.receiver.received.stamped,
                "in_order": c.receiver.received.counters == sorted(c.receiver.received.counters),
            }
            for c in seat.all_calls
        ],
    }
    if call is None:
        return out
    path = call.path
    if path is not None:
        out["ice"] = {
            "local_type": path.local_type,
            "remote_type": path.remote_type,
            "protocol": path.protocol,
            "relay_protocol": path.relay,
            "type": path.type,
        }
    out.update(media_summary(call))
    got = call.receiver.received
    start = min(seat.seats_taken_at or call.started, call.started)
    if got.first_video is not None:
        out["first_frame_ms"] = round((got.first_video - start) * 1000, 1)
    span = (time.monotonic() - got.first_video) if got.first_video else 0.0
    out["video"].update(
        {
            "frames": got.video_frames,
            "fps": round(got.video_frames / span, 1) if span > 0 else 0.0,
            "stamped": got.stamped,
            "in_order": got.counters == sorted(got.counters),
        }
    )
    out["audio"]["frames"] = got.audio_frames
    out["latency_ms"] = got.latency_summary()
    return out


def media_summary(call: Call) -> dict[str, Any]:
    """What a user of the call felt: freezes, time behind, audio made up, what is sent."""
    got = call.receiver.received
    sent = aiortc_send.sent_video(call.pc)
    return {
        "video": {
            "width": got.width,
            "height": got.height,
            "freezes": got.freezes,
            "frozen_s": round(got.frozen_s, 2),
            "longest_gap_s": round(got.longest_gap_s, 2),
            "behind_ms": round(got.behind_ms, 1),
            "max_behind_ms": round(got.max_behind_ms, 1),
            "behind_p95_ms": round(got.behind_p95_ms(), 1),
            "fec_recovered": aiortc_receive.fec_recovered(call.pc),
        },
        "audio": {
            "frames": got.audio_frames,
            "missing": got.audio_missing,
            "concealed": got.audio_concealed,
            "recovered": got.audio_recovered,
        },
        "sending": None
        if sent is None
        else {
            "width": sent.width,
            "height": sent.height,
            "target_kbps": round(sent.target_bps / 1000, 1),
            "frame_divisor": sent.frame_divisor,
            "limitation": sent.limitation,
            "fec": aiortc_send.fec_sent(call.pc),
        },
    }
