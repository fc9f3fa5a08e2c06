"""``make demo ARGS=--turn``: the demo's call through a local coturn, TURN only, in a namespace."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from peers.netns import netns_missing
from tests.processes import ROOT
from tests.support import within

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif((reason := netns_missing()) is not None, reason=reason or ""),
    pytest.mark.skipif(
        shutil.which("turnserver") is None,
        reason="coturn's turnserver is missing: run `make turn-deps` (Debian's coturn)",
    ),
]


@pytest.mark.asyncio
async def test_make_demo_turn_goes_through_coturn() -> None:
    """make demo ARGS=--turn connects both sides through coturn and prints the relay path."""
    proc = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "-o", "setup", "demo", "ARGS=--turn --seconds 3",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await within(proc.communicate(), 24)
    text = out.decode()
    assert proc.returncode == 0, text
    # The banner names the one exception to the denied private ranges.
    assert re.search(r"peers denied, except 198\.18\.0\.2/32 \(turn\.allowed_peers\)", text), text
    assert len(re.findall(r"ICE relay -> relay over udp", text)) == 2, text
    assert "demo: relay path: both sides through coturn at 198.18.0.2:3478" in text, text
