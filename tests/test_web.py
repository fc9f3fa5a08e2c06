"""The browser client without a call: files, CSP, languages, forms, every message.

The relay runs as a process on 127.0.0.1 (a secure context, so the fake camera
works); nothing here needs a second peer or a network namespace.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page

import relay
from tests.browser import (
    Browsers,
    join,
    notice,
    wait_state,
    write_config,
)
from tests.processes import RelayProcess, relay_process
from tests.support import TIMEOUT, Client, within

WEB = Path(__file__).resolve().parent.parent / "web"
PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SECRET = "web-test-secret"

# Every error code of the protocol, read from the table of its documentation.
ERROR_CODES = re.findall(
    r"^\| `([a-z-]+)` \| ",
    PROTOCOL.read_text(encoding="utf-8").split("## Error codes")[1].split("\n## ")[0],
    re.M,
)


@pytest_asyncio.fixture
async def relay_proc(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    """relay.py on 127.0.0.1, port 0, default limits, no tokens."""
    async with relay_process(write_config(tmp_path / "relay.yaml")) as running:
        yield running


async def text_for(page: Page, key: str, **params: Any) -> str:
    """What the page's own i18n module says for key, in the page's current language."""
    text: str = await page.evaluate(
        "async ([key, params]) => (await import('./js/i18n.js')).t(key, params)", [key, params]
    )
    return text


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# -- served by the relay ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_file_served_with_its_content_type_and_csp(
    relay_server: relay.RunningRelay,
) -> None:
    """Every file of web/ comes with its content type and the strict CSP; others are 404."""
    files = [p for p in WEB.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= set(relay.CONTENT_TYPES), "web/ has a type the relay lacks"
    for path in files:
        url = f"{relay_server.http_url}/{path.relative_to(WEB).as_posix()}"
        status, headers, body = await asyncio.to_thread(fetch, url)
        assert status == 200, url
        assert headers["Content-Type"] == relay.CONTENT_TYPES[path.suffix], url
        assert headers["Content-Security-Policy"] == relay.CSP
        assert body == path.read_bytes()
    status, _, _ = await asyncio.to_thread(fetch, f"{relay_server.http_url}/js/nothing.js")
    assert status == 404


def test_no_inline_script_or_style_and_nothing_remote() -> None:
    """The CSP forbids inline code: the HTML has none, and no file names another host."""
    html = (WEB / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)
    for path in WEB.rglob("*.*"):
        if path.suffix in {".html", ".js", ".css", ".json", ".svg"}:
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"(?:https?|wss?)://(?!www\.w3\.org/2000/svg)", text), path


def test_english_is_complete() -> None:
    """Every French string of web/js/i18n.js has its English one, with the same placeholders."""
    text = (WEB / "js" / "i18n.js").read_text(encoding="utf-8")
    fr_part, en_part = text.split("\n  en: {\n")
    pair = r'^ {4}"([a-z0-9.-]+)": "((?:[^"\\]|\\.)*)",$'
    fr = dict(re.findall(pair, fr_part.split("\n  fr: {\n")[1], re.M))
    en = dict(re.findall(pair, en_part.split("\n  },\n")[0], re.M))
    assert len(fr) > 100
    assert sorted(fr) == sorted(en)
    for key, french in fr.items():
        assert re.findall(r"\{\w+\}", french) == re.findall(r"\{\w+\}", en[key]), key


@pytest.mark.asyncio
async def test_page_runs_without_console_errors_or_csp_violations(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """Loading, switching language and joining log no error and violate no CSP directive."""
    page = await browsers.open("patient", relay_proc.http_url)
    await page.click("#lang-switch")
    await page.click("#lang-switch")
    await join(page, "csp-check", "patient")
    await wait_state(page, "waiting")
    await page.click("#hangup")
    await page.locator("#start-view").wait_for()
    assert browsers.problems("patient") == []


# -- languages ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("locale", "lang", "join_label"),
    [("fr-FR", "fr", "Rejoindre"), ("en-US", "en", "Join"), ("de-DE", "fr", "Rejoindre")],
    ids=["french-browser", "english-browser", "other-language-gets-french"],
)
async def test_language_follows_the_browser(
    browsers: Browsers, relay_proc: RelayProcess, locale: str, lang: str, join_label: str
) -> None:
    """French by default, English for an English browser."""
    page = await browsers.open("page", relay_proc.http_url, locale=locale)
    assert await page.get_attribute("html", "lang") == lang
    assert (await page.inner_text("#join")).strip() == join_label


@pytest.mark.asyncio
async def test_language_switch_is_kept(browsers: Browsers, relay_proc: RelayProcess) -> None:
    """The switch translates the page at once and the choice survives a reload."""
    page = await browsers.open("page", relay_proc.http_url, locale="fr-FR")
    await page.click("#lang-switch")
    assert await page.get_attribute("html", "lang") == "en"
    assert (await page.inner_text("#start-title")).strip() == "Join a consultation"
    assert (await page.inner_text("#lang-switch")).strip() == "Français"
    await page.reload()
    await page.wait_for_selector("body[data-ready]")
    assert (await page.inner_text("#join")).strip() == "Join"


# -- the start form ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_url_fills_the_form(browsers: Browsers, relay_proc: RelayProcess) -> None:
    """?session=&role=&token= fill the form, and the join button has the focus."""
    url = f"{relay_proc.http_url}/?session=abc-123&role=practitioner&token=v1.1.sig"
    page = await browsers.open("page", url)
    assert await page.input_value("#session") == "abc-123"
    assert await page.is_checked('input[name="role"][value="practitioner"]')
    assert await page.input_value("#token") == "v1.1.sig"
    assert await page.evaluate("document.activeElement.id") == "join"


@pytest.mark.asyncio
async def test_keyboard_and_screen_reader_names(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """Every control has an accessible name; typing the id and Enter joins."""
    page = await browsers.open("page", relay_proc.http_url, locale="en-US")
    assert await page.evaluate("document.activeElement.id") == "session"
    await page.get_by_role("radio", name="a practitioner").check()
    await page.get_by_label("Consultation id").fill("keyboard")
    await page.keyboard.press("Enter")
    await wait_state(page, "waiting")
    for name in ("Mute microphone", "Turn camera off", "Messages", "Details", "Hang up", "Send"):
        assert await page.get_by_role("button", name=name).count() == 1, name
    assert await page.get_by_role("status").inner_text() == "Waiting for the patient"
    assert await page.get_by_label("The patient's video").count() == 1
    assert await page.get_by_role("img", name="Call quality: not measured yet").count() == 1
    details = page.get_by_role("button", name="Details")
    await details.press("Enter")
    assert await details.get_attribute("aria-expanded") == "true"
    assert await page.get_by_role("heading", name="Technical details").is_visible()
    await page.keyboard.press("Escape")
    assert await details.get_attribute("aria-expanded") == "false"
    await page.get_by_role("button", name="Mute microphone").press("Enter")
    assert await page.get_attribute("#mic", "aria-pressed") == "true"
    assert await page.evaluate("epedicare.local.getAudioTracks()[0].enabled") is False


@pytest.mark.asyncio
@pytest.mark.parametrize("viewport", [(360, 740), (1280, 720)], ids=["phone", "desktop"])
async def test_no_horizontal_scrolling(
    browsers: Browsers, relay_proc: RelayProcess, viewport: tuple[int, int]
) -> None:
    """The start page and the call fit the screen's width, a phone's included."""
    page = await browsers.open("page", relay_proc.http_url, viewport=viewport)
    overflow = "document.documentElement.scrollWidth - window.innerWidth"
    assert await page.evaluate(overflow) <= 0
    await join(page, "narrow", "patient")
    await wait_state(page, "waiting")
    assert await page.evaluate(overflow) <= 0


PHONE = (390, 844)
CONTROLS = ("#mic", "#camera", "#chat-toggle", "#details-toggle", "#hangup")


@pytest.mark.asyncio
async def test_phone_layout_video_fills_the_screen(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """At 390x844 the remote video covers at least 60 % of the screen, every control in view."""
    page = await browsers.open("phone", relay_proc.http_url, viewport=PHONE)
    await join(page, "phone", "patient")
    await wait_state(page, "waiting")
    width, height = PHONE
    video = await page.locator("#remote-video").bounding_box()
    assert video is not None
    visible_w = min(video["x"] + video["width"], width) - max(video["x"], 0)
    visible_h = min(video["y"] + video["height"], height) - max(video["y"], 0)
    assert visible_w * visible_h >= 0.6 * width * height, video
    for selector in CONTROLS:
        box = await page.locator(selector).bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (selector, box)
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, (selector, box)
        assert box["height"] >= 44, (selector, box)  # a thumb's target
    assert await page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    assert await page.evaluate("document.scrollingElement.scrollTop") == 0
    # The statistics are behind "details", the chat opens on demand.
    assert not await page.is_visible("#stats")
    assert not await page.is_visible("#chat-input")
    await page.click("#chat-toggle")
    assert await page.is_visible("#chat-panel")
    await page.click("#details-toggle")  # one sheet at a time on a phone
    assert await page.is_visible("#stats")
    assert not await page.is_visible("#chat-panel")


async def verdict(page: Page) -> str:
    """The pre-call check's verdict, once it has one."""
    await page.wait_for_selector('#precheck:not([data-verdict="running"])')
    return str(await page.get_attribute("#precheck", "data-verdict"))


@pytest.mark.asyncio
async def test_precheck_says_when_the_relay_is_down(browsers: Browsers, tmp_path: Path) -> None:
    """The pre-call check: relay down gives its verdict and sentence; back up, all is ready."""
    async with relay_process(write_config(tmp_path / "relay.yaml")) as running:
        page = await browsers.open("page", running.http_url, locale="en-US")
        assert await verdict(page) == "ok"
        assert await page.get_attribute("#check-camera", "data-state") == "ok"
        assert await page.get_attribute("#check-mic", "data-state") == "ok"
        assert await page.inner_text("#precheck-verdict") == await text_for(
            page, "check.verdict.ok"
        )
        await running.stop()
        await page.click("#precheck-again")
        assert await verdict(page) == "relay-down"
        assert await page.get_attribute("#check-relay", "data-state") == "fail"
        assert await page.inner_text("#precheck-verdict") == (
            "The consultation server cannot be reached: check your Internet connection, "
            "then check again. If it goes on, tell the practice."
        )
        await running.start()  # the same port
        await page.click("#precheck-again")
        assert await verdict(page) == "ok"


@pytest.mark.asyncio
async def test_precheck_shows_the_camera_and_the_microphone_level(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """The check previews the camera, moves the microphone's meter, and the call reuses them."""
    page = await browsers.open("page", relay_proc.http_url)
    assert await verdict(page) == "ok"
    size = "[precheck.videoWidth, precheck.videoHeight]".replace(
        "precheck", "document.getElementById('precheck-video')"
    )

    async def moving() -> None:
        while await page.evaluate(size) == [0, 0] or not await page.evaluate(  # noqa: ASYNC110 (polling the page)
            "document.getElementById('mic-level').value > 0"
        ):
            await asyncio.sleep(0.1)

    await within(moving())
    track = await page.evaluate("document.getElementById('precheck-video').srcObject.id")
    await join(page, "reuse", "patient")
    await wait_state(page, "waiting")
    assert await page.evaluate("epedicare.local.id") == track  # no second camera prompt
    assert await page.evaluate("document.getElementById('mic-level').value") == 0


@pytest.mark.asyncio
async def test_bad_session_id_explained_before_joining(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """A malformed id gets the bad-session message and the page stays on the form."""
    page = await browsers.open("page", relay_proc.http_url)
    await join(page, "pas valide!", "patient")
    assert await notice(page) == await text_for(page, "error.bad-session")
    assert await page.get_attribute("#session", "aria-invalid") == "true"
    assert await page.is_visible("#start-view")


@pytest.mark.asyncio
async def test_hang_up_frees_the_seat(browsers: Browsers, relay_proc: RelayProcess) -> None:
    """Hanging up returns to the form, says so, and frees the seat for someone else."""
    page = await browsers.open("page", relay_proc.http_url)
    await join(page, "hangup", "patient")
    await wait_state(page, "waiting")
    await page.click("#hangup")
    assert await notice(page) == await text_for(page, "state.ended")
    client = await Client.open(relay_proc.url)
    try:
        await client.join("hangup", "patient")
    finally:
        await client.close()


# -- refusals from the real relay ----------------------------------------------------------


@pytest.mark.asyncio
async def test_role_taken_shows_its_message(browsers: Browsers, relay_proc: RelayProcess) -> None:
    """Joining a seat someone holds says so and returns to the form."""
    holder = await Client.open(relay_proc.url)
    try:
        await holder.join("taken", "practitioner")
        page = await browsers.open("page", relay_proc.http_url, locale="en-US")
        await join(page, "taken", "practitioner")
        text = await notice(page)
        assert text == "Someone already holds the practitioner's seat in this consultation."
        assert await page.is_visible("#start-view")
        assert await page.evaluate("epedicare.local") is None, "the camera was not released"
    finally:
        await holder.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("code", ["bad-token", "token-expired"])
async def test_token_refusals_show_their_message(
    browsers: Browsers, tmp_path: Path, code: str
) -> None:
    """A relay with join tokens: a wrong or an expired token gets its own message."""
    config = write_config(tmp_path / "relay.yaml", auth={"secret": SECRET})
    expiry = int(time.time()) + (-60 if code == "token-expired" else 3600)
    token = relay.mint_token(
        SECRET if code == "token-expired" else "other", "tok", "patient", expiry
    )
    async with relay_process(config) as running:
        page = await browsers.open("page", f"{running.http_url}/?session=tok&token={token}")
        await page.click("#join")
        assert await notice(page) == await text_for(page, f"error.{code}")
        assert await page.is_visible("#start-view")


@pytest.mark.asyncio
async def test_server_full_then_retry_joins(browsers: Browsers, tmp_path: Path) -> None:
    """server-full is explained, and the page keeps retrying until there is room."""
    config = write_config(tmp_path / "relay.yaml", limits={"max_connections": 1})
    async with relay_process(config) as running:
        holder = await Client.open(running.url)
        page = await browsers.open("page", running.http_url)
        await join(page, "full", "patient")
        assert await notice(page) == await text_for(page, "error.server-full")
        await holder.close()
        await wait_state(page, "waiting", units=3)


@pytest.mark.asyncio
async def test_relay_unreachable_then_back(browsers: Browsers, tmp_path: Path) -> None:
    """With the relay down the page says it retries, and joins once it is back."""
    async with relay_process(write_config(tmp_path / "relay.yaml")) as running:
        page = await browsers.open("page", running.http_url)
        await running.stop()
        await join(page, "later", "patient")
        assert (await notice(page)).startswith((await text_for(page, "server.unreachable"))[:20])
        await running.start()
        await wait_state(page, "waiting", units=3)


@pytest.mark.asyncio
@pytest.mark.parametrize("lang", ["fr", "en"])
async def test_every_error_code_has_a_message(
    browsers: Browsers, relay_proc: RelayProcess, lang: str
) -> None:
    """Each error code of docs/protocol.md shows its own sentence in the page."""
    assert len(ERROR_CODES) >= 17, ERROR_CODES
    page = await browsers.open("page", f"{relay_proc.http_url}/?lang={lang}")
    await join(page, "codes", "patient")
    await wait_state(page, "waiting")
    fallback = await text_for(page, "error.unknown", message="")
    seen = set()
    for code in ERROR_CODES:
        await page.evaluate(
            "code => epedicare.signaling.dispatchEvent("
            "new CustomEvent('refused', {detail: {type: 'error', code, message: 'm'}}))",
            code,
        )
        text = await notice(page)
        assert text and not text.startswith(fallback.strip()), code
        assert "{" not in text, (code, text)
        seen.add(text)
    assert len(seen) == len(ERROR_CODES), "two codes share a message"


# -- the camera and the microphone ---------------------------------------------------------

REFUSE = """
navigator.mediaDevices.getUserMedia = async () => {
  throw new DOMException("Permission denied", "NotAllowedError");
};
"""
NO_CAMERA = """
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (constraints) => {
  if (constraints.video) throw new DOMException("Requested device not found", "NotFoundError");
  return realGetUserMedia(constraints);
};
"""
NO_DEVICE = """
navigator.mediaDevices.getUserMedia = async () => {
  throw new DOMException("Requested device not found", "NotFoundError");
};
"""


@pytest.mark.asyncio
async def test_refused_permission_is_explained(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """A refused camera and microphone: a message, and the page stays on the form."""
    page = await browsers.open("page", relay_proc.http_url, init_script=REFUSE)
    await join(page, "refused", "patient")
    assert await notice(page) == await text_for(page, "media.denied")
    assert await page.is_visible("#start-view")
    assert not await page.is_disabled("#join")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("script", "key", "tracks"),
    [(NO_CAMERA, "media.no-camera", ["audio"]), (NO_DEVICE, "media.none", [])],
    ids=["no-camera", "no-device"],
)
async def test_missing_device_is_explained_and_the_call_goes_on(
    browsers: Browsers, relay_proc: RelayProcess, script: str, key: str, tracks: list[str]
) -> None:
    """A missing camera (or every device) is said, and the page joins with what there is."""
    page = await browsers.open("page", relay_proc.http_url, init_script=script)
    await join(page, "missing", "patient")
    await wait_state(page, "waiting")
    assert await notice(page) == await text_for(page, key)
    kinds = await page.evaluate("(epedicare.local?.getTracks() ?? []).map(t => t.kind)")
    assert kinds == tracks
    assert await page.is_disabled("#camera")


# -- honest states (issue 16, item 4) ------------------------------------------------------


def console_lines(browsers: Browsers, name: str, prefix: str = "info: ") -> list[str]:
    return [line.removeprefix(prefix) for line in browsers.logs.get(name, [])]


@pytest.mark.asyncio
async def test_a_side_gone_before_any_call_is_no_call_going_on_and_calls_are_numbered(
    browsers: Browsers, relay_proc: RelayProcess
) -> None:
    """The practitioner drops before the call connects: the page waits, no 'call goes on'."""
    page = await browsers.open("page", relay_proc.http_url, locale="en-US")
    await join(page, "gone", "patient")
    await wait_state(page, "waiting")
    for number in (1, 2):
        practitioner = await Client.open(relay_proc.url)
        await practitioner.join("gone", "practitioner")
        await practitioner.expect("offer")  # the page's call N
        await practitioner.close()  # no bye: its signaling dropped, before any call
        await wait_state(page, "waiting")
        assert await page.inner_text("#status .status-call") == (
            "The practitioner disconnected before the call; waiting for them to come back"
        )
        assert f"call {number}: offer sent to the practitioner" in console_lines(browsers, "page")
    lines = console_lines(browsers, "page")
    assert "the practitioner's signaling dropped (disconnected); no call in progress" in lines
    assert not any("the call goes on" in line for line in lines)
    assert browsers.problems("page") == []


@pytest.mark.asyncio
async def test_a_relay_refusing_the_websocket_is_told_from_one_that_is_down(
    browsers: Browsers, tmp_path: Path
) -> None:
    """/health answers, /ws is refused (an origin the relay does not expect): after 3 attempts
    the page says the call connection is blocked, not that the server is unreachable."""
    config = write_config(
        tmp_path / "relay.yaml",
        relay={"host": "127.0.0.1", "port": 0, "origins": ["https://call.example.org"]},
    )
    async with relay_process(config) as running:
        page = await browsers.open("page", running.http_url, locale="en-US")
        await join(page, "blocked", "patient")
        box = page.locator("#notice[data-key='server.ws-blocked']")
        await box.wait_for(timeout=TIMEOUT * 3000)
        text = (await box.inner_text()).strip()
        start = "The server answers, but refuses or never gets the call connection (WebSocket, /ws)"
        assert text.startswith(start), text
        lines = console_lines(browsers, "page")
        said = f"signaling: /health answers but {running.url} does not open (3 attempts)"
        assert said in lines
