"""A namespace with the relay and Chromium, for the page's calls with pages and with aiortc peers.

Shared by tests/test_web_call.py and tests/test_rate.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from playwright.async_api import Browser, Page

from peers.netns import Netns, Network, netns_missing
from tests.browser import Browsers, join, write_config
from tests.processes import Process, RelayProcess, peer_argv, relay_process, spawn
from tests.support import within

FAKE_WIDTH, FAKE_HEIGHT = 640, 480  # Chromium's fake camera


@dataclass
class Net:
    """One namespace with the relay and a Chromium in it."""

    relay: RelayProcess
    browser: Browser
    browsers: Browsers

    async def page(self, role: str, session: str, *, locale: str = "en-US") -> Page:
        page = await self.browsers.open(
            role, self.relay.http_url, browser=self.browser, locale=locale
        )
        await join(page, session, role)
        return page


@pytest_asyncio.fixture
async def net(browsers: Browsers, tmp_path: Path) -> AsyncIterator[Net]:
    if reason := netns_missing():
        pytest.skip(reason)
    async with Network("epc-web") as network:
        ns = (await network.lan("198.18.0.2/24")).name
        async with relay_process(write_config(tmp_path / "relay.yaml"), netns=ns) as running:
            yield Net(running, await browsers.launch(netns=ns), browsers)


async def stat(page: Page, expression: str) -> int:
    """A number from the page's latest getStats() summary (epedicare.stats)."""
    value: int = await page.evaluate(f"epedicare.stats ? epedicare.stats.{expression} : 0")
    return value


async def grows(page: Page, expression: str, by: int, units: float = 2) -> None:
    """Wait until a statistic of the page has grown by ``by``.

    Polled from here: the page's CSP forbids the eval that wait_for_function needs.
    """

    async def poll() -> None:
        start = await stat(page, expression)
        while await stat(page, expression) < start + by:  # noqa: ASYNC110 (polling the page)
            await asyncio.sleep(0.1)

    await within(poll(), units)


PEER_VIDEO = {"width": 320, "height": 240, "fps": 15}


async def aiortc_peer(net: Net, role: str, tmp_path: Path, session: str) -> Process:
    """``python -m peers.ROLE`` in the namespace, chat lines on its stdin."""
    config = tmp_path / "peer.yaml"
    config.write_text(yaml.safe_dump({"media": {"video": PEER_VIDEO}}), encoding="utf-8")
    argv = peer_argv(
        role, config, "--relay", net.relay.url, "--session", session, "--video", "pattern",
        "--audio", "tone", "--stats-json", str(tmp_path / f"{role}.json"),
    )  # fmt: skip
    assert net.relay.netns is not None
    return await spawn(role, argv, Netns(net.relay.netns).command(), stdin=asyncio.subprocess.PIPE)
