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
- An overuse within ``STALL_GRACE_MS`` of a stall of this process's event loop
  (``LoopWatch``) holds the estimate instead of lowering it: aiortc stamps arrivals on
  that loop (rtcdtlstransport.py:668), so on a busy machine a stall reads as queueing.
- The estimate never goes below ``MIN_BPS`` (the sender's floor, peers/aiortc_send.py).
- Probe clusters set the estimate at once (libwebrtc's ``RemoteBitrateEstimatorAbsSendTime``
  probe handling: ``ComputeClusters``, ``FindBestProbe``, ``ProcessClusters``): for the
  first 2 s, and while there is no estimate, packets over 200 bytes are grouped by send
  spacing, and a cluster of at least 4 deltas that arrived as spaced as it was sent sets
  the estimate to its rate, sent as REMB on that packet. aiortc has none: its first
  estimate is the throughput after 3 s, then 8 % a second, so a Chromium sender, which
  probes at 3 and 6 x its 300 kbit/s start, was held near 300 for tens of seconds.
- Arrival times are the kernel's (``install_kernel_stamps``: ``SIOCGSTAMPNS`` when aioice
  reads the datagram), not the event loop's (rtcdtlstransport.py:668): on a busy machine
  the loop reads bunches of datagrams late, which the detector reads as queueing and which
  spoils a probe's spacing. The same stamps feed transport-cc.

And on the sending side, ``RTCRtpSender._handle_rtcp_packet`` (rtcrtpsender.py:243)
sets the encoder's target to each REMB as it comes (rtcrtpsender.py:290) and ignores
the loss its receiver reports. A delay-based estimate cannot see a full drop-tail queue
(the delay stops growing, the detector says "normal" and the estimate climbs while the
link drops packets), so ``LossBased``, libwebrtc's classic loss rule of
``SendSideBandwidthEstimation``, caps it: over 10 % lost in a receiver report, the cap
falls by half the loss; under 2 %, it grows 8 % a second; the encoder's target is the
smaller of the REMB and the cap. The REMB aiortc and Chromium send covers the video
stream only (aiortc sends no abs-send-time on audio), so it is not shared with audio.

Chromium sending to aiortc: aiortc offers and answers REMB only (codecs/__init__.py:45
and :82), so Chromium's own congestion control, which needs transport-wide feedback,
never runs; its rate is the smaller of its loss rule and aiortc's REMB. ``TransportFeedback``
is the receiver's half of transport-cc (draft-holmer-rmcat-transport-wide-cc-extensions-01):
with ``offer_transport_cc()`` the video codecs offer ``a=rtcp-fb:<pt> transport-cc`` and
the transport-wide sequence number extension; each video packet that carries one is
noted with its arrival time, every ``FEEDBACK_INTERVAL_S`` the receiver sends what arrived
(RTPFB, FMT 15), and such a packet no longer feeds the REMB estimate (libwebrtc's receiver
sends one or the other). aiortc's sender stamps no transport-wide numbers, so between two
aiortc peers nothing would change. It is on (``TRANSPORT_CC``): with the kernel's arrival
times, Chromium's own estimate from it matched what Chromium sends to Chromium in every run,
where the REMB, probe detection and all, did in half of them (docs/benchmarks.md, "Chromium
sending to an aiortc practitioner"). The REMB stays for senders without transport-wide
numbers (aiortc's, with ``Prober``).

And the sender's probes (``Prober``): padding-only RTX bursts at the rate the top rung of
the ladder needs, while the ladder is below it and the link has been calm, which the
receiver's probe detection above takes mid-call (padding only); and at the start, after the
first media packet, clusters at 3 and 6 x the start rate (libwebrtc's initial probing),
which the receiver's start detection takes when the link carried them as sent
(``Prober.start``, started from ``RTCRtpSender.send``, rtcrtpsender.py:204).

Upstream, this would be the body of ``AimdRateControl.update`` and of
``RemoteBitrateEstimator.add``, a loss-based cap and a prober in ``RTCRtpSender``, a
transport-cc feedback generator in ``RTCRtpReceiver``, and receive times from aioice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import math
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aioice import Connection
from aioice.ice import StunProtocol
from aiortc import clock, codecs, rate, rtcrtpreceiver
from aiortc.codecs import is_rtx
from aiortc.rate import BandwidthUsage, RateControlState
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpHeaderExtensionParameters
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    unpack_remb_fci,
)

from peers.aiortc_send import FLOOR_BPS, Ladder, protection_of

__all__ = [
    "FAR_GROWTH",
    "MIN_BPS",
    "REDUCE_INTERVAL_MS",
    "LoopWatch",
    "LossBased",
    "ReportedLoss",
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
WATCH_TICK_S = 0.01
STALL_S = 0.05  # the event loop late by this much: it stood still
STALL_GRACE_MS = 500  # an overuse this soon after a stall is the stall's backlog
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


class LoopWatch:
    """When this process's event loop last stood still, on aiortc's clock (``clock.current_ms``).

    aiortc stamps a packet's arrival when its event loop gets to it (rtcdtlstransport.py:668),
    so a stall of the process (a busy machine, a slow decode) shows as queueing: the
    packets read after it look late, then bunched. libwebrtc stamps arrivals on a network
    thread and needs no such watch.
    """

    def __init__(self) -> None:
        self.stalled_at_ms: int | None = None
        self.stalls = 0
        self.task: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: no watch (unit tests)
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(WATCH_TICK_S)
            if time.monotonic() - before - WATCH_TICK_S > STALL_S:
                self.stalled_at_ms = clock.current_ms()
                self.stalls += 1

    def recent(self, now_ms: int) -> bool:
        """Whether the loop stood still within the last ``STALL_GRACE_MS``."""
        return self.stalled_at_ms is not None and now_ms - self.stalled_at_ms < STALL_GRACE_MS

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


PROBING = True  # the sender's probes (``Prober``); off: bench/rate.py's "no probing"
PROBES = True  # off: the estimator as the previous session left it (bench/rate.py --chromium)
PROBE_MIN_BYTES = 200  # libwebrtc: only packets larger than this are paced (probes)
PROBE_WINDOW_MS = 2000  # libwebrtc's kInitialProbingInterval: probes looked for this long
PROBE_MAX_PACKETS = 15  # kMaxProbePackets
PROBE_MIN_CLUSTER = 4  # kMinClusterSize (deltas)
PROBE_EXPECTED = 3  # kExpectedNumberOfProbes
PROBE_MAX_AGE_MS = 1000  # a mid-call probe's packets are this recent
BURST_SLACK_MS = 2.0  # a burst arriving this much slower than sent still counts (libwebrtc: 2)
CLUSTER_BOUND_MS = 2.5  # a send delta this close to the cluster's mean stays in it
MIN_CLUSTER_DELTA_MS = 1.0  # kMinClusterDelta
ABS_SEND_TIME_MS = 1000 / (1 << 18)  # abs-send-time is 6.18 fixed point seconds


@dataclass
class Cluster:
    """Probe packets sent at one rate: mean deltas (ms) and size (bytes)."""

    send_ms: float = 0.0
    recv_ms: float = 0.0
    size: float = 0.0
    count: int = 0
    above_min: int = 0

    def bitrate(self) -> float:
        """libwebrtc's min(SendBitrate, RecvBitrate) of a finished cluster, bit/s."""
        return self.size * 8000 / max(self.send_ms, self.recv_ms)


def clusters(probes: list[tuple[float, int, int]]) -> list[Cluster]:
    """libwebrtc's ``ComputeClusters``: ``probes`` as (send ms, arrival ms, bytes)."""
    found: list[Cluster] = []
    total = Cluster()

    def close() -> None:
        if total.count >= PROBE_MIN_CLUSTER and total.send_ms > 0 and total.recv_ms > 0:
            n = total.count
            found.append(Cluster(total.send_ms / n, total.recv_ms / n, total.size / n, n,
                                 total.above_min))  # fmt: skip

    for (send_a, recv_a, _), (send_b, recv_b, size) in itertools.pairwise(probes):
        send_delta, recv_delta = send_b - send_a, recv_b - recv_a
        if send_delta >= MIN_CLUSTER_DELTA_MS and recv_delta >= MIN_CLUSTER_DELTA_MS:
            total.above_min += 1
        if total.count and abs(send_delta - total.send_ms / total.count) >= CLUSTER_BOUND_MS:
            close()
            total = Cluster()
        total.send_ms += send_delta
        total.recv_ms += recv_delta
        total.size += size
        total.count += 1
    close()
    return found


def best_probe(found: list[Cluster]) -> float | None:
    """libwebrtc's ``FindBestProbe``: the highest rate of the clusters, up to a failed one."""
    best: float | None = None
    for cluster in found:
        if not (
            cluster.above_min > cluster.count / 2
            and cluster.recv_ms - cluster.send_ms <= 2
            and cluster.send_ms - cluster.recv_ms <= 5
        ):
            break  # a probe that arrived slower than sent, or bunched: the link's limit
        best = max(best or 0.0, cluster.bitrate())
    return best


class SteadyEstimator(rate.RemoteBitrateEstimator):
    """aiortc's abs-send-time estimator with ``SteadyAimd``, libwebrtc's reduce interval and
    libwebrtc's probe detection."""

    def __init__(self) -> None:
        super().__init__()
        self.rate_control: SteadyAimd = SteadyAimd()
        self.estimates: list[tuple[int, int]] = []  # (arrival ms, bit/s) of each REMB value
        self.watch = LoopWatch()
        self.held = 0  # overuses not acted on: this process had just stood still
        self.first_ms: int | None = None
        self.probes: list[tuple[float, int, int]] = []  # (send ms, arrival ms, bytes)
        self.probes_seen = 0
        self.last_send: tuple[int, float] | None = None  # (abs-send-time, unwrapped ms)
        self.probed: list[tuple[int, int]] = []  # (arrival ms, bit/s) of each probe taken
        self.padding = False  # the packet being added is padding only (set by the receiver)

    def send_ms(self, abs_send_time: int) -> float:
        """The send time in ms, unwrapped across abs-send-time's 64 s wrap."""
        if self.last_send is None:
            ms = abs_send_time * ABS_SEND_TIME_MS
        else:
            last_abs, last_ms = self.last_send
            delta = (abs_send_time - last_abs + 0x800000) % 0x1000000 - 0x800000
            ms = last_ms + delta * ABS_SEND_TIME_MS
        self.last_send = abs_send_time, ms
        return ms

    def probe(self, arrival_time_ms: int, abs_send_time: int, payload_size: int) -> bool:
        """libwebrtc's probe handling of ``IncomingPacketInfo`` and ``ProcessClusters``: whether
        a probe cluster just set the estimate.

        aiortc has none (rate.py:522-580): its first estimate is the throughput after 3 s
        (rate.py:74-78), then 8 % a second, so a sender that probes (Chromium sends clusters
        at 3 and 6 x its 300 kbit/s start at once) stays near its start for tens of seconds.
        """
        send_ms = self.send_ms(abs_send_time)
        padding, self.padding = self.padding, False
        if self.first_ms is None:
            self.first_ms = arrival_time_ms
        control = self.rate_control
        starting = (
            not control.current_bitrate_initialized
            or arrival_time_ms - self.first_ms < PROBE_WINDOW_MS
        )
        if not PROBES or payload_size <= PROBE_MIN_BYTES or not (starting or padding):
            return False
        if not starting:  # a mid-call probe (``Prober``): padding only, none older than 1 s
            self.probes = [p for p in self.probes if arrival_time_ms - p[1] < PROBE_MAX_AGE_MS]
            self.probes.append((send_ms, arrival_time_ms, payload_size))
            self.probes_seen += 1
            return self.burst(arrival_time_ms)
        self.probes.append((send_ms, arrival_time_ms, payload_size))
        self.probes_seen += 1
        found = clusters(self.probes)
        if not found:
            if len(self.probes) >= PROBE_MAX_PACKETS:
                del self.probes[0]
            return False
        best = best_probe(found)
        if best is not None and (
            not control.current_bitrate_initialized or best > control.current_bitrate
        ):
            control.set_estimate(max(MIN_BPS, int(best)), arrival_time_ms)
            self.probed.append((arrival_time_ms, int(best)))
            return True
        if len(found) >= PROBE_EXPECTED:
            self.probes.clear()
        return False

    def burst(self, arrival_time_ms: int) -> bool:
        """A mid-call padding burst's rate, taken when it arrived no slower than it was sent.

        libwebrtc's clusters need each send delta within 2.5 ms of their mean: its pacer
        runs on its own thread. aiortc's sender spaces the probe on its event loop, where a
        6 ms sleep may take 15 (an encode holds the loop), so a burst is judged whole: at
        least ``PROBE_MIN_CLUSTER`` deltas, the bytes after the first over the longer of the
        send and the arrival spans, and the arrival span no longer than the send span +
        ``BURST_SLACK_MS`` (a narrow link spreads the burst: no estimate).
        """
        probes = self.probes
        if len(probes) <= PROBE_MIN_CLUSTER:
            return False
        send_span = probes[-1][0] - probes[0][0]
        recv_span = probes[-1][1] - probes[0][1]
        if (
            send_span < MIN_CLUSTER_DELTA_MS * PROBE_MIN_CLUSTER
            or recv_span > send_span + BURST_SLACK_MS
        ):
            return False
        rate_bps = sum(size for _, _, size in probes[1:]) * 8000 / max(send_span, recv_span)
        control = self.rate_control
        if rate_bps <= control.current_bitrate:
            return False
        control.set_estimate(int(rate_bps), arrival_time_ms)
        self.probed.append((arrival_time_ms, int(rate_bps)))
        self.probes.clear()
        return True

    def add(
        self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        # rate.py:445-509, with libwebrtc's TimeToReduceFurther on an overuse.
        timestamp = abs_send_time << 8
        self.ssrcs[ssrc] = arrival_time_ms
        probed = self.probe(arrival_time_ms, abs_send_time, payload_size)
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
        usage = self.detector.state()
        if usage == BandwidthUsage.OVERUSING and self.watch.recent(arrival_time_ms):
            usage = BandwidthUsage.UNDERUSING  # hold: the queue was this process, not the link
            self.held += 1
        if probed:  # sent at once (libwebrtc: "a probe which updated the bitrate")
            self.last_update_ms = arrival_time_ms
            probed_bps = self.rate_control.current_bitrate
            self.estimates.append((arrival_time_ms, probed_bps))
            return probed_bps, list(self.ssrcs.keys())
        due = (
            self.last_update_ms is None
            or arrival_time_ms - self.last_update_ms > self.rate_control.feedback_interval()
        )
        if not due and usage == BandwidthUsage.OVERUSING:
            due = incoming is not None and self.rate_control.time_to_reduce_further(
                arrival_time_ms, incoming
            )
        if not due:
            return None
        target = self.rate_control.update(usage, incoming, arrival_time_ms)
        if target is None:
            return None
        self.last_update_ms = arrival_time_ms
        self.estimates.append((arrival_time_ms, target))
        del self.estimates[:-1000]
        return target, list(self.ssrcs.keys())


LOSS_HIGH, LOSS_LOW = 0.10, 0.02  # libwebrtc's kDefaultHighLossThreshold / LowLossThreshold
LOSS_GROWTH = 1.08  # per second under LOSS_LOW, + 1 kbit/s (libwebrtc)
# The queue's overflow: a report of LOSS_LOW or more within OVERFLOW_S of a fall of the REMB
# (the receiver's detector saw the queue grow: this loss is the queue's, not the link's noise)
# sets a ceiling at CEILING_BELOW x the highest target of the CEILING_LOOKBACK_S before it.
OVERFLOW_S = 2.0
CEILING_BELOW = 0.85
CEILING_LOOKBACK_S = 3.0
CEILING_GROWTH = 1.02  # per second: back to where the queue overflowed in about 8 s ...
# ... but from CEILING_NEAR x that rate on, by CEILING_NEAR_GROWTH only (TCP CUBIC's plateau
# around its last loss, RFC 9438): at 2 %/s all the way, a 300 kbit/s link's queue overflowed
# again every 5-9 s, and about one overflow in 10 became a run of holes and a keyframe, a
# freeze of 0.8-1.3 s. A link that widened is found by a probe (``Prober``), not by this.
CEILING_NEAR = 0.95
CEILING_NEAR_GROWTH = 1.005


# A loss fraction over fewer packets waits for the next report (libwebrtc: 20). 10 here: the
# reports of Chromium's that misled covered 2-4 packets, and aiortc's receiver, one report in
# 0.5-1.5 s, sends some over 15-20 packets at 300 kbit/s, which the loss rule read as before.
LOSS_MIN_PACKETS = 10


@dataclass
class ReportedLoss:
    """The fraction lost since the last update, from a receiver report's cumulative counts, over
    at least ``LOSS_MIN_PACKETS`` packets (10).

    A report's own fraction lost covers the packets since the report before, and Chromium sends
    reports with each REMB and NACK, several a second, some over 2-3 packets: at 5 % loss, a
    third of them said 0 and others 25-50 % (1 of 2 packets), which the loss rule took for a
    congested link (the cap fell by a quarter at each) and the FEC for a very lossy one.
    libwebrtc's ``SendSideBandwidthEstimation::UpdatePacketsLost`` does the same: it waits for
    ``kLimitNumPackets`` (20) expected packets and takes the cumulative lost count's growth.
    """

    highest: int | None = None  # the highest sequence number of the last update
    lost: int = 0  # the cumulative lost count then
    expected_total: int = 0  # over all the updates (the call's loss: ``whole``)
    lost_total: int = 0

    def add(self, highest_sequence: int, packets_lost: int) -> float | None:
        """The fraction lost since the last update, or None (too few packets yet)."""
        if self.highest is None:
            self.highest, self.lost = highest_sequence, packets_lost
            return None
        # Deltas between reports are small: mod 2**16 also covers a receiver that reports the
        # highest sequence number without its cycles (aiortc's, rtcrtpreceiver.py:595).
        expected = (highest_sequence - self.highest) & 0xFFFF
        if expected >= 0x8000 or expected < LOSS_MIN_PACKETS:
            return None  # reordered reports, or too few packets
        lost = max(packets_lost - self.lost, 0)
        self.highest, self.lost = highest_sequence, packets_lost
        self.expected_total += expected
        self.lost_total += min(lost, expected)
        return min(lost / expected, 1.0)

    def whole(self) -> float | None:
        """The fraction lost over all the updates so far (None before the first)."""
        return self.lost_total / self.expected_total if self.expected_total else None


@dataclass
class LossBased:
    """libwebrtc's classic loss-based cap on a sender's rate, from receiver reports."""

    remb_bps: int | None = None
    cap_bps: float | None = None  # None until a report says more than LOSS_HIGH was lost
    last_growth: float | None = None
    last_decrease: float | None = None
    rtt_s: float = 0.2
    decreases: int = 0
    last_loss: float = 0.0  # the fraction lost in the last report
    # Where a drop-tail queue overflowed (see ``on_report``): the target stays below it.
    ceiling_bps: float | None = None
    ceiling_growth_at: float | None = None
    overflowed_bps: float | None = None  # the highest target before the ceiling's overflow
    ceilings: int = 0
    remb_fell_at: float | None = None
    mean_loss: float = 0.0  # of the reports so far (a running mean over about 8)
    targets: list[tuple[float, int]] = field(default_factory=list)  # (when, target) sent

    def on_remb(self, bps: int, now: float | None = None) -> None:
        if now is not None and self.remb_bps is not None and bps < self.remb_bps:
            self.remb_fell_at = now
        self.remb_bps = bps
        if self.cap_bps is not None and self.cap_bps > bps:
            self.cap_bps = float(bps)  # the cap never wanders above the receiver's estimate

    def note_target(self, bps: int, now: float) -> None:
        """The encoder's target set at ``now`` (for the ceiling's look back)."""
        self.targets.append((now, bps))
        while self.targets and self.targets[0][0] < now - CEILING_LOOKBACK_S:
            del self.targets[0]

    def _overflowed(self, fraction_lost: float, now: float) -> None:
        """A drop-tail queue's overflow: the REMB fell, and packets were lost with it.

        A delay-based estimate (aiortc's REMB) sees a short buffer late: 100 ms of queue at
        300 kbit/s is 3.75 kB, full before the detector says "overusing", so every climb of
        the estimate past the link ends in a tail drop (a lost packet, a frame held for its
        retransmission: a freeze of 0.2-0.6 s), every 3-6 s in the traced calls. libwebrtc's
        loss rule holds between 2 and 10 % lost, but its estimate is at most the REMB, which
        has fallen by then and climbs again. Here the rate at which the queue overflowed is
        remembered: the target stays under ``CEILING_BELOW`` x the highest it was in the
        ``CEILING_LOOKBACK_S`` before, and nears it again by ``CEILING_GROWTH`` a second (a
        link that widened is found again, sooner by a probe: ``Prober.on_remb``). Random loss
        with no fall of the REMB, or no more than the link's usual (a lossy link), sets none.
        """
        usual, self.mean_loss = (
            self.mean_loss,
            self.mean_loss + (fraction_lost - self.mean_loss) / 8,
        )
        if fraction_lost < max(LOSS_LOW, 2 * usual) or self.remb_fell_at is None:
            return  # no loss, or no more than this link's usual (random loss is no queue)
        if now - self.remb_fell_at > OVERFLOW_S or not self.targets:
            return
        highest = max(bps for _, bps in self.targets)
        ceiling = CEILING_BELOW * highest
        if self.ceiling_bps is None or ceiling < self.ceiling_bps:
            self.ceiling_bps = max(float(MIN_BPS), ceiling)
            self.ceiling_growth_at = now
            self.overflowed_bps = highest
            self.ceilings += 1
        self.remb_fell_at = None  # one fall, one ceiling

    def _grow_ceiling(self, now: float) -> None:
        if self.ceiling_bps is None or self.ceiling_growth_at is None:
            return
        elapsed = min(now - self.ceiling_growth_at, 1.0)
        near = self.overflowed_bps is not None and (
            self.ceiling_bps >= CEILING_NEAR * self.overflowed_bps
        )
        self.ceiling_bps *= (CEILING_NEAR_GROWTH if near else CEILING_GROWTH) ** elapsed
        self.ceiling_growth_at = now
        if self.remb_bps is not None and self.ceiling_bps >= 2 * self.remb_bps:
            self.ceiling_bps = None  # far above what the receiver allows: of no use

    def on_report(self, fraction_lost: float, now: float, sending_bps: int | None = None) -> None:
        """A receiver report's fraction lost; ``sending_bps``, the encoder's target, is where the
        cap starts from while no REMB has come (libwebrtc's ``SendSideBandwidthEstimation``
        starts from its start bitrate; here the loss before the first REMB was ignored)."""
        self.last_loss = fraction_lost
        self._grow_ceiling(now)
        self._overflowed(fraction_lost, now)
        if fraction_lost > LOSS_HIGH:
            if self.last_decrease is None or now - self.last_decrease >= 0.3 + self.rtt_s:
                start = self.cap_bps if self.cap_bps is not None else self.remb_bps
                start = start if start is not None else sending_bps
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
        ceiling = self.ceiling_bps if self.ceiling_bps is not None else math.inf
        if self.remb_bps is None:
            return None if self.cap_bps is None else int(min(self.cap_bps, ceiling))
        cap = self.cap_bps if self.cap_bps is not None else math.inf
        return int(min(self.remb_bps, cap, ceiling))


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
        counter: ReportedLoss = sender.__dict__.setdefault("_epc_reported_loss", ReportedLoss())
        fraction = counter.add(reports[0].highest_sequence, reports[0].packets_lost)
        if fraction is None:
            return  # too few packets since the last update (``ReportedLoss``)
        state.on_report(fraction, time.monotonic(), int(encoder.target_bitrate))
        protection_of(sender).on_report(fraction, rtt, counter.whole())
    elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
        try:
            bitrate, ssrcs = unpack_remb_fci(packet.fci)
        except ValueError:
            return
        if sender._ssrc not in ssrcs:
            return
        state.on_remb(bitrate, time.monotonic())
        prober(sender).on_remb(bitrate, state, time.monotonic())
    else:
        return
    target = state.target()
    if target is not None:
        # After aiortc's own REMB handling (rtcrtpsender.py:290); the FEC's share (RED + ULPFEC,
        # peers/aiortc_send.py ``Protection``) comes out of what the encoder may send.
        share = protection_of(sender).media_share()
        encoder.target_bitrate = max(int(target * share), MIN_BPS)
        state.note_target(target, time.monotonic())
        prober(sender).on_target(target, time.monotonic())


PROBE_EVERY_S = 3.0  # at most one probe this often
PROBE_QUIET_S = 5.0  # no probe this soon after the target fell (the link is full)
PROBE_PACKETS = 8  # 7 deltas: libwebrtc's clusters need 4 (PROBE_MIN_CLUSTER)
PROBE_PADDING = 255  # bytes: the most one RTP packet's padding can say (RFC 3550 5.1)
PROBE_ABOVE = 1.2  # x the top rung's need: the rate probed
PROBE_ANSWER_S = 2.0  # a REMB this soon after a probe, at its rate, answers it
# The start probe (``Prober.start``), after libwebrtc's ProbeController: clusters at 3 and 6 x
# the start rate (its kFirstExponentialProbeScale / kSecondExponentialProbeScale) as soon as
# the first media packet has left.
START_PROBE = True  # off: bench/rate.py --start's "no start probe"
START_PROBE_SCALES = (3.0, 6.0)  # x the encoder's start target (START_BPS): 600 and 1200 kbit/s
START_PROBE_PACKETS = 6  # 5 deltas per cluster: the receiver needs 4 (PROBE_MIN_CLUSTER)
START_PROBE_PAUSE_S = 0.02  # between the clusters: the receiver tells them apart (2.5 ms bound)
START_WAIT_S = 10.0  # no media packet by then: no start probe


@dataclass
class Prober:
    """A video sender's probes: bursts of RTX padding that show the receiver a wider link.

    libwebrtc's sender probes when the rate it may use is below what the encoder wants (its
    ``ProbeController``: at the start, at a raised maximum, and in "ALR", sending less than
    its estimate); the receiver measures the burst's spacing and takes its rate when the
    packets arrived as spaced as they were sent. aiortc never probes (rtcrtpsender.py
    sends media only, rtcrtpsender.py:357-407), so an estimate bounded by 2 x what the
    encoder sends climbs back from a narrow link rung by rung, additively. Here, every
    ``PROBE_EVERY_S`` while the ladder (peers/aiortc_send.py) is below its top rung, the
    target has not fallen for ``PROBE_QUIET_S``, the last report lost under ``LOSS_LOW``
    and the target is below the top rung's need: ``PROBE_PACKETS`` padding-only RTX packets
    at ``PROBE_ABOVE`` x that need. A link too narrow spreads them and the receiver ignores
    the probe (``best_probe``); on a wide one the REMB that answers lifts the loss cap, as
    libwebrtc's ``SetSendBitrate`` does with a probe's result, and the ladder climbs
    ``UP_AFTER_S`` later.
    """

    last_fall: float = 0.0
    last_target: int | None = None
    sent: int = 0  # probes
    started: int = 0  # start probes (``start``)
    task: asyncio.Task[None] | None = None
    probed: tuple[float, float] | None = None  # (when, bit/s) of the last probe

    def on_remb(self, bps: int, state: LossBased, now: float) -> None:
        """A REMB that answers the last probe lifts the loss cap (libwebrtc's GoogCC sets its
        loss-based estimate to a probe's result: ``SetSendBitrate``)."""
        probed = self.probed
        if probed is not None and now - probed[0] < PROBE_ANSWER_S and bps >= 0.9 * probed[1]:
            state.cap_bps = None
            state.ceiling_bps = None  # the link is wider than where its queue overflowed
            state.overflowed_bps = None
            self.probed = None

    async def start(self, sender: RTCRtpSender) -> None:
        """The start probe: as soon as the first media packet has left, one cluster of
        ``START_PROBE_PACKETS`` padding-only RTX packets at each of ``START_PROBE_SCALES`` x the
        encoder's target (``START_BPS``, 200 kbit/s: 600 and 1200 kbit/s).

        aiortc's first estimate is an overuse, the receiver's start probe detection on the
        media's own spacing, or 3 s of throughput (rate.py:74-78), and the ladder then holds
        ``UP_AFTER_S``: a sender that starts at 480x360 to leave a 300 kbit/s link room for
        its audio reached 640x480 on a clean link 6-9 s after its first frame. libwebrtc's
        ``ProbeController`` (``InitiateExponentialProbing``) probes at 3 and 6 x its start
        rate when the transport becomes writable, and the receiver's estimate is the probe's
        rate from the first cluster that arrived as spaced as it was sent (``best_probe``):
        a link narrower than the probe spreads it, and the estimate is not raised. While
        that answer may come (``PROBE_ANSWER_S``), the ladder climbs at once
        (``Ladder.climb_until``). The first media packet goes first so that the probe
        reaches a receiver that is ready for it (aiortc starts sending as soon as its own
        DTLS is up, rtcpeerconnection.py:1089) and no media cluster comes before it in the
        receiver's list (one that failed would hide the probe: ``best_probe`` stops there).
        """
        deadline = time.monotonic() + START_WAIT_S
        while not getattr(sender, "_RTCRtpSender__packet_count", 0):  # rtcrtpsender.py:406
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.005)
        encoder = getattr(sender, "_RTCRtpSender__encoder", None)
        ladder: Ladder | None = getattr(encoder, "_epc_ladder", None)
        rtx = getattr(sender, "_RTCRtpSender__rtx_payload_type", None)
        if encoder is None or ladder is None or rtx is None or ladder.rung == 0:
            return
        base = int(encoder.target_bitrate)
        now = time.monotonic()
        ladder.climb_until = now + PROBE_ANSWER_S
        self.probed = now, START_PROBE_SCALES[0] * base
        self.started += 1
        for n, scale in enumerate(START_PROBE_SCALES):
            if n:
                await asyncio.sleep(START_PROBE_PAUSE_S)
            await send_cluster(sender, rtx, scale * base, START_PROBE_PACKETS)

    def on_target(self, target: int, now: float) -> None:
        if self.last_target is not None and target < self.last_target:
            self.last_fall = now
        self.last_target = target

    def want(self, sender: RTCRtpSender, now: float) -> float | None:
        """The rate to probe now, in bit/s, or None."""
        encoder = getattr(sender, "_RTCRtpSender__encoder", None)
        ladder: Ladder | None = getattr(encoder, "_epc_ladder", None)
        state = loss_based(sender)
        if ladder is None or not ladder.width or ladder.rung == 0 or state.last_loss >= LOSS_LOW:
            return None
        target = state.target()
        rate = PROBE_ABOVE * ladder.need(0)
        if target is None or target >= rate or now - self.last_fall < PROBE_QUIET_S:
            return None
        return rate

    async def run(self, sender: RTCRtpSender) -> None:
        if START_PROBE:
            with contextlib.suppress(ConnectionError):
                await self.start(sender)
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            rate = self.want(sender, time.monotonic())
            rtx = getattr(sender, "_RTCRtpSender__rtx_payload_type", None)
            if rate is None or rtx is None:
                continue
            self.sent += 1
            self.probed = time.monotonic(), rate
            with contextlib.suppress(ConnectionError):
                await send_probe(sender, rtx, rate)


async def send_probe(sender: RTCRtpSender, payload_type: int, rate_bps: float) -> None:
    """``PROBE_PACKETS`` padding-only RTX packets spaced for ``rate_bps`` (each stamped with
    its own abs-send-time, as rtcrtpsender.py:388 stamps media)."""
    gap = PROBE_PADDING * 8 / rate_bps
    start = time.monotonic()
    for n in range(PROBE_PACKETS):
        await asyncio.sleep(max(0.0, start + n * gap - time.monotonic()))
        await send_padding(sender, payload_type)


async def send_cluster(
    sender: RTCRtpSender, payload_type: int, rate_bps: float, packets: int
) -> None:
    """``packets`` padding-only RTX packets, each ``PROBE_PADDING`` x 8 / ``rate_bps`` after
    the one before, waited out with ``time.sleep``: the event loop is held for the cluster
    (8-17 ms at 1200 and 600 kbit/s). The receiver's start detection (``clusters``) needs
    each send delta within 2.5 ms of the cluster's mean, and 1.7 or 3.4 ms on the event loop
    take up to 15 while an encode holds it; libwebrtc's pacer has a thread of its own. The
    sends do not wait (``RTCDtlsTransport._send_rtp`` to aioice's ``sendto`` never yields on
    UDP)."""
    gap = PROBE_PADDING * 8 / rate_bps
    sent_at: float | None = None
    for _ in range(packets):
        if sent_at is not None:
            time.sleep(max(0.0, sent_at + gap - time.monotonic()))  # noqa: ASYNC251 (the spacing)
        sent_at = time.monotonic()
        await send_padding(sender, payload_type)


async def send_padding(sender: RTCRtpSender, payload_type: int) -> None:
    """One padding-only RTX packet of ``PROBE_PADDING`` bytes, stamped with its abs-send-time."""
    seq: int = sender._RTCRtpSender__rtx_sequence_number  # type: ignore[attr-defined]
    sender._RTCRtpSender__rtx_sequence_number = (seq + 1) & 0xFFFF  # type: ignore[attr-defined]
    packet = RtpPacket(payload_type=payload_type, sequence_number=seq, ssrc=sender._rtx_ssrc)
    packet.padding_size = PROBE_PADDING
    packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0xFFFFFF
    packet.extensions.mid = getattr(sender, "_RTCRtpSender__mid", None)
    extensions = sender._RTCRtpSender__rtp_header_extensions_map  # type: ignore[attr-defined]
    await sender.transport._send_rtp(packet.serialize(extensions))


def prober(sender: RTCRtpSender) -> Prober:
    """The sender's ``Prober`` (made, and started, on first use)."""
    state: Prober | None = sender.__dict__.get("_epc_prober")
    if state is None:
        state = sender.__dict__["_epc_prober"] = Prober()
        if PROBING:
            state.task = asyncio.ensure_future(state.run(sender))
    return state


# On: with the kernel's stamps, Chromium's estimate from this feedback matched Chromium to
# Chromium; the REMB's probe detection missed Chromium's start probes in half the runs.
TRANSPORT_CC = True
TRANSPORT_CC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
TRANSPORT_CC_ID = 5  # aiortc uses 1-3 (codecs/__init__.py:45), shared across kinds with BUNDLE
FEEDBACK_INTERVAL_S = 0.1  # libwebrtc's default
MAX_STATUSES = 4000  # packets reported in one feedback at most
RTCP_RTPFB, RTCP_RTPFB_TRANSPORT_CC = 205, 15
TICK_US = 250  # a receive delta's unit
REFERENCE_US = 64_000  # the reference time's unit


@dataclass
class TransportFeedback:
    """The transport-cc feedback of one receiver: what arrived, reported every 100 ms."""

    arrivals: dict[int, int] = field(default_factory=dict)  # unwrapped seq -> arrival us
    next_seq: int | None = None  # the first sequence number not reported yet
    highest: int | None = None  # unwrapped
    count: int = 0  # feedback packets made (modulo 256 on the wire)
    sent: int = 0

    def unwrap(self, seq: int) -> int:
        if self.highest is None:
            return seq
        base = self.highest & ~0xFFFF
        candidates = (base - 0x10000 + seq, base + seq, base + 0x10000 + seq)
        return min(candidates, key=lambda c: abs(c - self.highest))  # type: ignore[operator]

    def add(self, seq: int, arrival_us: int) -> None:
        ext = self.unwrap(seq)
        if self.next_seq is None:
            self.next_seq = ext
        if ext < self.next_seq:
            return  # already reported missing; too late to tell
        self.arrivals[ext] = arrival_us
        self.highest = ext if self.highest is None else max(self.highest, ext)

    def build(self, sender_ssrc: int, media_ssrc: int) -> bytes | None:
        """The next feedback packet (RTCP RTPFB FMT 15), None when nothing new arrived."""
        if not self.arrivals or self.next_seq is None or self.highest is None:
            return None
        base = self.next_seq
        end = min(self.highest, base + MAX_STATUSES - 1)
        received = sorted((s, self.arrivals[s]) for s in self.arrivals if s <= end)
        first_us = received[0][1]
        reference = first_us // REFERENCE_US
        previous = reference * REFERENCE_US // TICK_US
        symbols: list[int] = []
        deltas = b""

        for seq in range(base, end + 1):
            arrival = self.arrivals.get(seq)
            if arrival is None:
                symbols.append(0)
                continue
            ticks = arrival // TICK_US
            delta = ticks - previous
            if 0 <= delta <= 0xFF:
                symbols.append(1)
                deltas += struct.pack("!B", delta)
            elif -0x8000 <= delta <= 0x7FFF:
                symbols.append(2)
                deltas += struct.pack("!h", delta)
            else:  # out of range: report up to here, the rest next time
                end = seq - 1
                break
            previous = ticks
        chunks = b""
        at = 0
        while at < len(symbols):  # run-length chunks: 0 | symbol (2 bits) | run (13 bits)
            run = 1
            while at + run < len(symbols) and symbols[at + run] == symbols[at] and run < 0x1FFF:
                run += 1
            chunks += struct.pack("!H", symbols[at] << 13 | run)
            at += run
        body = struct.pack(
            "!IIHHI",
            sender_ssrc,
            media_ssrc,
            base & 0xFFFF,
            len(symbols),
            (reference & 0xFFFFFF) << 8 | (self.count & 0xFF),
        )
        body += chunks + deltas
        padding = -len(body) % 4
        if padding:
            body += b"\x00" * (padding - 1) + struct.pack("!B", padding)
        header = struct.pack(
            "!BBH",
            0x80 | (0x20 if padding else 0) | RTCP_RTPFB_TRANSPORT_CC,
            RTCP_RTPFB,
            (len(body) + 4) // 4 - 1,
        )
        for seq in range(base, end + 1):
            self.arrivals.pop(seq, None)
        self.next_seq = end + 1
        self.count += 1
        return header + body


class _RawRtcp:
    """An RTCP packet already serialized, for ``RTCRtpReceiver._send_rtcp`` (it calls bytes())."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __bytes__(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"RtcpTransportFeedback({len(self.data)} bytes)"


def _feedback_of(receiver: RTCRtpReceiver) -> TransportFeedback:
    feedback: TransportFeedback | None = receiver.__dict__.get("_epc_transport_cc")
    if feedback is None:
        feedback = receiver.__dict__["_epc_transport_cc"] = TransportFeedback()
        task = asyncio.ensure_future(_send_feedback(receiver, feedback))
        receiver.__dict__["_epc_transport_cc_task"] = task
    return feedback


async def _send_feedback(receiver: RTCRtpReceiver, feedback: TransportFeedback) -> None:
    media_ssrc = 0
    while receiver._enabled is not False:
        await asyncio.sleep(FEEDBACK_INTERVAL_S)
        rtcp_ssrc = getattr(receiver, "_RTCRtpReceiver__rtcp_ssrc", None)
        streams = getattr(receiver, "_RTCRtpReceiver__remote_streams", {})
        media_ssrc = next(iter(streams), media_ssrc)
        if rtcp_ssrc is None:
            continue
        data = feedback.build(rtcp_ssrc, media_ssrc)
        if data is not None:
            feedback.sent += 1
            await receiver._send_rtcp(_RawRtcp(data))  # type: ignore[arg-type]


def transport_feedback(receiver: RTCRtpReceiver) -> TransportFeedback | None:
    """The receiver's transport-cc state, None while no packet carried a transport-wide number."""
    feedback: TransportFeedback | None = receiver.__dict__.get("_epc_transport_cc")
    return feedback


def offer_transport_cc() -> None:
    """Offer and answer transport-cc on the video codecs (process-wide)."""
    # codecs/__init__.py:45 (header extensions) and :79-83 (the video codecs' feedback).
    video = codecs.HEADER_EXTENSIONS["video"]
    if all(ext.uri != TRANSPORT_CC_URI for ext in video):
        video.append(RTCRtpHeaderExtensionParameters(id=TRANSPORT_CC_ID, uri=TRANSPORT_CC_URI))
    wanted = RTCRtcpFeedback(type="transport-cc")
    for codec in codecs.CODECS["video"]:
        if codec.rtcpFeedback and wanted not in codec.rtcpFeedback:
            codec.rtcpFeedback.append(wanted)


# -- arrival times from the kernel ----------------------------------------------------------------

KERNEL_STAMPS = True  # off: aiortc's own stamps (bench/rate.py --chromium's "patched REMB")
SIOCGSTAMPNS = 0x8907  # linux/sockios.h: the receive time of the last datagram read
NTP_UNIX_S = 2208988800  # aiortc's clock counts ms from 1900 (clock.py:3)


class _Stamped(tuple):  # type: ignore[type-arg]
    """aioice's ``(data, component)`` queue item with the datagram's kernel receive time."""

    stamp_ms: int | None = None


def kernel_stamp_ms(sock: socket.socket) -> int | None:
    """The kernel's receive time of the datagram just read from ``sock``, on aiortc's clock.

    The first call on a socket turns its stamps on (the kernel then answers with the time of
    the call); None where the kernel has none.
    """
    try:
        raw = fcntl.ioctl(sock.fileno(), SIOCGSTAMPNS, b"\x00" * 16)
    except OSError:
        return None
    seconds, nanoseconds = struct.unpack("qq", raw)
    return int((seconds + NTP_UNIX_S) * 1000 + nanoseconds // 1_000_000)


def arrival_ms(connection: Connection) -> int | None:
    """The kernel receive time of the datagram ``connection.recv()`` returned last."""
    stamp: int | None = connection.__dict__.get("_epc_stamp_ms")
    return stamp


def install_kernel_stamps() -> None:
    """Stamp each datagram with its kernel receive time and give that time, not the time the
    event loop got to it, to aiortc's estimate.

    aiortc takes a packet's arrival time when ``RTCDtlsTransport._recv_next`` handles it
    (rtcdtlstransport.py:668, ``clock.current_ms()``), after aioice's queue (ice.py:1278)
    and DTLS, on the event loop; libwebrtc stamps on its network thread. On a busy machine
    the loop reads seconds of datagrams at once: the estimators read that as queueing, and
    a probe cluster's spacing is lost. Here ``StunProtocol.datagram_received`` (ice.py:284)
    asks the kernel when the datagram came (``SIOCGSTAMPNS``, one ioctl), aioice's
    ``Connection.data_received`` (ice.py:1277) queues that time with the datagram,
    ``Connection.recvfrom`` (ice.py:729) notes it when it hands the datagram out, and
    ``RTCDtlsTransport._handle_rtp_data`` (rtcdtlstransport.py:614), called with no await
    between, takes it instead of aiortc's ``arrival_time_ms``. Only the estimate reads that
    argument (rtcrtpreceiver.py:486). A datagram that came another way (TURN over TCP)
    keeps aiortc's time. Upstream: ``recvmsg`` with ``SO_TIMESTAMPNS`` in aioice's
    protocols and a ``recv`` that returns the time.

    Link emulation: a packet delayed by an ingress ``NFQUEUE`` in the receiver's own
    namespace (tests/netem.py, ``PREROUTING``) was stamped before the delay; the tests
    and benches impair the sender's side of a video stream.
    """
    original_datagram = StunProtocol.datagram_received
    original_data = Connection.data_received
    original_recvfrom = Connection.recvfrom
    original_rtp_data = RTCDtlsTransport._handle_rtp_data

    def datagram_received(self: StunProtocol, data: bytes | str, addr: tuple[Any, ...]) -> None:
        sock = self.transport.get_extra_info("socket")
        stamp = kernel_stamp_ms(sock) if sock is not None else None
        self.receiver.__dict__["_epc_rx_stamp_ms"] = stamp
        try:
            original_datagram(self, data, addr)
        finally:
            self.receiver.__dict__["_epc_rx_stamp_ms"] = None

    def data_received(self: Connection, data: bytes, component: int) -> None:
        stamp = self.__dict__.get("_epc_rx_stamp_ms")
        if stamp is None:
            original_data(self, data, component)
            return
        item = _Stamped((data, component))
        item.stamp_ms = stamp
        self._queue.put_nowait(item)  # ice.py:1278, with the stamp

    async def recvfrom(self: Connection) -> tuple[bytes, int]:
        result = await original_recvfrom(self)
        self.__dict__["_epc_stamp_ms"] = getattr(result, "stamp_ms", None)
        return result

    async def _handle_rtp_data(self: RTCDtlsTransport, data: bytes, arrival_time_ms: int) -> None:
        connection = getattr(self.transport, "_connection", None)
        stamp = arrival_ms(connection) if connection is not None else None
        await original_rtp_data(self, data, stamp if stamp is not None else arrival_time_ms)

    StunProtocol.datagram_received = datagram_received  # type: ignore[method-assign]
    Connection.data_received = data_received  # type: ignore[method-assign]
    Connection.recvfrom = recvfrom  # type: ignore[method-assign]
    RTCDtlsTransport._handle_rtp_data = _handle_rtp_data  # type: ignore[method-assign]


_installed: list[bool] = []


def install() -> None:
    """Make every new video receiver estimate with ``SteadyEstimator`` (and give transport-cc
    feedback for packets that ask for it), and every sender cap its REMB with ``LossBased``
    (once per process)."""
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
    original_sender_stop = RTCRtpSender.stop

    async def sender_stop(self: RTCRtpSender) -> None:
        state: Prober | None = self.__dict__.get("_epc_prober")
        if state is not None and state.task is not None:
            state.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.task
        await original_sender_stop(self)

    RTCRtpSender.stop = sender_stop  # type: ignore[method-assign]
    original_send = RTCRtpSender.send

    async def send(self: RTCRtpSender, parameters: Any) -> None:
        await original_send(self, parameters)
        if self.kind == "video":
            prober(self)  # its task starts with the start probe (``Prober.start``)

    RTCRtpSender.send = send  # type: ignore[method-assign]

    if KERNEL_STAMPS:
        install_kernel_stamps()
    if TRANSPORT_CC:
        offer_transport_cc()
    original_rtp = RTCRtpReceiver._handle_rtp_packet
    original_stop = RTCRtpReceiver.stop

    async def _handle_rtp_packet(
        self: RTCRtpReceiver, packet: RtpPacket, arrival_time_ms: int
    ) -> None:
        estimator = getattr(self, "_RTCRtpReceiver__remote_bitrate_estimator", None)
        codec = getattr(self, "_RTCRtpReceiver__codecs", {}).get(packet.payload_type)
        if isinstance(estimator, SteadyEstimator):  # read by the add() this packet makes
            estimator.padding = (
                codec is not None
                and is_rtx(codec)
                and not packet.payload
                and packet.padding_size > 0
            )  # a probe (``Prober``)
        seq = packet.extensions.transport_sequence_number
        if seq is not None and self._enabled:
            _feedback_of(self).add(seq, arrival_time_ms * 1000)
            # rtcrtpreceiver.py:482-498: with transport-cc the sender estimates; no REMB.
            packet.extensions.abs_send_time = None
        await original_rtp(self, packet, arrival_time_ms)

    async def stop(self: RTCRtpReceiver) -> None:
        estimator = getattr(self, "_RTCRtpReceiver__remote_bitrate_estimator", None)
        if isinstance(estimator, SteadyEstimator):
            estimator.watch.stop()
        task = self.__dict__.pop("_epc_transport_cc_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await original_stop(self)

    RTCRtpReceiver._handle_rtp_packet = _handle_rtp_packet  # type: ignore[method-assign]
    RTCRtpReceiver.stop = stop  # type: ignore[method-assign]


def installed() -> bool:
    return bool(_installed)
