"""One seat's life: reacts to the relay's frames and owns at most one ``Call``.

The patient offers when it learns the practitioner is there; the practitioner
answers. Candidates trickled by a browser (and its end-of-candidates ``null``)
go to the current call, which keeps them until its description is set.

A signaling drop is not a hang-up: the call keeps its media while the relay
client reconnects and rejoins with its resume key. ``bye`` ends that call and
the seat waits for the next peer. A call that cannot be made (``CallFailed``:
no connection within ``ice.timeout_s``, TURN unavailable or lost) ends
``run()`` with that error, as does a refused join (``JoinRefused``) or the seat
taken over (``Replaced``). A failed DTLS handshake is not the network: the
seat says so in a ``bye`` (its reason "DTLS handshake failed: <cause>") and
``run()`` ends with ``DtlsFailed``.

Recovery (issue 12, docs/recovery.md of the notes): a call whose media path
goes dead (nothing received for ``call.media_timeout_s``, or ICE failed) is
not the end. Both sides say ``path lost``. Media coming back on the same path
first (a short outage) ends it: nothing is renegotiated. Otherwise the patient,
once the signaling is back (heard from after the path went dead) and the
practitioner is there, builds a new Call and offers (``path lost;
renegotiating (attempt N)``), with backoff between attempts. When the signaling
was away too and has just come back, the old path gets ``SAME_PATH_GRACE_S``
first (the relay's reconnection may land just before the old path's bytes),
unless its local address is gone or its ICE failed; the practitioner
answers any new offer with a new Call. After ``call.recovery_timeout_s`` the
side gives up with one line; the call is closed and the seat stays joined, so
that a new offer or a new peer still makes a call. ``recoveries`` lists each
recovery (``at_s``, ``outage_ms``, ``method``: "same-path" or "new-connection").

What the seat logs is what is true: the lines of one call carry its number
("call 2: offer sent to the practitioner", "call 2: ICE path: ..."), so that a
new call's lines never read as the previous one's closing; the other side's
signaling dropping is "the call goes on" only while a call is under way (else
"no call in progress: waiting for the ..."); a rejoin while the call flows
(after a relay restart, this side back first) says the call is in progress,
not "waiting". A chat line that cannot go says why (no call yet, the other
side opened no chat channel in this call, the channel not open yet).

Replacing the call (a new offer, a new peer) closes the old one for sure:
``calls`` counts the calls started, ``closed_calls`` those fully closed, and
``close()`` waits for every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from peers import ice
from peers.call import Call, CallOptions
from peers.config import PeerSettings
from peers.errors import Backoff, CallFailed, DtlsFailed, TurnUnavailable
from peers.media import Receiver, Sources
from peers.signaling import RelayClient
from peers.turnclient import check_turn_server, first_turn_server

logger = logging.getLogger(__name__)

OTHER = {"patient": "practitioner", "practitioner": "patient"}
ANSWER_WAIT_S = 3.0  # a renegotiation whose answer does not come by then is tried again
# The signaling back after a silence of its own (the network under it was gone: an outage,
# or a change): the old path may come back with the network, a round trip and the watch's
# 0.1 s later, and the relay's reconnection may be first (its SYN retransmitted just as the
# network returned). Its bytes are given this long before the patient renegotiates, unless
# the path's local address is gone (a change: it cannot come back) or its ICE failed.
SAME_PATH_GRACE_S = 0.5

__all__ = ["OTHER", "Seat"]


class Seat:
    """A patient or practitioner: joins, calls, answers, hangs up, recovers a lost path."""

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
            heartbeat_s=settings.call_heartbeat_s,
        )
        self.started = time.monotonic()
        self.call: Call | None = None
        self.last_call: Call | None = None  # the one the summary speaks of
        self.all_calls: list[Call] = []
        self.relay_ice: list[dict[str, Any]] | None = None
        self.seats_taken_at: float | None = None
        self.calls = 0  # calls started
        self.closed_calls = 0  # calls whose peer connection is closed
        self.peer_online = False  # the other seat's signaling is connected to the relay
        self.lost_at: float | None = None  # when the current path went silent
        self.dead_at: float | None = None  # when it was found dead
        self.recoveries: list[dict[str, Any]] = []  # {"at_s", "outage_ms", "method"}
        self.gave_up = False
        self.ever_connected = False  # a call of this seat has connected once
        # The other seat joined afresh (not a resume) since the last offer: its next offer is a
        # new call (a reloaded page), not a recovery.
        self.peer_is_new = True
        self._recovery: asyncio.Task[None] | None = None
        self._fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
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
            self.peer_online = bool(frame.get("peer"))
            self._check_turn_at_join()
            if frame.get("peer"):
                # Either seat resumed (this one after its own drop, or the other's):
                # a live call goes on.
                await self._peer_present(
                    resumed=bool(frame.get("resumed") or frame.get("peer_resumed"))
                )
            elif self.in_call:
                # A relay restart: this side is back first; the media never stopped.
                logger.info(
                    "%s: in progress; the %s's signaling is not back yet",
                    self._call_name,
                    self.other,
                )
            else:
                logger.info("waiting for the %s", self.other)
        elif kind == "peer-joined":
            logger.info(
                "the %s joined%s", self.other, " again (resumed)" if frame.get("resumed") else ""
            )
            self.peer_online = True
            await self._peer_present(resumed=bool(frame.get("resumed")))
        elif kind == "peer-left":
            self.peer_online = False
            reason = frame.get("reason")
            if reason == "bye":
                logger.info("the %s hung up", self.other)
                await self.hang_up(send_bye=False)
            elif self.in_call:
                logger.info(
                    "%s: the %s's signaling dropped (%s): the call goes on",
                    self._call_name,
                    self.other,
                    reason,
                )
            else:
                logger.info(
                    "the %s's signaling dropped (%s); no call in progress: waiting for the %s",
                    self.other,
                    reason,
                    self.other,
                )
        elif kind == "bye":
            logger.info("the %s said bye (%s)", self.other, frame.get("reason", ""))
            await self.hang_up(send_bye=False)
        elif kind == "offer" and self.role == "practitioner":
            if (
                call is not None
                and call.connected_at is not None
                and self.lost_at is None
                and not self.peer_is_new
            ):
                # The patient found the path dead first (its media timeout ran out first, or
                # this side was starved of CPU): the same recovery, or the new call's first
                # frame would not be counted as one ("media back").
                logger.info("%s: a new offer from the %s during the call", call.name, self.other)
                self._path_changed(call, alive=False)
            self.peer_is_new = False
            if self.lost_at is not None:
                logger.info("a new offer from the %s: answering with a new call", self.other)
            call = self.new_call()
            await call.answer(str(frame.get("sdp", "")))
            logger.info("%s: answer sent to the %s", call.name, self.other)
        elif kind == "answer" and self.role == "patient" and call is not None:
            await call.accept(str(frame.get("sdp")))
        elif kind == "candidate" and call is not None:
            await call.add_candidate(frame.get("candidate"))
        elif kind == "error":
            logger.warning("relay: %s (%s)", frame.get("code"), frame.get("message"))

    async def _peer_present(self, *, resumed: bool) -> None:
        self.peer_is_new = not resumed
        if self._recovery is not None:
            return  # the recovery offers as soon as it can
        if resumed and self.call is not None and self.call.alive:
            return  # a signaling reconnect: the call goes on
        self.seats_taken_at = time.monotonic()
        if self.role == "patient":
            call = self.new_call()
            await call.offer()
            logger.info("%s: offer sent to the %s", call.name, self.other)

    @property
    def in_call(self) -> bool:
        """A call is under way: connecting, carrying media, or recovering its path."""
        return self.call is not None and (self.call.alive or self.lost_at is not None)

    @property
    def _call_name(self) -> str:
        return self.call.name if self.call is not None else "call"

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
        call.on_path = lambda alive: self._path_changed(call, alive=alive)
        call.on_chat = self.on_chat
        self.call = self.last_call = call
        self.all_calls.append(call)
        if self.lost_at is not None:
            self._spawn(self._first_frame_of(call, self.lost_at))
        else:
            self._spawn(self._media_flowing(call))
        return call

    async def _media_flowing(self, call: Call) -> None:
        await call.receiver.first_frame.wait()
        logger.info(
            "%s: media flowing (first frame after %.0f ms)",
            call.name,
            (time.monotonic() - call.started) * 1000,
        )

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.relay.send(**frame)

    def _call_failed(self, call: Call, error: CallFailed) -> None:
        if call is not self.call:
            return
        if isinstance(error, DtlsFailed):
            self._spawn(self._bye_and_give_up(error))
        elif self.lost_at is not None:
            pass  # a renegotiation that failed: the recovery tries again or gives up
        elif self.ever_connected:
            # Not the first call (a late offer after giving up, say): recover, within the limit.
            logger.warning("%s: %s", call.name, error)
            self._path_changed(call, alive=False)
        else:
            self._give_up(error)

    async def _bye_and_give_up(self, error: DtlsFailed) -> None:
        await self.hang_up(send_bye=True, reason=str(error))
        self._give_up(error)

    async def _call_state(self, call: Call, state: str) -> None:
        if state == "connected":
            self.ever_connected = True
        if state == "failed" and call is self.call and call.connected_at is not None:
            self._path_changed(call, alive=False)

    # -- recovery --

    def _path_changed(self, call: Call, *, alive: bool) -> None:
        if call is not self.call:
            return
        if not alive and self.lost_at is None:
            self.lost_at = call.heard_at
            self.dead_at = time.monotonic()
            silent = self.dead_at - self.lost_at
            logger.warning(
                "%s: path lost (nothing received for %.1f s, ICE %s)",
                call.name,
                silent,
                call.pc.iceConnectionState,
            )
            self._recovery = asyncio.get_running_loop().create_task(self._recover(self.lost_at))
        elif alive and self.lost_at is not None and call.connected_at is not None:
            lost_at, self.lost_at = self.lost_at, None
            self._stop_recovery()
            self._spawn(self._first_frame_of(call, lost_at, same_path=True))

    async def _first_frame_of(self, call: Call, lost_at: float, *, same_path: bool = False) -> None:
        """Once ``call`` shows a new video frame: log and record the recovery."""
        got = call.receiver.received
        await call.receiver.frames(video=got.video_frames + 1)
        if same_path:
            method = "same-path"
        else:
            if call is not self.call:
                return
            self.lost_at = None
            self._stop_recovery()
            method = "new-connection"
        now = time.monotonic()
        outage_ms = round((now - lost_at) * 1000)
        self.recoveries.append(
            {"at_s": round(lost_at - self.started, 1), "outage_ms": outage_ms, "method": method}
        )
        logger.info(
            "%s: media back after %d ms (%s; ICE path: %s)",
            call.name,
            outage_ms,
            method,
            call.path or "unknown",
        )

    def _stop_recovery(self) -> None:
        task, self._recovery = self._recovery, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _recover(self, lost_at: float) -> None:
        """Renegotiate (patient) or wait for the new offer (practitioner), within the limit."""
        limit = self.settings.call_recovery_timeout_s
        try:
            async with asyncio.timeout(limit - (time.monotonic() - lost_at)):
                if self.role == "patient":
                    await self._renegotiate()
                else:
                    logger.info("waiting for the %s's new offer", self.other)
                    await asyncio.Event().wait()  # until cancelled: a new call's first frame
        except TimeoutError:
            self._recovery = None
            self.lost_at = None
            self.gave_up = True
            call, self.call = self.call, None
            logger.error(
                "gave up reconnecting after %.0f s (call.recovery_timeout_s); "
                "the seat stays joined: a new offer or a rejoin starts a new call",
                limit,
            )
            if call is not None:
                self._close_soon(call)

    async def _renegotiate(self) -> None:
        backoff = Backoff(0.5, 5.0)
        attempt = 0
        while True:
            await self._signaling_back()
            if attempt == 0 and not await self._old_path_stays_dead():
                return  # it came back: _path_changed ended the recovery (same-path)
            attempt += 1
            call = self.new_call()
            logger.warning("%s: path lost; renegotiating (attempt %d)", call.name, attempt)
            with contextlib.suppress(CallFailed):  # reported through on_failed
                await call.offer()
                if await _first(call.answered.wait(), call.failed.wait(), ANSWER_WAIT_S):
                    await _first(
                        call.receiver.first_frame.wait(),
                        call.failed.wait(),
                        self.settings.ice_timeout_s,
                    )
            if call.receiver.first_frame.is_set():
                await asyncio.Event().wait()  # _first_frame_of ends the recovery
            delay = next(backoff)
            why = call.failure or ("no answer" if not call.answered.is_set() else "no media")
            logger.info("%s: renegotiation %d: %s; again in %.1f s", call.name, attempt, why, delay)
            await asyncio.sleep(delay)

    async def _old_path_stays_dead(self) -> bool:
        """False when the old path's bytes come back within the grace (SAME_PATH_GRACE_S).

        Only when the signaling itself was away during this loss (heard again after a
        silence: the network may just have returned, and the path with it) and the path
        can come back: its call not failed, its local address still this machine's. A
        signaling that never left (the other side's network changed) or an address gone
        (this side's changed) renegotiates at once.
        """
        call, lost_at = self.call, self.lost_at
        if call is None or lost_at is None or self.relay.back_at < lost_at:
            return True
        if not call.alive or call.failure is not None or ice.path_address_gone(call.pc):
            return True
        logger.info(
            "%s: signaling back after a silence: %.1f s for the old path to come back",
            call.name,
            SAME_PATH_GRACE_S,
        )
        await asyncio.sleep(SAME_PATH_GRACE_S)
        if call is self.call:
            call.check_path()  # bytes that came since the watch last looked (a starved loop)
        return self.lost_at is not None  # None: back on the same path, the recovery ended

    async def _signaling_back(self) -> None:
        """Until the relay was heard from after the path was found dead, and the peer is there."""
        while not (
            self.relay.connected.is_set()
            and self.dead_at is not None
            and self.relay.heard_at > self.dead_at
            and self.peer_online
        ):
            self.relay.heard.clear()  # every change comes with a frame from the relay
            await self.relay.heard.wait()

    # -- the end --

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_soon(self, call: Call) -> None:
        task = asyncio.get_running_loop().create_task(self._close_call(call))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_call(self, call: Call) -> None:
        await call.close()
        self.closed_calls += 1

    async def hang_up(self, *, send_bye: bool, reason: str = "hang up") -> None:
        self.lost_at = None
        self._stop_recovery()
        call, self.call = self.call, None
        if send_bye:
            await self.relay.send(type="bye", reason=reason)
        if call is not None:
            self._close_soon(call)
            await call.close()

    def send_chat(self, text: str) -> str | None:
        """One chat line to the other side; None when sent, else why not (a sentence)."""
        call = self.call
        if call is None or not self.in_call:
            return "not in a call yet"
        if call.send_chat(text):
            return None
        if call.remote_chat is False:
            return f"{call.name}: the {self.other}'s side opened no chat channel in this call"
        return f"{call.name}: the chat channel is not open yet"

    async def close(self) -> None:
        """Hang up without a bye, wait until every call is closed, stop the sources."""
        await self.hang_up(send_bye=False)
        for task in list(self._tasks):
            task.cancel()
        if self._turn_check is not None:
            self._turn_check.cancel()
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.sources.stop()


async def _first(done: Awaitable[object], failed: Awaitable[object], timeout_s: float) -> bool:
    """True when ``done`` comes before ``failed`` and within ``timeout_s``."""
    wins = asyncio.ensure_future(done)
    loses = asyncio.ensure_future(failed)
    try:
        await asyncio.wait([wins, loses], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wins, loses):
            task.cancel()
    return wins.done() and not wins.cancelled()
