"""The page's TURN check in Chromium against a real coturn (issue 16): the pre-call check
with rtc-config.json's TURN server, and the check at join with the relay's minted credentials.

Chromium gathers nothing on 127.0.0.1, so coturn, the relay and Chromium all run
inside one private network namespace (198.18.0.2) that the test creates and deletes.
coturn is ``make turn``'s own command line (``python -m peers.turnserver``).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.async_api import Page

import relay
from peers.netns import Netns, Network, netns_missing
from tests.browser import Browsers, join, wait_state, write_config
from tests.processes import Process, relay_process, spawn
from tests.support import TIMEOUT

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        shutil.which("turnserver") is None,
        reason="coturn's turnserver is missing: run `make turn-deps` (Debian's coturn)",
    ),
]

ADDRESS = "198.18.0.2"
SECRET = "web-turn-secret"
AUTH = "web-turn-auth"
UNREACHABLE = f"turn:{ADDRESS}:9?transport=udp"  # nothing listens there


@asynccontextmanager
async def lan() -> AsyncIterator[Netns]:
    if reason := netns_missing():
        pytest.skip(reason)
    async with Network("epc-wturn") as network:
        yield await network.lan(f"{ADDRESS}/24")


@asynccontextmanager
async def coturn(ns: Netns, directory: Path, **turn: Any) -> AsyncIterator[str]:
    """coturn on the namespace's address, a free port; yields its turn: URL over UDP."""
    config = directory / "turn.yaml"
    settings = {"listen": ADDRESS, "port": 0, "tls_port": 0, **turn}
    config.write_text(yaml.safe_dump({"turn": settings}), encoding="utf-8")
    argv = [sys.executable, "-m", "peers.turnserver", "--config", str(config)]
    process: Process = await spawn("coturn", argv, ns.command())
    try:
        match = await process.expect(r"TURN URL (turn:\S+\?transport=udp)", TIMEOUT * 3)
        yield match.group(1)
    finally:
        await process.stop()


async def verdict(page: Page) -> str:
    """The pre-call check's verdict, once it has one."""
    await page.wait_for_selector('#precheck:not([data-verdict="running"])', timeout=TIMEOUT * 3000)
    return str(await page.get_attribute("#precheck", "data-verdict"))


CASES = {
    # case: (the relay's TURN secret, its TURN URL (None: coturn's), check line state, its text)
    "accepting": (SECRET, None, "ok", "Relay server (TURN): reachable, relay obtained"),
    "refusing": ("not-coturns", None, "fail", "Relay server (TURN): it refuses the credentials"),
    "unreachable": (SECRET, UNREACHABLE, "fail", "Relay server (TURN): no answer within 5 s"),
}


def relay_yaml(directory: Path, turn_secret: str, turn_url: str) -> Path:
    """The production pattern: join tokens, and TURN credentials minted with turn.secret."""
    return write_config(
        directory / "relay.yaml",
        auth={"secret": AUTH},
        turn={"secret": turn_secret, "urls": [turn_url], "ttl": 600},
    )


def link(http_url: str, session: str, role: str = "patient") -> str:
    token = relay.mint_token(AUTH, session, role, int(time.time()) + 600)
    return f"{http_url}/?session={session}&role={role}&token={token}"


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(CASES))
async def test_the_precheck_tries_the_turn_server_and_says_what_it_found(
    browsers: Browsers, tmp_path: Path, case: str
) -> None:
    """The link's TURN credentials, before joining: a relayed candidate, refused, or no answer."""
    turn_secret, turn_url, state, line = CASES[case]
    async with lan() as ns, coturn(ns, tmp_path, secret=SECRET) as url:
        config = relay_yaml(tmp_path, turn_secret, turn_url or url)
        async with relay_process(config, netns=ns.name) as running:
            browser = await browsers.launch(netns=ns.name)
            page = await browsers.open(
                "page", link(running.http_url, "pre"), browser=browser, locale="en-US"
            )
            expected = {"accepting": "ok", "refusing": "turn-refused"}.get(case, "turn-unreachable")
            assert await verdict(page) == expected
            assert await page.is_visible("#check-turn")
            assert await page.get_attribute("#check-turn", "data-state") == state
            assert await page.inner_text("#check-turn .check-text") == line
            said = [entry for entry in browsers.logs["page"] if "precheck: TURN" in entry]
            assert len(said) == 1, said
            if case == "accepting":
                assert said[0].startswith("info: precheck: TURN ok (udp relay 198.18.0.2"), said
            elif case == "refusing":
                assert said[0].startswith("info: precheck: TURN refused (401 "), said
                text = await page.inner_text("#precheck-verdict")
                assert text.startswith("The relay server (TURN) refuses the page's credentials")
            else:
                assert said[0].startswith("info: precheck: TURN unreachable"), said


@pytest.mark.asyncio
async def test_without_a_valid_token_the_precheck_gets_no_turn_credentials(
    browsers: Browsers, tmp_path: Path
) -> None:
    """The relay mints TURN credentials for the check only for a link it would let join."""
    async with lan() as ns, coturn(ns, tmp_path, secret=SECRET) as url:
        config = relay_yaml(tmp_path, SECRET, url)
        async with relay_process(config, netns=ns.name) as running:
            browser = await browsers.launch(netns=ns.name)
            forged = f"{running.http_url}/?session=pre&role=patient&token=v1.0.bad"
            page = await browsers.open("page", forged, browser=browser, locale="en-US")
            assert await verdict(page) == "ok"
            assert not await page.is_visible("#check-turn")


@pytest.mark.asyncio
async def test_a_page_checks_the_relays_turn_credentials_as_soon_as_it_joins(
    browsers: Browsers, tmp_path: Path
) -> None:
    """Credentials minted with another secret than coturn's: the page says so at join, alone."""
    async with lan() as ns, coturn(ns, tmp_path, secret=SECRET) as url:
        # The relay signs with a secret coturn does not know: every allocation gets 401.
        config = relay_yaml(tmp_path, "not-coturns-secret", url)
        async with relay_process(config, netns=ns.name) as running:
            browser = await browsers.launch(netns=ns.name)
            page = await browsers.open(
                "page", link(running.http_url, "turn-join"), browser=browser, locale="en-US"
            )
            await join(page, "turn-join", "patient")
            await wait_state(page, "waiting")  # alone: nobody else to call
            box = page.locator("#notice[data-key='turn.refused']")
            await box.wait_for(timeout=TIMEOUT * 2000)
            assert (await box.inner_text()).strip() == (
                "The relay server (TURN) refuses the credentials the consultation server gave: "
                "if a direct call is impossible, the call will fail. Tell the practice."
            )
