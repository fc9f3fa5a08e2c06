"""aiortc's receiver-side bandwidth estimate made to find a narrow link again (imported by
peers/aiortc_patches.py).

A sibling of ``aiortc_patches`` (like ``aiortc_receive`` and ``aiortc_send``): it replaces
one class as a whole, ``RemoteBitrateEstimator`` (aiortc rate.py:427), which
``RTCRtpReceiver.__init__`` builds for each video receiver (rtcrtpreceiver.py:301) and
whose estimate the receiver sends as REMB (rtcrtpreceiver.py:490), and its
``AimdRateControl`` (rate.py:36). Against aiortc 1.16.0, following libwebrtc's
``AimdRateControl`` and ``RemoteBitrateEstimatorAbsSendTime``:

- Decreases come at most once per ``REDUCE_INTERVAL_MS`` while the detector says
  "overusing" (libwebrtc's ``TimeToReduceFurther``). aiortc decreases, and sends a
  REMB, on every packet that arrives while the detector overuses (rate.py:498-503):
  each one 0.85 x a throughput that is itself falling, so a burst of queueing
  collapses the estimate far below the link.
- A decrease is 0.85 x the throughput, but never below 0.75 x the estimate; while the
  detector goes on overusing, the next one comes 200 ms later. aiortc (rate.py:140) and
  libwebrtc take 0.85 x the throughput alone, which assumes the sender filled the
  estimate. An encoder seldom fills a small picture's target (VP8 at 320x240 sends half
  of a 100 kbit/s target for a plain picture), and on a shared machine an overuse is
  often a stall of the receiving process rather than a queue: one such overuse took a
  100 kbit/s estimate to 45, the sender to half its frame rate, and its throughput, the
  ground of the next decrease, lower still. A real drop of the link is followed within
  a second (0.75 per 200 ms) and the loss-based cap below.
- The increase stops at 2 x the throughput + 10 kbit/s (aiortc rate.py:149 and
  libwebrtc: 1.5 x). The sender's next rung (peers/aiortc_send.py) needs 2.25 x the
  pixels of the one it is on; an estimate held to 1.5 x what the rung it is on sends
  (an encoder seldom fills a small picture's target) never lets it climb back when the
  link widens. The loss-based cap below keeps the wider margin from overrunning a link.
- A decrease never raises the estimate (libwebrtc: "avoid increasing the rate when
  over-using"); aiortc sets 0.85 x the throughput even above the current estimate
  (rate.py:140).
- Below the link's capacity as last measured (``avg_max_bitrate_kbps``), the
  estimate climbs back multiplicatively, ``FAR_GROWTH`` per second, up to that
  capacity, and only then additively. aiortc climbs additively as soon as it has
  once overused (``near_max``, rate.py:131 and :139), about 4 kbit/s per second at
  the rates of a narrow link (rate.py:161): after one burst it takes tens of seconds
  to come back. A throughput far below the capacity (a real drop of the link) moves
  the capacity halfway to it instead of erasing it (rate.py:129-135 erases it), so
  one burst does not make the estimate forget the link.
- The estimate never goes below ``MIN_BPS`` (the sender's floor, peers/aiortc_send.py).

And on the sending side, ``RTCRtpSender._handle_rtcp_packet`` (rtcrtpsender.py:243)
sets the encoder's target to each REMB as it comes (rtcrtpsender.py:290) and ignores
the loss its receiver reports. A delay-based estimate cannot see a full drop-tail queue
(the delay stops growing, the detector says "normal" and the estimate climbs while the
link drops packets), so ``LossBased``, libwebrtc's classic loss rule of
``SendSideBandwidthEstimation``, caps it: over 10 % lost in a receiver report, the cap
falls by half the loss; under 2 %, it grows 8 % a second; the encoder's target is the
smaller of the REMB and the cap. The REMB aiortc and Chromium send covers the video
stream only (aiortc sends no abs-send-time on audio), so it is not shared with audio.

Upstream, this would be the body of ``AimdRateControl.update`` and of
``RemoteBitrateEstimator.add``, and a loss-based cap in ``RTCRtpSender``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from aiortc import rate, rtcrtpreceiver
from aiortc.rate import BandwidthUsage, RateControlState
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtcpRrPacket, RtcpSrPacket, unpack_remb_fci

from peers.aiortc_send import FLOOR_BPS

__all__ = [
    "FAR_GROWTH",
    "MIN_BPS",
    "REDUCE_INTERVAL_MS",
    "LossBased",
    "SteadyAimd",
    "SteadyEstimator",
    "install",
    "installed",
    "loss_based",
]

MIN_BPS = FLOOR_BPS
FAR_GROWTH = 1.5  # per second, back towards the capacity last measured
NEAR_SIGMAS = 3.0  # within this many deviations of the capacity: additive increase
REDUCE_INTERVAL_MS = 200  # libwebrtc: min(max(rtt, 10 ms), 200 ms); aiortc's rtt is fixed at 200
BETA = 0.85
INCREASE_LIMIT = 2.0  # x the throughput, + 10 kbit/s (aiortc rate.py:149 and libwebrtc: 1.5)
DROP = 0.75  # an overuse takes at least this much of the estimate away (every 200 ms)


class SteadyAimd(rate.AimdRateControl):
    """libwebrtc's AIMD with a fast climb back to the capacity last measured."""

    def __init__(self) -> None:
        super().__init__()
        self.decreases = 0  # at an overuse, from the throughput
        self.gentle = 0  # at an overuse, from the estimate (the sender undershot)

    def time_to_reduce_further(self, now_ms: int, incoming_bps: int) -> bool:
        """libwebrtc's ``AimdRateControl::TimeToReduceFurther``."""
        if self.last_change_ms is None or now_ms - self.last_change_ms >= REDUCE_INTERVAL_MS:
            return True
        return self.current_bitrate_initialized and self.current_bitrate / 2 > incoming_bps

    def _sigma_kbps(self) -> float:
        assert self.avg_max_bitrate_kbps is not None
        return math.sqrt(self.var_max_bitrate_kbps * self.avg_max_bitrate_kbps)

    def update(
        self, bandwidth_usage: BandwidthUsage, estimated_throughput: int | None, now_ms: int
    ) -> int | None:
        if not self.current_bitrate_initialized and estimated_throughput is not None:
            if self.first_estimated_throughput_time is None:
                self.first_estimated_throughput_time = now_ms
            elif now_ms - self.first_estimated_throughput_time > 3000:
                self.current_bitrate = estimated_throughput
                self.current_bitrate_initialized = True
        if not self.current_bitrate_initialized and bandwidth_usage != BandwidthUsage.OVERUSING:
            return None

        if bandwidth_usage == BandwidthUsage.NORMAL and self.state == RateControlState.HOLD:
            self.last_change_ms = now_ms
            self.state = RateControlState.INCREASE
        elif bandwidth_usage == BandwidthUsage.OVERUSING:
            self.state = RateControlState.DECREASE
        elif bandwidth_usage == BandwidthUsage.UNDERUSING:
            self.state = RateControlState.HOLD

        if estimated_throughput is not None:
            self.latest_estimated_throughput = estimated_throughput
        throughput = self.latest_estimated_throughput
        throughput_kbps = throughput / 1000
        new_bitrate = self.current_bitrate
        last_ms = self.last_change_ms if self.last_change_ms is not None else now_ms

        if self.state == RateControlState.INCREASE:
            if (
                self.avg_max_bitrate_kbps is not None
                and throughput_kbps > self.avg_max_bitrate_kbps + NEAR_SIGMAS * self._sigma_kbps()
            ):
                self.avg_max_bitrate_kbps = None  # the link grew: find it again
            limit = int(INCREASE_LIMIT * throughput) + 10_000
            if new_bitrate < limit:
                capacity = self.avg_max_bitrate_kbps
                if capacity is None:  # nothing known: libwebrtc's 8 % per second
                    new_bitrate += self._multiplicative_rate_increase(new_bitrate, last_ms, now_ms)
                elif new_bitrate / 1000 >= capacity - NEAR_SIGMAS * self._sigma_kbps():
                    new_bitrate += self._additive_rate_increase(last_ms, now_ms)
                else:  # far below the capacity last measured: back to it quickly
                    elapsed_s = min(now_ms - last_ms, 1000) / 1000
                    grown = int(new_bitrate * FAR_GROWTH**elapsed_s)
                    new_bitrate = max(new_bitrate, min(grown, int(capacity * 1000)))
                new_bitrate = min(new_bitrate, limit)
            self.last_change_ms = now_ms
        elif self.state == RateControlState.DECREASE:
            decreased = int(BETA * throughput)
            if decreased > self.current_bitrate and self.avg_max_bitrate_kbps is not None:
                decreased = int(BETA * self.avg_max_bitrate_kbps * 1000)
            if not self.current_bitrate_initialized or throughput >= DROP * self.current_bitrate:
                self._update_capacity(throughput_kbps)  # the sender filled it: the link's rate
            if self.current_bitrate_initialized and decreased < DROP * self.current_bitrate:
                # The sender did not fill the estimate (a simple picture, a lower frame
                # rate): the encoder set the throughput, not the link.
                decreased = int(DROP * self.current_bitrate)
                self.gentle += 1
            else:
                self.decreases += 1
            if decreased < self.current_bitrate:
                new_bitrate = decreased
            self.current_bitrate_initialized = True
            self.last_change_ms = now_ms
            self.state = RateControlState.HOLD

        self.current_bitrate = max(MIN_BPS, new_bitrate)
        return self.current_bitrate

    def _update_capacity(self, throughput_kbps: float) -> None:
        """The link capacity seen at an overuse; a throughput far below it moves it halfway."""
        avg = self.avg_max_bitrate_kbps
        if avg is not None and throughput_kbps < avg - NEAR_SIGMAS * self._sigma_kbps():
            self.avg_max_bitrate_kbps = (avg + throughput_kbps) / 2
            return
        self._update_max_throughput_estimate(throughput_kbps)


class SteadyEstimator(rate.RemoteBitrateEstimator):
    """aiortc's abs-send-time estimator with ``SteadyAimd`` and libwebrtc's reduce interval."""

    def __init__(self) -> None:
        super().__init__()
        self.rate_control: SteadyAimd = SteadyAimd()
        self.estimates: list[tuple[int, int]] = []  # (arrival ms, bit/s) of each REMB value

    def add(
        self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        # rate.py:445-509, with libwebrtc's TimeToReduceFurther on an overuse.
        timestamp = abs_send_time << 8
        self.ssrcs[ssrc] = arrival_time_ms
        if self.incoming_bitrate.rate(arrival_time_ms) is not None:
            self.incoming_bitrate_initialized = True
        elif self.incoming_bitrate_initialized:
            self.incoming_bitrate.reset()
            self.incoming_bitrate_initialized = False
        self.incoming_bitrate.add(payload_size, arrival_time_ms)

        deltas = self.inter_arrival.compute_deltas(timestamp, arrival_time_ms, payload_size)
        if deltas is not None:
            timestamp_delta_ms = deltas.timestamp * rate.TIMESTAMP_TO_MS
            self.estimator.update(
                deltas.arrival_time,
                timestamp_delta_ms,
                deltas.size,
                self.detector.state(),
                arrival_time_ms,
            )
            self.detector.detect(
                self.estimator.offset(),
                timestamp_delta_ms,
                self.estimator.num_of_deltas(),
                arrival_time_ms,
            )

        incoming = self.incoming_bitrate.rate(arrival_time_ms)
        due = (
            self.last_update_ms is None
            or arrival_time_ms - self.last_update_ms > self.rate_control.feedback_interval()
        )
        if not due and self.detector.state() == BandwidthUsage.OVERUSING:
            due = incoming is not None and self.rate_control.time_to_reduce_further(
                arrival_time_ms, incoming
            )
        if not due:
            return None
        target = self.rate_control.update(self.detector.state(), incoming, arrival_time_ms)
        if target is None:
            return None
        self.last_update_ms = arrival_time_ms
        self.estimates.append((arrival_time_ms, target))
        del self.estimates[:-1000]
        return target, list(self.ssrcs.keys())


LOSS_HIGH, LOSS_LOW = 0.10, 0.02  # libwebrtc's kDefaultHighLossThreshold / LowLossThreshold
LOSS_GROWTH = 1.08  # per second under LOSS_LOW, + 1 kbit/s (libwebrtc)


@dataclass
class LossBased:
    """libwebrtc's classic loss-based cap on a sender's rate, from receiver reports."""

    remb_bps: int | None = None
    cap_bps: float | None = None  # None until a report says more than LOSS_HIGH was lost
    last_growth: float | None = None
    last_decrease: float | None = None
    rtt_s: float = 0.2
    decreases: int = 0

    def on_remb(self, bps: int) -> None:
        self.remb_bps = bps
        if self.cap_bps is not None and self.cap_bps > bps:
            self.cap_bps = float(bps)  # the cap never wanders above the receiver's estimate

    def on_report(self, fraction_lost: float, now: float) -> None:
        if fraction_lost > LOSS_HIGH:
            if self.last_decrease is None or now - self.last_decrease >= 0.3 + self.rtt_s:
                start = self.cap_bps if self.cap_bps is not None else self.remb_bps
                if start is not None:
                    self.cap_bps = start * (1 - 0.5 * fraction_lost)
                    self.last_decrease = self.last_growth = now
                    self.decreases += 1
        elif fraction_lost < LOSS_LOW and self.cap_bps is not None:
            elapsed = min(now - (self.last_growth or now), 1.0)
            self.cap_bps = self.cap_bps * LOSS_GROWTH**elapsed + 1000 * elapsed
            self.last_growth = now
            if self.remb_bps is not None and self.cap_bps >= self.remb_bps:
                self.cap_bps = None  # back to the receiver's estimate alone
        else:
            self.last_growth = now

    def target(self) -> int | None:
        if self.remb_bps is None:
            return None if self.cap_bps is None else int(self.cap_bps)
        return int(min(self.remb_bps, self.cap_bps if self.cap_bps is not None else math.inf))


def loss_based(sender: RTCRtpSender) -> LossBased:
    """The sender's ``LossBased`` cap (made on first use)."""
    state: LossBased = sender.__dict__.setdefault("_epc_loss_based", LossBased())
    return state


def _on_rtcp(sender: RTCRtpSender, packet: Any) -> None:
    encoder = getattr(sender, "_RTCRtpSender__encoder", None)
    if sender.kind != "video" or encoder is None or not hasattr(encoder, "target_bitrate"):
        return
    state = loss_based(sender)
    if isinstance(packet, RtcpRrPacket | RtcpSrPacket):
        reports = [r for r in packet.reports if r.ssrc == sender._ssrc]
        if not reports:
            return
        rtt = getattr(sender, "_RTCRtpSender__rtt", None)
        if rtt is not None:
            state.rtt_s = rtt
        state.on_report(reports[0].fraction_lost / 256, time.monotonic())
    elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
        try:
            bitrate, ssrcs = unpack_remb_fci(packet.fci)
        except ValueError:
            return
        if sender._ssrc not in ssrcs:
            return
        state.on_remb(bitrate)
    else:
        return
    target = state.target()
    if target is not None:
        encoder.target_bitrate = target  # after aiortc's own REMB handling (rtcrtpsender.py:290)


_installed: list[bool] = []


def install() -> None:
    """Make every new video receiver estimate with ``SteadyEstimator`` and every sender cap
    its REMB with ``LossBased`` (once per process)."""
    if _installed:
        return
    _installed.append(True)
    # rtcrtpreceiver.py:20 imports the class by name and :301 builds it from that name.
    setattr(rtcrtpreceiver, "RemoteBitrateEstimator", SteadyEstimator)  # noqa: B010
    original = RTCRtpSender._handle_rtcp_packet

    async def _handle_rtcp_packet(self: RTCRtpSender, packet: Any) -> None:
        await original(self, packet)
        _on_rtcp(self, packet)

    RTCRtpSender._handle_rtcp_packet = _handle_rtcp_packet  # type: ignore[method-assign]


def installed() -> bool:
    return bool(_installed)
