"""``make bench-storm``: a relay restart makes every client reconnect and resume at once.

10,000 WebSocket clients (5,000 sessions, both seats) join a relay (its own
process, uvloop), then the relay is stopped with SIGTERM (every client gets
1001) and started again on the same port with the same configuration (the
resume secret comes from ``auth.resume_secret``). As soon as it listens,
every client reconnects and joins with its resume key. Two storms in the same
run, the same clients:

- before: no cap on handshakes in progress (``limits.max_handshakes`` out of
  reach) and every client's first try at once, a failed try retried with a
  jittered backoff (0.25 s doubling to 5 s): the relay and the clients before
  issue 14's point 11 was finished;
- after: the relay's default ``limits.max_handshakes`` (the excess answered
  503 with Retry-After) and the peers' own ``peers.errors.Backoff``: the
  first try anywhere in ``RESTART_SPREAD_S`` after the 1001, a 503 waited for
  as it asks.

Printed for each: how many clients resumed their seat (``resumed: true``),
how many failed at the first try and in the end, and why, the time from
"listening" to each client's ``joined`` (p50, p99, max), the kernel's
listen-queue overflows during the storm (``TcpExt: ListenOverflows`` from
/proc/net/netstat), and how long the relay took to exit after SIGTERM with
every client connected (``limits.shutdown_timeout_s`` is 10); then the
ratios after/before. The clients run in this process (uvloop); on 2 shared
cores they, not the relay, may be the bottleneck. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import resource
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from peers.errors import Backoff, restart_delay
from relay import Limits

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
relay: {{host: 127.0.0.1, port: {port}, backlog: {backlog}}}
auth: {{resume_secret: bench-storm-resume-secret}}
limits:
  max_handshakes: {max_handshakes}
  reconnect_rate: {reconnect_rate}
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
            for attempt in range(10):  # on a busy machine a first handshake may time out
                try:
                    reply = await seat.join(url)
                except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
                    await asyncio.sleep(0.5 * 2 ** min(attempt, 3))
                    continue
                assert reply["type"] == "joined", reply
                return
            raise RuntimeError(f"{seat.session} {seat.role}: could not join in 10 tries")

    await asyncio.gather(*(one(seat) for seat in seats))


@dataclass
class Outcome:
    times: list[float] = field(default_factory=list)
    resumed: int = 0
    first_failures: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def first_try_failed(self, *, busy: bool) -> int:
        """First tries that failed: those answered 503 (busy) or the others."""
        return sum(n for why, n in self.first_failures.items() if (why == BUSY) == busy)

    def p99(self) -> float:
        return self.times[min(len(self.times) - 1, int(len(self.times) * 0.99))]


BUSY = "HTTP 503"


@dataclass
class Restart:
    """The relay being restarted: ``up`` is set, and ``listening`` known, once it listens."""

    up: asyncio.Event = field(default_factory=asyncio.Event)
    listening: float = 0.0
    failed: bool = False  # the relay did not start again: the clients give up


async def storm(
    seats: list[Seat], url: str, restart: Restart, tries: int, policy: str, *, at_listening: bool
) -> Outcome:
    """Every seat rejoins; ``policy`` "before" (all at once) or "after" (the peers' Backoff).

    Each client starts at its own close, as a real one does: the relay is
    still stopping then, and a try before the new one listens is refused by
    the kernel and backed off as any other failure. With ``at_listening``,
    as in the previous sessions' runs, every client starts when the new
    relay listens instead (a restart without downtime). Counted from
    "listening": the ``tries`` and the first try (the first that started
    once it listened).
    """
    out = Outcome()

    async def one(seat: Seat) -> None:
        backoff = Backoff(0.5, 5.0)
        assert seat.ws is not None
        await seat.ws.wait_closed()
        if at_listening:  # the previous sessions' storm: every clock starts at "listening"
            await restart.up.wait()
        if policy == "after":  # the 1001 came: the first try when the relay said
            await asyncio.sleep(backoff.after_restart(restart_delay(seat.ws.close_reason or "")))
        attempt = -1
        while attempt < tries - 1 and not restart.failed:
            retry_after: int | None = None
            if restart.up.is_set():
                attempt += 1
            try:
                reply = await seat.join(url)
            except InvalidStatus as exc:
                reason = f"HTTP {exc.response.status_code}"
                header = exc.response.headers.get("Retry-After", "")
                retry_after = int(header) if header.isdigit() else None
            except InvalidHandshake as exc:
                reason = f"handshake: {exc}"
            except ConnectionClosed as exc:
                reason = f"closed ({exc})"
            except (OSError, TimeoutError) as exc:
                reason = type(exc).__name__
            else:
                if reply["type"] == "joined":  # timed from "listening" below
                    out.times.append(time.monotonic())
                    out.resumed += reply["resumed"] is True
                    return
                reason = str(reply["code"])
            if attempt == 0:
                out.first_failures[reason] = out.first_failures.get(reason, 0) + 1
            if seat.ws is not None:
                await seat.ws.close()
            if policy == "after":
                delay = next(backoff) if retry_after is None else backoff.busy(retry_after)
            else:  # 0.25 s doubling, capped at 5 s, jittered
                tried = backoff.attempt
                backoff.attempt += 1
                delay = min(5.0, 0.25 * 2 ** min(tried + 1, 6)) * random.uniform(0.5, 1)
            await asyncio.sleep(delay)
        out.failures[reason] = out.failures.get(reason, 0) + 1

    await asyncio.gather(*(one(seat) for seat in seats))
    # The relay accepts a moment before this process reads its "listening" line:
    # a client back in that moment counts 0.
    out.times = sorted(max(0.0, t - restart.listening) for t in out.times)
    print(
        f"  rejoined {len(out.times):,} of {len(seats):,}; resumed (verified key) {out.resumed:,}"
    )
    print(
        f"  failed at the first try: {sum(out.first_failures.values()):,} "
        f"{out.first_failures or ''}"
    )
    print(f"  failed after {tries} tries: {sum(out.failures.values())} {out.failures or ''}")
    if out.times:
        p50 = statistics.median(out.times)
        print(
            f"  time from 'listening' to joined: p50 {p50 * 1000:,.0f} ms, "
            f"p99 {out.p99() * 1000:,.0f} ms, max {out.times[-1] * 1000:,.0f} ms"
        )
    return out


def watch_exit(pid: int, gone: concurrent.futures.Future[float]) -> None:
    """Set ``gone`` when process ``pid`` is a zombie or gone (polled every 10 ms, off the loop)."""
    stat = Path(f"/proc/{pid}/stat")
    while True:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            state = "gone"
        if state in ("Z", "X", "gone"):
            gone.set_result(time.monotonic())
            return
        time.sleep(0.01)


async def stop(relay: asyncio.subprocess.Process, seats: list[Seat]) -> float:
    """SIGTERM with every client connected; the seconds until the process is gone."""
    gone = concurrent.futures.Future[float]()
    watcher = threading.Thread(target=watch_exit, args=(relay.pid, gone), daemon=True)
    watcher.start()
    stopped = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    await relay.wait()
    # The bench's own loop (10,000 clients) notices the exit late: a thread watches it.
    took = gone.result(timeout=5) - stopped
    print(f"  relay exited {took:.1f} s after SIGTERM ({len(seats):,} connections)")
    return took


async def restart_relay(
    relay: asyncio.subprocess.Process, seats: list[Seat], config: Path, restart: Restart
) -> tuple[asyncio.subprocess.Process, float]:
    """Stop the relay, start it again with ``config``: the new process and the old one's exit."""
    took = await stop(relay, seats)
    try:
        relay = await start_relay(config)
    except BaseException:
        restart.failed = True
        raise
    restart.listening = time.monotonic()
    restart.up.set()
    return relay, took


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


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
        f"{args.backlog} (net.core.somaxconn {somaxconn()}); clients start "
        + ("when the new relay listens" if args.at_listening else "at their close")
    )
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for policy, cap in (("before", 1_000_000), ("after", args.max_handshakes)):
            configs[policy] = Path(tmp) / f"{policy}.yaml"
            configs[policy].write_text(
                CONFIG.format(
                    port=port,
                    backlog=args.backlog,
                    max_handshakes=cap,
                    reconnect_rate=args.reconnect_rate,
                    max_connections=args.clients + 100,
                    max_sessions=args.clients // 2 + 100,
                )
            )
        url = f"ws://127.0.0.1:{port}/ws"
        relay = await start_relay(configs["before"])
        seats = [
            Seat(f"storm-{n // 2}", ("patient", "practitioner")[n % 2]) for n in range(args.clients)
        ]
        outcomes: dict[str, Outcome] = {}
        exits: list[float] = []
        try:
            started = time.monotonic()
            await open_all(seats, url, concurrency=200)
            took = time.monotonic() - started
            print(
                f"  joined {len(seats):,} clients in {took:.1f} s ({len(seats) / took:,.0f} a "
                f"second, 200 at a time); told to come back over "
                f"{len(seats) / args.reconnect_rate:.1f} s (limits.reconnect_rate "
                f"{args.reconnect_rate:g})"
            )
            for policy in ("before", "after"):
                print(f"storm {policy} (load average {load()}):")
                overflows = listen_overflows()
                restart = Restart()
                restarting = asyncio.ensure_future(
                    restart_relay(relay, seats, configs[policy], restart)
                )
                try:
                    outcomes[policy] = await storm(
                        seats, url, restart, args.tries, policy, at_listening=args.at_listening
                    )
                finally:
                    relay, took = await restarting
                exits.append(took)
                print(
                    f"  listen-queue overflows during the storm: {listen_overflows() - overflows}"
                )
            exits.append(await stop(relay, seats))
        finally:
            if relay.returncode is None:
                relay.send_signal(signal.SIGTERM)
                await relay.wait()
    before, after = outcomes["before"], outcomes["after"]
    failed = (before.first_try_failed(busy=False), after.first_try_failed(busy=False))
    print(
        f"after/before: first tries failed other than by a 503 {failed[1]:,}/{failed[0]:,} "
        f"({failed[1] / max(failed[0], 1):.2f}x; after: {after.first_try_failed(busy=True):,} "
        f"answered 503 and retried), p99 to joined {after.p99():.1f}/{before.p99():.1f} s "
        f"({after.p99() / before.p99():.2f}x)"
    )
    shown = ", ".join(f"{t:.1f} s" for t in exits)
    print(f"relay exit after SIGTERM with every client connected: {shown}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Reconnect storm after a relay restart.")
    parser.add_argument("--clients", type=int, default=10_000, help="clients (two per session)")
    parser.add_argument("--backlog", type=int, default=4096, help="relay.backlog")
    parser.add_argument("--tries", type=int, default=10, help="tries per client to rejoin")
    parser.add_argument(
        "--reconnect-rate",
        type=float,
        default=Limits.reconnect_rate,
        help="limits.reconnect_rate of both storms (default: the relay's)",
    )
    parser.add_argument(
        "--at-listening",
        action="store_true",
        help="every client starts when the new relay listens (the previous sessions' storm), "
        "not at its close",
    )
    parser.add_argument(
        "--max-handshakes", type=int, default=500, help="limits.max_handshakes of the after storm"
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(uvloop.run(main(parse_args())))
