"""``make bench-storm``: a relay restart makes every client reconnect and resume at once.

10,000 WebSocket clients (5,000 sessions, both seats) join a relay (its own
process, uvloop), then the relay is stopped with SIGTERM (every client gets
1001) and started again on the same port with the same configuration (the
resume secret comes from ``auth.resume_secret``). As soon as the new relay
listens, every client reconnects and joins with its resume key, all at once;
a failed try is retried with the peers' jittered backoff.

Printed: how many clients resumed their seat (``resumed: true``), how many
failed at the first try and in the end, and why, the time from "listening"
to each client's ``joined`` (p50, p99, max), and the kernel's listen-queue
overflows during the storm
(``TcpExt: ListenOverflows`` from /proc/net/netstat: each one is a SYN
dropped and retransmitted a second later). The clients run in this process
(uvloop); on 2 shared cores they, not the relay, may be the bottleneck.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
relay: {{host: 127.0.0.1, port: {port}, backlog: {backlog}}}
auth: {{resume_secret: bench-storm-resume-secret}}
limits:
  max_connections: {max_connections}
  max_sessions: {max_sessions}
  join_timeout_s: 120
  ping_interval_s: 120
  ping_timeout_s: 120
  max_connections_per_address: 1000000   # every client is 127.0.0.1
  max_sessions_per_address: 1000000
  handshakes_per_second_per_address: 1000000
"""


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def listen_overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            fields = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return 0


async def start_relay(config: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "relay.py"),
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while line := (await asyncio.wait_for(proc.stderr.readline(), 30)).decode():
        if "relay listening" in line:
            asyncio.get_running_loop().create_task(drain(proc))
            return proc
        if "WARNING" in line:
            print("  relay:", line.strip().split(": ", 1)[-1])
    raise RuntimeError("the relay exited before listening")


async def drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    while line := (await proc.stderr.readline()).decode():
        if " WARNING " in line or " ERROR " in line or "stopped" in line:
            print("  relay:", line.strip())


class Seat:
    def __init__(self, session: str, role: str) -> None:
        self.session, self.role = session, role
        self.key: str | None = None
        self.ws: ClientConnection | None = None

    async def join(self, url: str) -> dict[str, Any]:
        self.ws = await connect(url, compression=None, ping_interval=None, open_timeout=120)
        frame: dict[str, Any] = {"type": "join", "session": self.session, "role": self.role}
        if self.key:
            frame["resume"] = self.key
        await self.ws.send(json.dumps(frame))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 120))
            if reply["type"] in ("joined", "error"):
                break
        if reply["type"] == "joined":
            self.key = reply["resume"]
        return dict(reply)


async def open_all(seats: list[Seat], url: str, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(seat: Seat) -> None:
        async with gate:
            reply = await seat.join(url)
            assert reply["type"] == "joined", reply

    await asyncio.gather(*(one(seat) for seat in seats))


async def storm(seats: list[Seat], url: str, listening: float, tries: int) -> None:
    """Every seat rejoins at once; a failed try is retried as the peers do (jittered backoff)."""
    times: list[float] = []
    first_failures: dict[str, int] = {}
    failures: dict[str, int] = {}
    retried = resumed = 0

    async def one(seat: Seat) -> None:
        nonlocal resumed, retried
        for attempt in range(tries):
            try:
                reply = await seat.join(url)
            except InvalidStatus as exc:
                reason = f"HTTP {exc.response.status_code}"
            except InvalidHandshake as exc:
                reason = f"handshake: {exc}"
            except ConnectionClosed as exc:
                reason = f"closed ({exc})"
            except (OSError, TimeoutError) as exc:
                reason = type(exc).__name__
            else:
                if reply["type"] == "joined":
                    times.append(time.monotonic() - listening)
                    resumed += reply["resumed"] is True
                    return
                reason = str(reply["code"])
            if attempt == 0:
                first_failures[reason] = first_failures.get(reason, 0) + 1
                retried += 1
            if seat.ws is not None:
                await seat.ws.close()
            # peers/signaling.py's backoff: 0.25 s doubling, capped at 5 s, jittered.
            await asyncio.sleep(min(5.0, 0.25 * 2 ** min(attempt + 1, 6)) * random.uniform(0.5, 1))
        failures[reason] = failures.get(reason, 0) + 1

    await asyncio.gather(*(one(seat) for seat in seats))
    times.sort()
    print(f"  rejoined {len(times):,} of {len(seats):,}; resumed (verified key) {resumed:,}")
    print(f"  failed at the first try: {retried:,} {first_failures or ''}")
    print(f"  failed after {tries} tries: {sum(failures.values())} {failures or ''}")
    if times:
        p50 = statistics.median(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(
            f"  time from 'listening' to joined: p50 {p50 * 1000:,.0f} ms, "
            f"p99 {p99 * 1000:,.0f} ms, max {times[-1] * 1000:,.0f} ms"
        )


async def main(args: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.clients + 256:
        print(f"needs {args.clients + 256} file descriptors; the hard limit is {hard}")
        return 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(
        f"{args.clients:,} clients ({args.clients // 2:,} sessions), relay.backlog "
        f"{args.backlog} (net.core.somaxconn {somaxconn()})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "storm.yaml"
        config.write_text(
            CONFIG.format(
                port=port,
                backlog=args.backlog,
                max_connections=args.clients + 100,
                max_sessions=args.clients // 2 + 100,
            )
        )
        url = f"ws://127.0.0.1:{port}/ws"
        relay = await start_relay(config)
        seats = [
            Seat(f"storm-{n // 2}", ("patient", "practitioner")[n % 2]) for n in range(args.clients)
        ]
        try:
            started = time.monotonic()
            await open_all(seats, url, concurrency=200)
            print(f"  joined {len(seats):,} clients in {time.monotonic() - started:.1f} s")
            relay.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            await relay.wait()
            print(f"  relay stopped (SIGTERM) in {time.monotonic() - stopped:.1f} s")
            closes = [s.ws.wait_closed() for s in seats if s.ws is not None]
            await asyncio.gather(*closes)
            overflows = listen_overflows()
            relay = await start_relay(config)
            listening = time.monotonic()
            await storm(seats, url, listening, args.tries)
            print(f"  listen-queue overflows during the storm: {listen_overflows() - overflows}")
        finally:
            if relay.returncode is None:
                relay.send_signal(signal.SIGTERM)
                await relay.wait()
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Reconnect storm after a relay restart.")
    parser.add_argument("--clients", type=int, default=10_000, help="clients (two per session)")
    parser.add_argument("--backlog", type=int, default=4096, help="relay.backlog")
    parser.add_argument("--tries", type=int, default=10, help="tries per client to rejoin")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(uvloop.run(main(parse_args())))
