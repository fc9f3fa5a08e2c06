"""``make bench-relay``: the relay against a bare websockets forwarder, in the same run.

Each server runs as its own process pinned to CPU 0, both on the same event
loop (``--loop``, uvloop by default as in production); the Node ``ws`` load
generator (bench/loadgen, the same frames for both) runs pinned to CPU 1.
Each run starts a fresh process of both and measures their throughput in
turns of a quarter second, alternating for 10 s (the machine's speed drifts
by up to a quarter over seconds: a drift then falls on both), each run
alternating which one goes first; five runs by default. The table gives the medians of the runs;
the throughput and CPU targets are judged on the median of the run-by-run
ratios.
Printed for both, and as a ratio relay/bare:

- ping-pong frames per second over many pairs (signaling frames: ICE
  candidates, an SDP-sized offer every tenth frame);
- one pair's round trip, p50 and p99 (nothing else running);
- CPU microseconds per relayed frame (the server's utime+stime over the
  measured run, from /proc; a server idles while the other has its turn);
- memory per idle connection with 2,000 connections open (RSS delta / 2,000);
- RSS before and after 10,000 join/leave cycles (after 2,000 for warm-up);
- once per server, user-space instructions per relayed frame, counted by
  callgrind: a figure that the machine's load does not move.

``--relay PATH`` adds a second relay.py (another commit's) to every run:
the three servers take the turns, and each relay is judged against the same
bare forwarder, so that a before/after comes from one sitting.

Figures are printed, never asserted: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from bench.tables import ratio_table

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen" / "loadgen.mjs"
RELAY = ROOT / "relay.py"
OTHER = "other"  # the name of the relay given with --relay PATH, measured beside this one
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SERVER_CPU, LOADGEN_CPU = 0, 1
CALLGRIND_PAIRS = 20  # under valgrind a server runs about 50 times slower: a lighter load

# Limits high enough that the relay's checks run but never refuse the load.
BENCH_CONFIG = """\
relay: {host: 127.0.0.1, port: 0}
limits:
  frames_per_second: 1000000
  burst: 1000000
  max_connections: 15000   # within the machine's descriptors (the relay checks at start)
  max_sessions: 100000
  join_timeout_s: 60
  max_connections_per_address: 100000   # every client of the load is 127.0.0.1
  max_sessions_per_address: 100000
  handshakes_per_second_per_address: 1000000
"""


@dataclass
class Figures:
    frames_per_s: float = 0.0
    rtt_p50_us: float = 0.0
    rtt_p99_us: float = 0.0
    cpu_us_per_frame: float = 0.0
    kib_per_idle_conn: float = 0.0
    rss_before_cycles_mib: float = 0.0
    rss_after_cycles_mib: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Server:
    name: str
    proc: asyncio.subprocess.Process
    url: str

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime

    def rss_mib(self) -> float:
        pages = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        return pages * PAGE / 2**20


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() else []


@asynccontextmanager
async def server(
    name: str, workdir: Path, loop: str, wrapper: tuple[str, ...] = (), relay_file: Path = RELAY
) -> AsyncIterator[Server]:
    """A fresh process of "bare", or of a relay ("relay", "relay-plain", OTHER) from relay_file."""
    if name != "bare":
        config = workdir / "bench.yaml"
        config.write_text(BENCH_CONFIG)
        # relay-plain: the relay without ApiBodyReader (bench/relay_plain.py).
        program = ["-m", "bench.relay_plain"] if name == "relay-plain" else [str(relay_file)]
        argv = [sys.executable, *program, "--config", str(config), "--loop", loop]
        pattern = re.compile(r"relay listening on (ws://\S+)")
        stream = "stderr"
    else:
        argv = [sys.executable, "-m", "bench.bare_forwarder", "--port", "0", "--loop", loop]
        pattern = re.compile(r"listening (\d+)")
        stream = "stdout"
    proc = await asyncio.create_subprocess_exec(
        *pinned(SERVER_CPU),
        *wrapper,
        *argv,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    reader = proc.stderr if stream == "stderr" else proc.stdout
    assert reader is not None
    url = ""
    while not url:
        line = (await asyncio.wait_for(reader.readline(), 120)).decode()
        if not line:
            raise RuntimeError(f"{name} exited before listening")
        if match := pattern.search(line):
            url = match.group(1) if name != "bare" else f"ws://127.0.0.1:{match.group(1)}/ws"
    # Both pipes read to the end, so that the server never blocks on a full one.
    assert proc.stdout is not None
    assert proc.stderr is not None
    drains = [asyncio.create_task(_drain(r)) for r in (proc.stdout, proc.stderr)]
    try:
        yield Server(name, proc, url)
    finally:
        proc.terminate()
        await proc.wait()
        for drain in drains:
            drain.cancel()


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.readline():
        pass


@asynccontextmanager
async def loadgen(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The load generator, with bench/loadgen/loadgen.mjs's arguments."""
    proc = await asyncio.create_subprocess_exec(
        *pinned(LOADGEN_CPU),
        "node",
        str(LOADGEN),
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def go(proc: asyncio.subprocess.Process) -> None:
    """Let the load generator go on from where it waits for a line."""
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()


async def line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), 120)
    if not raw:
        raise RuntimeError(f"load generator exited ({await proc.wait()})")
    data = json.loads(raw)
    assert isinstance(data, dict)
    return data


async def throughput(
    servers: dict[str, Server], figures: dict[str, Figures], args: argparse.Namespace
) -> None:
    """Ping-pong frames per second over many pairs, and CPU per frame, for all servers at once.

    The load generator gives the servers turns of ``--slice-ms``: only one has
    traffic at a time, and each turn ends once its frames in flight have
    arrived. Drifts of the machine's speed, which last seconds, fall on both
    servers alike.
    """
    targets = [f"{mode(name)}:{srv.url}" for name, srv in servers.items()]
    async with loadgen(
        "throughput", str(args.pairs), str(args.seconds), str(args.slice_ms), *targets
    ) as gen:
        assert (await line(gen))["mark"] == "warm"
        cpu0 = {name: srv.cpu_seconds() for name, srv in servers.items()}
        await go(gen)
        end = await line(gen)
        cpu = {name: srv.cpu_seconds() - cpu0[name] for name, srv in servers.items()}
    for (name, counted), target in zip(figures.items(), end["targets"], strict=True):
        frames = max(int(target["frames"]), 1)
        counted.frames_per_s = frames / target["seconds"]
        counted.cpu_us_per_frame = cpu[name] * 1e6 / frames


def mode(name: str) -> str:
    """The load generator's mode for a server: "bare", or "relay" (each pair joins a session)."""
    return "bare" if name == "bare" else "relay"


def relay_file(name: str, args: argparse.Namespace) -> Path:
    """The relay.py that a server named ``name`` runs (--relay's for OTHER)."""
    return Path(os.path.abspath(args.relay)) if name == OTHER else RELAY


async def latency_and_memory(srv: Server, figures: Figures, args: argparse.Namespace) -> None:
    # Round trip of one pair.
    async with loadgen(mode(srv.name), "rtt", srv.url, str(args.rtts)) as gen:
        samples = sorted((await line(gen))["rtt_us"])
    figures.rtt_p50_us = statistics.median(samples)
    figures.rtt_p99_us = samples[int(len(samples) * 0.99) - 1]
    # Memory per idle connection.
    await asyncio.sleep(0.5)
    rss0 = srv.rss_mib()
    async with loadgen(mode(srv.name), "idle", srv.url, str(args.idle)) as gen:
        opened = await line(gen)
        await asyncio.sleep(1)
        rss1 = srv.rss_mib()
        await go(gen)  # close them
    figures.kib_per_idle_conn = (rss1 - rss0) * 1024 / opened["connections"]
    # Join/leave cycles.
    async with loadgen(mode(srv.name), "cycles", srv.url, str(args.cycles)) as gen:
        assert (await line(gen))["mark"] == "warm"
        figures.rss_before_cycles_mib = srv.rss_mib()
        assert (await line(gen))["mark"] == "done"
    await asyncio.sleep(1)
    figures.rss_after_cycles_mib = srv.rss_mib()


async def measure(order: tuple[str, ...], args: argparse.Namespace) -> dict[str, Figures]:
    """One run: a fresh process of each server, their throughput measured in turns."""
    figures = {name: Figures() for name in order}
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            servers = {
                name: await stack.enter_async_context(
                    server(name, Path(tmp), args.loop, relay_file=relay_file(name, args))
                )
                for name in order
            }
            await throughput(servers, figures, args)
            for name in order:
                await latency_and_memory(servers[name], figures[name], args)
    return figures


async def instructions_per_frame(name: str, args: argparse.Namespace) -> float:
    """User-space instructions per relayed frame, counted by callgrind.

    Unlike CPU time, an instruction count does not move with the machine's
    load. The server runs under valgrind (about 50 times slower), so a lighter
    load (``CALLGRIND_PAIRS`` pairs) is counted, with the count turned on
    before the load generator is let go and off after its end mark.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        wrapper = (
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        )
        async with server(
            name, Path(tmp), args.loop, wrapper, relay_file=relay_file(name, args)
        ) as srv:
            pid = str(srv.proc.pid)
            seconds = args.seconds / 2  # one turn, as long as the server's in a run
            async with loadgen(
                "throughput",
                str(CALLGRIND_PAIRS),
                str(seconds),
                str(seconds * 1000),
                f"{mode(name)}:{srv.url}",
            ) as gen:
                assert (await line(gen))["mark"] == "warm"
                await _callgrind_control("-i", "on", pid)
                await go(gen)
                end = await line(gen)
                await _callgrind_control("-i", "off", pid)
            await _callgrind_control("-d", pid)
        counted = _callgrind_totals(Path(tmp))
    return counted / max(int(end["targets"][0]["frames"]), 1)


def _callgrind_totals(folder: Path) -> int:
    """Instructions in every dump callgrind wrote into ``folder``."""
    return sum(
        int(row.split()[1])
        for dump in folder.glob("callgrind.out*")
        for row in dump.read_text().splitlines()
        if row.startswith("totals:")
    )


async def _callgrind_control(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control",
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {' '.join(argv)} failed")


async def handshakes(srv: Server, count: int) -> tuple[float, float]:
    """``count`` opening handshakes (then a close), 50 at a time: per second, and CPU µs each."""
    gate = asyncio.Semaphore(50)

    async def one() -> None:
        async with gate:
            ws = await connect(srv.url, compression=None, ping_interval=None, open_timeout=60)
            await ws.close()

    await asyncio.gather(*(one() for _ in range(200)))  # warm-up
    cpu, started = srv.cpu_seconds(), time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    took, used = time.monotonic() - started, srv.cpu_seconds() - cpu
    return count / took, used * 1e6 / count


async def handshake_cost(args: argparse.Namespace) -> None:
    """What ApiBodyReader (on every connection) costs a handshake: relay vs relay-plain.

    Both servers run at once, pinned to CPU 0, and take turns of
    ``--handshakes`` handshakes from a client in this process (pinned to
    CPU 1), ``--repeat`` turns each, alternating which goes first.
    """
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > LOADGEN_CPU:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    figures: dict[str, list[tuple[float, float]]] = {"relay": [], "relay-plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            servers = {
                name: await stack.enter_async_context(server(name, Path(tmp), args.loop))
                for name in figures
            }
            for n in range(args.repeat):
                order = list(figures) if n % 2 == 0 else list(reversed(figures))
                for name in order:
                    figures[name].append(await handshakes(servers[name], args.handshakes))
    rate = {name: statistics.median(r for r, _ in runs) for name, runs in figures.items()}
    cost = {name: statistics.median(c for _, c in runs) for name, runs in figures.items()}
    paired = [
        (w[1] / p[1], w[0] / p[0])
        for w, p in zip(figures["relay"], figures["relay-plain"], strict=True)
    ]
    print(
        f"opening handshakes ({args.handshakes:,} a turn, {args.repeat} turns, 50 at a time): "
        f"with ApiBodyReader {rate['relay']:,.0f}/s, {cost['relay']:,.0f} CPU µs each; "
        f"without {rate['relay-plain']:,.0f}/s, {cost['relay-plain']:,.0f} µs"
    )
    print(
        "  with/without, turn by turn (CPU per handshake, rate): "
        + ", ".join(f"{c:.3f}x {r:.2f}x" for c, r in paired)
        + f"; medians {statistics.median(c for c, _ in paired):.3f}x and "
        f"{statistics.median(r for _, r in paired):.2f}x"
    )


def median_of(runs: list[Figures]) -> Figures:
    """The median of each figure over the runs."""
    return Figures(
        **{
            name: statistics.median(getattr(run, name) for run in runs)
            for name in Figures.__dataclass_fields__
            if name != "notes"
        }
    )


def table(relay: Figures, bare: Figures, label: str = "relay") -> str:
    rows = [
        ("ping-pong frames/s (higher is better)", "frames_per_s", "{:,.0f}"),
        ("round trip p50 (µs)", "rtt_p50_us", "{:,.0f}"),
        ("round trip p99 (µs)", "rtt_p99_us", "{:,.0f}"),
        ("CPU µs per relayed frame", "cpu_us_per_frame", "{:.1f}"),
        ("KiB per idle connection (2,000 open)", "kib_per_idle_conn", "{:.1f}"),
        ("RSS before 10k join/leave (MiB)", "rss_before_cycles_mib", "{:.1f}"),
        ("RSS after 10k join/leave (MiB)", "rss_after_cycles_mib", "{:.1f}"),
    ]
    return ratio_table(
        ("figure", label, "bare", f"{label}/bare"),
        ((label, fmt, getattr(relay, attr), getattr(bare, attr)) for label, attr, fmt in rows),
        (40, 10, 10, 10),
    )


def verdict(relay: Figures, rate_ratio: float, cost_ratio: float) -> str:
    """The targets: throughput and CPU on the paired ratios, memory on the relay's medians."""
    growth = relay.rss_after_cycles_mib - relay.rss_before_cycles_mib
    checks = [
        (f"throughput >= 0.8x bare ({rate_ratio:.2f}x)", rate_ratio >= 0.8),
        (f"CPU/frame <= 1.25x bare ({cost_ratio:.2f}x)", cost_ratio <= 1.25),
        ("< 40 KiB per idle connection", relay.kib_per_idle_conn < 40),
        (f"no growth after cycles ({growth:+.1f} MiB)", growth < 1.0),
    ]
    return "\n".join(f"  {'met ' if ok else 'MISSED'}  {label}" for label, ok in checks)


async def main(args: argparse.Namespace) -> int:
    if args.handshakes_only:
        await handshake_cost(args)
        return 0
    if shutil.which("node") is None or not (LOADGEN.parent / "node_modules" / "ws").exists():
        print(
            "bench-relay: run `make bench-deps` (node and `npm ci` in bench/loadgen)",
            file=sys.stderr,
        )
        return 2
    print(
        f"{os.cpu_count()} CPUs; servers on CPU {SERVER_CPU} ({args.loop} event loop), "
        f"load generator on CPU {LOADGEN_CPU}; "
        f"{args.pairs} pairs for {args.seconds:g} s in turns of {args.slice_ms} ms; "
        f"{args.rtts} round trips; "
        f"{args.idle} idle connections; {args.cycles} join/leave cycles"
    )
    names = ("bare", "relay", OTHER) if args.relay else ("bare", "relay")
    if args.relay:
        print(f"{OTHER}: the relay of {relay_file(OTHER, args)}, measured beside {RELAY}")
    runs: dict[str, list[Figures]] = {name: [] for name in names}
    for n in range(args.repeat):
        order = names[n % len(names) :] + names[: n % len(names)]  # none always first
        measured = await measure(order, args)
        for name in names:
            figures = measured[name]
            runs[name].append(figures)
            print(
                f"  run {n + 1}: {name:5} {figures.frames_per_s:9,.0f} frames/s "
                f"{figures.cpu_us_per_frame:5.1f} µs/frame",
                flush=True,
            )
    results = {name: median_of(figures) for name, figures in runs.items()}
    print(f"medians of {args.repeat} runs:")
    for name in names[1:]:
        print(table(results[name], results["bare"], name))
    print("spread of the runs (lowest to highest):")
    for name, samples in runs.items():
        rates = sorted(run.frames_per_s for run in samples)
        costs = sorted(run.cpu_us_per_frame for run in samples)
        print(
            f"  {name:5} {rates[0]:,.0f} to {rates[-1]:,.0f} frames/s, "
            f"{costs[0]:.1f} to {costs[-1]:.1f} µs/frame"
        )
    # Within a run the servers took turns, so their ratio cancels the
    # machine's drift; the targets are judged on the median of these ratios.
    ratios: dict[str, tuple[float, float]] = {}
    for name in names[1:]:
        paired = [
            (one.frames_per_s / bare.frames_per_s, one.cpu_us_per_frame / bare.cpu_us_per_frame)
            for one, bare in zip(runs[name], runs["bare"], strict=True)
        ]
        ratios[name] = (
            statistics.median(rate for rate, _ in paired),
            statistics.median(cost for _, cost in paired),
        )
        print(
            f"{name}/bare run by run (frames/s, CPU per frame): "
            + ", ".join(f"{rate:.2f}x {cost:.2f}x" for rate, cost in paired)
            + f"; medians {ratios[name][0]:.2f}x and {ratios[name][1]:.2f}x"
        )
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        counts = {name: await instructions_per_frame(name, args) for name in names}
        print(
            f"user-space instructions per relayed frame (callgrind, {CALLGRIND_PAIRS} pairs): "
            + ", ".join(
                f"{name} {counts[name]:,.0f} ({counts[name] / counts['bare']:.2f}x)"
                for name in names[1:]
            )
            + f", bare {counts['bare']:,.0f}"
        )
    else:
        print("instructions per frame: not counted (no valgrind; `apt-get install valgrind`)")
    if not args.no_handshakes:
        await handshake_cost(args)
    for name in names[1:]:
        print(f"targets ({name}):")
        print(verdict(results[name], *ratios[name]))
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Relay vs bare websockets forwarder.")
    parser.add_argument("--pairs", type=int, default=100, help="pairs for the throughput run")
    parser.add_argument(
        "--seconds", type=float, default=10, help="length of a throughput run, both servers' turns"
    )
    parser.add_argument(
        "--slice-ms", type=int, default=250, help="length of one server's turn in a throughput run"
    )
    parser.add_argument("--rtts", type=int, default=2000, help="round trips measured for one pair")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections opened")
    parser.add_argument("--cycles", type=int, default=10000, help="join/leave cycles")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each server, interleaved")
    parser.add_argument(
        "--handshakes", type=int, default=2000, help="opening handshakes in one turn"
    )
    parser.add_argument(
        "--handshakes-only",
        action="store_true",
        help="only the handshake figure (relay with and without ApiBodyReader; no node needed)",
    )
    parser.add_argument(
        "--relay",
        metavar="PATH",
        help=f"a second relay.py (another commit's, say) measured in the same runs as {OTHER!r}",
    )
    parser.add_argument(
        "--no-handshakes", action="store_true", help="skip the handshake figure at the end"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of both servers (default uvloop, the relay's default)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
