"""Browser test support: Debian's Chromium driven by Playwright, and the relay as a process.

Chromium comes from Debian (``make browser-deps``), never from ``playwright
install``: Playwright drives it through ``executable_path``.

Calls run inside a network namespace. Playwright talks to Chromium over two
inherited pipes (``--remote-debugging-pipe``), and ``ip netns exec`` keeps open
file descriptors, so the browser's executable is a two-line wrapper script that
execs ``ip netns exec NS chromium "$@"``: the Playwright driver stays in the
test's own namespace while every socket of Chromium lives in the test namespace.
The relay runs there too (``tests.processes.relay_process(netns=...)``), on
that namespace's 127.0.0.1, so the page is a secure context (camera allowed)
without TLS.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from tests.support import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path(os.environ.get("EPEDICARE_CHROMIUM", "/usr/bin/chromium"))

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",  # a test pattern and a beep as camera and microphone
    "--use-fake-ui-for-media-stream",  # camera and microphone allowed without a prompt
    # Hidden tabs throttle timers and skip rendering video frames.
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
)


def routed_flags(http_url: str) -> tuple[str, ...]:
    """A Chromium reaching the relay at ``http_url`` across routed namespaces: the page's
    origin treated as secure (camera allowed without TLS) and real host addresses in its
    candidates (no mDNS names: nothing resolves them between namespaces)."""
    return (
        f"--unsafely-treat-insecure-origin-as-secure={http_url}",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    )


# Reports CSP violations in the console, where the tests collect them.
CSP_WATCH = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`);
});
"""


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run `make browser-deps` (apt-get install chromium)"
    return None


# -- the relay as a process -------------------------------------------------------


def write_config(path: Path, **sections: Mapping[str, Any]) -> Path:
    """A relay YAML file on 127.0.0.1, port 0, with sections overridden."""
    data: dict[str, Any] = {"relay": {"host": "127.0.0.1", "port": 0}}
    data.update(sections)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# -- browsers and pages ---------------------------------------------------------------


class Browsers:
    """The browsers and pages of one test; their console logs, and artifacts on failure."""

    def __init__(self, tmp: Path, prefix: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.prefix = prefix  # run before Chromium, e.g. setpriv (bench-network)
        self.playwright: Playwright | None = None
        self.browsers: list[Browser] = []
        self.pages: dict[str, Page] = {}
        self.logs: dict[str, list[str]] = {}

    async def __aenter__(self) -> Browsers:
        self.playwright = await async_playwright().start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for browser in self.browsers:
            with contextlib.suppress(PlaywrightError):
                await browser.close()
        if self.playwright is not None:
            await self.playwright.stop()

    async def launch(self, netns: str | None = None, extra_args: tuple[str, ...] = ()) -> Browser:
        """A fresh Chromium (Playwright gives it a new --user-data-dir), in netns if given."""
        assert self.playwright is not None
        executable = CHROMIUM
        if netns is not None or self.prefix:
            inside = ("ip", "netns", "exec", netns) if netns is not None else ()
            command = shlex.join([*inside, *self.prefix, str(CHROMIUM)])
            executable = self.tmp / f"chromium-in-{netns or 'host'}"
            executable.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            executable.chmod(0o755)
        browser = await self.playwright.chromium.launch(
            executable_path=executable,
            args=[*CHROMIUM_FLAGS, *extra_args],
            headless=True,
            # Playwright's own default: a cold start of Chromium on a busy
            # 2-CPU machine once took over 10 s in CI.
            timeout=TIMEOUT * 6000,
        )
        self.browsers.append(browser)
        return browser

    async def open(
        self,
        name: str,
        url: str,
        *,
        browser: Browser | None = None,
        locale: str = "fr-FR",
        init_script: str | None = None,
        viewport: tuple[int, int] = (1280, 720),
    ) -> Page:
        """A page in its own context (its own storage), its console logged under name."""
        if browser is None:
            browser = self.browsers[0] if self.browsers else await self.launch()
        context: BrowserContext = await browser.new_context(
            locale=locale, viewport={"width": viewport[0], "height": viewport[1]}
        )
        await context.add_init_script(CSP_WATCH)
        if init_script is not None:
            await context.add_init_script(init_script)
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT * 1000)
        log = self.logs.setdefault(name, [])

        def on_console(message: ConsoleMessage) -> None:
            log.append(f"{message.type}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda error: log.append(f"pageerror: {error}"))
        self.pages[name] = page
        await page.goto(url)
        await page.wait_for_selector("body[data-ready]")
        return page

    def problems(self, name: str) -> list[str]:
        """Console errors and warnings of one page (CSP violations included)."""
        return [
            line
            for line in self.logs.get(name, [])
            if line.startswith(("error:", "warning:", "pageerror:"))
        ]

    async def save_artifacts(self, test: str) -> list[Path]:
        """A screenshot and the console log of every page, under artifacts/TEST/."""
        folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", test)
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for name, page in self.pages.items():
            with contextlib.suppress(PlaywrightError):
                await page.screenshot(path=folder / f"{name}.png", timeout=TIMEOUT * 1000)
                saved.append(folder / f"{name}.png")
            log = folder / f"{name}.console.log"
            log.write_text("\n".join(self.logs.get(name, [])) + "\n", encoding="utf-8")
            saved.append(log)
        return saved


# -- reading the page ---------------------------------------------------------------


async def notice(page: Page) -> str:
    """The text of the page's message area (waits until it shows)."""
    box = page.locator("#notice")
    await box.wait_for(state="visible")
    return (await box.inner_text()).strip()


async def wait_state(
    page: Page, state: str, *, server: str | None = None, units: float = 1
) -> None:
    """Wait until the status line says ``state`` (waiting, connecting, connected, left...)."""
    selector = f'#status[data-state="{state}"]'
    if server is not None:
        selector += f'[data-server="{server}"]'
    await page.wait_for_selector(selector, timeout=TIMEOUT * 1000 * units)


async def join(page: Page, session: str, role: str) -> None:
    await page.check(f'input[name="role"][value="{role}"]')
    await page.fill("#session", session)
    await page.click("#join")
