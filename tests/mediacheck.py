"""What the calls through the link emulator share: root check, namespaces, loop stalls, audio.

Shared by tests/test_media.py and tests/test_rate.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Self

import pytest
import pytest_asyncio

from peers.media import Received
from peers.netns import Netns, Network, netns_missing
from tests import netem
from tests.nat import iptables_missing

needs_root = pytest.mark.skipif(
    (reason := netns_missing() or iptables_missing()) is not None, reason=reason or ""
)


@pytest_asyncio.fixture
async def link_pair() -> AsyncIterator[tuple[Netns, Netns, str]]:
    """Namespaces a (198.18.0.1, the patient) and b (198.18.0.2) on one veth; a's end of it."""
    async with Network("media") as net:
        yield await netem.pair(net)


class LoopTask:
    """A task of this event loop's for the length of an ``async with`` (``_run``, cancelled
    at the end)."""

    task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _run(self) -> None:
        raise NotImplementedError


class LoopLag(LoopTask):
    """This process's event-loop stalls: what the machine's load costs every frame here.

    Both calls run in this process, so a stall delays sending and receiving
    alike; the link and the receive path cannot help it. On the shared 2-core
    machine (load average 14-25 when this was written) a clean link shows gaps
    of 1.3 s and frames 0.9 s late from stalls alone; the assertions below judge
    the rest.
    """

    TICK_S = 0.01

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []  # (when it ended, seconds lost)

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.TICK_S)
            now = time.monotonic()
            if (lag := now - before - self.TICK_S) > 0.02:
                self.stalls.append((now, lag))

    def between(self, start: float, end: float) -> float:
        """Seconds this process stood still between ``start`` and ``end``."""
        return sum(
            min(t, end) - max(t - lag, start)
            for t, lag in self.stalls
            if t > start and t - lag < end
        )


class Stalls(LoopTask):
    """Stalls of this process's event loop, made on a schedule: ``time.sleep(stall_s)`` on the
    loop every ``every_s`` (the first after ``every_s``), as a starved process's loop stalls
    (80-360 ms at load 4-8 on the shared 2-core machine), so that what a sender does after
    one can be measured on a quiet machine. ``LoopLag`` sees them as any other stall.
    """

    def __init__(self, stall_s: float = 0.25, every_s: float = 2.5) -> None:
        self.stall_s, self.every_s = stall_s, every_s
        self.made: list[float] = []  # monotonic times at which each stall ended

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            time.sleep(self.stall_s)  # noqa: ASYNC251 (the point: the whole loop stands still)
            self.made.append(time.monotonic())


class SlowTurns(LoopTask):
    """Every turn of this process's event loop made ``turn_s`` longer: what a loaded machine
    does to it (each time the loop has waited, it waits again for a CPU). A task that blocks
    the loop once a turn (none when ``turn_s`` is 0: the loop would spin); with ``Stalls``
    for the loop held up on a schedule as well.
    """

    def __init__(self, turn_s: float) -> None:
        self.turn_s = turn_s

    async def _run(self) -> None:
        while self.turn_s > 0:
            time.sleep(self.turn_s)  # noqa: ASYNC251 (the point: the whole loop stands still)
            await asyncio.sleep(0)  # the next turn


def audio_counts(got: Received) -> tuple[int, int, int]:
    """Audio frames of media time so far (played or not: 20 ms each), missing and concealed.

    Media time, not frames counted on arrival: under load audio arrives late, not lost.
    """
    return (got.audio_pts or 0) // 960, got.audio_missing, got.audio_concealed


def after(got: Received, since: float) -> list[tuple[float, float, int]]:
    """The stamped frames shown from ``since`` on."""
    return [entry for entry in got.history if entry[0] >= since]


def longest_gap(entries: list[tuple[float, float, int]], lag: LoopLag) -> float:
    """The longest time between two frames shown, less this process's stalls within it."""
    times = [t for t, _, _ in entries]
    return max((b - a - lag.between(a, b) for a, b in itertools.pairwise(times)), default=0.0)


def most_behind(got: Received, entries: list[tuple[float, float, int]], lag: LoopLag) -> float:
    """How far behind the call's best delay a frame was shown (ms), less this process's stalls
    while it travelled."""
    best = min(latency for _, latency, _ in got.history)
    return max(
        (latency - best - 1000 * lag.between(t - latency / 1000, t) for t, latency, _ in entries),
        default=0.0,
    )
