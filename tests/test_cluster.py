"""Several relays as one: the seats they share in a real redis-server (tests/processes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import pytest_asyncio

import relay
from bench.cluster import Cluster, running_cluster
from peers.netns import Network, netns_missing
from tests.processes import (
    Process,
    RedisServer,
    RelayProcess,
    peer_argv,
    redis_missing,
    redis_server,
    spawn,
)
from tests.support import TIMEOUT, Client, http_get, relay_config, write_yaml
from tests.test_peers import VIDEO, assert_media_arrived, summary

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[RedisServer]:
    """A real redis-server on a free port of 127.0.0.1, stopped by its PID at the end."""
    if reason := redis_missing():
        pytest.skip(reason)
    async with redis_server() as server:
        yield server


# Every directory a test made, closed after it (each holds a connection pool).
_opened: list[relay.SeatDirectory] = []


@pytest_asyncio.fixture(autouse=True)
async def _close_directories() -> AsyncIterator[None]:
    yield
    while _opened:
        await _opened.pop().close()


def directory(server: RedisServer, node: str, **cluster: object) -> relay.SeatDirectory:
    config = relay_config(cluster=cluster, limits={"resume_grace_s": 30})
    seats = relay.SeatDirectory.from_url(server.url, node, config.cluster, config.limits)
    _opened.append(seats)
    return seats


async def test_a_seat_is_taken_cluster_wide(redis: RedisServer) -> None:
    """A seat taken on relay A is role-taken on relay B; the other seat is free on B."""
    a, b = directory(redis, "a"), directory(redis, "b")
    assert await a.claim("s1", "patient", 1, "ka", None) == ("ok", "", 0, None)
    # The same claim again (redis-py retries a command whose reply timed out): still ok.
    assert await a.claim("s1", "patient", 1, "ka", None) == ("ok", "", 0, None)
    assert await b.claim("s1", "patient", 7, "kb", None) == ("role-taken", "", 0, None)
    assert await b.claim("s1", "patient", 7, "kb", "not-the-key") == ("role-taken", "", 0, None)
    # The other seat as it was at the claim: a join at the same moment on A is not missed.
    peer = relay.SeatRecord("taken", "a", 1, "ka")
    assert await b.claim("s1", "practitioner", 7, "kb", None) == ("ok", "", 0, peer)
    seats = await b.seats("s1")
    assert seats == {
        "patient": relay.SeatRecord("taken", "a", 1, "ka"),
        "practitioner": relay.SeatRecord("taken", "b", 7, "kb"),
    }


async def test_resume_on_another_relay_names_the_connection_it_replaces(
    redis: RedisServer,
) -> None:
    """The seat's key takes it on relay B and names A's stale connection; A frees nothing after."""
    a, b = directory(redis, "a"), directory(redis, "b")
    await a.claim("s1", "patient", 1, "ka", None)
    assert await b.claim("s1", "patient", 9, "kb", "ka") == ("ok", "a", 1, None)
    assert await a.release("s1", "patient", 1, hold=False) is False  # no longer A's
    assert (await b.seats("s1"))["patient"] == relay.SeatRecord("taken", "b", 9, "kb")


async def test_an_unclean_drop_holds_the_seat_for_its_key_alone(redis: RedisServer) -> None:
    """Released with hold: seat-held for anyone else (with the time left), taken by its key."""
    a, b = directory(redis, "a"), directory(redis, "b")
    await a.claim("s1", "patient", 1, "ka", None)
    assert await a.release("s1", "patient", 1, hold=True) is True
    outcome, _, left_ms, _ = await b.claim("s1", "patient", 5, "kb", None)
    assert outcome == "seat-held" and 29_000 < left_ms <= 30_000
    assert await b.claim("s1", "patient", 5, "kb", "ka") == ("ok", "", 0, None)  # nobody to replace
    assert await b.release("s1", "patient", 5, hold=False) is True
    assert await a.seats("s1") == {}


async def test_a_dead_relays_seats_expire_and_a_live_ones_do_not(redis: RedisServer) -> None:
    """Seats last seat_ttl_s unless their relay refreshes them: a dead relay's seats go."""
    ttl = 0.5
    alive, dead = (
        directory(redis, "alive", seat_ttl_s=ttl),
        directory(redis, "dead", seat_ttl_s=ttl),
    )
    await alive.claim("s1", "patient", 1, "k1", None)
    await dead.claim("s1", "practitioner", 2, "k2", None)
    started = time.monotonic()
    while "practitioner" in await alive.seats("s1"):
        assert time.monotonic() - started < ttl + TIMEOUT, "the dead relay's seat never expired"
        assert await alive.refresh([("s1", "patient", 1, "k1")]) == 1
        await asyncio.sleep(ttl / 5)  # a refresh period, as a live relay's
    gone_after = time.monotonic() - started
    assert gone_after >= ttl * 0.9
    assert list(await alive.seats("s1")) == ["patient"]
    # Only the relay holding a seat refreshes it.
    assert await dead.refresh([("s1", "patient", 1, "k1")]) == 0


async def test_redis_away_raises_a_redis_error_within_a_second() -> None:
    """A directory whose Redis does not answer raises RedisError fast (joins get unavailable)."""
    import redis.exceptions

    server = RedisServer()
    if reason := redis_missing():
        pytest.skip(reason)
    await server.start()
    await server.kill()
    seats = directory(server, "a")
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        await seats.claim("s1", "patient", 1, "k", None)
    assert time.monotonic() - started < 2.0


# -- two relays, one Redis ---------------------------------------------------------------

RESUME_SECRET = "cluster-test-resume-secret"
SDP = "v=0\r\no=- 1 2 IN IP4 198.18.0.2\r\ns=-\r\nt=0 0\r\n"


def candidate(i: int) -> dict[str, object]:
    return {"candidate": f"candidate:{i} 1 udp 1 198.18.0.2 {40000 + i} typ host", "sdpMid": "0"}


@contextlib.asynccontextmanager
async def two_relays(
    server: RedisServer,
    *,
    auth: Mapping[str, object] | None = None,
    limits: Mapping[str, object] | None = None,
    seat_ttl_s: float = 1.5,
) -> AsyncIterator[tuple[relay.RunningRelay, relay.RunningRelay]]:
    """Relays "a" and "b" in this process, sharing ``server`` and one resume secret."""
    configs = [
        relay_config(
            cluster={"redis_url": server.url, "node_id": node, "seat_ttl_s": seat_ttl_s},
            auth={"resume_secret": RESUME_SECRET, **(auth or {})},
            limits=dict(limits or {}),
        )
        for node in ("a", "b")
    ]
    try:
        async with relay.serve_relay(configs[0]) as a, relay.serve_relay(configs[1]) as b:
            yield a, b
    finally:
        await Client.drop_all()


async def split_pair(
    a: relay.RunningRelay, b: relay.RunningRelay, session: str
) -> tuple[Client, Client]:
    patient = await Client.open(a.url)
    await patient.join(session, "patient")
    practitioner = await Client.open(b.url)
    await practitioner.send(type="join", session=session, role="practitioner")
    await practitioner.expect("joined", peer=True)
    await patient.expect("peer-joined", role="practitioner", resumed=False)
    return patient, practitioner


@pytest.mark.parametrize("first", ["a", "b"])
async def test_a_session_split_across_two_relays_gets_the_whole_protocol(
    redis: RedisServer, first: str
) -> None:
    """Patient on one relay, practitioner on the other: frames in order, bye, peer-left."""
    async with two_relays(redis) as (a, b):
        one, other = (a, b) if first == "a" else (b, a)
        patient, practitioner = await split_pair(one, other, "s1")
        await patient.send(type="offer", sdp=SDP)
        for i in range(50):
            await patient.send(type="candidate", candidate=candidate(i))
        await practitioner.expect("offer", sdp=SDP)
        for i in range(50):
            await practitioner.expect("candidate", candidate=candidate(i))
        await practitioner.send(type="answer", sdp=SDP)
        await patient.expect("answer", sdp=SDP)
        await practitioner.send(type="bye")
        await patient.expect("bye")
        await patient.expect("peer-left", role="practitioner", reason="bye")
        await patient.send(type="offer", sdp=SDP)
        await patient.expect_error("no-peer")
        await patient.close()


async def test_role_taken_across_relays_and_peer_left_on_a_drop(redis: RedisServer) -> None:
    """A seat taken on relay a is role-taken on b; a clean close there is peer-left on a."""
    async with two_relays(redis) as (a, b):
        patient, practitioner = await split_pair(a, b, "s1")
        intruder = await Client.open(b.url)
        await intruder.send(type="join", session="s1", role="patient")
        await intruder.expect_error("role-taken")
        await practitioner.close()
        await patient.expect("peer-left", role="practitioner", reason="disconnected")


async def test_resume_on_the_other_relay_replaces_the_stale_connection(redis: RedisServer) -> None:
    """The patient's key takes its seat on relay b: a's connection closes 4001, peer resumed."""
    async with two_relays(redis) as (a, b):
        patient = await Client.open(a.url)
        key = (await patient.join("s1", "patient"))["resume"]
        practitioner = await Client.open(a.url)
        await practitioner.join("s1", "practitioner")
        await patient.expect("peer-joined", role="practitioner")
        moved = await Client.open(b.url)
        await moved.send(type="join", session="s1", role="patient", resume=key)
        await moved.expect("joined", resumed=True, peer=True)
        assert await patient.closed() == (relay.CLOSE_REPLACED, "replaced")
        await practitioner.expect("peer-joined", role="patient", resumed=True)
        await practitioner.send(type="offer", sdp=SDP)
        await moved.expect("offer", sdp=SDP)
        await moved.send(type="answer", sdp=SDP)
        await practitioner.expect("answer", sdp=SDP)


async def test_redis_away_then_back(redis: RedisServer) -> None:
    """Redis gone: /health 503 naming it, joins get unavailable, a call's frames between
    seats of one relay pass; Redis back (empty): seats written again, joins work, no peer-left."""
    async with two_relays(redis) as (a, b):
        patient, practitioner = await split_pair(a, b, "s1")
        local_patient, local_practitioner = await pair_on(a, "s2")
        await redis.kill()
        for running in (a, b):
            await wait_health(running, 503)
        _, _, body = await http_get(a.port, "/health")
        assert json.loads(body)["status"].startswith("redis unavailable")
        late = await Client.open(b.url)
        await late.send(type="join", session="s3", role="patient")
        await late.expect_error("unavailable")
        assert await late.closed() == (1013, "unavailable")
        await local_patient.send(type="offer", sdp=SDP)
        await local_practitioner.expect("offer", sdp=SDP)
        await redis.start()  # the same port, nothing in it
        for running in (a, b):
            await wait_health(running, 200)
        await asyncio.sleep(1.5)  # two refresh periods: the seats are written again
        await patient.send(type="offer", sdp=SDP)
        await practitioner.expect("offer", sdp=SDP)  # not peer-left: the seats survived
        again = await Client.open(b.url)
        await again.send(type="join", session="s1", role="patient")
        await again.expect_error("role-taken")
        third, fourth = await split_pair(b, a, "s4")
        await fourth.send(type="answer", sdp=SDP)
        await third.expect("answer", sdp=SDP)


MANY = {
    "handshakes_per_second_per_address": 10_000,
    "max_connections_per_address": 1_000,
    "max_sessions_per_address": 1_000,
}


async def test_200_sessions_split_across_two_relays_all_complete_in_order(
    redis: RedisServer,
) -> None:
    """200 sessions, each with its patient on one relay and practitioner on the other, at once:
    every offer, answer and candidate arrives, in order, and every bye."""
    # The default time to live: 400 clients and two relays in this one process
    # lag its loop past a 1.5 s one on a busy machine (the seats would expire).
    async with two_relays(redis, limits=MANY, seat_ttl_s=15) as (a, b):
        # Joins 25 at a time: 400 at once in this one process (two relays, 400
        # clients) lag its loop past the relays' 1 s Redis timeouts on a busy
        # machine. The frames of the 200 sessions then all flow at once.
        joining = asyncio.Semaphore(25)

        async def session(i: int) -> None:
            one, other = (a, b) if i % 2 else (b, a)
            async with joining:
                patient, practitioner = await split_pair(one, other, f"s{i}")
            await patient.send(type="offer", sdp=SDP)
            for n in range(5):
                await patient.send(type="candidate", candidate=candidate(n))
            await practitioner.expect("offer", sdp=SDP)
            await practitioner.send(type="answer", sdp=SDP)
            for n in range(5):
                await practitioner.expect("candidate", candidate=candidate(n))
                await practitioner.send(type="candidate", candidate=candidate(100 + n))
            await patient.expect("answer", sdp=SDP)
            for n in range(5):
                await patient.expect("candidate", candidate=candidate(100 + n))
            await patient.send(type="bye", reason="done")
            await practitioner.expect("bye", reason="done")
            await practitioner.expect("peer-left", role="patient", reason="bye")
            await patient.close()
            await practitioner.close()

        await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(200))), TIMEOUT * 12)
        assert a.state.stats.joins + b.state.stats.joins == 400
        assert a.state.seats.session_count() == b.state.seats.session_count() == 0


async def test_two_relays_claiming_one_seat_at_once_seat_one_of_them(redis: RedisServer) -> None:
    """The same seat joined on both relays at once, 20 times: one joined, the other role-taken."""
    async with two_relays(redis, limits=MANY) as (a, b):
        for i in range(20):
            one, other = await Client.open(a.url), await Client.open(b.url)
            for client in (one, other):
                await client.send(type="join", session=f"race{i}", role="patient")
            replies = sorted(
                [(await one.recv())["type"], (await other.recv())["type"]], reverse=True
            )
            assert replies == ["joined", "error"], replies


async def test_the_two_seats_joined_on_two_relays_at_once_meet(redis: RedisServer) -> None:
    """Patient on a, practitioner on b, both joins sent at once, 20 times: each side hears of
    the other (``joined`` with peer, or ``peer-joined``), and an offer crosses."""
    async with two_relays(redis, limits=MANY) as (a, b):
        for i in range(20):
            patient, practitioner = await Client.open(a.url), await Client.open(b.url)
            await asyncio.gather(
                patient.send(type="join", session=f"meet{i}", role="patient"),
                practitioner.send(type="join", session=f"meet{i}", role="practitioner"),
            )
            told = []
            for client, other in ((patient, "practitioner"), (practitioner, "patient")):
                joined = await client.expect("joined")
                if not joined["peer"]:
                    await client.expect("peer-joined", role=other)
                told.append(joined["peer"])
            assert sorted(told) == [False, True]  # the later claim was told at its join
            await patient.send(type="offer", sdp=SDP)
            await practitioner.expect("offer", sdp=SDP)
            await patient.close()
            await practitioner.close()


async def test_seat_held_across_relays(redis: RedisServer) -> None:
    """An unclean drop on relay b holds the seat: a join on a without its key gets seat-held
    (closed 1013), with its key it resumes and the patient on a sees peer-joined resumed."""
    async with two_relays(redis) as (a, b):
        patient = await Client.open(a.url)
        await patient.join("s1", "patient")
        practitioner = await Client.open(b.url)
        key = (await practitioner.join("s1", "practitioner"))["resume"]
        await patient.expect("peer-joined", role="practitioner")
        practitioner.ws.transport.abort()  # no close frame: an unclean drop
        await patient.expect("peer-left", role="practitioner", reason="disconnected")
        intruder = await Client.open(a.url)
        await intruder.send(type="join", session="s1", role="practitioner")
        await intruder.expect_error("seat-held")
        assert await intruder.closed() == (1013, "seat-held")
        back = await Client.open(a.url)
        await back.send(type="join", session="s1", role="practitioner", resume=key)
        await back.expect("joined", resumed=True, peer=True)
        await patient.expect("peer-joined", role="practitioner", resumed=True)


async def test_tokens_signed_for_the_cluster_are_checked_on_every_relay(
    redis: RedisServer,
) -> None:
    """One auth.secret: a token works on either relay; one for the other role is bad-token,
    an expired one token-expired, wherever the seat is."""
    secret = "cluster-test-auth-secret-0123456789"
    expiry = int(time.time()) + 600
    async with two_relays(redis, auth={"secret": secret}) as (a, b):
        patient = await Client.open(a.url)
        await patient.join("s1", "patient", token=relay.mint_token(secret, "s1", "patient", expiry))
        wrong = await Client.open(b.url)
        token = relay.mint_token(secret, "s1", "patient", expiry)  # the patient's, not this role's
        await wrong.send(type="join", session="s1", role="practitioner", token=token)
        await wrong.expect_error("bad-token")
        past = relay.mint_token(secret, "s1", "practitioner", int(time.time()) - 60)
        await wrong.send(type="join", session="s1", role="practitioner", token=past)
        await wrong.expect_error("token-expired")
        token = relay.mint_token(secret, "s1", "practitioner", expiry)
        await wrong.send(type="join", session="s1", role="practitioner", token=token)
        await wrong.expect("joined", peer=True)
        await patient.expect("peer-joined", role="practitioner")


async def test_protocol_errors_of_a_split_session(redis: RedisServer) -> None:
    """Across two relays: not-joined before join, already-joined, role-taken on either relay,
    not-practitioner for the patient's invite, no-peer once the other seat left."""
    async with two_relays(redis) as (a, b):
        early = await Client.open(b.url)
        await early.send(type="offer", sdp=SDP)
        await early.expect_error("not-joined")
        patient, practitioner = await split_pair(a, b, "s1")
        await practitioner.send(type="join", session="s2", role="patient")
        await practitioner.expect_error("already-joined")
        for running in (a, b):
            for role in ("patient", "practitioner"):
                intruder = await Client.open(running.url)
                await intruder.send(type="join", session="s1", role=role)
                await intruder.expect_error("role-taken")
        await patient.send(type="invite")
        await patient.expect_error("not-practitioner")
        await practitioner.send(type="invite")
        await practitioner.expect("invite", session="s1", role="patient")
        await practitioner.send(type="bye")
        await patient.expect("bye")
        await patient.expect("peer-left", role="practitioner", reason="bye")
        await patient.send(type="candidate", candidate=candidate(1))
        await patient.expect_error("no-peer")


async def test_per_address_limits_are_per_relay(redis: RedisServer) -> None:
    """max_sessions_per_address counts one relay's sessions: a second on a is address-limit,
    on b it is taken (README, Scaling out)."""
    async with two_relays(redis, limits={"max_sessions_per_address": 1}) as (a, b):
        first = await Client.open(a.url)
        await first.join("s1", "patient")
        second = await Client.open(a.url)
        await second.send(type="join", session="s2", role="patient")
        await second.expect_error("address-limit")
        elsewhere = await Client.open(b.url)
        await elsewhere.join("s2", "patient")


async def pair_on(running: relay.RunningRelay, session: str) -> tuple[Client, Client]:
    return await split_pair(running, running, session)


async def wait_health(running: relay.RunningRelay, status: int) -> None:
    started = time.monotonic()
    while (await http_get(running.port, "/health"))[0] != status:
        assert time.monotonic() - started < TIMEOUT, f"/health never answered {status}"
        await asyncio.sleep(0.1)


# -- through HAProxy (make cluster) ------------------------------------------------------


def haproxy_missing() -> str | None:
    return None if shutil.which("haproxy") else "haproxy is not installed (make haproxy-deps)"


async def seated_through(cluster: Cluster) -> tuple[Client, str, Client, str]:
    """A patient and a practitioner joined to session s1 through HAProxy, with their keys."""
    patient = await Client.open(cluster.ws_url)
    key = (await patient.join("s1", "patient"))["resume"]
    practitioner = await Client.open(cluster.ws_url)
    practitioner_key = (await practitioner.join("s1", "practitioner"))["resume"]
    await patient.expect("peer-joined", role="practitioner")
    return patient, key, practitioner, practitioner_key


async def test_kill_9_a_relay_and_the_client_resumes_on_the_other_through_haproxy() -> None:
    """make cluster's parts; kill -9 one relay: its client resumes through HAProxy on the other."""
    if reason := redis_missing() or haproxy_missing():
        pytest.skip(reason)
    async with running_cluster() as cluster:
        patient, key, practitioner, practitioner_key = await seated_through(cluster)
        victim = cluster.relays[0].process
        assert victim is not None
        victim.proc.kill()  # SIGKILL by PID
        await victim.wait(TIMEOUT)
        # Round robin put the two clients on different relays: one lost its relay.
        closed, _ = await asyncio.wait(
            [asyncio.ensure_future(c.ws.wait_closed()) for c in (patient, practitioner)],
            timeout=TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        assert len(closed) == 1
        lost_patient = patient.ws.close_code is not None or patient.ws.state.name == "CLOSED"
        role, resume, survivor = (
            ("patient", key, practitioner)
            if lost_patient
            else ("practitioner", practitioner_key, patient)
        )
        back = await Client.open(cluster.ws_url)
        await back.send(type="join", session="s1", role=role, resume=resume)
        await back.expect("joined", resumed=True, peer=True)
        seen = await survivor.recv()
        if seen["type"] == "peer-left":  # the survivor's relay noticed the death first
            seen = await survivor.recv()
        assert seen == {"type": "peer-joined", "role": role, "resumed": True}
        await survivor.send(type="offer", sdp=SDP)
        await back.expect("offer", sdp=SDP)


async def test_sigterm_drains_a_relay_its_clients_resume_on_the_other_through_haproxy() -> None:
    """SIGTERM one relay: its client is closed 1001, resumes through HAProxy, frames pass."""
    if reason := redis_missing() or haproxy_missing():
        pytest.skip(reason)
    async with running_cluster() as cluster:
        patient, key, practitioner, practitioner_key = await seated_through(cluster)
        assert await cluster.relays[1].stop() == 0  # SIGTERM by PID: the relay drains
        closed, _ = await asyncio.wait(
            [asyncio.ensure_future(c.ws.wait_closed()) for c in (patient, practitioner)],
            timeout=TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        assert len(closed) == 1
        moved = patient if patient.ws.close_code is not None else practitioner
        survivor = practitioner if moved is patient else patient
        assert moved.ws.close_code == 1001
        role, resume = ("patient", key) if moved is patient else ("practitioner", practitioner_key)
        back = await Client.open(cluster.ws_url)
        await back.send(type="join", session="s1", role=role, resume=resume)
        await back.expect("joined", resumed=True, peer=True)
        seen = await survivor.recv()
        if seen["type"] == "peer-left":  # the survivor's relay saw the seat held first
            seen = await survivor.recv()
        assert seen == {"type": "peer-joined", "role": role, "resumed": True}
        await back.send(type="answer", sdp=SDP)
        await survivor.expect("answer", sdp=SDP)


# -- no silent loss: frames left in a dead relay's inbox ----------------------------------


@contextlib.asynccontextmanager
async def killable_relay(
    server: RedisServer, tmp_path: Path, seat_ttl_s: float
) -> AsyncIterator[RelayProcess]:
    """Relay "x" as a process of its own (for kill -9), sharing ``server`` and the resume secret."""
    config = write_yaml(
        tmp_path / "x.yaml",
        {
            "relay": {"host": "127.0.0.1", "port": 0},
            "auth": {"resume_secret": RESUME_SECRET},
            "cluster": {"redis_url": server.url, "node_id": "x", "seat_ttl_s": seat_ttl_s},
        },
    )
    victim = RelayProcess(config)
    try:
        await victim.start()
        yield victim
    finally:
        await victim.stop()


async def read_through(server: RedisServer, node: str) -> None:
    """Wait until ``node`` has recorded that it delivered the last entry of its inbox."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(server.url)
    try:
        started = time.monotonic()
        while True:
            last = await client.xrevrange(relay.INBOX_KEY.format(node), count=1)
            if last and await client.get(relay.INBOX_POS_KEY.format(node)) == last[0][0]:
                return
            assert time.monotonic() - started < TIMEOUT, "the relay never recorded its position"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def kill_9(victim: RelayProcess) -> None:
    process = victim.process
    assert process is not None
    process.proc.kill()  # SIGKILL by PID
    await process.wait(TIMEOUT)


@pytest.mark.parametrize("resume_on", ["patients-relay", "third-relay"])
async def test_frames_sent_to_a_killed_relay_are_delivered_after_the_resume(
    redis: RedisServer, tmp_path: Path, resume_on: str
) -> None:
    """kill -9 the practitioner's relay: the frames sent to it before the resume arrive after it."""
    async with killable_relay(redis, tmp_path, 15) as victim, two_relays(redis) as (a, b):
        patient = await Client.open(a.url)
        await patient.join("s1", "patient")
        practitioner = await Client.open(victim.url)
        key = (await practitioner.join("s1", "practitioner"))["resume"]
        await patient.expect("peer-joined", role="practitioner")
        await patient.send(type="offer", sdp=SDP)
        await practitioner.expect("offer", sdp=SDP)
        await read_through(redis, "x")  # else the offer is delivered again (at least once)
        await kill_9(victim)
        await practitioner.closed()
        for i in range(10):  # written to the dead relay's inbox
            await patient.send(type="candidate", candidate=candidate(i))
        target = a if resume_on == "patients-relay" else b
        back = await Client.open(target.url)
        await back.send(type="join", session="s1", role="practitioner", resume=key)
        await back.expect("joined", resumed=True, peer=True)
        for i in range(10):
            await back.expect("candidate", candidate=candidate(i))
        await patient.expect("peer-joined", role="practitioner", resumed=True)
        await patient.send(type="candidate", candidate=candidate(10))
        await back.expect("candidate", candidate=candidate(10))
        await back.send(type="answer", sdp=SDP)
        await patient.expect("answer", sdp=SDP)


async def test_frames_sent_to_a_killed_relay_nobody_resumes_are_named_to_their_sender(
    redis: RedisServer, tmp_path: Path
) -> None:
    """kill -9 the practitioner's relay, no resume: each frame sent since is named in a no-peer."""
    async with killable_relay(redis, tmp_path, 1.5) as victim, two_relays(redis) as (a, _):
        patient = await Client.open(a.url)
        await patient.join("s1", "patient")
        practitioner = await Client.open(victim.url)
        await practitioner.join("s1", "practitioner")
        await patient.expect("peer-joined", role="practitioner")
        await kill_9(victim)
        await practitioner.closed()
        await patient.send(type="offer", sdp=SDP)
        await patient.send(type="candidate", candidate=candidate(1))
        for kind in ("offer", "candidate"):
            error = await patient.expect("error", code="no-peer", frame=kind)
            assert "not delivered" in error["message"]
        await patient.expect("peer-left", role="practitioner", reason="disconnected")
    # The relay's own log lines carry its id (cluster.node_id).
    assert any(" [x]: conn=" in line and "joined" in line for line in victim.log), victim.log


async def test_each_relays_log_lines_carry_its_node_id(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two relays in one process: each log record names the relay that wrote it (node)."""
    caplog.set_level(logging.INFO, logger="relay")
    async with two_relays(redis) as (a, b):
        patient, practitioner = await split_pair(a, b, "s1")
        await practitioner.close()
        await patient.expect("peer-left", role="practitioner", reason="disconnected")
    records = [r for r in caplog.records if r.name == "relay"]
    nodes = {getattr(r, "node", None) for r in records}
    assert nodes == {"a", "b"}, nodes
    lines = [(r.getMessage(), getattr(r, "node", None)) for r in records]
    joins = {text.split(" ")[2]: node for text, node in lines if "joined (peer" in text}
    assert joins == {"role=patient": "a", "role=practitioner": "b"}
    assert {node for text, node in lines if text == "relay stopped"} == {"a", "b"}


# -- a real call across two relays ----------------------------------------------------------


@pytest.mark.netns
async def test_an_aiortc_call_whose_seats_are_on_two_relays(tmp_path: Path) -> None:
    """The patient's command line on relay a, the practitioner's on relay b: media both ways."""
    if reason := redis_missing() or netns_missing():
        pytest.skip(reason)
    peers_config = write_yaml(
        tmp_path / "peers.yaml",
        {
            "relay": {"open_timeout_s": 2, "join_timeout_s": 3, "reconnect_max_s": 1},
            "media": {"video": VIDEO},
            "ice": {"timeout_s": 10},
        },
    )
    started: list[Process] = []
    async with Network("epc-cluster") as net:
        lan = await net.lan("198.18.0.2/24")  # Redis, both relays and both peers inside
        server = RedisServer(netns=lan.name)
        relays: dict[str, RelayProcess] = {}
        try:
            await server.start()
            for node in ("a", "b"):
                config = write_yaml(
                    tmp_path / f"{node}.yaml",
                    {
                        "relay": {"host": "127.0.0.1", "port": 0},
                        "auth": {"resume_secret": RESUME_SECRET},
                        "cluster": {"redis_url": server.url, "node_id": node},
                    },
                )
                relays[node] = RelayProcess(config, lan.name)
                await relays[node].start()
            for role, node in (("patient", "a"), ("practitioner", "b")):
                argv = peer_argv(
                    role, peers_config, "--relay", relays[node].url, "--session", "call",
                    "--video", "pattern", "--audio", "tone", "--duration", "4",
                    "--stats-json", str(tmp_path / f"{role}.json"),
                )  # fmt: skip
                started.append(await spawn(role, argv, lan.command()))
            for process in started:
                assert await process.wait(40) == 0, process.log()
            for role in ("patient", "practitioner"):
                assert_media_arrived(summary(tmp_path, role), 3)
            # Each seat was on its own relay: every frame between them crossed Redis.
            assert any("role=patient joined" in line for line in relays["a"].log)
            assert any("role=practitioner joined" in line for line in relays["b"].log)
            assert not any("joined" in line for line in relays["a"].log if "practitioner" in line)
        finally:
            for process in started:
                await process.stop()
            for running in relays.values():
                await running.stop()
            await server.stop()
