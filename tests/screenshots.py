"""``make screenshots``: docs/screenshot-{start,waiting,call}.png of the browser client.

The real relay and Debian's Chromium (fake camera and microphone) inside a
private network namespace, as in the browser tests: the start page, a
practitioner waiting for the patient, and the patient's page in a call.
Needs root (the namespace).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from peers.netns import Network, netns_missing
from tests.browser import Browsers, chromium_missing, join, relay_process, wait_state, write_config

DOCS = Path(__file__).resolve().parent.parent / "docs"


async def shoot() -> None:
    with tempfile.TemporaryDirectory(prefix="epc-shots-") as tmp:
        async with (
            Browsers(Path(tmp)) as browsers,
            Network("epc-shots") as network,
        ):
            ns = (await network.lan("198.18.0.2/24")).name
            async with relay_process(write_config(Path(tmp) / "relay.yaml"), netns=ns) as relay:
                browser = await browsers.launch(netns=ns)
                practitioner = await browsers.open("practitioner", relay.http_url, browser=browser)
                await practitioner.screenshot(path=DOCS / "screenshot-start.png")
                await join(practitioner, "consultation-42", "practitioner")
                await wait_state(practitioner, "waiting")
                await practitioner.screenshot(path=DOCS / "screenshot-waiting.png")
                patient = await browsers.open("patient", relay.http_url, browser=browser)
                await join(patient, "consultation-42", "patient")
                await wait_state(patient, "connected", units=2)
                await patient.bring_to_front()
                await asyncio.sleep(4)  # a few seconds of statistics
                await patient.fill("#chat-input", "Bonjour docteur !")
                await patient.press("#chat-input", "Enter")
                await asyncio.sleep(1)
                await patient.screenshot(path=DOCS / "screenshot-call.png", full_page=True)


def main() -> int:
    if reason := chromium_missing() or netns_missing():
        print(f"screenshots: {reason}", file=sys.stderr)
        return 2
    asyncio.run(shoot())
    for name in ("start", "waiting", "call"):
        print(DOCS / f"screenshot-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
