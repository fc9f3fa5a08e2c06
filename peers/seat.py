"""One seat's life: reacts to the relay's frames and owns at most one ``Call``.

The patient offers when it learns the practitioner is there; the practitioner
answers. Candidates trickled by a browser (and its end-of-candidates ``null``)
go to the current call, which keeps them until its description is set.

A signaling drop is not a hang-up: the call keeps its media while the relay
client reconnects and rejoins with its resume key. ``bye``, or ICE failing
after the call was up, ends that call and the seat waits for the next peer.
A call that cannot be made (``CallFailed``: no connection within
``ice.timeout_s``, TURN unavailable or lost) ends ``run()`` with that error, as
does a refused join (``JoinRefused``) or the seat taken over (``Replaced``).

Replacing the call (a new offer, a new peer) closes the old one for sure:
``calls`` counts the calls started, ``closed_calls`` those fully closed, and
``close()`` waits for every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers import ice
from peers.call import Call, CallOptions
from peers.config import PeerSettings
from peers.errors import CallFailed, TurnUnavailable
from peers.media import Receiver, Sources
from peers.signaling import RelayClient
from peers.turnclient import check_turn_server, first_turn_server

logger = logging.getLogger(__name__)

OTHER = {"patient": "practitioner", "practitioner": "patient"}

__all__ = ["OTHER", "Seat"]


class Seat:
    """A patient or practitioner: joins, calls, answers, hangs up."""

    def __init__(
        self,
        role: str,
        settings: PeerSettings,
        sources: Sources,
        *,
        record_to: Path | None = None,
        on_chat: Callable[[str], None] | None = None,
        relay: RelayClient | None = None,
    ) -> None:
        self.role, self.other = role, OTHER[role]
        self.settings = settings
        self.sources = sources
        self.record_to = record_to
        self.on_chat = on_chat
        self.relay = relay or RelayClient(
            settings.relay_url,
            settings.session,
            role,
            settings.token,
            backoff_max_s=settings.relay_reconnect_max_s,
            open_timeout_s=settings.relay_open_timeout_s,
            join_timeout_s=settings.relay_join_timeout_s,
        )
        self.call: Call | None = None
        self.last_call: Call | None = None  # the one the summary speaks of
        self.relay_ice: list[dict[str, Any]] | None = None
        self.seats_taken_at: float | None = None
        self.calls = 0  # calls started
        self.closed_calls = 0  # calls whose peer connection is closed
        self._fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing: set[asyncio.Task[None]] = set()
        self._turn_check: asyncio.Task[None] | None = None

    # -- the main loop --

    async def run(self) -> None:
        """Handle the relay's frames until cancelled; a PeerError ends it."""
        ice.honour_timeout(self.settings.ice_timeout_s)
        frames = asyncio.create_task(self._frames())
        try:
            await asyncio.wait([frames, self._fatal], return_when=asyncio.FIRST_COMPLETED)
            if self._fatal.done():
                self._fatal.result()  # raises what made the seat give up
            frames.result()
        finally:
            frames.cancel()
            # What ended the frames task early is reported through self._fatal.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await frames

    def _give_up(self, error: BaseException) -> None:
        if not self._fatal.done():
            self._fatal.set_exception(error)

    async def _frames(self) -> None:
        async for frame in self.relay.frames():
            # A CallFailed was reported through the call's on_failed: run() ends with it.
            with contextlib.suppress(CallFailed):
                await self._on_frame(frame)

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        call = self.call
        if kind == "joined":
            self.relay_ice = frame.get("ice_servers")
            resumed = " (resumed)" if frame.get("resumed") else ""
            logger.info("joined session %s as %s%s", self.settings.session, self.role, resumed)
            self._check_turn_at_join()
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
            await self.new_call().answer(str(frame.get("sdp", "")))
            logger.info("answer sent to the %s", self.other)
        elif kind == "answer" and self.role == "patient" and call is not None:
            await call.accept(str(frame.get("sdp")))
        elif kind == "candidate" and call is not None:
            await call.add_candidate(frame.get("candidate"))
        elif kind == "error":
            logger.warning("relay: %s (%s)", frame.get("code"), frame.get("message"))

    async def _peer_present(self, *, resumed: bool) -> None:
        if resumed and self.call is not None and self.call.alive:
            return  # a signaling reconnect: the call goes on
        self.seats_taken_at = time.monotonic()
        if self.role == "patient":
            await self.new_call().offer()
            logger.info("offer sent to the %s", self.other)

    def _check_turn_at_join(self) -> None:
        """Check the TURN server once, at the first join, before the other side is there.

        In the background: the join goes on. A server that refuses or does not
        answer ends the seat with TurnUnavailable, as it would at the first call.
        """
        server = first_turn_server(ice.ice_servers(self.settings, self.relay_ice))
        if self._turn_check is not None or server is None:
            return
        logger.info("checking the TURN server %s", server.url)

        async def check() -> None:
            try:
                await check_turn_server(server, self.settings.turn_ca_file)
            except TurnUnavailable as exc:
                self._give_up(exc)
            else:
                logger.info("TURN server %s: allocation granted", server.url)

        self._turn_check = asyncio.get_running_loop().create_task(check())

    # -- the one call --

    def new_call(self) -> Call:
        """A fresh Call in place of the current one, which is closed for sure, in the background."""
        if self.call is not None:
            self._close_soon(self.call)
        self.calls += 1
        call = Call(
            CallOptions.from_settings(self.settings, self.relay_ice),
            self._send,
            audio=self.sources.audio,
            video=self.sources.video,
            receiver=Receiver(self.record_to),
            name=f"call {self.calls}",
        )
        call.on_failed = lambda error: self._call_failed(call, error)
        call.on_state = lambda state: self._call_state(call, state)
        call.on_chat = self.on_chat
        self.call = self.last_call = call
        return call

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.relay.send(**frame)

    def _call_failed(self, call: Call, error: CallFailed) -> None:
        if call is self.call:
            self._give_up(error)

    async def _call_state(self, call: Call, state: str) -> None:
        if state == "failed" and call is self.call and call.connected_at is not None:
            logger.warning(
                "%s: ICE failed: the %s is gone; waiting for the next", call.name, self.other
            )
            await self.hang_up(send_bye=False)

    def _close_soon(self, call: Call) -> None:
        task = asyncio.get_running_loop().create_task(self._close_call(call))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_call(self, call: Call) -> None:
        await call.close()
        self.closed_calls += 1

    async def hang_up(self, *, send_bye: bool, reason: str = "hang up") -> None:
        call, self.call = self.call, None
        if send_bye:
            await self.relay.send(type="bye", reason=reason)
        if call is not None:
            self._close_soon(call)
            await call.close()

    def send_chat(self, text: str) -> bool:
        """One chat line to the other side; False when no call's channel is open."""
        return self.call is not None and self.call.send_chat(text)

    async def close(self) -> None:
        """Hang up without a bye, wait until every call is closed, stop the sources."""
        await self.hang_up(send_bye=False)
        if self._turn_check is not None:
            self._turn_check.cancel()
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.sources.stop()
