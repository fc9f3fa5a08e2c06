"""One seat's life: the relay client, one RTCPeerConnection at a time, media and chat.

The patient offers when it learns the practitioner is there; the practitioner
answers. aiortc gathers every candidate before its description goes out;
candidates trickled by a browser (and its end-of-candidates ``null``) are
accepted, also before the description they belong to.

A signaling drop is not a hang-up: the call keeps its media while the relay
client reconnects and rejoins with its resume key. ``bye``, or ICE failing
after the call was up, ends that call and the seat waits for the next peer.
A call that never connects within ``ice.timeout_s`` is fatal (``IceFailed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISFIFO, S_ISSOCK
from typing import Any

from aiortc import (
    RTCDataChannel,
    RTCIceCandidate,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp
from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCRemoteOutboundRtpStreamStats,
)

from peers import ice
from peers.config import PeerSettings
from peers.media import Receiver, Sources
from peers.signaling import RelayClient
from peers.turnclient import TurnUnavailable, check_relay_gathered, first_turn_server, instrument

logger = logging.getLogger(__name__)

OTHER = {"patient": "practitioner", "practitioner": "patient"}
CHAT_LABEL = "chat"
STATS_EVERY_S = 5.0

__all__ = ["IceFailed", "Seat"]


class IceFailed(RuntimeError):
    """No connection could be made within the ICE timeout; the message says why."""


@dataclass
class CallState:
    """What one RTCPeerConnection has carried."""

    pc: RTCPeerConnection
    receiver: Receiver
    started: float
    connected_at: float | None = None
    servers: list[Any] = field(default_factory=list)
    pending: list[dict[str, Any] | None] = field(default_factory=list)
    channel: RTCDataChannel | None = None
    watchdog: asyncio.Task[None] | None = None


class Seat:
    """A patient or practitioner: joins, calls, answers, hangs up, reports."""

    def __init__(
        self,
        role: str,
        settings: PeerSettings,
        sources: Sources,
        *,
        record_to: Path | None = None,
        chat_input: bool = True,
    ) -> None:
        self.role, self.other = role, OTHER[role]
        self.settings = settings
        self.sources = sources
        self.record_to = record_to
        self.chat_input = chat_input
        self.relay = RelayClient(settings.relay_url, settings.session, role, settings.token)
        self.call: CallState | None = None
        self.relay_ice: list[dict[str, Any]] | None = None
        self.seats_taken_at: float | None = None
        self.calls = 0
        self.fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.summary_call: CallState | None = None
        self.last_path: ice.IcePath | None = None
        self._stats_prev: tuple[float, int, int] | None = None
        self._closing: dict[int, asyncio.Task[None]] = {}

    # -- the main loop --

    async def run(self) -> None:
        """Handle the relay's frames until cancelled; IceFailed or JoinRefused end it."""
        ice.honour_timeout(self.settings.ice_timeout_s)
        stats = asyncio.create_task(self._stats_loop())
        chat = asyncio.create_task(self._chat_input()) if self.chat_input else None
        frames = asyncio.create_task(self._frames())
        try:
            waiters: list[asyncio.Future[Any]] = [frames, self.fatal]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if self.fatal.done():
                raise self.fatal.result()
            frames.result()
        finally:
            for task in (stats, chat, frames):
                if task is not None:
                    task.cancel()
            for task in (stats, chat, frames):
                if task is not None:
                    # What ended the frames task is reported through self.fatal.
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _frames(self) -> None:
        async for frame in self.relay.frames():
            await self._on_frame(frame)

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "joined":
            self.relay_ice = frame.get("ice_servers")
            resumed = " (resumed)" if frame.get("resumed") else ""
            logger.info("joined session %s as %s%s", self.settings.session, self.role, resumed)
            if frame.get("peer"):
                await self._peer_present(resumed=bool(frame.get("peer_resumed")))
            else:
                logger.info("waiting for the %s", self.other)
        elif kind == "peer-joined":
            logger.info(
                "the %s joined%s", self.other, " again (resumed)" if frame.get("resumed") else ""
            )
            await self._peer_present(resumed=bool(frame.get("resumed")))
        elif kind == "peer-left":
            reason = frame.get("reason")
            if reason == "bye":
                logger.info("the %s hung up", self.other)
                await self.hang_up(send_bye=False)
            else:
                logger.info("the %s's signaling dropped (%s): the call goes on", self.other, reason)
        elif kind == "bye":
            logger.info("the %s said bye (%s)", self.other, frame.get("reason", ""))
            await self.hang_up(send_bye=False)
        elif kind == "offer" and self.role == "practitioner":
            await self._answer(str(frame.get("sdp", "")))
        elif kind == "answer" and self.role == "patient" and self.call is not None:
            await self.call.pc.setRemoteDescription(
                RTCSessionDescription(str(frame.get("sdp")), "answer")
            )
            await self._flush_candidates()
        elif kind == "candidate":
            await self._remote_candidate(frame.get("candidate"))
        elif kind == "error":
            logger.warning("relay: %s (%s)", frame.get("code"), frame.get("message"))

    async def _peer_present(self, *, resumed: bool) -> None:
        alive = self.call is not None and self.call.pc.connectionState in {
            "new",
            "connecting",
            "connected",
        }
        if resumed and alive:
            return  # a signaling reconnect: the call goes on
        self.seats_taken_at = time.monotonic()
        if self.role == "patient":
            await self._offer()

    # -- one call --

    def _new_call(self) -> CallState:
        if self.call is not None:
            self._close_call_soon(self.call)
        servers = ice.ice_servers(self.settings, self.relay_ice)
        pc = RTCPeerConnection(ice.configuration(self.settings, servers))
        call = CallState(pc, Receiver(self.record_to), time.monotonic(), servers=servers)
        self.call, self.calls = call, self.calls + 1
        self.summary_call = call
        self._stats_prev = None

        @pc.on("track")
        def on_track(track: Any) -> None:
            call.receiver.add(track)

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label == CHAT_LABEL:
                self._use_channel(call, channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            logger.info("call %d: %s", self.calls, state)
            if state == "connected" and call.connected_at is None:
                call.connected_at = time.monotonic()
                self.last_path = ice.path_of(pc)
                logger.info("ICE path: %s", self.last_path or "unknown")
            elif state == "failed" and call is self.call:
                if call.connected_at is None:
                    self._fail(servers)
                else:
                    logger.warning(
                        "call %d: ICE failed: the %s is gone; waiting for the next",
                        self.calls,
                        self.other,
                    )
                    await self.hang_up(send_bye=False)

        call.watchdog = asyncio.create_task(self._watchdog(call, servers))
        return call

    def _fail(self, servers: list[Any], message: str | None = None) -> None:
        if not self.fatal.done():
            self.fatal.set_result(
                IceFailed(
                    message
                    or f"ICE: no connection after {self.settings.ice_timeout_s:g} s: "
                    + ice.explain_failure(self.settings, servers)
                )
            )

    def _prepare_turn(self, call: CallState) -> None:
        """Before gathering: trust turn.ca_file, bind TURN channels early, watch allocations."""

        def lost(why: str) -> None:
            logger.error("TURN: %s", why)
            self._fail(call.servers, f"TURN: {why}")

        for transport in ice.ice_transports(call.pc):
            instrument(transport, ca_file=self.settings.turn_ca_file, on_lost=lost)

    async def _check_turn(self, call: CallState) -> None:
        """After gathering: a configured TURN server that gave no relay candidate fails now."""
        server = first_turn_server(call.servers)
        if server is None:
            return
        for transport in ice.ice_transports(call.pc):
            try:
                await check_relay_gathered(transport, server, self.settings.turn_ca_file)
            except TurnUnavailable as exc:
                self._fail(call.servers, str(exc))
                raise

    async def _watchdog(self, call: CallState, servers: list[Any]) -> None:
        await asyncio.sleep(self.settings.ice_timeout_s)
        if call is self.call and call.connected_at is None:
            self._fail(servers)

    def _add_media(self, pc: RTCPeerConnection) -> None:
        for kind, track in (("audio", self.sources.audio), ("video", self.sources.video)):
            if track is not None:
                pc.addTrack(track)
            else:
                pc.addTransceiver(kind, direction="recvonly")
        codec = self.settings.video.codec
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                capabilities = RTCRtpSender.getCapabilities("video").codecs
                preferred = [c for c in capabilities if c.mimeType.lower() == f"video/{codec}"]
                rest = [c for c in capabilities if c not in preferred]
                transceiver.setCodecPreferences(preferred + rest)

    async def _turn_resolves(self) -> bool:
        servers = ice.ice_servers(self.settings, self.relay_ice)
        if why := await ice.unresolvable(servers):
            self._fail(servers, why)
            return False
        return True

    async def _offer(self) -> None:
        if not await self._turn_resolves():
            return
        call = self._new_call()
        self._add_media(call.pc)
        self._use_channel(call, call.pc.createDataChannel(CHAT_LABEL))
        self._prepare_turn(call)
        await call.pc.setLocalDescription(await call.pc.createOffer())  # gathers every candidate
        await self._check_turn(call)
        await call.receiver.start()
        await self.relay.send(type="offer", sdp=call.pc.localDescription.sdp)
        logger.info("offer sent to the %s", self.other)

    async def _answer(self, sdp: str) -> None:
        if not await self._turn_resolves():
            return
        call = self._new_call()
        await call.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        for transceiver in call.pc.getTransceivers():
            track = self.sources.audio if transceiver.kind == "audio" else self.sources.video
            if track is not None:
                transceiver.sender.replaceTrack(track)
                transceiver.direction = "sendrecv"
        self._prepare_turn(call)
        await call.pc.setLocalDescription(await call.pc.createAnswer())
        await self._check_turn(call)
        await call.receiver.start()
        await self._flush_candidates()
        await self.relay.send(type="answer", sdp=call.pc.localDescription.sdp)
        logger.info("answer sent to the %s", self.other)

    async def _remote_candidate(self, init: Any) -> None:
        call = self.call
        if call is None:
            return
        if call.pc.remoteDescription is None:
            call.pending.append(init)
            return
        if init is None or not init.get("candidate"):
            return  # end-of-candidates: aiortc needs nothing more
        line = str(init["candidate"]).removeprefix("candidate:")
        candidate: RTCIceCandidate = candidate_from_sdp(line)
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        try:
            await call.pc.addIceCandidate(candidate)
        except ValueError as exc:
            logger.warning("a remote candidate was refused: %s", exc)

    async def _flush_candidates(self) -> None:
        call = self.call
        if call is None:
            return
        pending, call.pending = call.pending, []
        for init in pending:
            await self._remote_candidate(init)

    async def hang_up(self, *, send_bye: bool, reason: str = "hang up") -> None:
        call, self.call = self.call, None
        if send_bye:
            await self.relay.send(type="bye", reason=reason)
        if call is not None:
            await self._close_call(call)

    def _close_call_soon(self, call: CallState) -> None:
        self._closing_task(call)

    async def _close_call(self, call: CallState) -> None:
        # Shielded: a hang-up cancelled half-way (Ctrl-C while the other side's
        # bye is being handled) must still stop aiortc's decoder threads, or the
        # process never exits. close() waits for every such task.
        await asyncio.shield(self._closing_task(call))

    def _closing_task(self, call: CallState) -> asyncio.Task[None]:
        task = self._closing.get(id(call))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._finish(call))
            self._closing[id(call)] = task
        return task

    async def _finish(self, call: CallState) -> None:
        if call.watchdog is not None:
            call.watchdog.cancel()
        await call.receiver.stop()
        await call.pc.close()

    # -- chat --

    def _use_channel(self, call: CallState, channel: RTCDataChannel) -> None:
        call.channel = channel

        @channel.on("message")
        def on_message(message: Any) -> None:
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            print(f"chat> {text}", flush=True)

    async def _chat_input(self) -> None:
        if not _interactive(sys.stdin):
            return  # /dev/null, a regular file, or closed: no chat input
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except (ValueError, OSError):
            return  # stdin is a regular file or closed: no chat input
        while line := await reader.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            call = self.call
            if not text:
                continue
            if call is None or call.channel is None or call.channel.readyState != "open":
                logger.warning("chat: not in a call yet; line dropped")
                continue
            call.channel.send(text)

    # -- statistics --

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            call = self.call
            if call is not None and call.connected_at is not None:
                logger.info("%s", await self.stats_line(call))

    async def stats_line(self, call: CallState) -> str:
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
        prev, self._stats_prev = self._stats_prev, (now, received, sent)
        bitrate = "bitrate -"  # the first line has no earlier sample to compare with
        if prev is not None and now > prev[0]:
            rate_in = (received - prev[1]) * 8 / (now - prev[0]) / 1000
            rate_out = (sent - prev[2]) * 8 / (now - prev[0]) / 1000
            bitrate = f"bitrate in {rate_in:.0f} kbit/s out {rate_out:.0f} kbit/s"
        got = call.receiver.received
        path = ice.path_of(call.pc) or self.last_path
        rtt_text = f"{rtt * 1000:.0f} ms" if rtt is not None else "-"
        return (
            f"stats: path {path or '-'}; video in {got.width}x{got.height} "
            f"{got.fps(now):.1f} fps; {bitrate}; "
            f"rtt {rtt_text}; packets lost {lost}"
        )

    def summary(self, exit_reason: str) -> dict[str, Any]:
        """The ``--stats-json`` summary of the last call."""
        call = self.summary_call
        out: dict[str, Any] = {
            "role": self.role,
            "session": self.settings.session,
            "exit_reason": exit_reason,
            "calls": self.calls,
            "relay_reconnects": self.relay.reconnects,
            "ice": None,
            "first_frame_ms": None,
            "video": {"frames": 0, "fps": 0.0, "width": 0, "height": 0, "stamped": 0},
            "audio": {"frames": 0},
            "latency_ms": None,
        }
        if call is None:
            return out
        path = ice.path_of(call.pc) or self.last_path
        if path is not None:
            out["ice"] = {
                "local_type": path.local_type,
                "remote_type": path.remote_type,
                "protocol": path.protocol,
                "relay_protocol": path.relay,
                "type": path.type,
            }
        got = call.receiver.received
        start = min(self.seats_taken_at or call.started, call.started)
        if got.first_video is not None:
            out["first_frame_ms"] = round((got.first_video - start) * 1000, 1)
        span = (time.monotonic() - got.first_video) if got.first_video else 0.0
        out["video"] = {
            "frames": got.video_frames,
            "fps": round(got.video_frames / span, 1) if span > 0 else 0.0,
            "width": got.width,
            "height": got.height,
            "stamped": got.stamped,
            "in_order": got.counters == sorted(got.counters),
        }
        out["audio"] = {"frames": got.audio_frames}
        out["latency_ms"] = got.latency_summary()
        return out

    async def close(self) -> None:
        await self.hang_up(send_bye=False)
        for task in list(self._closing.values()):
            await task
        self.sources.stop()


def _interactive(stream: Any) -> bool:
    """A terminal, a pipe or a socket: something worth reading chat lines from."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return bool(stream.isatty()) or S_ISFIFO(mode) or S_ISSOCK(mode)
