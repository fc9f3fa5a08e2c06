"""``make cluster``: redis-server, two relays and HAProxy on 127.0.0.1, until Ctrl-C.

(In bench/ with ``make demo``: a try-out that starts real processes with the
helpers of tests/processes.py.) The relays share seats through the Redis
(README, "Scaling out"); HAProxy spreads clients over them in turn, sends no
one to a relay whose ``/health`` is not 200, and passes WebSockets through.
Prints the URL to open; Ctrl-C (or SIGTERM) stops every process by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.processes import Process, RedisServer, RelayProcess, spawn

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
NODES = ("relay-a", "relay-b")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Cluster:
    """The running parts; ``url`` is the page to open (through HAProxy)."""

    redis: RedisServer
    relays: list[RelayProcess]
    haproxy: Process | None = None
    port: int = 0
    workdir: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def haproxy_config(port: int, relays: Sequence[RelayProcess]) -> str:
    """deploy/haproxy.cfg with this try-out's ports in it."""
    text = HAPROXY_CFG.read_text(encoding="utf-8").replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    servers = "".join(
        f"    server {name} 127.0.0.1:{relay.port} check\n"
        for name, relay in zip(NODES, relays, strict=True)
    )
    head, _, _ = text.partition("    server relay-a")
    return head + servers


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            status: int = reply.status
            return status
    except OSError:
        return 0


async def wait_healthy(url: str, limit: float = 15.0) -> None:
    """Wait until ``url`` answers 200 (HAProxy up, a relay behind it healthy)."""
    started = time.monotonic()
    while await asyncio.to_thread(_health, url) != 200:
        if time.monotonic() - started > limit:
            raise RuntimeError(f"{url} did not answer 200 within {limit:g} s")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running_cluster(port: int = 0, **relay_args: str) -> AsyncIterator[Cluster]:
    """Everything started, stopped by PID at the end (in reverse order)."""
    with tempfile.TemporaryDirectory(prefix="epc-cluster-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster(RedisServer(), [], port=port or free_port(), workdir=workdir)
        resume_secret = secrets.token_urlsafe(32)
        try:
            await cluster.redis.start()
            for node in NODES:
                config = workdir / f"{node}.yaml"
                data = {
                    "relay": {"host": "127.0.0.1", "port": 0},
                    "auth": {"resume_secret": resume_secret},
                    "cluster": {"redis_url": cluster.redis.url, "node_id": node},
                }
                config.write_text(yaml.safe_dump(data), encoding="utf-8")
                relay = RelayProcess(config, args=tuple(relay_args.get(node, "").split()))
                cluster.relays.append(relay)
                await relay.start()
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(haproxy_config(cluster.port, cluster.relays), encoding="utf-8")
            cluster.haproxy = await spawn("haproxy", ["haproxy", "-db", "-f", str(cfg)])
            await wait_healthy(f"http://127.0.0.1:{cluster.port}/health")
            yield cluster
        finally:
            if cluster.haproxy is not None:
                await cluster.haproxy.stop(grace=5.0)
            for relay in cluster.relays:
                await relay.stop()
            await cluster.redis.stop()


async def run(port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_cluster(port) as cluster:
        relays = ", ".join(f"{n} on {r.url}" for n, r in zip(NODES, cluster.relays, strict=True))
        print(f"redis-server on {cluster.redis.url}; {relays}")
        print(f"open {cluster.url} (HAProxy, round robin; relay URL {cluster.ws_url})")
        print("Ctrl-C stops everything", flush=True)
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make cluster", description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="HAProxy's port (default 8080)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.port))
    except RuntimeError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
