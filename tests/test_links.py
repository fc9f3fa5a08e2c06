"""Consultation links: ``relay.py invite``, ``POST /api/consultations``, the page's invitation.

The API tests run an in-process relay on 127.0.0.1; the browser tests run the
relay and Chromium inside a network namespace (a call needs a non-loopback
address) and post to the API from inside it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

import relay
from peers.netns import Netns, Network, inside, netns_missing
from tests.browser import Browsers, wait_state, write_config
from tests.processes import RelayProcess, relay_process
from tests.support import Client, relay_config, running_relay, within

SECRET = "links-secret"
API_KEY = "booking-system-key-0123456789abcdef"
AUTH = {"secret": SECRET}
API = {"keys": [relay.hash_api_key(API_KEY)]}


async def post(
    port: int,
    body: bytes,
    *,
    key: str | None = API_KEY,
    method: str = "POST",
    ns: Netns | None = None,
) -> tuple[int, dict[str, Any]]:
    """A raw HTTP/1.1 request to /api/consultations: the status and the JSON answer."""
    if ns is None:
        sock = socket.create_connection(("127.0.0.1", port))
    else:
        with inside(ns):  # a blocking connect on the namespace's loopback: immediate
            sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await within(asyncio.open_connection(sock=sock))
    auth = "" if key is None else f"Authorization: Bearer {key}\r\n"
    head = (
        f"{method} /api/consultations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    raw = await within(reader.read())
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    answer: dict[str, Any] = json.loads(rest.partition(b"\r\n\r\n")[2])
    return int(status_line.split()[1]), answer


def seat_of(url: str) -> dict[str, str]:
    """The session, role and token a link carries."""
    query = parse_qs(urlsplit(url).query)
    return {name: values[0] for name, values in query.items()}


# -- the API (in-process relay) ----------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "body", "status", "code"),
    [
        pytest.param({"key": None}, b"{}", 401, "bad-api-key", id="no-key"),
        pytest.param({"key": "wrong-key-0123456789"}, b"{}", 401, "bad-api-key", id="wrong-key"),
        pytest.param({}, b'{"ttl_s": "2h"}', 400, "bad-field", id="bad-ttl"),
        pytest.param({}, b"[]", 400, "bad-body", id="not-an-object"),
        pytest.param({"method": "GET"}, b"", 405, "bad-method", id="get"),
    ],
)
async def test_api_refusals(kwargs: dict[str, Any], body: bytes, status: int, code: str) -> None:
    """The API answers a missing or wrong key, a bad body and a GET with their codes."""
    async with running_relay(relay_config(auth=AUTH, api=API)) as running:
        got_status, answer = await post(running.port, body, **kwargs)
    assert (got_status, answer["code"]) == (status, code)
    if code == "bad-field":
        assert "'ttl_s'" in answer["message"]


@pytest.mark.asyncio
async def test_api_shares_the_per_address_handshake_limit() -> None:
    """Past limits.handshakes_per_second_per_address, the API answers 429 address-limit."""
    limits = {"handshakes_per_second_per_address": 1}
    async with running_relay(relay_config(auth=AUTH, api=API, limits=limits)) as running:
        first, _ = await post(running.port, b"{}")
        second, answer = await post(running.port, b"{}")
    assert first == 200
    assert (second, answer["code"]) == (429, "address-limit")


@pytest.mark.asyncio
async def test_api_is_off_without_keys() -> None:
    """Without api.keys, POST /api/consultations is 404 api-off."""
    async with running_relay(relay_config(auth=AUTH)) as running:
        status, answer = await post(running.port, b"{}")
    assert (status, answer["code"]) == (404, "api-off")


@pytest.mark.asyncio
async def test_api_links_open_their_seats_only_inside_their_window() -> None:
    """API links join their seats; a future window is token-not-yet-valid, a past one expired."""
    async with running_relay(relay_config(auth=AUTH, api=API)) as running:
        status, made = await post(running.port, b'{"ttl_s": 600}')
        assert status == 200
        assert made["expires"] - time.time() == pytest.approx(600, abs=30)
        for role in relay.ROLES:
            seat = seat_of(made[f"{role}_url"])
            assert seat == {
                "session": made["session"],
                "role": role,
                "token": made[f"{role}_token"],
            }
            client = await Client.open(running.url)
            await client.join(seat["session"], role, token=seat["token"])

        later = json.dumps({"not_before": int(time.time()) + 3600}).encode()
        status, future = await post(running.port, later)
        assert status == 200 and future["patient_token"].startswith("v2.")
        past = relay.new_consultation(SECRET, "http://x", time.time() - 7200, 60)
        for links, code in [(future, "token-not-yet-valid"), (past, "token-expired")]:
            client = await Client.open(running.url)
            await client.send(
                type="join", session=links["session"], role="patient", token=links["patient_token"]
            )
            await client.expect_error(code)


def test_invite_refuses_a_time_without_offset(capsys: pytest.CaptureFixture[str]) -> None:
    """relay.py invite --valid-from needs a UTC offset: exit 2, naming what to add."""
    with pytest.raises(SystemExit) as exited:
        relay.main(["invite", "--base-url", "https://x.org", "--valid-from", "2026-12-09T14:45"])
    assert exited.value.code == 2
    assert "add a UTC offset" in capsys.readouterr().err


# -- in Chromium, inside a network namespace -------------------------------------------


@dataclass
class Net:
    ns: Netns
    relay: RelayProcess
    browser: Browser
    browsers: Browsers
    config: Path

    async def page(self, name: str, url: str) -> Page:
        """A page opened on a link, joined with what the link filled in."""
        page = await self.browsers.open(name, url, browser=self.browser, locale="en-US")
        await page.click("#join")
        return page


@pytest_asyncio.fixture
async def net(browsers: Browsers, tmp_path: Path) -> AsyncIterator[Net]:
    if reason := netns_missing():
        pytest.skip(reason)
    config = write_config(tmp_path / "relay.yaml", auth=AUTH, api=API)
    async with Network("epc-links") as network:
        ns = await network.lan("198.18.0.2/24")
        async with relay_process(config, netns=ns.name) as running:
            yield Net(ns, running, await browsers.launch(netns=ns.name), browsers, config)


async def connect(practitioner: Page, patient: Page) -> None:
    for page in (practitioner, patient):
        await wait_state(page, "connected", units=3)


@pytest.mark.asyncio
@pytest.mark.netns
async def test_invite_cli_links_connect_two_browsers(net: Net) -> None:
    """The two links printed by relay.py invite join a call between two Chromium pages."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(relay.ROOT / "relay.py"),
        "invite",
        "--config",
        str(net.config),
        "--base-url",
        net.relay.http_url,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await within(proc.communicate(), 3)
    assert proc.returncode == 0
    links = dict(re.findall(r"^(\w+): +(\S+)$", out.decode(), re.M))
    assert re.fullmatch(r"[A-Za-z0-9]{22}", links["session"])
    practitioner = await net.page("practitioner", links["practitioner"])
    await wait_state(practitioner, "waiting", units=2)
    patient = await net.page("patient", links["patient"])
    await connect(practitioner, patient)


@pytest.mark.asyncio
@pytest.mark.netns
async def test_the_practitioners_copied_link_lets_the_patient_join(net: Net) -> None:
    """With an API link, the practitioner's copy button gives a patient link that connects."""
    status, made = await post(net.relay.port, b"{}", ns=net.ns)
    assert status == 200
    practitioner = await net.page("practitioner", made["practitioner_url"])
    await practitioner.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await practitioner.locator("#invite").wait_for(state="visible")
    await practitioner.click("#invite-copy")
    await practitioner.locator("#invite-copy", has_text="Link copied").wait_for()
    copied: str = await practitioner.evaluate("navigator.clipboard.readText()")
    assert copied == await practitioner.input_value("#invite-link")
    # Same session, role and window as the API's patient link: the same token.
    assert seat_of(copied) == seat_of(made["patient_url"])
    patient = await net.page("patient", copied)
    await connect(practitioner, patient)
