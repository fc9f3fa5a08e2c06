"""The relay under attack (issue 14): the real relay on port 0, hostile clients.

Raw-socket and websockets clients try what a hostile client would: ping
floods that never read, slow readers, squatting from one address, forged
resume keys, odd tokens, log forging, exposed endpoints, signals. Each test
asserts the bound that holds (memory, the victim's seat, the honest
neighbour's connection, the exact code).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import resource
import signal
import socket
import ssl
import stat
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

import relay
from peers.signaling import RelayClient
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

MIB = 1024 * 1024
# Limits that never refuse the load, so that the bound under test is the one that acts.
NO_RATE_LIMIT = {"frames_per_second": 1_000_000, "burst": 1_000_000}
# The shipped limits (pings count against the frame rate, the write buffer is bounded).
FLOOD_LIMITS: dict[str, Any] = {}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def raw_websocket(
    port: int, headers: str = "", rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand on a raw socket (the client sees every byte)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    await writer.drain()
    head = await within(reader.readuntil(b"\r\n\r\n"))
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked), payload under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


PING = 0x9


# -- 1. ping floods and slow readers ----------------------------------------------------


# An honest client's pace: 25 frames a second, half the shipped frames_per_second
# (back to back, the pair would empty its own bucket and be refused rate-limited).
HONEST_INTERVAL = 0.04


async def round_trips(patient: Client, practitioner: Client, count: int) -> list[float]:
    """Seconds for an offer to reach the practitioner and its answer to come back."""
    loop = asyncio.get_running_loop()
    samples = []
    for n in range(count):
        await asyncio.sleep(HONEST_INTERVAL)
        sent = loop.time()
        await patient.send(type="offer", sdp=f"offer {n}")
        await practitioner.expect("offer", sdp=f"offer {n}")
        await practitioner.send(type="answer", sdp=f"answer {n}")
        await patient.expect("answer", sdp=f"answer {n}")
        samples.append(loop.time() - sent)
    return samples


def ping_flood(port: int, seconds: float = 60) -> tuple[int, Exception | None]:
    """A WebSocket that sends pings and never reads; bytes sent and how it ended (blocking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.settimeout(seconds)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)  # one byte at a time: nothing after the head is read
        assert head.startswith(b"HTTP/1.1 101"), head
        ping = masked_frame(PING, b"p" * 125) * 64
        sent, deadline = 0, time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                sock.sendall(ping)
                sent += len(ping)
        except OSError as exc:
            return sent, exc
    return sent, None


async def test_a_ping_flood_that_never_reads_is_cut_and_memory_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pongs never read pile up to limits.write_buffer_bytes at most: the flooder is cut.

    Quietly: no write to the cut connection (asyncio logs each one, a flood's
    read holds some 2,000 pongs, a log flood of the attacker's making).
    """
    limits = {**NO_RATE_LIMIT, "write_buffer_bytes": 262_144}
    async with running_relay(relay_config(limits=limits)) as running:
        honest_patient, honest_practitioner = await pair(running.url, "neighbours")
        _, writer = await raw_websocket(running.port, rcvbuf=4096)
        ping = masked_frame(PING, b"p" * 125) * 64
        before = rss_bytes()
        sent = 0
        with pytest.raises((ConnectionError, OSError)):  # noqa: PT012 (the loop is the flood)
            async with asyncio.timeout(60):
                while True:
                    writer.write(ping)
                    await writer.drain()
                    sent += len(ping)
        grown = rss_bytes() - before
        assert sent > 4 * MIB  # the flood was big enough to matter
        assert grown < 8 * MIB, f"RSS grew {grown / MIB:.1f} MiB under the flood"
        assert running.state.stats.errors["slow-reader"] == 1
        writes_after_cut = [r for r in caplog.records if "socket.send() raised" in r.getMessage()]
        assert not writes_after_cut, f"{len(writes_after_cut)} writes logged after the cut"
        # The neighbours never noticed.
        await honest_patient.send(type="offer", sdp="still here")
        await honest_practitioner.expect("offer", sdp="still here")


async def test_honest_neighbours_keep_their_round_trip_during_a_ping_flood() -> None:
    """With the default limits, a pair's round-trip p50 during a ping flood stays near its own."""
    async with running_relay(relay_config(limits=FLOOD_LIMITS)) as running:
        patient, practitioner = await pair(running.url, "neighbours")
        before = statistics.median(await round_trips(patient, practitioner, 30))
        # The flooder is a thread with a blocking socket: in this event loop it
        # would take the loop from the relay and the neighbours alike.
        flooding = asyncio.create_task(asyncio.to_thread(ping_flood, running.port, 20))
        during: list[float] = []
        while not flooding.done() or len(during) < 5:
            during += await round_trips(patient, practitioner, 1)
        sent, _ = await flooding
        p50 = statistics.median(during)
        assert sent > 256 * 1024  # the flood was sent
        assert p50 <= max(5 * before, 0.050), (
            f"round trip p50 {p50 * 1000:.1f} ms during the flood ({len(during)} samples), "
            f"{before * 1000:.1f} ms before"
        )


async def test_pings_count_against_the_frame_rate_limit() -> None:
    """A flood of pings over frames_per_second/burst is closed with 1008 rate-limited."""
    limits = {"frames_per_second": 10, "burst": 20}
    async with running_relay(relay_config(limits=limits)) as running:
        client = await Client.open(running.url, ping_interval=None)
        for _ in range(40):
            await client.ws.ping()  # the pongs are read; only the rate is at fault
        assert await client.closed() == (1008, "rate-limited")
        assert running.state.stats.errors["rate-limited"] >= 1


async def test_a_slow_reader_is_cut_and_the_honest_sender_keeps_its_connection() -> None:
    """The peer that stops reading is cut; the sender gets peer-left and keeps relaying."""
    limits = {**NO_RATE_LIMIT, "write_buffer_bytes": 131_072}
    async with running_relay(relay_config(limits=limits)) as running:
        patient, practitioner = await pair(running.url, "s1")
        practitioner.ws.transport.pause_reading()  # reads nothing from now on
        sdp = "x" * 50_000
        async with asyncio.timeout(30):
            while running.state.stats.errors["slow-reader"] == 0:
                await patient.send(type="offer", sdp=sdp)
        # The sender's own connection never blocked: it hears peer-left at once.
        while (frame := await patient.recv())["type"] != "peer-left":
            pass
        assert frame == {"type": "peer-left", "role": "practitioner", "reason": "disconnected"}
        await patient.send(type="ping")
        # Offers that were in flight when the reader was cut have no peer now.
        while (frame := await patient.recv())["type"] != "pong":
            assert frame["type"] == "error" and frame["code"] == "no-peer", frame
        practitioner.ws.transport.resume_reading()
        with pytest.raises(ConnectionClosedError):  # noqa: PT012 (reads up to the end)
            async with asyncio.timeout(30):
                async for _ in practitioner.ws:  # what was sent before the cut, then the end
                    pass
        assert practitioner.ws.close_code == 1006  # aborted: no close frame to a non-reader


# -- 3. per-address limits ----------------------------------------------------------------


def forwarded(address: str) -> dict[str, Any]:
    return {"additional_headers": {"X-Forwarded-For": address}}


async def test_one_address_cannot_take_every_connection() -> None:
    """Past max_connections_per_address, handshakes get 429; another address still joins."""
    config = relay_config(
        relay={"host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.1"]},
        auth={"open": True},
        limits={"max_connections_per_address": 3, "max_connections": 10},
    )
    async with running_relay(config) as running:
        squatters = [await Client.open(running.url, **forwarded("198.18.0.66")) for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(running.url, **forwarded("198.18.0.66"))
        assert refused.value.response.status_code == 429
        user = await Client.open(running.url, **forwarded("198.18.0.77"))
        assert (await user.join("s1", "patient"))["peer"] is False
        await squatters[0].close()
        await within(squatters[0].ws.wait_closed())
        await Client.open(running.url, **forwarded("198.18.0.66"))  # a slot freed


async def test_x_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    """Without relay.trusted_proxies, a made-up X-Forwarded-For does not dodge the limit."""
    config = relay_config(limits={"max_connections_per_address": 2})
    async with running_relay(config) as running:
        await Client.open(running.url, **forwarded("198.18.0.1"))
        await Client.open(running.url, **forwarded("198.18.0.2"))
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(running.url, **forwarded("198.18.0.3"))
        assert refused.value.response.status_code == 429


async def test_one_address_gets_a_bounded_rate_of_handshakes() -> None:
    """Handshakes beyond handshakes_per_second_per_address get 429 with Retry-After."""
    config = relay_config(limits={"handshakes_per_second_per_address": 5})
    async with running_relay(config) as running:
        statuses = []
        retry_after = None
        for _ in range(12):
            try:
                client = await Client.open(running.url)
                await client.close()
                statuses.append(101)
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
                retry_after = exc.response.headers["Retry-After"]
        assert 429 in statuses and statuses.count(101) <= 7
        assert retry_after == "1"


async def test_one_address_cannot_fill_the_sessions() -> None:
    """Past max_sessions_per_address, a new session is refused address-limit (close 1013)."""
    config = relay_config(limits={"max_sessions_per_address": 2, "max_sessions": 10})
    async with running_relay(config) as running:
        for n in range(2):
            await (await Client.open(running.url)).join(f"squat-{n}", "patient")
        third = await Client.open(running.url)
        await third.send(type="join", session="squat-2", role="patient")
        await third.expect_error("address-limit")
        assert await third.closed() == (1013, "address-limit")
        # Joining a session that exists opens no new one: allowed.
        await (await Client.open(running.url)).join("squat-0", "practitioner")


async def test_a_connection_without_a_seat_after_bye_gets_the_join_timeout_again() -> None:
    """bye frees the seat and restarts the join deadline: the idle socket is closed 1008."""
    config = relay_config(limits={"join_timeout_s": 0.3})
    async with running_relay(config) as running:
        client = await Client.open(running.url)
        await client.join("s1", "patient")
        await asyncio.sleep(0.4)  # past the first deadline while seated: nothing happens
        await client.send(type="bye")
        await client.expect_error("join-timeout")
        assert await client.closed() == (1008, "join-timeout")


# -- 4. resume keys -------------------------------------------------------------------------


async def test_a_made_up_key_cannot_take_a_dropped_seat() -> None:
    """While the patient's signaling is down, a forged key gets seat-held; the patient returns."""
    async with running_relay(relay_config(limits={"resume_grace_s": 30})) as running:
        patient, practitioner = await pair(running.url, "s1")
        key = running.state.sessions["s1"]["patient"].resume
        patient.ws.transport.abort()  # an unclean drop: no close frame
        await practitioner.expect("peer-left", role="patient", reason="disconnected")
        for forged in ("anything", relay.mint_resume(b"a guess", "s1", "patient")):
            thief = await Client.open(running.url)
            await thief.send(type="join", session="s1", role="patient", resume=forged)
            await thief.expect_error("seat-held")
            assert await thief.closed() == (1013, "seat-held")
        back = await Client.open(running.url)
        assert (await back.join("s1", "patient", resume=key))["resumed"] is True
        await practitioner.expect("peer-joined", role="patient", resumed=True)


async def test_a_resume_key_survives_a_relay_restart(tmp_path: Path) -> None:
    """A key minted before a restart resumes the seat after it (the secret file is kept)."""
    path = write_yaml(tmp_path / "c.yaml", {"relay": {"host": "127.0.0.1", "port": 0}})
    config = relay.RelayConfig.load(path, env={})
    async with running_relay(config) as running:
        key = (await (await Client.open(running.url)).join("s1", "patient"))["resume"]
    secret_file = tmp_path / relay.RESUME_SECRET_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    async with running_relay(relay.RelayConfig.load(path, env={})) as running:
        joined = await (await Client.open(running.url)).join("s1", "patient", resume=key)
        assert joined["resumed"] is True


# -- 2. exposure and TURN -----------------------------------------------------------------


@pytest.mark.parametrize(
    "sections",
    [
        pytest.param({"turn": {"secret": "t", "urls": ["turn:198.18.0.9:3478"]}}, id="turn-secret"),
        pytest.param(
            {"relay": {"host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.1"]}},
            id="behind-a-proxy",
        ),
    ],
)
async def test_loopback_needs_a_secret_when_exposed(sections: dict[str, Any]) -> None:
    """On loopback behind a proxy, or minting TURN credentials, no secret is a refusal."""
    with pytest.raises(relay.ConfigError) as refused:
        async with running_relay(relay_config(**sections)):
            pass
    assert refused.value.key == "auth.secret"


async def test_turn_credentials_are_minted_once_per_connection_and_seat() -> None:
    """join/bye/join on one socket gets the same TURN credential, not a new one each time."""
    config = relay_config(
        auth={"open": True}, turn={"secret": "t", "urls": ["turn:198.18.0.9:3478"], "ttl": 600}
    )
    async with running_relay(config) as running:
        client = await Client.open(running.url)
        first = (await client.join("s1", "patient"))["ice_servers"]
        for _ in range(5):
            await client.send(type="bye")
            again = (await client.join("s1", "patient"))["ice_servers"]
            assert again == first


# -- 7. tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expiry",
    [
        pytest.param("²", id="superscript-two"),
        pytest.param("{full_width}", id="full-width-of-the-right-expiry"),
        pytest.param("0{exp}", id="leading-zero"),
        pytest.param("9" * 13, id="thirteen-digits"),
        pytest.param("", id="empty"),
    ],
)
async def test_an_oddly_written_expiry_is_bad_token(expiry: str) -> None:
    """Only ASCII [1-9][0-9]{0,11} is an expiry; anything else is bad-token, never a crash."""
    secret = "s3cret"
    exp = 4_000_000_000
    good = relay.mint_token(secret, "s1", "patient", exp)
    signature = good.rsplit(".", 1)[1]
    async with running_relay(relay_config(auth={"secret": secret})) as running:
        client = await Client.open(running.url)
        full_width = "".join(chr(ord(c) + 0xFEE0) for c in str(exp))  # U+FF10 and on
        token = f"v1.{expiry.format(exp=exp, full_width=full_width)}.{signature}"
        await client.send(type="join", session="s1", role="patient", token=token)
        await client.expect_error("bad-token")
        await client.join("s1", "patient", token=good)  # the connection lived on


async def test_token_command_refuses_a_ttl_past_twelve_digits(tmp_path: Path) -> None:
    """relay.py token --ttl with an expiry over 12 digits exits 2 with one line."""
    config = write_yaml(tmp_path / "c.yaml", {"auth": {"secret": "x"}})
    proc = await relay_command(
        "token", "--config", str(config), "--session", "s1", "--role", "patient",
        "--ttl", str(10**12),
    )  # fmt: skip
    _, err = await within(proc.communicate(), 2)
    assert proc.returncode == 2
    assert err.decode() == "relay: --ttl: too long: the expiry must fit in 12 digits\n"


# -- 8. logs ----------------------------------------------------------------------------------


async def test_debug_log_redacts_tokens_and_keys_and_quotes_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG a join's token and resume are masked and a raw newline forges no line."""
    caplog.set_level(logging.DEBUG, logger="relay")
    secret = "s3cret"
    token = relay.mint_token(secret, "s1", "patient", 4_000_000_000)
    async with running_relay(relay_config(auth={"secret": secret})) as running:
        client = await Client.open(running.url)
        joined = await client.join("s1", "patient", token=token, resume="r1" + "A" * 40)
        # JSON allows a raw newline between tokens: logged as is, it would start a line.
        await client.send_raw('{"type":"bye",\n"reason":"INFO relay: forged line"}')
        await client.send(type="ping")
        await client.expect("pong")
    text = caplog.text
    assert token not in text and token.rsplit(".", 1)[1] not in text
    assert joined["resume"] not in text and "r1" + "A" * 40 not in text
    assert "'token': '***'" in text or '"token": "***"' in text
    assert not any(line.startswith("INFO relay: forged") for line in text.splitlines())


async def test_refusals_are_not_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """A client sending garbage makes no WARNING lines (it is counted in /metrics)."""
    caplog.set_level(logging.INFO, logger="relay")
    async with running_relay() as running:
        client = await Client.open(running.url)
        for _ in range(20):
            await client.send_raw("not json")
            await client.expect_error("bad-json")
        assert running.state.stats.errors["bad-json"] == 20
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_yaml_error_names_file_line_and_column_only(tmp_path: Path) -> None:
    """A broken YAML file is reported by position, never by quoting its lines (secrets)."""
    path = tmp_path / "c.yaml"
    path.write_text('auth:\n  secret: "very-secret-value\n  open: [\n', encoding="utf-8")
    with pytest.raises(relay.ConfigError) as refused:
        relay.RelayConfig.load(path, env={})
    message = str(refused.value)
    assert "very-secret-value" not in message
    assert message.startswith(f"{path}: not valid YAML at line ")
    assert ", column " in message


# -- 10. what is public -----------------------------------------------------------------------


async def test_metrics_only_for_metrics_allow_and_health_minimal_for_the_public() -> None:
    """From outside metrics.allow: /metrics is 403 and /health says only ok."""
    config = relay_config(metrics={"allow": ["198.18.0.0/24"]})
    async with running_relay(config) as running:
        status, _, _ = await http_get(running.port, "/metrics")
        assert status == 403
        status, _, body = await http_get(running.port, "/health")
        assert status == 200 and json.loads(body) == {"status": "ok"}
    async with running_relay() as running:  # the default: loopback sees everything
        status, _, body = await http_get(running.port, "/metrics")
        assert status == 200 and b"relay_connections" in body
        _, _, body = await http_get(running.port, "/health")
        assert json.loads(body)["version"] == relay.__version__


async def test_other_methods_get_405(relay_server: relay.RunningRelay) -> None:
    """POST, PUT, DELETE on an HTTP path: 405 with Allow: GET."""
    for method in ("POST", "PUT", "DELETE"):
        reader, writer = await within(asyncio.open_connection("127.0.0.1", relay_server.port))
        writer.write(f"{method} /health HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        raw = await within(reader.read())
        writer.close()
        assert raw.startswith(b"HTTP/1.1 405"), raw[:40]
        assert b"\r\nAllow: GET\r\n" in raw


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        pytest.param("http://127.0.0.1:{port}", 101, id="same-origin"),
        pytest.param("https://evil.example", 403, id="other-origin"),
        pytest.param("null", 403, id="null-origin"),
    ],
)
async def test_origin_is_checked_on_the_upgrade(origin: str, status: int) -> None:
    """With a secret, a browser WebSocket from another origin is refused 403."""
    async with running_relay(relay_config(auth={"secret": "s"})) as running:
        headers = {"Origin": origin.format(port=running.port)}
        try:
            ws = await within(connect(running.url, additional_headers=headers))
            await ws.close()
            got = 101
        except InvalidStatus as exc:
            got = exc.response.status_code
        assert got == status


async def test_configured_origins_are_the_only_ones() -> None:
    """relay.origins lists who may connect; the same origin is then not enough."""
    config = relay_config(
        relay={"host": "127.0.0.1", "port": 0, "origins": ["https://call.example.org"]}
    )
    async with running_relay(config) as running:
        ok = await within(
            connect(running.url, additional_headers={"Origin": "https://call.example.org"})
        )
        await ok.close()
        with pytest.raises(InvalidStatus) as refused:
            await within(
                connect(
                    running.url,
                    additional_headers={"Origin": f"http://127.0.0.1:{running.port}"},
                )
            )
        assert refused.value.response.status_code == 403


# -- 9 and 5. the process -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
async def test_sighup_and_sigusr1_do_not_stop_the_relay(tmp_path: Path, signum: int) -> None:
    """logrotate's SIGHUP (and SIGUSR1) are logged and ignored; calls go on."""
    running = RelayProcess(write_yaml(tmp_path / "c.yaml", {}))
    try:
        patient, practitioner = await pair(await running.start(), "s1")
        assert running.process is not None
        running.process.proc.send_signal(signum)
        await running.process.expect(f"{signal.Signals(signum).name} received: ignored")
        await patient.send(type="offer", sdp="v=0")
        await practitioner.expect("offer", sdp="v=0")
    finally:
        assert await running.stop() == 0


async def test_too_few_file_descriptors_for_max_connections_is_a_refusal(tmp_path: Path) -> None:
    """With ulimit -n 256 (hard), max_connections 10000 stops the start with one line."""
    config = write_yaml(tmp_path / "c.yaml", {})

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(relay.__file__)),
        "--config",
        str(config),
        "--port",
        "0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_limit,
    )
    _, err = await within(proc.communicate(), 2)
    assert proc.returncode == 2
    assert err.decode() == (
        "relay: limits.max_connections: 10000 connections need 10064 file descriptors, "
        "but the limit is 256 (ulimit -n; the hard limit is 256)\n"
    )


# -- 10. the documented keepalive bound --------------------------------------------------------


async def test_a_dead_connection_goes_within_ping_interval_timeout_and_close_timeout() -> None:
    """A client that never answers pings is gone within the documented bound (45 s by default)."""
    limits = {"ping_interval_s": 0.3, "ping_timeout_s": 0.3, "close_timeout_s": 0.3}
    async with running_relay(relay_config(limits=limits)) as running:
        reader, writer = await raw_websocket(running.port)  # raw: it never sends a pong
        loop = asyncio.get_running_loop()
        opened = loop.time()
        await within(reader.read())  # the pings, the close frame, then the end of the stream
        gone = loop.time() - opened
        writer.close()
    assert gone <= 0.9 + 0.3, f"dropped after {gone:.2f} s"


async def test_shutdown_holds_its_bound_with_a_client_that_never_reads(tmp_path: Path) -> None:
    """SIGTERM with a client that reads nothing: the relay exits 0 within shutdown_timeout_s."""
    config = write_yaml(
        tmp_path / "c.yaml", {"limits": {"shutdown_timeout_s": 2, "close_timeout_s": 10}}
    )
    running = RelayProcess(config)
    await running.start()
    assert running.process is not None
    proc = running.process.proc
    _, writer = await raw_websocket(running.port, rcvbuf=4096)
    flood = masked_frame(PING, b"p" * 125) * 16
    for _ in range(20):  # a few pongs waiting in the buffers
        writer.write(flood)
    await writer.drain()
    loop = asyncio.get_running_loop()
    started = loop.time()
    proc.send_signal(signal.SIGTERM)
    assert await within(proc.wait(), 3) == 0
    took = loop.time() - started
    writer.close()
    assert took <= 2 + 0.5, f"shutdown took {took:.2f} s"


async def test_shutdown_bound_is_the_process_exit_with_two_thousand_connections(
    tmp_path: Path,
) -> None:
    """SIGTERM with 2,000 connections that never answer the close: the process is gone in time."""
    bound = 2.0
    limits = {
        **NO_RATE_LIMIT,
        "shutdown_timeout_s": bound,
        "close_timeout_s": 10,
        "join_timeout_s": 60,
        "write_buffer_bytes": 4 * MIB,  # the non-readers are not cut before the signal
        "max_connections_per_address": 10_000,
        "handshakes_per_second_per_address": 1_000_000,
    }
    running = RelayProcess(write_yaml(tmp_path / "c.yaml", {"limits": limits}))
    await running.start()
    assert running.process is not None
    proc = running.process.proc
    gate = asyncio.Semaphore(100)

    async def one(n: int) -> asyncio.StreamWriter:
        async with gate:  # raw: none ever reads or answers the close frame
            _, writer = await raw_websocket(running.port, rcvbuf=4096 if n % 4 == 0 else None)
        if n % 4 == 0:  # a quarter also leave pongs unread in full buffers
            writer.write(masked_frame(PING, b"p" * 125) * 64)
        return writer

    writers = await within(asyncio.gather(*(one(n) for n in range(2000))), 24)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        proc.send_signal(signal.SIGTERM)
        assert await within(proc.wait(), 4) == 0
        took = loop.time() - started
    finally:
        for writer in writers:
            writer.transport.abort()
    assert took <= bound + relay.EXIT_MARGIN_S + 1.0, (
        f"the relay exited {took:.2f} s after SIGTERM:\n" + "\n".join(running.log[-5:])
    )


async def test_https_answers_carry_hsts(tmp_path: Path) -> None:
    """With TLS every HTTP answer has Strict-Transport-Security; without, none."""
    cert, key = self_signed(tmp_path)
    config = relay_config(tls={"cert": str(cert), "key": str(key)})
    async with running_relay(config) as running:
        trust = ssl.create_default_context(cafile=str(cert))
        reader, writer = await within(asyncio.open_connection("localhost", running.port, ssl=trust))
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        raw = await within(reader.read())
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"\r\nStrict-Transport-Security: max-age=31536000\r\n" in raw
    async with running_relay() as running:
        _, headers, _ = await http_get(running.port, "/health")
    assert "strict-transport-security" not in headers


# -- 11. the listen backlog ---------------------------------------------------------------------


async def test_a_handshake_past_max_handshakes_gets_503_with_retry_after() -> None:
    """Past limits.max_handshakes, each new WebSocket gets 503 + Retry-After: its own place."""
    limits = {"max_handshakes": 1, "reconnect_rate": 1}
    async with running_relay(relay_config(limits=limits)) as running:
        # Accepted and never sends its request: one handshake in progress.
        _, idle = await within(asyncio.open_connection("127.0.0.1", running.port))
        try:
            async with asyncio.timeout(TIMEOUT):
                while running.relay.handshaking < 1:  # noqa: ASYNC110 (the relay's counter)
                    await asyncio.sleep(0.01)
            places = []
            for _ in range(3):
                with pytest.raises(InvalidStatus) as refused:
                    await within(connect(running.url))
                response = refused.value.response
                assert response.status_code == 503
                places.append(response.headers["Retry-After"])
            # 1 in progress (the idle one) at 1 a second, then one place each.
            assert places == ["2", "3", "4"]
            assert running.state.stats.errors["busy"] == 3
            status, _, _ = await http_get(running.port, "/health")  # plain HTTP still answers
            assert status == 200
        finally:
            idle.close()
        async with asyncio.timeout(TIMEOUT):
            while running.relay.handshaking:  # noqa: ASYNC110 (the relay's counter)
                await asyncio.sleep(0.01)
        client = await Client.open(running.url)  # the queue gone, a handshake goes through
        await client.ws.close()


async def test_a_backlog_above_somaxconn_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """relay.backlog above net.core.somaxconn: a warning naming both at start."""
    somaxconn = relay._somaxconn()
    if somaxconn is None or somaxconn >= 65_535:
        pytest.skip("net.core.somaxconn is unreadable or already at its maximum")
    caplog.set_level(logging.WARNING, logger="relay")
    config = relay_config(relay={"host": "127.0.0.1", "port": 0, "backlog": 65_535})
    async with running_relay(config):
        pass
    assert f"relay.backlog is 65535 but the kernel caps it at {somaxconn}" in caplog.text


async def test_a_stopping_relay_tells_each_client_its_moment_to_come_back() -> None:
    """At shutdown, the n-th oldest connection's close reason says n / limits.reconnect_rate s."""
    limits = {"reconnect_rate": 20, "handshakes_per_second_per_address": 1000}
    async with running_relay(relay_config(limits=limits)) as running:
        clients = [await Client.open(running.url) for _ in range(40)]
        async with asyncio.timeout(TIMEOUT):
            while len(running.state.conns) < len(clients):  # noqa: ASYNC110 (the relay's count)
                await asyncio.sleep(0.01)
    closes = [(c.ws.close_code, c.ws.close_reason) for c in clients]
    assert closes == [
        (1001, f"relay shutting down; reconnect in {n / 20:.2f} s") for n in range(40)
    ]


async def test_a_restart_brings_every_client_back_to_its_seat_at_its_moment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """400 peers' relay clients, relay restarted: each resumes its seat, spread, none refused."""
    clients, rate = 400, 100.0
    limits = {
        **NO_RATE_LIMIT,
        "reconnect_rate": rate,
        "max_connections_per_address": 10_000,
        "max_sessions_per_address": 10_000,
        "handshakes_per_second_per_address": 1_000_000,
    }
    config = {"auth": {"resume_secret": "storm-test-resume-secret"}, "limits": limits}
    running = RelayProcess(write_yaml(tmp_path / "c.yaml", config))
    url = await running.start()
    seats = [
        RelayClient(url, f"s{n // 2}", ("patient", "practitioner")[n % 2], heartbeat_s=30)
        for n in range(clients)
    ]
    joins: list[list[tuple[float, bool]]] = [[] for _ in seats]
    caplog.set_level(logging.INFO, logger="peers.signaling")

    async def keep(n: int) -> None:
        async for frame in seats[n].frames():
            if frame["type"] == "joined":
                joins[n].append((time.monotonic(), frame.get("resumed") is True))

    tasks = [asyncio.create_task(keep(n)) for n in range(clients)]
    try:
        async with asyncio.timeout(60):
            while not all(joins):  # noqa: ASYNC110 (the clients' own loops)
                await asyncio.sleep(0.05)
            stopped, stopped_wall = time.monotonic(), time.time()
            await running.stop()
            await running.start()
            while not all(len(j) == 2 for j in joins):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await running.stop()
    assert all(j[1][1] for j in joins), "a client joined again without its seat's resume key"
    # Told to come back one every 1 / rate s from their close: the last, (n - 1) / rate s after.
    assert max(j[1][0] for j in joins) - stopped >= (clients - 1) / rate
    # (The first joins, all at once, met the count cap: only the restart counts.)
    refused = [
        r for r in caplog.records if r.created >= stopped_wall and "HTTP 503" in r.getMessage()
    ]
    assert len(refused) <= clients // 20, f"{len(refused)} tries answered 503 after the restart"


async def test_past_max_handshakes_the_request_line_alone_gets_the_503() -> None:
    """Past the cap, "GET /ws" is refused 503 from its request line, before any header is read."""
    async with running_relay(relay_config(limits={"max_handshakes": 1})) as running:
        _, idle = await within(asyncio.open_connection("127.0.0.1", running.port))
        try:
            async with asyncio.timeout(TIMEOUT):
                while running.relay.handshaking < 1:  # noqa: ASYNC110 (the relay's counter)
                    await asyncio.sleep(0.01)
            reader, writer = await within(asyncio.open_connection("127.0.0.1", running.port))
            writer.write(b"GET /ws HTTP/1.1\r\n")  # no header yet: websockets would wait for them
            head = await within(reader.readuntil(b"\r\n\r\n"))
            assert head.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nRetry-After: 1\r\n" in head
            assert await within(reader.read()) == relay.BUSY_BODY  # then the relay's FIN
            writer.close()
            assert running.relay.handshaking == 1  # the refused one never counted
        finally:
            idle.close()
