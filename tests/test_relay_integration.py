"""Integration tier: the real relay on port 0 and real websockets clients.

Every rule of protocol v1 and every error code over real sockets; HTTP on the
same port; keepalive; TLS; the process's signals, exit codes and logs; and
isolation: a bad, crashed or silent client never disturbs another session.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

import relay
from peers.netns import Network, netns_missing
from tests.processes import RelayProcess
from tests.support import (
    TIMEOUT,
    Client,
    http_get,
    pair,
    relay_command,
    relay_config,
    running_relay,
    self_signed,
    within,
    write_yaml,
)

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parent.parent
SDP = "v=0\r\no=- 1 2 IN IP4 198.18.0.2\r\ns=-\r\nt=0 0\r\n" + "a=x-pad\r\n" * 200
CANDIDATE = {
    "candidate": "candidate:1 1 udp 2130706431 198.18.0.2 40000 typ host",
    "sdpMid": "0",
    "sdpMLineIndex": 0,
}


async def quiet(client: Client, seconds: float = 0.2) -> None:
    """Assert that nothing arrives for a while."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.ws.recv(), seconds)


# -- seats and routing -------------------------------------------------------------


class Relays:
    """Where a test's clients connect: one relay with its seats in memory, or two relays
    sharing one Redis, each new client on the next one (a pair is split across them)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._turn = itertools.count()

    @property
    def url(self) -> str:
        return self.urls[next(self._turn) % len(self.urls)]


@pytest_asyncio.fixture(params=["memory", "redis-split"])
async def relays(request: pytest.FixtureRequest) -> AsyncIterator[Relays]:
    """The seat and forwarding tests run on each seat store: memory, and Redis (two relays)."""
    if request.param == "memory":
        async with running_relay() as running:
            yield Relays([running.url])
        return
    import redis

    url = request.getfixturevalue("shared_redis")
    with redis.Redis.from_url(url) as client:
        client.flushall()  # nothing left by the test before
    configs = [
        relay_config(
            cluster={"redis_url": url, "node_id": node},
            auth={"resume_secret": "integration-resume-secret"},
        )
        for node in ("a", "b")
    ]
    try:
        async with relay.serve_relay(configs[0]) as a, relay.serve_relay(configs[1]) as b:
            yield Relays([a.url, b.url])
    finally:
        await Client.drop_all()


async def split(relays: Relays, session: str) -> tuple[Client, Client]:
    """``pair``, its two clients on the next two relays."""
    patient = await Client.open(relays.url)
    await patient.join(session, "patient")
    practitioner = await Client.open(relays.url)
    await practitioner.join(session, "practitioner")
    await patient.expect("peer-joined", role="practitioner")
    return patient, practitioner


@pytest.mark.parametrize("first", ["patient", "practitioner"])
async def test_either_side_joins_first(relays: Relays, first: str) -> None:
    second = "practitioner" if first == "patient" else "patient"
    a = await Client.open(relays.url)
    joined = await a.join("s1", first)
    assert joined["peer"] is False
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", joined["resume"])
    b = await Client.open(relays.url)
    assert (await b.join("s1", second))["peer"] is True
    await a.expect("peer-joined", role=second, resumed=False)
    await b.send(type="offer" if second == "patient" else "answer", sdp=SDP)
    got = await a.recv()
    assert got["sdp"] == SDP


async def test_offer_answer_candidates_and_end_of_candidates_cross_verbatim(
    relays: Relays,
) -> None:
    patient, practitioner = await split(relays, "s1")
    await patient.send(type="offer", sdp=SDP, extra={"kept": [1, 2]})
    assert await practitioner.recv() == {"type": "offer", "sdp": SDP, "extra": {"kept": [1, 2]}}
    await practitioner.send(type="answer", sdp=SDP)
    await patient.expect("answer", sdp=SDP)
    await practitioner.send(type="candidate", candidate=CANDIDATE)
    await patient.expect("candidate", candidate=CANDIDATE)
    await practitioner.send(type="candidate", candidate=None)
    await patient.expect("candidate", candidate=None)


async def test_ping_is_answered_before_and_after_join(relay_server: relay.RunningRelay) -> None:
    client = await Client.open(relay_server.url)
    await client.send(type="ping")
    await client.expect("pong")
    await client.join("s1", "patient")
    await client.send(type="ping")
    await client.expect("pong")


async def test_bye_is_forwarded_then_peer_left_and_the_seat_is_free(
    relays: Relays,
) -> None:
    patient, practitioner = await split(relays, "s1")
    await practitioner.send(type="bye", reason="done")
    await patient.expect("bye", reason="done")
    await patient.expect("peer-left", role="practitioner", reason="bye")
    # The connection stays open and may join again; so may somebody else.
    newcomer = await Client.open(relays.url)
    await newcomer.join("s1", "practitioner")
    await patient.expect("peer-joined", role="practitioner")
    await practitioner.join("s2", "practitioner")


async def test_disconnect_frees_the_seat_with_reason_disconnected(
    relays: Relays,
) -> None:
    patient, practitioner = await split(relays, "s1")
    await practitioner.close()
    await patient.expect("peer-left", role="practitioner", reason="disconnected")


async def test_frames_never_cross_sessions(relays: Relays) -> None:
    a1, b1 = await split(relays, "one")
    a2, b2 = await split(relays, "two")
    await a1.send(type="offer", sdp="for-one")
    await a2.send(type="offer", sdp="for-two")
    await b1.expect("offer", sdp="for-one")
    await b2.expect("offer", sdp="for-two")
    await quiet(b1)
    await quiet(a2)


async def test_resume_replaces_the_stale_connection_of_its_own_seat(
    relays: Relays,
) -> None:
    patient, practitioner = await split(relays, "s1")
    # The patient's signaling "drops" without the relay noticing: it rejoins on
    # a new connection with its resume key.
    first = await Client.open(relays.url)
    joined = await first.join("s9", "patient")
    other = await Client.open(relays.url)
    await other.join("s9", "practitioner")
    await first.expect("peer-joined", role="practitioner")
    again = await Client.open(relays.url)
    rejoined = await again.join("s9", "patient", resume=joined["resume"])
    assert rejoined["resumed"] is True
    assert rejoined["peer"] is True
    assert await first.closed() == (4001, "replaced")
    await other.expect("peer-joined", role="patient", resumed=True)
    await again.send(type="offer", sdp="after-resume")
    await other.expect("offer", sdp="after-resume")
    # Untouched: the other session.
    await patient.send(type="offer", sdp="s1")
    await practitioner.expect("offer", sdp="s1")


@pytest.mark.parametrize(
    ("session", "role"), [("s9", "practitioner"), ("s8", "patient")], ids=["role", "session"]
)
async def test_a_resume_key_never_opens_another_seat(
    relays: Relays, session: str, role: str
) -> None:
    first = await Client.open(relays.url)
    key = (await first.join("s9", "patient"))["resume"]
    holder = await Client.open(relays.url)
    await holder.join(session, role)
    thief = await Client.open(relays.url)
    await thief.send(type="join", session=session, role=role, resume=key)
    await thief.expect_error("role-taken")
    await holder.send(type="ping")
    await holder.expect("pong")


async def test_a_made_up_resume_key_is_no_resume(relay_server: relay.RunningRelay) -> None:
    """A key the relay did not sign takes a free seat as a fresh join: resumed false, a new key."""
    client = await Client.open(relay_server.url)
    joined = await client.join("s1", "patient", resume="from-before-restart")
    assert joined["resume"] != "from-before-restart"
    assert joined["resumed"] is False


# -- every error code ------------------------------------------------------------------


async def refused(client: Client, message: str | bytes, code: str) -> None:
    await client.send_raw(message)
    await client.expect_error(code)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "bad-json"),
        ("[1, 2]", "bad-json"),
        (b"\x00\x01", "binary-frame"),
        (json.dumps({"sdp": "x"}), "missing-field"),
        (json.dumps({"type": "offer"}), "missing-field"),
        (json.dumps({"type": "offer", "sdp": 42}), "bad-field"),
        (json.dumps({"type": "candidate", "candidate": "text"}), "bad-field"),
        (json.dumps({"type": "teleport"}), "unknown-type"),
        (json.dumps({"type": "join", "session": "s1", "role": "patient"}), "already-joined"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 20 else None,
)
async def test_each_bad_frame_gets_its_code_and_changes_nothing(
    relay_server: relay.RunningRelay, message: str | bytes, code: str
) -> None:
    patient, practitioner = await pair(relay_server.url, "s1")
    await refused(patient, message, code)
    # Nothing else happened: the seat, the peer and the session are as they were.
    await quiet(practitioner)
    await patient.send(type="offer", sdp="still-here")
    await practitioner.expect("offer", sdp="still-here")


async def test_a_fragmented_frame_is_relayed_whole(relay_server: relay.RunningRelay) -> None:
    """A text message sent as a text frame and two continuations reaches the peer as one."""
    patient, practitioner = await pair(relay_server.url, "s1")
    text = json.dumps({"type": "offer", "sdp": "v=0 fragmented"})
    await patient.ws.send([text[:5], text[5:12], text[12:]])
    await practitioner.expect("offer", sdp="v=0 fragmented")
    # A binary message in fragments is still refused as one binary frame.
    await patient.ws.send([b"\x00", b"\x01"])
    await patient.expect_error("binary-frame")


async def test_frame_too_large(relay_server: relay.RunningRelay) -> None:
    patient, practitioner = await pair(relay_server.url, "s1")
    limit = relay_server.state.config.limits.max_frame_bytes
    await refused(patient, json.dumps({"type": "offer", "sdp": "x" * limit}), "frame-too-large")
    await patient.send(type="offer", sdp="small")
    await practitioner.expect("offer", sdp="small")


async def test_frame_over_the_hard_ceiling_closes_1009() -> None:
    config = relay_config(limits={"max_frame_bytes": 1024, "hard_max_bytes": 4096})
    async with running_relay(config) as running:
        client = await Client.open(running.url)
        await client.send_raw("x" * 5000)
        code, _ = await client.closed()
        assert code == 1009


async def test_not_joined(relay_server: relay.RunningRelay) -> None:
    client = await Client.open(relay_server.url)
    await refused(client, json.dumps({"type": "offer", "sdp": SDP}), "not-joined")
    await client.join("s1", "patient")


async def test_no_peer(relays: Relays) -> None:
    client = await Client.open(relays.url)
    await client.join("s1", "patient")
    await refused(client, json.dumps({"type": "offer", "sdp": SDP}), "no-peer")


@pytest.mark.parametrize("session", ["", "x" * 65, "a b", "../etc", "é"])
async def test_bad_session(relay_server: relay.RunningRelay, session: object) -> None:
    client = await Client.open(relay_server.url)
    await refused(
        client, json.dumps({"type": "join", "session": session, "role": "patient"}), "bad-session"
    )
    await client.join("ok_-1", "patient")


async def test_a_session_that_is_not_a_string_is_a_bad_field(
    relay_server: relay.RunningRelay,
) -> None:
    client = await Client.open(relay_server.url)
    await refused(
        client, json.dumps({"type": "join", "session": 7, "role": "patient"}), "bad-field"
    )
    await client.join("s1", "patient")


async def test_bad_role(relay_server: relay.RunningRelay) -> None:
    client = await Client.open(relay_server.url)
    await refused(
        client, json.dumps({"type": "join", "session": "s1", "role": "nurse"}), "bad-role"
    )
    await client.join("s1", "patient")


async def test_role_taken(relays: Relays) -> None:
    patient, practitioner = await split(relays, "s1")
    second = await Client.open(relays.url)
    await refused(
        second, json.dumps({"type": "join", "session": "s1", "role": "patient"}), "role-taken"
    )
    await quiet(practitioner)
    await second.join("s2", "patient")  # the refused connection may join elsewhere
    await patient.send(type="offer", sdp="ok")
    await practitioner.expect("offer", sdp="ok")


@pytest_asyncio.fixture
async def secured() -> AsyncIterator[relay.RunningRelay]:
    async with running_relay(relay_config(auth={"secret": "s3cret"})) as running:
        yield running


def join_frame(session: str, role: str, token: str | None) -> str:
    return json.dumps({"type": "join", "session": session, "role": role, "token": token})


async def test_tokens_open_their_own_seat_only(secured: relay.RunningRelay) -> None:
    expiry = int(time.time()) + 60
    token = relay.mint_token("s3cret", "s1", "patient", expiry)
    client = await Client.open(secured.url)
    await refused(client, join_frame("s2", "patient", token), "bad-token")
    await refused(client, join_frame("s1", "practitioner", token), "bad-token")
    await refused(
        client,
        join_frame("s1", "patient", relay.mint_token("other", "s1", "patient", expiry)),
        "bad-token",
    )
    await refused(
        client, json.dumps({"type": "join", "session": "s1", "role": "patient"}), "bad-token"
    )
    await refused(client, join_frame("s1", "patient", "v1.garbage"), "bad-token")
    await client.join("s1", "patient", token=token)


async def test_token_expired(secured: relay.RunningRelay) -> None:
    token = relay.mint_token("s3cret", "s1", "patient", int(time.time()) - 1)
    client = await Client.open(secured.url)
    await refused(client, join_frame("s1", "patient", token), "token-expired")


async def test_rate_limited_then_refilled() -> None:
    config = relay_config(limits={"frames_per_second": 20, "burst": 5})
    async with running_relay(config) as running:
        patient, practitioner = await pair(running.url, "s1")
        codes = []
        for _ in range(12):
            await patient.send(type="ping")
        for _ in range(12):
            frame = await patient.recv()
            codes.append(frame.get("code", frame["type"]))
        assert "rate-limited" in codes
        assert codes.count("pong") >= 3
        await asyncio.sleep(0.5)  # the bucket refills
        await patient.send(type="offer", sdp="after")
        await practitioner.expect("offer", sdp="after")


@pytest.mark.parametrize("limit", ["max_connections", "max_sessions"])
async def test_server_full_closes_with_the_code(limit: str) -> None:
    async with running_relay(relay_config(limits={limit: 1})) as running:
        first = await Client.open(running.url)
        await first.join("s1", "patient")
        second = await Client.open(running.url)
        if limit == "max_sessions":
            await second.send(type="join", session="s2", role="patient")
        await second.expect_error("server-full")
        assert await second.closed() == (1013, "server-full")
        await first.send(type="ping")
        await first.expect("pong")


async def test_join_timeout_closes_with_the_code() -> None:
    async with running_relay(relay_config(limits={"join_timeout_s": 0.3})) as running:
        joined = await Client.open(running.url)
        await joined.join("s1", "patient")
        idle = await Client.open(running.url)
        await idle.expect_error("join-timeout")
        assert await idle.closed() == (1008, "join-timeout")
        await joined.send(type="ping")
        await joined.expect("pong")


async def test_invalid_utf8_closes_only_that_connection(relay_server: relay.RunningRelay) -> None:
    patient, practitioner = await pair(relay_server.url, "s1")
    bad = await Client.open(relay_server.url)
    await bad.join("s2", "patient")
    # A text frame whose payload is not UTF-8: websockets' client refuses to
    # send one, so write the frame by hand on the same connection's transport.
    frame = bytes([0x81, 0x80 | 2]) + b"\0\0\0\0" + b"\xff\xfe"
    bad.ws.transport.write(frame)
    code, _ = await bad.closed()
    assert code == 1007
    await patient.send(type="offer", sdp="fine")
    await practitioner.expect("offer", sdp="fine")


# -- isolation ---------------------------------------------------------------------------


async def test_crashed_and_silent_clients_never_disturb_another_session(
    relay_server: relay.RunningRelay,
) -> None:
    patient, practitioner = await pair(relay_server.url, "calm")
    crashed, _ = await pair(relay_server.url, "crash")
    crashed.ws.transport.abort()  # a TCP reset, no close frame
    silent = await Client.open(relay_server.url)
    await silent.join("silent", "patient")
    silent.ws.transport.pause_reading()  # reads nothing more
    for n in range(50):
        await patient.send(type="candidate", candidate={**CANDIDATE, "sdpMLineIndex": n})
    for n in range(50):
        got = await practitioner.expect("candidate")
        assert got["candidate"]["sdpMLineIndex"] == n


async def test_two_hundred_sessions_receive_their_own_frames_complete_and_in_order() -> None:
    """Frames of 200 concurrent sessions arrive complete, in order, in their own session."""
    sessions, frames = 200, 10
    # Every client comes from 127.0.0.1 here: lift the per-address limits.
    per_address = {
        "max_connections_per_address": 1000,
        "max_sessions_per_address": 1000,
        "handshakes_per_second_per_address": 10_000,
    }
    async with running_relay(relay_config(limits=per_address)) as relay_server:
        await _two_hundred_sessions(relay_server, sessions, frames)


async def _two_hundred_sessions(
    relay_server: relay.RunningRelay, sessions: int, frames: int
) -> None:
    pairs = await asyncio.gather(*(pair(relay_server.url, f"load-{n}") for n in range(sessions)))

    async def exchange(n: int, patient: Client, practitioner: Client) -> None:
        for k in range(frames):
            await patient.send(type="candidate", candidate={"candidate": f"{n}:{k}"})
            await practitioner.send(type="candidate", candidate={"candidate": f"{n}:{-k}"})
        for k in range(frames):
            got = await practitioner.expect("candidate")
            assert got["candidate"] == {"candidate": f"{n}:{k}"}
            got = await patient.expect("candidate")
            assert got["candidate"] == {"candidate": f"{n}:{-k}"}

    await within(asyncio.gather(*(exchange(n, a, b) for n, (a, b) in enumerate(pairs))), units=6)
    for a, b in pairs:
        await quiet(a, 0)
        await quiet(b, 0)


# -- keepalive and TLS -------------------------------------------------------------------


async def test_a_client_that_stops_answering_pings_is_dropped() -> None:
    config = relay_config(
        limits={"ping_interval_s": 0.2, "ping_timeout_s": 0.3, "close_timeout_s": 0.5}
    )
    async with running_relay(config) as running:
        patient, _ = await pair(running.url, "s1")
        dead = await Client.open(running.url)
        await dead.join("s2", "patient")
        watcher = await Client.open(running.url)
        await watcher.join("s2", "practitioner")
        await dead.expect("peer-joined")
        dead.ws.transport.pause_reading()  # it never sees the relay's pings
        await watcher.expect("peer-left", role="patient", reason="disconnected")
        # Replies to pings keep the answering client alive meanwhile.
        await asyncio.sleep(0.6)
        await patient.send(type="ping")
        await patient.expect("pong")


async def test_wss_with_a_configured_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = relay_config(tls={"cert": str(cert), "key": str(key)})
    async with running_relay(config) as running:
        assert running.url.startswith("wss://")
        trust = ssl.create_default_context(cafile=str(cert))
        url = f"wss://localhost:{running.port}/ws"
        a = Client(await within(connect(url, ssl=trust, compression=None)))
        await a.join("s1", "patient")
        b = Client(await within(connect(url, ssl=trust, compression=None)))
        await b.join("s1", "practitioner")
        await a.expect("peer-joined")
        # An untrusting client is refused by the handshake.
        with pytest.raises(ssl.SSLCertVerificationError):
            await within(connect(url, ssl=ssl.create_default_context()))


# -- HTTP on the same port -------------------------------------------------------------------


async def test_health(relay_server: relay.RunningRelay) -> None:
    await pair(relay_server.url, "s1")
    status, headers, body = await http_get(relay_server.port, "/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["sessions"] == 1
    assert health["connections"] == 2
    assert health["uptime_s"] >= 0
    assert health["version"] == relay.__version__
    assert health["node"] == f"127.0.0.1:{relay_server.port}"  # cluster.node_id unset


async def test_node_id_names_the_relay_in_health_and_metrics() -> None:
    """cluster.node_id is the relay's name in /health and in /metrics' relay_info labels."""
    async with running_relay(relay_config(cluster={"node_id": "relay-a"})) as running:
        _, _, body = await http_get(running.port, "/health")
        assert json.loads(body)["node"] == "relay-a"
        _, _, metrics = await http_get(running.port, "/metrics")
        info = f'relay_info{{node="relay-a",version="{relay.__version__}"}} 1.0'
        assert info in metrics.decode().splitlines()


async def test_metrics_count_what_happened(relay_server: relay.RunningRelay) -> None:
    patient, practitioner = await pair(relay_server.url, "s1")
    await patient.send(type="offer", sdp=SDP)
    await practitioner.expect("offer")
    await patient.send_raw("{oops")
    await patient.expect_error("bad-json")
    status, headers, body = await http_get(relay_server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    for line in (
        "relay_connections 2.0",
        "relay_sessions 1.0",
        "relay_seats_taken 2.0",
        "relay_joins_total 2.0",
        "relay_resumes_total 0.0",
        'relay_frames_relayed_total{type="offer"} 1.0',
        'relay_errors_total{code="bad-json"} 1.0',
    ):
        assert line in text.splitlines(), line
    assert "process_resident_memory_bytes" in text


async def test_root_serves_the_browser_client_with_security_headers(
    relay_server: relay.RunningRelay,
) -> None:
    status, headers, body = await http_get(relay_server.port, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert body == (ROOT / "web" / "index.html").read_bytes()
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "target",
    [
        "/nothing-here",
        "/../relay.py",
        "/%2e%2e/relay.py",
        "/..%2frelay.py",
        "//etc/passwd",
        "/../../../../etc/passwd",
        "/web/../../relay.py",
        "/config.yaml",
    ],
)
async def test_other_paths_and_traversal_are_404(
    relay_server: relay.RunningRelay, target: str
) -> None:
    status, _, body = await http_get(relay_server.port, target)
    assert status == 404
    assert b"root:" not in body
    assert b"import" not in body


# -- the process: signals, exit codes, logs -------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_every_connection_with_1001_and_exits_0(
    tmp_path: Path, signum: signal.Signals, loop: str
) -> None:
    """On either event loop: a call's frames pass, then a signal closes everything."""
    config = write_yaml(tmp_path / "c.yaml", {})
    relay_process = RelayProcess(config, args=("--loop", loop))
    try:
        url = await relay_process.start()
        assert relay_process.process is not None
        listening = [line for line in relay_process.log if "relay listening" in line]
        assert f"(event loop: {loop})" in listening[0]
        patient, practitioner = await pair(url, "s1")
        await patient.send(type="offer", sdp="v=0")
        assert (await practitioner.expect("offer"))["sdp"] == "v=0"
        await practitioner.send(type="candidate", candidate=CANDIDATE)
        assert (await patient.expect("candidate"))["candidate"] == CANDIDATE
        relay_process.process.proc.send_signal(signum)
        assert (await patient.closed())[0] == 1001
        assert (await practitioner.closed())[0] == 1001
        assert await relay_process.process.wait(2 * TIMEOUT) == 0
    finally:
        await relay_process.stop()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"limits": {"burst": "many"}}, "limits.burst"),
        ({"relay": {"port": 70000}}, "relay.port"),
        ({"auth": {"sercet": "x"}}, "auth.sercet"),
        ({"tls": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"}}, "tls"),
    ],
)
async def test_config_errors_exit_2_naming_the_key(
    tmp_path: Path, data: dict[str, Any], key: str
) -> None:
    proc = await relay_command(
        "--config", str(write_yaml(tmp_path / "c.yaml", data)), "--port", "0"
    )
    _, err = await within(proc.communicate(), 2)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert key in lines[0]


async def test_refuses_a_public_address_without_a_secret(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "c.yaml", {})
    proc = await relay_command("--config", str(config), "--host", "0.0.0.0", "--port", "0")
    _, err = await within(proc.communicate(), 2)
    assert proc.returncode == 2
    assert "auth.secret" in err.decode()


@pytest.mark.netns
async def test_open_on_a_public_address_warns_at_start(tmp_path: Path) -> None:
    if reason := netns_missing():
        pytest.skip(reason)
    config = write_yaml(tmp_path / "c.yaml", {"auth": {"open": True}})
    async with Network() as net:
        lan = await net.lan("198.18.0.2/24")
        relay_process = RelayProcess(config, netns=lan.name, host="198.18.0.2")
        try:
            await relay_process.start()
            log = "\n".join(relay_process.log)
            assert "WARNING" in log
            assert "auth.open" in log
        finally:
            assert await relay_process.stop() == 0


async def test_token_command_prints_a_token_the_relay_accepts(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "c.yaml", {"auth": {"secret": "from-the-file"}})
    proc = await relay_command(
        "token", "--config", str(config), "--session", "s1", "--role", "patient", "--ttl", "60"
    )
    out, _ = await within(proc.communicate(), 2)
    assert proc.returncode == 0
    token = out.decode().strip()
    settings = relay_config(auth={"secret": "from-the-file"})
    async with running_relay(settings) as running:
        client = await Client.open(running.url)
        await client.send_raw(join_frame("s1", "practitioner", token))
        await client.expect_error("bad-token")
        await client.join("s1", "patient", token=token)


async def test_token_command_without_a_secret_exits_2(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "c.yaml", {})
    proc = await relay_command(
        "token", "--config", str(config), "--session", "s1", "--role", "patient"
    )
    _, err = await within(proc.communicate(), 2)
    assert proc.returncode == 2
    assert "auth.secret" in err.decode()


@pytest.mark.parametrize("verbose", [False, True], ids=["INFO", "DEBUG"])
async def test_sdp_and_candidates_are_logged_only_at_debug_and_truncated(
    relay_server: relay.RunningRelay, caplog: pytest.LogCaptureFixture, verbose: bool
) -> None:
    caplog.set_level(logging.DEBUG if verbose else logging.INFO, logger="relay")
    secret_sdp = "v=0 o=- 198.18.7.7 " + "a=fingerprint:sha-256 AB " * 50
    patient, practitioner = await pair(relay_server.url, "s1")
    await patient.send(type="offer", sdp=secret_sdp)
    await practitioner.expect("offer")
    await patient.send(type="candidate", candidate=CANDIDATE)
    await practitioner.expect("candidate")
    text = caplog.text
    assert secret_sdp not in text
    if verbose:
        assert "198.18.7.7" in text  # the start of the frame, truncated
    else:
        assert "198.18" not in text
        assert "typ host" not in text


async def test_the_relay_keeps_serving_after_a_flood_of_handshakes_that_fail(
    relay_server: relay.RunningRelay,
) -> None:
    patient, practitioner = await pair(relay_server.url, "s1")
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_server.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        await writer.drain()
        await within(reader.read())
        writer.close()
    await patient.send(type="offer", sdp="ok")
    await practitioner.expect("offer", sdp="ok")


@pytest.mark.parametrize(
    ("query", "minted"),
    [
        ("session=pre&role=patient&token={token}", True),
        ("session=pre&role=practitioner&token={token}", False),  # the token is the patient's
        ("session=pre&role=patient&token=v1.0.bad", False),
        ("session=pre&role=patient", False),
        ("session=bad id&role=patient&token={token}", False),
        ("role=patient&token={token}", False),
    ],
    ids=["valid-link", "other-role", "bad-token", "no-token", "bad-session", "no-session"],
)
async def test_rtc_config_adds_a_links_turn_credentials_for_the_precheck(
    query: str, minted: bool
) -> None:
    """?session&role&token: the TURN credentials that seat's join would get, and only then."""
    config = relay_config(
        auth={"secret": "precheck-auth"},
        turn={"secret": "precheck-turn", "urls": ["turn:198.18.0.9:3478"], "ttl": 600},
    )
    token = relay.mint_token("precheck-auth", "pre", "patient", int(time.time()) + 600)
    async with running_relay(config) as running:
        path = "/rtc-config.json?" + query.format(token=token).replace(" ", "%20")
        status, _, body = await http_get(running.port, path)
    assert status == 200
    servers = json.loads(body)["iceServers"]
    if not minted:
        assert servers == []
        return
    (server,) = servers
    assert server["urls"] == ["turn:198.18.0.9:3478"]
    assert server["username"].endswith(":pre-patient")
    digest = hmac.new(b"precheck-turn", server["username"].encode(), hashlib.sha1).digest()
    assert server["credential"] == base64.b64encode(digest).decode()  # coturn's REST scheme


async def test_rtc_config_for_browsers_comes_from_the_ice_section() -> None:
    """One YAML value switches the peers and the browsers: ice.servers and ice.policy."""
    config = relay_config(
        ice={
            "servers": [
                {"urls": "stun:198.18.0.9:3478"},
                {"urls": "turn:198.18.0.9:3478", "username": "u", "credential": "p"},
            ],
            "policy": "relay",
            "timeout_s": 20,
        },
        call={"recovery_timeout_s": 30, "media_timeout_s": 2.5},
    )
    async with running_relay(config) as running:
        status, headers, body = await http_get(running.port, "/rtc-config.json")
    assert status == 200
    assert headers["content-type"] == "application/json"
    # Long-term TURN credentials are never published (browsers get TURN from joined).
    assert json.loads(body) == {
        "iceServers": [{"urls": ["stun:198.18.0.9:3478"]}],
        "iceTransportPolicy": "relay",
        "call": {"recovery_timeout_s": 30, "media_timeout_s": 2.5, "heartbeat_s": 1},
    }
    async with running_relay() as running:
        _, _, body = await http_get(running.port, "/rtc-config.json")
    assert json.loads(body) == {  # no public STUN; the call: defaults
        "iceServers": [],
        "iceTransportPolicy": "all",
        "call": {"recovery_timeout_s": 60, "media_timeout_s": 3, "heartbeat_s": 1},
    }
