"""The relay client: join, send, receive, reconnect with jittered backoff, rejoin with ``resume``.

A dropped signaling connection is not a hang-up: ``RelayClient.frames()``
reconnects by itself and joins again with the seat's resume key, so an
established call goes on. A refused join (``peers.errors.is_fatal(code)``)
ends it with ``JoinRefused``; the relay taking the seat over (close 4001) ends it
with ``Replaced``. Each reconnection waits for the next delay of a
``peers.errors.Backoff`` (reset after every successful join) and is logged at
INFO with its delay and reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from peers.errors import Backoff, JoinRefused, Replaced, is_fatal
from relay import CLOSE_REPLACED

__all__ = ["JoinRefused", "RelayClient", "Replaced"]

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.url, self.session, self.role, self.token = url, session, role, token
        self.resume: str | None = None
        self.backoff = Backoff(backoff_base_s, backoff_max_s)
        self.open_timeout_s = open_timeout_s
        self.join_timeout_s = join_timeout_s
        self.ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0

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

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        """Every frame from the relay, ``joined`` included, across reconnects."""
        while True:
            try:
                async with connect(
                    self.url, compression=None, open_timeout=self.open_timeout_s
                ) as ws:
                    joined = await self._join(ws)
                    self.backoff.reset()
                    self.ws = ws
                    self.connected.set()
                    yield joined
                    async for message in ws:
                        data = json.loads(message)
                        if isinstance(data, dict):
                            yield data
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                if (
                    isinstance(exc, ConnectionClosed)
                    and exc.rcvd
                    and exc.rcvd.code == CLOSE_REPLACED
                ):
                    raise Replaced("another connection took this seat over (resume)") from exc
                reason = _why(exc)
            else:
                reason = "closed"
            finally:
                self.ws = None
                self.connected.clear()
            self.reconnects += 1
            delay = next(self.backoff)
            logger.info("relay %s: %s; reconnecting in %.1f s", self.url, reason, delay)
            await asyncio.sleep(delay)

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


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
    if isinstance(exc, InvalidURI):
        return f"bad relay URL ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
