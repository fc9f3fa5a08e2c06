"""Two ``Call``s in this process, their signaling in memory: aiortc's own first-test shape.

Used by the first peers test, the NAT/TURN proof (tests/nat.py) and the floor
of ``make bench-call``. Each call sends the stamped test pattern and the tone;
each side may gather inside its own network namespace (``peers.netns.inside``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from peers import ice
from peers.call import Call, CallOptions
from peers.media import PatternTrack, ToneTrack
from peers.netns import Netns, inside
from peers.signaling import RelayClient
from tests.support import within

__all__ = ["LocalPair", "chatless_patient"]


class LocalPair:
    """A patient's Call (the offerer) and a practitioner's Call, wired to each other."""

    def __init__(
        self,
        options: tuple[CallOptions, CallOptions] = (CallOptions(), CallOptions()),
        namespaces: tuple[Netns | None, Netns | None] = (None, None),
        *,
        width: int = 320,
        height: int = 240,
        fps: int = 30,
        video: tuple[bool, bool] = (True, True),
    ) -> None:
        self.namespaces = namespaces
        self.inbox: tuple[asyncio.Queue[dict[str, Any]], asyncio.Queue[dict[str, Any]]] = (
            asyncio.Queue(),
            asyncio.Queue(),
        )
        self.calls = tuple(
            Call(
                opts,
                self.inbox[1 - side].put,
                audio=ToneTrack(),
                video=PatternTrack(width, height, fps) if sends else None,
                name=name,
            )
            for side, (opts, name, sends) in enumerate(
                zip(options, ("patient", "practitioner"), video, strict=True)
            )
        )
        self.answered_at: float | None = None  # time.monotonic() once the answer was made

    @property
    def a(self) -> Call:
        return self.calls[0]

    @property
    def b(self) -> Call:
        return self.calls[1]

    async def connect(self, answer_delay: float = 0.0) -> None:
        """Offer, answer, accept; ``answer_delay`` stands for the answer's trip through a relay.

        Raises CallFailed when either side cannot gather what its options ask for.
        """
        with self._inside(0):
            await self.a.offer()
        offer = self.inbox[1].get_nowait()
        with self._inside(1):
            await self.b.answer(offer["sdp"])
        self.answered_at = time.monotonic()  # the answerer's checks start now
        answer = self.inbox[0].get_nowait()
        if answer_delay:
            await asyncio.sleep(answer_delay)
        await self.a.accept(answer["sdp"])

    async def flowing(self, video: int = 1, audio: int = 1) -> None:
        """Wait until each side received ``video`` video and ``audio`` audio frames."""
        await asyncio.gather(*(call.receiver.frames(video, audio) for call in self.calls))

    def _inside(self, side: int) -> contextlib.AbstractContextManager[None]:
        ns = self.namespaces[side]
        return contextlib.nullcontext() if ns is None else inside(ns)

    async def aclose(self) -> None:
        """Close both calls and stop their tracks (``async with contextlib.aclosing(pair)``)."""
        for call in self.calls:
            await call.close()
            for track in (call.audio, call.video):
                if track is not None:
                    track.stop()


@contextlib.asynccontextmanager
async def chatless_patient(url: str, session: str, ns: Netns) -> AsyncIterator[RTCPeerConnection]:
    """A patient that offers media only, no chat channel (another app, an old client).

    Its relay connection and its candidates are made inside ``ns``; it waits
    for the practitioner's seat, offers, and takes the answer; closed at the end.
    """
    client = RelayClient(url, session, "patient", open_timeout_s=5)
    frames = client.frames()
    pc = RTCPeerConnection(ice.rtc_configuration(()))  # no STUN server: the project's rule
    try:
        with inside(ns):
            joined = await within(anext(frames))
        if not joined["peer"]:
            await within(_next_of(frames, "peer-joined"), 6)
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")  # media only: no data channel
        with inside(ns):
            await within(pc.setLocalDescription(await pc.createOffer()), 2)
        await client.send(type="offer", sdp=pc.localDescription.sdp)
        answer = await within(_next_of(frames, "answer"), 3)
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        yield pc
    finally:
        await pc.close()
        await frames.aclose()


async def _next_of(frames: AsyncGenerator[dict[str, Any], None], kind: str) -> dict[str, Any]:
    async for frame in frames:
        if frame.get("type") == kind:
            return frame
    raise AssertionError(f"the relay client ended before a {kind!r} frame")
