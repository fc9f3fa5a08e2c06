"""``make bench-cluster``: one relay in memory, one on Redis, two on Redis with the pairs split.

Printed, not asserted (docs/benchmarks.md, "Cluster"). For each setting: the
frames per second that ``--pairs`` ping-ponging pairs get through for
``--seconds``, one probe pair's round trip p50/p99 per setting (the settings'
round trips interleaved, so that each sees the same load), the CPU per
relayed frame of the relays and of redis-server (utime+stime from /proc), and
the memory per idle joined connection (RSS growth over ``--idle`` connections).
The load generator is this Python process: the frames per second compare the
settings with each other, not with ``make bench-relay``'s Node load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from websockets.asyncio.client import ClientConnection, connect

from tests.processes import RedisServer, RelayProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
FRAME = json.dumps(
    {"type": "candidate", "candidate": {"candidate": "candidate:1 1 udp 1 198.18.0.2 4 typ host"}}
)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def joined(url: str, session: str, role: str) -> ClientConnection:
    ws = await connect(url, compression=None, max_queue=None)
    await ws.send(json.dumps({"type": "join", "session": session, "role": role}))
    reply = json.loads(await ws.recv())
    if reply["type"] != "joined":
        raise RuntimeError(f"join {session} {role} on {url}: {reply}")
    return ws


async def pair(urls: tuple[str, str], session: str) -> tuple[ClientConnection, ClientConnection]:
    patient = await joined(urls[0], session, "patient")
    practitioner = await joined(urls[1], session, "practitioner")
    assert json.loads(await patient.recv())["type"] == "peer-joined"
    return patient, practitioner


async def ping_pong(a: ClientConnection, b: ClientConnection, until: float) -> int:
    trips = 0
    while time.monotonic() < until:
        await a.send(FRAME)
        await b.send(await b.recv())
        await a.recv()
        trips += 1
    return trips


async def round_trips(
    settings: list[tuple[str, tuple[str, str]]], rounds: int
) -> dict[str, list[float]]:
    """One probe pair per setting; each round times one round trip on each, in turn.

    Interleaved, every setting's round trips see the same moments of the
    machine's load: a shared machine's load swings more between two settings
    measured one after the other than the difference being measured.
    """
    probes = [(name, await pair(urls, f"probe-{i}")) for i, (name, urls) in enumerate(settings)]
    rtts: dict[str, list[float]] = {name: [] for name, _ in settings}
    for _ in range(rounds):
        for name, (a, b) in probes:
            started = time.perf_counter()
            await a.send(FRAME)
            await b.send(await b.recv())
            await a.recv()
            rtts[name].append((time.perf_counter() - started) * 1000)
    for _, (a, b) in probes:
        await a.close()
        await b.close()
    return rtts


async def measure(
    name: str,
    urls: tuple[str, str],
    pids: list[int],
    redis_pid: int | None,
    *,
    pairs: int,
    seconds: float,
    idle: int,
) -> dict[str, float]:
    pairs_ = [await pair(urls, f"{name}-{i}") for i in range(pairs)]
    cpu0 = [cpu_s(p) for p in pids]
    redis0 = cpu_s(redis_pid) if redis_pid else 0.0
    until = time.monotonic() + seconds
    trips = sum(await asyncio.gather(*(ping_pong(a, b, until) for a, b in pairs_)))
    frames = trips * 2
    cpu = sum(cpu_s(p) for p in pids) - sum(cpu0)
    redis_cpu = (cpu_s(redis_pid) - redis0) if redis_pid else 0.0
    rss0 = sum(rss(p) for p in pids)
    idle_conns = [await joined(urls[i % 2], f"{name}-idle-{i}", "patient") for i in range(idle)]
    await asyncio.sleep(1.0)
    per_conn = (sum(rss(p) for p in pids) - rss0) / idle
    for ws in [*idle_conns, *(w for p in pairs_ for w in p)]:
        await ws.close()
    return {
        "fps": frames / seconds,
        "cpu_us": cpu / frames * 1e6,
        "redis_us": redis_cpu / frames * 1e6,
        "kib": per_conn / 1024,
    }


async def bench(pairs: int, seconds: float, idle: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="epc-bench-cluster-") as tmp:
        redis = RedisServer()
        relays: list[RelayProcess] = []
        try:
            await redis.start()
            assert redis.process is not None
            redis_pid = redis.process.proc.pid

            async def relay(node: str, shared: bool) -> RelayProcess:
                data: dict[str, object] = {
                    "relay": {"host": "127.0.0.1", "port": 0},
                    "auth": {"resume_secret": "bench-cluster-resume-secret"},
                    "limits": {"frames_per_second": 100_000, "burst": 100_000,
                               "max_connections_per_address": 100_000,
                               "max_sessions_per_address": 100_000,
                               "handshakes_per_second_per_address": 100_000},
                }  # fmt: skip
                if shared:
                    data["cluster"] = {"redis_url": redis.url, "node_id": node}
                path = Path(tmp) / f"{node}.yaml"
                path.write_text(yaml.safe_dump(data), encoding="utf-8")
                running = RelayProcess(path)
                await running.start()
                relays.append(running)
                return running

            def pid(r: RelayProcess) -> int:
                assert r.process is not None
                return r.process.proc.pid

            memory = await relay("memory", shared=False)
            one = await relay("one", shared=True)
            a, b = await relay("a", shared=True), await relay("b", shared=True)
            settings = [
                ("one relay, memory", (memory.url, memory.url), [pid(memory)], None),
                ("one relay, Redis", (one.url, one.url), [pid(one)], redis_pid),
                ("two relays, Redis, split", (a.url, b.url), [pid(a), pid(b)], redis_pid),
            ]
            print(f"{pairs} pairs ping-pong for {seconds:g} s; round trips of one probe pair "
                  f"per setting, interleaved ({rounds} rounds); "
                  f"{idle} idle joined connections")  # fmt: skip
            rtts = await round_trips([(name, urls) for name, urls, _, _ in settings], rounds)
            print(
                f"{'setting':<26} {'frames/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
                f"{'relay µs/frame':>15} {'redis µs/frame':>15} {'KiB/idle conn':>14}"
            )
            for i, (name, urls, pids, rpid) in enumerate(settings):
                got = await measure(
                    f"set{i}", urls, pids, rpid, pairs=pairs, seconds=seconds, idle=idle
                )
                p50 = statistics.median(rtts[name])
                p99 = statistics.quantiles(rtts[name], n=100)[98]
                print(f"{name:<26} {got['fps']:>9,.0f} {p50:>7.3f} {p99:>7.3f} "
                      f"{got['cpu_us']:>15.1f} {got['redis_us']:>15.1f} {got['kib']:>14.1f}",
                      flush=True)  # fmt: skip
            added = statistics.median(rtts[settings[2][0]]) - statistics.median(
                rtts[settings[0][0]]
            )
            print(f"a split frame adds {added:.3f} ms to the p50 round trip (target: at most 1 ms)")
        finally:
            for running in relays:
                await running.stop()
            await redis.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench-cluster", description=__doc__)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1000, help="round trips per setting")
    args = parser.parse_args(argv)
    asyncio.run(bench(args.pairs, args.seconds, args.idle, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
