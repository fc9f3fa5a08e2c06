"""Shared test helpers: one timeout unit, a relay on port 0, protocol clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, TypeVar

from websockets.asyncio.client import ClientConnection, connect

import relay

T = TypeVar("T")

# One timeout unit (seconds) wraps every await that could hang; scale it on a
# slow machine with EPEDICARE_TEST_TIMEOUT_SCALE=3.
TIMEOUT = 5.0 * float(os.environ.get("EPEDICARE_TEST_TIMEOUT_SCALE", "1"))


async def within(awaitable: Awaitable[T], units: float = 1.0) -> T:
    """Await with the test timeout unit (times ``units``)."""
    return await asyncio.wait_for(awaitable, TIMEOUT * units)


def relay_config(**sections: dict[str, Any]) -> relay.RelayConfig:
    """A relay configuration on 127.0.0.1, port 0, with sections overridden."""
    data: dict[str, Any] = {"relay": {"host": "127.0.0.1", "port": 0}}
    data.update(sections)
    return relay.RelayConfig.from_mapping(data, env={})


@contextlib.asynccontextmanager
async def running_relay(
    config: relay.RelayConfig | None = None,
) -> AsyncIterator[relay.RunningRelay]:
    try:
        async with relay.serve_relay(config or relay_config()) as running:
            yield running
    finally:
        await Client.drop_all()


class Client:
    """A protocol client on a real WebSocket connection."""

    # Every client still open; a test's relay drops them at its end, so that a
    # client the test left half-open (paused, silent) never leaks its socket.
    opened: ClassVar[list[Client]] = []

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        Client.opened.append(self)

    @classmethod
    async def drop_all(cls) -> None:
        clients, cls.opened = cls.opened, []
        for client in clients:
            client.ws.transport.abort()
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.ws.wait_closed(), TIMEOUT)

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        return cls(await within(connect(url, compression=None, **kwargs)))

    async def send(self, **fields: Any) -> None:
        await self.ws.send(json.dumps(fields))

    async def send_raw(self, message: str | bytes) -> None:
        await self.ws.send(message)

    async def recv(self) -> dict[str, Any]:
        message = await within(self.ws.recv())
        data = json.loads(message)
        assert isinstance(data, dict)
        return data

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Receive one frame and check its type and the given fields."""
        data = await self.recv()
        assert data["type"] == kind, data
        for name, value in fields.items():
            assert data[name] == value, (name, data)
        return data

    async def expect_error(self, code: str) -> dict[str, Any]:
        return await self.expect("error", code=code)

    async def join(self, session: str, role: str, **fields: Any) -> dict[str, Any]:
        await self.send(type="join", session=session, role=role, **fields)
        return await self.expect("joined", session=session, role=role)

    async def closed(self) -> tuple[int | None, str | None]:
        """Wait until the relay closes the connection; its close code and reason."""
        await within(self.ws.wait_closed())
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        await self.ws.close()


async def pair(url: str, session: str) -> tuple[Client, Client]:
    """A patient and a practitioner joined to one session."""
    patient = await Client.open(url)
    await patient.join(session, "patient")
    practitioner = await Client.open(url)
    await practitioner.join(session, "practitioner")
    await patient.expect("peer-joined", role="practitioner")
    return patient, practitioner
