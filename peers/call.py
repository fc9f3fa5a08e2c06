"""One call: one RTCPeerConnection's life, as web/js/call.js is for the page.

A ``Call`` offers, answers, accepts the answer, takes trickled candidates (also
before the description they belong to: they wait in a queue), carries the chat
channel and closes. It sends its descriptions through the ``send`` callable it
is given (one frame, a dict as on the wire) and knows nothing of the relay
client. aiortc gathers every candidate before its description goes out, so it
sends no candidates of its own.

It tells its owner through callbacks:

- ``on_state(state)``: every connectionState (``connected``, ``failed``, ...);
- ``on_failed(error)``: once, when the call cannot be made: no connection within
  ``timeout_s`` or ICE failing before it connected (``IceFailed``), a configured
  TURN server giving no relay candidate (``TurnUnavailable``), its name not
  resolving, or its allocation lost (``IceFailed``);
- ``on_chat(text)``: a chat message from the other side;
- ``on_path(alive)``: once connected, ``False`` when nothing at all (RTP, RTCP,
  SCTP: the DTLS transport's bytes received) arrived for ``media_timeout_s``
  (a muted side still sends RTCP every 0.5 to 1.5 s, so it is not a dead
  path), ``True`` when bytes arrive again on the same path.

When ICE connects and the DTLS handshake then fails, ``on_failed`` gets a
``DtlsFailed`` naming aiortc's cause ("DTLS handshake failed: <cause>"), not
an ICE timeout: that is not the network, and retrying will not fix it.

``close()`` may be called any number of times, from anywhere: the first call
does the work (shielded from cancellation, so that aiortc's decoder threads
always stop), the others wait for it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from peers import aiortc_patches, aiortc_send, ice
from peers.config import PeerSettings
from peers.errors import CallFailed, DtlsFailed, IceFailed
from peers.media import Receiver
from peers.turnclient import IcePath, check_relay_gathered, first_turn_server, tls_context

__all__ = ["CHAT_LABEL", "Call", "CallOptions"]

logger = logging.getLogger(__name__)

CHAT_LABEL = "chat"
GAP_S = 0.5  # nothing received this long: a gap, after which the video needs a keyframe

Send = Callable[[dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class CallOptions:
    """What one call needs to know: its ICE servers and policy, timeout, TLS trust, codec."""

    servers: tuple[RTCIceServer, ...] = ()
    policy: str = "all"  # or "relay": TURN only
    timeout_s: float = 20.0
    ca_file: Path | None = None  # trusted for turns:, besides the system's CAs
    codec: str = "vp8"
    early_channels: bool = True  # bind TURN channels before the checks start
    media_timeout_s: float = 3.0  # nothing received this long: the path is dead
    # RED + ULPFEC offered and answered on video (media.video.fec, on by default; off here for
    # a Call built in process unless asked)
    fec: bool = False

    @classmethod
    def from_settings(
        cls, settings: PeerSettings, from_relay: Sequence[dict[str, Any]] | None = None
    ) -> CallOptions:
        """The options of a call: the relay's TURN credentials first, then the YAML's servers."""
        return cls(
            servers=tuple(ice.ice_servers(settings, from_relay)),
            policy=settings.ice_policy,
            timeout_s=settings.ice_timeout_s,
            ca_file=settings.turn_ca_file,
            codec=settings.video.codec,
            fec=settings.video.fec,
            media_timeout_s=settings.call_media_timeout_s,
        )


class Call:
    """One RTCPeerConnection: offer or answer, candidates, chat, state, close."""

    def __init__(
        self,
        options: CallOptions,
        send: Send,
        *,
        audio: MediaStreamTrack | None = None,
        video: MediaStreamTrack | None = None,
        receiver: Receiver | None = None,
        name: str = "call",
    ) -> None:
        aiortc_patches.check_versions()
        aiortc_patches.steady_media()
        aiortc_send.negotiate_fec(options.fec)  # process-wide: aiortc's codec list
        self.options = options
        self.name = name
        self.audio, self.video = audio, video
        self.receiver = receiver if receiver is not None else Receiver()
        self.pc = RTCPeerConnection(ice.rtc_configuration(options.servers, options.policy))
        self.started = time.monotonic()
        self.connected_at: float | None = None
        self.channel: RTCDataChannel | None = None
        # Did the other side's description carry a data channel (m=application)? None: not yet.
        self.remote_chat: bool | None = None
        self.lost: list[str] = []  # TURN allocations reported lost
        self.failure: CallFailed | None = None
        self.on_state: Callable[[str], Awaitable[None] | None] | None = None
        self.on_failed: Callable[[CallFailed], None] | None = None
        self.on_chat: Callable[[str], None] | None = None
        self.on_path: Callable[[bool], None] | None = None
        self.answered = asyncio.Event()  # the remote description is set
        self.failed = asyncio.Event()  # on_failed was called
        self.heard_at = time.monotonic()  # when bytes last arrived (watched once connected)
        self.path_dead = False
        self._dtls_watched: list[Any] = []  # the transports whose bytes the path watch counts
        self._bytes_seen = -1
        self._gap = False  # nothing received for GAP_S: a keyframe is asked for at the next bytes
        self._send = send
        self._pending: list[dict[str, Any] | None] = []
        self._path: IcePath | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._path_watch: asyncio.Task[None] | None = None
        self._pli_again: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.pc.on("track", self.receiver.add)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    # -- what the owner reads --

    @property
    def state(self) -> str:
        return str(self.pc.connectionState)

    @property
    def alive(self) -> bool:
        """Not failed nor closed: still connecting or carrying media."""
        return self.state in {"new", "connecting", "connected"} and self._closing is None

    @property
    def path(self) -> IcePath | None:
        """The selected candidate pair now, or the one taken when the call connected."""
        return ice.path_of(self.pc) or self._path

    @property
    def closed(self) -> bool:
        return self._closing is not None and self._closing.done()

    # -- negotiation --

    async def offer(self) -> None:
        """Add the media and the chat channel, gather, and send the offer."""
        await self._before_gathering()
        self._add_media()
        self._use_channel(self.pc.createDataChannel(CHAT_LABEL))
        self._instrument()
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        await self._check_gathered()
        await self.receiver.start()
        await self._send({"type": "offer", "sdp": self.pc.localDescription.sdp})

    async def answer(self, sdp: str) -> None:
        """Take the other side's offer, gather, and send the answer."""
        await self._before_gathering()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        self.remote_chat = "\nm=application " in f"\n{sdp}"
        self.answered.set()
        for transceiver in self.pc.getTransceivers():
            track = self.audio if transceiver.kind == "audio" else self.video
            if track is not None:
                transceiver.sender.replaceTrack(track)
                transceiver.direction = "sendrecv"
        self._instrument()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self._check_gathered()
        await self.receiver.start()
        await self._flush_candidates()
        await self._send({"type": "answer", "sdp": self.pc.localDescription.sdp})

    async def accept(self, sdp: str) -> None:
        """Take the other side's answer to our offer."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        self.remote_chat = "\nm=application " in f"\n{sdp}"
        self.answered.set()
        await self._flush_candidates()

    async def add_candidate(self, init: dict[str, Any] | None) -> None:
        """A trickled candidate (RTCIceCandidateInit), or None for end-of-candidates."""
        if self.pc.remoteDescription is None:
            self._pending.append(init)
            return
        if init is None or not init.get("candidate"):
            return  # end-of-candidates: aiortc needs nothing more
        line = str(init["candidate"]).removeprefix("candidate:")
        candidate: RTCIceCandidate = candidate_from_sdp(line)
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        try:
            await self.pc.addIceCandidate(candidate)
        except ValueError as exc:
            logger.warning("%s: a remote candidate was refused: %s", self.name, exc)

    async def _flush_candidates(self) -> None:
        pending, self._pending = self._pending, []
        for init in pending:
            await self.add_candidate(init)

    # -- chat --

    def send_chat(self, text: str) -> bool:
        """Send one chat line; False when the channel is not open (yet)."""
        if self.channel is None or self.channel.readyState != "open":
            return False
        self.channel.send(text)
        return True

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label == CHAT_LABEL:
            self._use_channel(channel)

    def _use_channel(self, channel: RTCDataChannel) -> None:
        self.channel = channel

        @channel.on("message")
        def on_message(message: Any) -> None:
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            if self.on_chat is not None:
                self.on_chat(text)

    # -- failure --

    async def _before_gathering(self) -> None:
        if why := await ice.unresolvable(self.options.servers):
            raise self._fail(IceFailed(why))
        self._watchdog = asyncio.create_task(self._watch())

    def _add_media(self) -> None:
        for kind, track in (("audio", self.audio), ("video", self.video)):
            if track is not None:
                self.pc.addTrack(track)
            else:
                self.pc.addTransceiver(kind, direction="recvonly")
        codec = self.options.codec
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "video":
                capabilities = RTCRtpSender.getCapabilities("video").codecs
                preferred = [c for c in capabilities if c.mimeType.lower() == f"video/{codec}"]
                rest = [c for c in capabilities if c not in preferred]
                transceiver.setCodecPreferences(preferred + rest)

    def _instrument(self) -> None:
        """Before gathering: trust ca_file, bind TURN channels early, watch allocations."""
        ca_file = self.options.ca_file
        for dtls in self._dtls_transports():
            aiortc_patches.watch_handshake(dtls, self._dtls_failed)
        for transport in ice.ice_transports(self.pc):
            if ca_file is not None:
                aiortc_patches.use_tls_context(transport, tls_context(ca_file))
            aiortc_patches.instrument(
                transport, on_lost=self._turn_lost, early_channels=self.options.early_channels
            )

    def _dtls_transports(self) -> list[Any]:
        found: list[Any] = []
        for transceiver in self.pc.getTransceivers():
            dtls = transceiver.sender.transport
            if dtls is not None and dtls not in found:
                found.append(dtls)
        if self.pc.sctp is not None and self.pc.sctp.transport not in found:
            found.append(self.pc.sctp.transport)
        return found

    def _dtls_failed(self, cause: str) -> None:
        if cause == "connection error":
            return  # the ICE transport failed under it: the network, reported as IceFailed
        logger.error("%s: DTLS handshake failed: %s", self.name, cause)
        self._fail(DtlsFailed(cause))

    def _turn_lost(self, why: str) -> None:
        logger.error("%s: TURN: %s", self.name, why)
        self.lost.append(why)
        self._fail(IceFailed(f"TURN: {why}"))

    async def _check_gathered(self) -> None:
        """After gathering: a configured TURN server that gave no relay candidate fails now."""
        server = first_turn_server(self.options.servers)
        if server is None:
            return
        for transport in ice.ice_transports(self.pc):
            try:
                await check_relay_gathered(transport, server, self.options.ca_file)
            except CallFailed as exc:
                raise self._fail(exc) from None

    async def _watch(self) -> None:
        await asyncio.sleep(self.options.timeout_s)
        if self.connected_at is None:
            self._fail(self._timed_out())

    def _timed_out(self) -> IceFailed:
        return IceFailed(
            f"ICE: no connection after {self.options.timeout_s:g} s: "
            + ice.explain_failure(self.options.servers)
        )

    def _fail(self, error: CallFailed) -> CallFailed:
        """Report ``error`` once (the first failure is the one that counts); return it."""
        if self.failure is None and self._closing is None:
            self.failure = error
            self.failed.set()
            if self.on_failed is not None:
                self.on_failed(error)
        return error

    async def _on_state(self) -> None:
        state = self.state
        logger.info("%s: %s", self.name, state)
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self._path = ice.path_of(self.pc)
            logger.info("%s: ICE path: %s", self.name, self._path or "unknown")
            self._path_watch = asyncio.create_task(self._watch_path())
        elif state == "failed" and self.connected_at is None:
            self._fail(self._timed_out())
        if self.on_state is not None:
            result = self.on_state(state)
            if inspect.isawaitable(result):
                await result

    async def _watch_path(self) -> None:
        """Tell ``on_path`` when bytes stop coming for ``media_timeout_s``, and when they resume."""
        every = min(0.1, self.options.media_timeout_s / 5)
        self._dtls_watched = self._dtls_transports()
        self.heard_at = time.monotonic()
        while True:
            self.check_path()
            await asyncio.sleep(every)

    def check_path(self) -> bool:
        """Look at the bytes received now (the watch does every 0.1 s): True if they flow.

        Also called by the owner before it gives up on the path, so that bytes that came
        since the watch last looked count (a starved loop may run the watch late).
        """
        if self.connected_at is None or self._closing is not None:
            return False
        now = time.monotonic()
        total = sum(aiortc_patches.bytes_received(t) for t in self._dtls_watched)
        if total != self._bytes_seen:
            if self._gap:
                self._gap = False
                self._ask_keyframe(now - self.heard_at)
            self._bytes_seen, self.heard_at = total, now
            if self.path_dead:
                self.path_dead = False
                self._tell_path(alive=True)
        elif not self._gap and now - self.heard_at >= GAP_S:
            # The video frame buffer (peers/aiortc_receive.py) gives up the
            # gap's hole itself; a keyframe is asked for when bytes come back.
            self._gap = True
        if not self.path_dead and now - self.heard_at >= self.options.media_timeout_s:
            self.path_dead = True
            self._tell_path(alive=False)
        return not self.path_dead

    def _ask_keyframe(self, gap_s: float) -> None:
        """After a gap, ask for a keyframe now rather than after the frame buffer's hole wait.

        Asked again a few times: the first request may leave while the way back
        is still closed (a network returns one direction at a time). Our own
        video sends a keyframe too: a receiver that asks for none (Chromium
        after a gap, seen on the browser side) decodes again at once.
        """
        logger.debug("%s: %.1f s without media: keyframe requested", self.name, gap_s)
        for transceiver in self.pc.getTransceivers():
            aiortc_patches.request_keyframe(transceiver.receiver)
            aiortc_patches.send_keyframe(transceiver.sender)
        if self._pli_again is not None:
            self._pli_again.cancel()
        self._pli_again = asyncio.create_task(self._ask_keyframe_again())

    async def _ask_keyframe_again(self) -> None:
        for delay in (0.2, 0.3, 0.5):
            await asyncio.sleep(delay)
            for transceiver in self.pc.getTransceivers():
                aiortc_patches.request_keyframe(transceiver.receiver)

    def _tell_path(self, *, alive: bool) -> None:
        if self.on_path is not None and self._closing is None:
            self.on_path(alive)

    # -- the end --

    async def close(self) -> None:
        """Stop the receiver and the peer connection (once; later calls wait for the first)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        # Shielded: a close cancelled half-way (Ctrl-C while the other side's bye
        # is being handled) must still stop aiortc's decoder threads, or the
        # process never exits.
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        for task in (self._watchdog, self._path_watch, self._pli_again):
            if task is not None:
                task.cancel()
        await self.receiver.stop()
        await self.pc.close()
