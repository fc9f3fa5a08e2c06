"""The relay client: join, send, receive, reconnect with jittered backoff, rejoin with ``resume``.

A dropped signaling connection is not a hang-up: ``RelayClient.frames()``
reconnects by itself and joins again with the seat's resume key, so an
established call goes on. A refused join (``peers.errors.is_fatal(code)``)
ends it with ``JoinRefused``; the relay taking the seat over (close 4001) ends it
with ``Replaced``. Each reconnection waits for the next delay of a
``peers.errors.Backoff`` (reset after every successful join) and is logged at
INFO with its delay and reason.

A relay that cannot be reached: after ``HINT_AFTER`` failed attempts in a
row the client says once, at WARNING, what to check (``relay_hint``: is the
relay running at that URL, whose path must be /ws) and keeps trying. An HTTP
answer where the WebSocket was expected (a URL without /ws answered 200 or
404, another server) will not change by trying again: ``frames()`` ends with
``NotWebSocket`` (code ``not-websocket``) and the same hint. A 429 (the
relay's own admission refusal) and a 5xx (a proxy whose relay is restarting)
are retried, as is a connection closed before any answer.

The heartbeat: a ``ping`` frame every ``heartbeat_s`` (the relay answers
``pong``); when nothing at all came from the relay for 2.5 heartbeats, the
connection is dead (a network gone under it sends no FIN): it is dropped and
the client reconnects at once, without waiting for TCP or websockets'
keepalive (about 40 s). ``heard_at`` is when the relay was last heard from, so
that a seat can tell that the signaling is back after a silence; ``back_at``
when it was heard again after a silence of more than ``SILENT_HEARTBEATS``
heartbeats (a pong missed at least: the network under it was gone, or the
relay; a reconnection's ``joined`` included), so that a seat can tell "the
network may just have come back" from "the signaling never left".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)

from peers.errors import (
    Backoff,
    JoinRefused,
    NotWebSocket,
    Replaced,
    is_fatal,
    relay_hint,
    restart_delay,
)
from relay import CLOSE_REPLACED

__all__ = ["HINT_AFTER", "JoinRefused", "NotWebSocket", "RelayClient", "Replaced"]

logger = logging.getLogger(__name__)

HINT_AFTER = 3  # failed connection attempts in a row before saying what to check
SILENT_HEARTBEATS = 1.5  # nothing from the relay this many heartbeats: it was away (a pong missed)
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})  # the relay's refusal, a proxy's

# The relay went away (1001: shutting down, 1012: restarting): all its clients at once.
RELAY_AWAY_CODES = frozenset({1001, 1012})


class RelayClient:
    """One seat of a session, kept across signaling drops."""

    def __init__(
        self,
        url: str,
        session: str,
        role: str,
        token: str | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 5.0,
        open_timeout_s: float = 5.0,
        join_timeout_s: float = 10.0,
        heartbeat_s: float = 1.0,
    ) -> None:
        self.url, self.session, self.role, self.token = url, session, role, token
        self.resume: str | None = None
        self.backoff = Backoff(backoff_base_s, backoff_max_s)
        self.open_timeout_s = open_timeout_s
        self.join_timeout_s = join_timeout_s
        self.ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.failures = 0  # connection attempts failed in a row (reset by a join)
        self.heartbeat_s = heartbeat_s
        self.heard_at = time.monotonic()  # the last frame from the relay (a pong included)
        self.back_at = 0.0  # the first frame after a silence of over SILENT_HEARTBEATS heartbeats
        self.heard = asyncio.Event()  # set at every frame from the relay; readers clear it
        self._dead: str | None = None  # why the heartbeat dropped the connection

    async def send(self, **fields: Any) -> bool:
        """Send a frame; False when the relay is away right now (the frame is dropped)."""
        ws = self.ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(fields))
        except ConnectionClosed:
            return False
        return True

    async def frames(self) -> AsyncGenerator[dict[str, Any], None]:
        """Every frame from the relay, ``joined`` included, across reconnects."""
        while True:
            try:
                async with connect(
                    self.url, compression=None, open_timeout=self.open_timeout_s
                ) as ws:
                    joined = await self._join(ws)
                    self.backoff.reset()
                    self.failures = 0
                    self.ws = ws
                    self._heard()
                    self.connected.set()
                    self._dead = None
                    beat = asyncio.create_task(self._heartbeat(ws))
                    try:
                        yield joined
                        async for message in ws:
                            self._heard()
                            data = json.loads(message)
                            if isinstance(data, dict) and data.get("type") != "pong":
                                yield data
                    finally:
                        beat.cancel()
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                closed = exc.rcvd.code if isinstance(exc, ConnectionClosed) and exc.rcvd else None
                if closed == CLOSE_REPLACED:
                    raise Replaced("another connection took this seat over (resume)") from exc
                if answer := _http_answer(exc):
                    raise NotWebSocket(self.url, answer) from exc
                reason = self._dead or _why(exc)
                if not isinstance(exc, ConnectionClosed):
                    self.failures += 1
                why = exc.rcvd.reason if isinstance(exc, ConnectionClosed) and exc.rcvd else ""
                delay = self._delay(closed, exc, why)
            else:  # a clean close (1000, 1001, 1012) ends the iteration without an error
                reason = f"closed ({ws.close_code})"
                delay = self._delay(ws.close_code, None, ws.close_reason or "")
            finally:
                self.ws = None
                self.connected.clear()
            self.reconnects += 1
            self._dead = None
            logger.info("relay %s: %s; reconnecting in %.1f s", self.url, reason, delay)
            if self.failures == HINT_AFTER:
                logger.warning(
                    "relay %s: not reached after %d attempts: %s (still trying)",
                    self.url,
                    HINT_AFTER,
                    relay_hint(self.url),
                )
            await asyncio.sleep(delay)

    def _delay(self, closed: int | None, exc: BaseException | None, why: str = "") -> float:
        """How long to wait before the next try, by how the last one ended (``why``: its reason)."""
        if self._dead:
            return 0.0  # a dead connection found by the heartbeat: the first try at once
        if closed in RELAY_AWAY_CODES and self.backoff.attempt == 0:
            # Every client of the relay comes back now: at the moment the relay gave.
            return self.backoff.after_restart(restart_delay(why))
        if isinstance(exc, InvalidStatus) and exc.response.status_code == 503:
            retry_after = exc.response.headers.get("Retry-After", "")
            if retry_after.isascii() and retry_after.isdigit():
                return self.backoff.busy(min(int(retry_after), 60))
        return next(self.backoff)

    def _heard(self) -> None:
        now = time.monotonic()
        if now - self.heard_at > self.heartbeat_s * SILENT_HEARTBEATS:
            self.back_at = now
        self.heard_at = now
        self.heard.set()

    async def _heartbeat(self, ws: ClientConnection) -> None:
        """Ping every ``heartbeat_s``; drop the connection after 2.5 of them unanswered."""
        ping = json.dumps({"type": "ping"})
        sent_at = 0.0
        while True:
            now = time.monotonic()
            silent = now - self.heard_at
            if silent > self.heartbeat_s * 2.5:
                self._dead = f"no answer for {silent:.1f} s (heartbeat)"
                ws.transport.abort()  # recv() ends with ConnectionClosed: reconnect
                return
            if now - sent_at >= self.heartbeat_s:
                sent_at = now
                # A full socket buffer (a dead network) must not stall the check.
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    await asyncio.wait_for(ws.send(ping), self.heartbeat_s)
            await asyncio.sleep(self.heartbeat_s / 4)

    async def _join(self, ws: ClientConnection) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "session": self.session, "role": self.role}
        if self.token:
            frame["token"] = self.token
        if self.resume:
            frame["resume"] = self.resume
        await ws.send(json.dumps(frame))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), self.join_timeout_s))
            if reply.get("type") == "joined":
                self.resume = reply.get("resume", self.resume)
                return dict(reply)
            if reply.get("type") == "error" and is_fatal(reply.get("code")):
                raise JoinRefused(str(reply["code"]), str(reply.get("message", "")))
            if reply.get("type") == "error":
                logger.warning("relay refused the join: %s", reply.get("code"))


def _http_answer(exc: BaseException) -> str | None:
    """What the server said instead of a WebSocket, when trying again cannot change it."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in RETRIED_STATUSES:
            return None
        return f"HTTP {status} {exc.response.reason_phrase}".rstrip()
    if isinstance(exc, InvalidMessage) and not isinstance(exc.__cause__, EOFError):
        return "an answer that is not HTTP"
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code} instead of a WebSocket"
    if isinstance(exc, InvalidURI):
        return f"bad relay URL ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
