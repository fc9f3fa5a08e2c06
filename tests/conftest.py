"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

import relay
from tests.browser import Browsers, chromium_missing
from tests.support import running_relay

# Fixtures of helper modules that several test modules use (net, link_pair).
pytest_plugins = ["tests.webcall", "tests.mediacheck"]

# Hypothesis on a shared 2-core machine: no per-example deadline and no
# too_slow/data_too_large health checks (they measure the machine's load, not
# the code); the number of examples is Hypothesis's own default and is not
# lowered. HYPOTHESIS_PROFILE=dev keeps Hypothesis's timing checks for local runs.
settings.register_profile(
    "shared-machine",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "shared-machine"))

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


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[str]:
    """One redis-server for the whole run (tests that share it flush it first): its URL."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis-deps)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--logfile", "", "--daemonize", "no",
    ]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        for line in server.stdout:  # it exits (and the loop ends) if it cannot start
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail(f"redis-server did not start (exit status {server.wait()})")
        server.stdout.close()  # nothing more is read: no pipe to fill
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()  # by its PID
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
