"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

import relay
from tests.support import running_relay


@pytest_asyncio.fixture
async def relay_server() -> AsyncIterator[relay.RunningRelay]:
    """The real relay on 127.0.0.1, port 0, with the default limits."""
    async with running_relay() as running:
        yield running
