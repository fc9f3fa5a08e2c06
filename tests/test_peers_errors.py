"""The peers' error tree, the retry policy, a Seat replacing its Call, a relay URL that is wrong.

No network namespace: the relay, where there is one, runs on 127.0.0.1.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest

import relay
from peers import errors
from peers.config import PeerSettings
from peers.errors import FATAL_CODES, Backoff, JoinRefused, NotWebSocket, PeerError, is_fatal
from peers.media import Sources
from peers.seat import Seat
from peers.signaling import HINT_AFTER, RelayClient
from tests.processes import peer_argv, relay_process, spawn
from tests.support import within

SIGNALING_JS = Path(__file__).resolve().parent.parent / "web" / "js" / "signaling.js"


def test_the_fatal_codes_are_the_browsers() -> None:
    """is_fatal() refuses exactly the codes of FATAL_JOIN_CODES in web/js/signaling.js."""
    text = SIGNALING_JS.read_text(encoding="utf-8")
    block = re.search(r"const FATAL_JOIN_CODES = new Set\(\[(.*?)\]\)", text, re.DOTALL)
    assert block is not None, "FATAL_JOIN_CODES not found in signaling.js"
    browser = set(re.findall(r'"([a-z-]+)"', block.group(1)))
    assert browser == set(FATAL_CODES)
    assert all(is_fatal(code) for code in browser)
    assert not is_fatal("rate-limited")
    assert not is_fatal(None)


def test_every_peer_error_has_a_stable_kebab_case_code() -> None:
    """Each class of the tree is a PeerError with its own kebab-case code."""
    classes = [getattr(errors, name) for name in errors.__all__]
    tree = [c for c in classes if isinstance(c, type) and issubclass(c, PeerError)]
    assert len(tree) == 11
    codes = [c.code for c in tree]
    assert len(set(codes)) == len(codes)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", code) for code in codes)
    refused = JoinRefused("role-taken", "the patient's seat is taken")
    assert refused.code == "role-taken"
    assert str(refused) == "role-taken: the patient's seat is taken"


def test_backoff_doubles_up_to_its_cap_with_jitter_and_resets() -> None:
    """Delays double from base to cap, jitter keeps half to all of each, reset starts again."""
    top = Backoff(0.5, 5.0, jitter=lambda: 1.0)
    assert [next(top) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    top.reset()
    assert next(top) == 0.5
    bottom = Backoff(0.5, 5.0, jitter=lambda: 0.0)
    assert [next(bottom) for _ in range(3)] == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="backoff"):
        Backoff(1.0, 0.5)


def test_after_a_relay_restart_the_first_try_is_spread_and_a_503_is_waited_for() -> None:
    """after_restart() lands anywhere in the spread; busy() waits Retry-After plus up to 1 s."""
    low = Backoff(0.5, 5.0, restart_spread_s=2.0, jitter=lambda: 0.0)
    high = Backoff(0.5, 5.0, restart_spread_s=2.0, jitter=lambda: 1.0)
    assert (low.after_restart(), high.after_restart()) == (0.0, 2.0)
    assert (low.attempt, high.attempt) == (1, 1)  # the next failure backs off as usual
    assert (low.busy(3), high.busy(3)) == (3.0, 4.0)
    assert (low.attempt, high.attempt) == (2, 2)
    assert Backoff(0.5, 5.0, jitter=lambda: 0.0).busy(0) == 0.5  # never below base_s
    assert Backoff(0.5, 5.0, jitter=lambda: 1.0).busy(60) == 66.0  # up to a tenth more


def test_a_relay_that_gives_its_clients_a_moment_is_obeyed() -> None:
    """The close reason's "reconnect in S s" is the first delay; none: the spread; capped."""
    backoff = Backoff(0.5, 5.0, restart_spread_s=2.0, jitter=lambda: 1.0)
    delay = errors.restart_delay(relay.RECONNECT_REASON.format(7.5))
    assert delay == 7.5
    assert backoff.after_restart(delay) == 7.5
    assert errors.restart_delay("relay shutting down") is None  # an older relay: the spread
    assert Backoff(jitter=lambda: 1.0).after_restart(None) == errors.RESTART_SPREAD_S
    assert errors.restart_delay("reconnect in 99999 s") == errors.RESTART_DELAY_MAX_S
    assert errors.restart_delay("reconnect in -3 s") is None
    with pytest.raises(ValueError, match="restart_spread_s"):
        Backoff(restart_spread_s=-1)


def test_the_restart_spread_is_the_browsers() -> None:
    """RESTART_SPREAD_S is restartSpreadMs of web/js/signaling.js."""
    text = SIGNALING_JS.read_text(encoding="utf-8")
    found = re.search(r"restartSpreadMs: ([0-9_]+),", text)
    assert found is not None, "restartSpreadMs not found in signaling.js"
    assert int(found.group(1).replace("_", "")) == errors.RESTART_SPREAD_S * 1000


def test_the_close_reasons_delay_is_read_as_the_browsers_read_it() -> None:
    """RESTART_DELAY_RE and its cap are those of web/js/signaling.js."""
    text = SIGNALING_JS.read_text(encoding="utf-8")
    found = re.search(r"const RESTART_DELAY_RE = /(.+)/;", text)
    assert found is not None, "RESTART_DELAY_RE not found in signaling.js"
    assert found.group(1) == errors.RESTART_DELAY_RE.pattern
    cap = re.search(r"const restartDelayMaxMs = ([0-9_]+);", text)
    assert cap is not None, "restartDelayMaxMs not found in signaling.js"
    assert int(cap.group(1).replace("_", "")) == errors.RESTART_DELAY_MAX_S * 1000


@pytest.mark.asyncio
async def test_each_retry_is_logged_at_info_with_its_delay_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A relay that refuses connections: each retry says when and why, at INFO."""
    with socket.socket() as probe:  # a free port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO, logger="peers.signaling")
    client = RelayClient(
        f"ws://127.0.0.1:{port}/ws", "s1", "patient", backoff_base_s=0.01, backoff_max_s=0.02
    )

    async def two_retries() -> None:
        async for _ in client.frames():
            pass  # never reached: nothing answers

    with pytest.raises(TimeoutError):
        await within(two_retries(), 0.2)
    retries = [r for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert len(retries) >= 2
    assert {r.levelno for r in retries} == {logging.INFO}
    assert "ConnectionRefusedError" in retries[0].getMessage()
    assert client.reconnects == len(retries)


@pytest.mark.asyncio
async def test_an_unreachable_relay_says_what_to_check_after_three_attempts_and_keeps_trying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens: after 3 failed attempts one WARNING names the URL and the /ws path."""
    with socket.socket() as probe:  # a free port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    caplog.set_level(logging.INFO, logger="peers.signaling")
    client = RelayClient(url, "s1", "patient", backoff_base_s=0.01, backoff_max_s=0.02)

    async def retry() -> None:
        async for _ in client.frames():
            pass  # never reached: nothing answers

    with pytest.raises(TimeoutError):
        await within(retry(), 0.3)
    hints = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in hints] == [
        f"relay {url}: not reached after {HINT_AFTER} attempts: "
        f"is the relay running at {url}? the URL path must be /ws (still trying)"
    ]
    retries = [r for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert len(retries) > HINT_AFTER  # it kept trying after the hint
    assert caplog.records.index(hints[0]) > caplog.records.index(retries[HINT_AFTER - 1])


@pytest.fixture
def open_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("relay: {open_timeout_s: 2, join_timeout_s: 3, reconnect_max_s: 1}\n")
    return path


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "answer"), [("/", "HTTP 200 OK"), ("/nope", "HTTP 404 Not Found")], ids=["root", "404"]
)
async def test_an_http_answer_where_a_websocket_was_expected_is_fatal_with_the_hint(
    open_config: Path, path: str, answer: str
) -> None:
    """The relay's URL without /ws (its page, or a 404): NotWebSocket at once, not a retry."""
    async with relay_process(open_config) as running:
        url = running.url.removesuffix("/ws") + path
        client = RelayClient(url, "s1", "patient", backoff_base_s=0.01, backoff_max_s=0.02)
        with pytest.raises(NotWebSocket) as caught:
            async for _ in client.frames():
                pass
    assert caught.value.code == "not-websocket"
    assert str(caught.value) == (
        f"relay {url}: {answer} instead of a WebSocket; "
        f"is the relay running at {url}? the URL path must be /ws"
    )
    assert client.reconnects == 0


@pytest.mark.asyncio
async def test_a_peer_given_a_url_without_ws_exits_2_with_the_hint(open_config: Path) -> None:
    """python -m peers.patient --relay ws://HOST:PORT/ (the page's URL): one line, exit 2."""
    async with relay_process(open_config) as running:
        url = running.url.removesuffix("ws")
        argv = peer_argv(
            "patient", open_config, "--relay", url, "--video", "none", "--audio", "none"
        )
        process = await spawn("patient", argv)
        assert await process.wait(30) == 2, process.log()
    expected = (
        f"patient: relay {url}: HTTP 200 OK instead of a WebSocket; "
        f"is the relay running at {url}? the URL path must be /ws"
    )
    assert expected in process.lines, process.log()


@pytest.mark.asyncio
async def test_a_seat_replacing_its_call_closes_the_old_one() -> None:
    """new_call() twice: the first Call is closed for sure and counted; close() waits for all."""
    seat = Seat("patient", PeerSettings(), Sources(None, None))
    first = seat.new_call()
    second = seat.new_call()
    assert seat.call is second and seat.calls == 2
    await seat.close()
    assert first.closed and second.closed
    assert seat.closed_calls == 2
    assert first.pc.connectionState == "closed"
