"""``make screenshots``: docs/screenshot-*.png of the browser client, phone and desktop.

The real relay and Debian's Chromium (fake camera and microphone) inside a
private network namespace, as in the browser tests. At phone size (390x844)
and desktop size (1280x800): the start page with its pre-call check, and the
patient's page in a call; at phone size also the details and the chat opened,
and the practitioner waiting. Needs root (the namespace).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from playwright.async_api import Page

from peers.netns import Network, netns_missing
from tests.browser import Browsers, chromium_missing, join, wait_state, write_config
from tests.processes import relay_process

DOCS = Path(__file__).resolve().parent.parent / "docs"
PHONE = (390, 844)
DESKTOP = (1280, 800)
NAMES = [
    "phone-start", "phone-waiting", "phone-call", "phone-details", "phone-chat",
    "desktop-start", "desktop-call",
]  # fmt: skip


async def verdict(page: Page) -> None:
    await page.wait_for_selector('#precheck:not([data-verdict="running"])')
    await asyncio.sleep(1)  # the microphone's meter moves


async def shoot() -> None:
    with tempfile.TemporaryDirectory(prefix="epc-shots-") as tmp:
        async with (
            Browsers(Path(tmp)) as browsers,
            Network("epc-shots") as network,
        ):
            ns = (await network.lan("198.18.0.2/24")).name
            async with relay_process(write_config(Path(tmp) / "relay.yaml"), netns=ns) as relay:
                browser = await browsers.launch(netns=ns)
                for size, (width, height) in (("phone", PHONE), ("desktop", DESKTOP)):
                    session = f"consultation-{size}"
                    url = f"{relay.http_url}/?session={session}"
                    practitioner = await browsers.open(
                        f"practitioner-{size}", url, browser=browser, viewport=(width, height)
                    )
                    await join(practitioner, session, "practitioner")
                    await wait_state(practitioner, "waiting")
                    if size == "phone":
                        await practitioner.screenshot(path=DOCS / "screenshot-phone-waiting.png")
                    patient = await browsers.open(
                        f"patient-{size}", url, browser=browser, viewport=(width, height)
                    )
                    await verdict(patient)
                    await patient.screenshot(path=DOCS / f"screenshot-{size}-start.png")
                    await join(patient, session, "patient")
                    await wait_state(patient, "connected", units=2)
                    await patient.bring_to_front()
                    await asyncio.sleep(4)  # a few seconds of statistics
                    if size == "phone":
                        await patient.screenshot(path=DOCS / "screenshot-phone-call.png")
                        await patient.click("#details-toggle")
                        await patient.screenshot(path=DOCS / "screenshot-phone-details.png")
                        await patient.click("#chat-toggle")
                    else:
                        await patient.click("#details-toggle")
                    await patient.fill("#chat-input", "Bonjour docteur !")
                    await patient.press("#chat-input", "Enter")
                    await practitioner.locator("#chat-log li.theirs").wait_for(state="attached")
                    if await practitioner.get_attribute("#chat-toggle", "aria-expanded") != "true":
                        await practitioner.click("#chat-toggle")
                    await practitioner.fill("#chat-input", "Bonjour ! Je vous vois bien.")
                    await practitioner.press("#chat-input", "Enter")
                    await patient.locator("#chat-log li.theirs").wait_for()
                    await asyncio.sleep(1)
                    await patient.screenshot(
                        path=DOCS / f"screenshot-{size}-{'chat' if size == 'phone' else 'call'}.png"
                    )
                    await patient.click("#hangup")
                    await practitioner.click("#hangup")


def main() -> int:
    if reason := chromium_missing() or netns_missing():
        print(f"screenshots: {reason}", file=sys.stderr)
        return 2
    asyncio.run(shoot())
    for name in NAMES:
        print(DOCS / f"screenshot-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
