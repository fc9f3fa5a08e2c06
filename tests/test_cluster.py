"""Several relays as one: the seats they share in a real redis-server (tests/processes.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import relay
from tests.processes import RedisServer, redis_missing, redis_server
from tests.support import TIMEOUT, relay_config

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
    assert await a.claim("s1", "patient", 1, "ka", None) == ("ok", "", 0)
    assert await b.claim("s1", "patient", 7, "kb", None) == ("role-taken", "", 0)
    assert await b.claim("s1", "patient", 7, "kb", "not-the-key") == ("role-taken", "", 0)
    assert await b.claim("s1", "practitioner", 7, "kb", None) == ("ok", "", 0)
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
    assert await b.claim("s1", "patient", 9, "kb", "ka") == ("ok", "a", 1)
    assert await a.release("s1", "patient", 1, hold=False) is False  # no longer A's
    assert (await b.seats("s1"))["patient"] == relay.SeatRecord("taken", "b", 9, "kb")


async def test_an_unclean_drop_holds_the_seat_for_its_key_alone(redis: RedisServer) -> None:
    """Released with hold: seat-held for anyone else (with the time left), taken by its key."""
    a, b = directory(redis, "a"), directory(redis, "b")
    await a.claim("s1", "patient", 1, "ka", None)
    assert await a.release("s1", "patient", 1, hold=True) is True
    outcome, _, left_ms = await b.claim("s1", "patient", 5, "kb", None)
    assert outcome == "seat-held" and 29_000 < left_ms <= 30_000
    assert await b.claim("s1", "patient", 5, "kb", "ka") == ("ok", "", 0)  # nobody to replace
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
        assert await alive.refresh([("s1", "patient", 1)]) == 1
        await asyncio.sleep(ttl / 5)  # a refresh period, as a live relay's
    gone_after = time.monotonic() - started
    assert gone_after >= ttl * 0.9
    assert list(await alive.seats("s1")) == ["patient"]
    # Only the relay holding a seat refreshes it.
    assert await dead.refresh([("s1", "patient", 1)]) == 0


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
