"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
import pytest_asyncio

import relay
from tests.browser import Browsers, chromium_missing
from tests.support import running_relay

# Each phase's report, kept on the test item so that fixtures can tell a failure.
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


def failed(item: pytest.Item) -> bool:
    return any(report.failed for report in item.stash.get(REPORTS, {}).values())


@pytest_asyncio.fixture
async def relay_server() -> AsyncIterator[relay.RunningRelay]:
    """The real relay on 127.0.0.1, port 0, with the default limits."""
    async with running_relay() as running:
        yield running


@pytest_asyncio.fixture
async def browsers(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browsers]:
    """Chromium under Playwright; on failure, screenshots and console logs in artifacts/."""
    if reason := chromium_missing():
        pytest.skip(reason)
    async with Browsers(tmp_path) as running:
        yield running
        if failed(request.node):
            await running.save_artifacts(request.node.name)
