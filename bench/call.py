"""``make bench-call``: a call through the relay and the peers' command lines, against the floor.

The floor: two ``peers.call.Call`` objects in one process handing each other
their descriptions directly (tests/inprocess.py: VP8, the same stamped 640x480
pattern and tone). The
real thing: relay.py, ``python -m peers.practitioner`` then ``python -m
peers.patient``, with ``--stats-json``. Both inside a private network namespace
(as root), interleaved over several runs. Printed: time from both seats taken
to ICE connected and to the first decoded frame, frames per second,
glass-to-glass latency p50/p95 from the stamps, and CPU per peer; the ratios to
the floor. Then how many simultaneous 640x480 calls the machine holds at 25
fps or more. Figures are printed, never asserted: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from bench.tables import ratio_table
from peers.netns import Netns, Network, netns_missing
from tests.inprocess import LocalPair
from tests.processes import Process, peer_argv, spawn, start_relay

TICKS = os.sysconf("SC_CLK_TCK")
WIDTH, HEIGHT, FPS = 640, 480, 30


@dataclass
class Run:
    ice_ms: float
    first_frame_ms: float
    fps: float
    p50_ms: float
    p95_ms: float
    cpu_pct: float  # per peer, of one core


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def floor(lan: Netns, seconds: float) -> Run:
    """Two bare Calls in this process (tests/inprocess.py), their signaling in memory."""
    connected: dict[str, float] = {}
    pair = LocalPair(namespaces=(lan, lan), width=WIDTH, height=HEIGHT, fps=FPS)
    for call in pair.calls:

        def on_state(state: str, name: str = call.name) -> None:
            if state == "connected":
                connected.setdefault(name, time.monotonic())

        call.on_state = on_state
    async with contextlib.aclosing(pair):
        cpu0 = time.process_time()
        start = time.monotonic()
        await pair.connect()
        await asyncio.wait_for(pair.flowing(audio=0), 20)
        await asyncio.sleep(seconds)  # the length of the measured call
        cpu = time.process_time() - cpu0
        elapsed = time.monotonic() - start
        got = [call.receiver.received for call in pair.calls]
        latencies = sorted(ms for g in got for ms in g.latencies_ms)
        return Run(
            ice_ms=statistics.mean(connected[n] - start for n in connected) * 1000,
            first_frame_ms=statistics.mean((g.first_video or start) - start for g in got) * 1000,
            fps=statistics.mean(
                g.video_frames / (time.monotonic() - (g.first_video or start)) for g in got
            ),
            p50_ms=statistics.median(latencies),
            p95_ms=latencies[int(len(latencies) * 0.95)],
            cpu_pct=cpu / elapsed / 2 * 100,
        )


def log_time(line: str) -> float:
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def watch_cpu(processes: list[Process], totals: dict[int, float]) -> None:
    while True:
        for p in processes:
            with contextlib.suppress(OSError, IndexError):  # it has exited
                totals[p.proc.pid] = cpu_seconds(p.proc.pid)
        await asyncio.sleep(0.2)


async def through_relay(lan: Netns, tmp: Path, seconds: float, calls: int = 1) -> list[Run]:
    """``calls`` simultaneous calls through one relay, with the real command lines."""
    config = tmp / "config.yaml"
    config.write_text(
        yaml.safe_dump({"media": {"video": {"width": WIDTH, "height": HEIGHT, "fps": FPS}}})
    )
    relay, url = await start_relay(config, lan)
    processes: dict[str, Process] = {}
    totals: dict[int, float] = {}
    watcher = asyncio.create_task(watch_cpu([], totals))
    try:
        for n in range(calls):
            for role in ("practitioner", "patient"):
                argv = peer_argv(
                    role, config, "--relay", url, "--session", f"bench-{n}", "--video", "pattern",
                    "--audio", "tone", "--duration", str(seconds + 1),
                    "--stats-json", str(tmp / f"{role}-{n}.json"),
                )  # fmt: skip
                processes[f"{role}-{n}"] = await spawn(role, argv, lan.command())
            await asyncio.sleep(0.3)
        watcher.cancel()
        watcher = asyncio.create_task(watch_cpu(list(processes.values()), totals))
        for p in processes.values():
            await p.wait(seconds + 40)
    finally:
        watcher.cancel()
        for p in processes.values():
            await p.stop()
        await relay.stop()
    runs = []
    for n in range(calls):
        summaries = [
            json.loads((tmp / f"{role}-{n}.json").read_text())
            for role in ("patient", "practitioner")
        ]
        patient = processes[f"patient-{n}"]
        joined = next(log_time(x) for x in patient.lines if "joined session" in x)
        connected = next((log_time(x) for x in patient.lines if "call 1: connected" in x), joined)
        latencies = [s["latency_ms"] for s in summaries if s["latency_ms"]]
        cpu = [
            totals.get(processes[f"{role}-{n}"].proc.pid, 0.0)
            for role in ("patient", "practitioner")
        ]
        runs.append(
            Run(
                ice_ms=(connected - joined) * 1000,
                first_frame_ms=statistics.mean(s["first_frame_ms"] or 0 for s in summaries),
                fps=min(s["video"]["fps"] for s in summaries),
                p50_ms=statistics.mean(x["p50"] for x in latencies) if latencies else 0.0,
                p95_ms=statistics.mean(x["p95"] for x in latencies) if latencies else 0.0,
                cpu_pct=statistics.mean(cpu) / (seconds + 1) * 100,
            )
        )
    return runs


def median(runs: list[Run], name: str) -> float:
    return float(statistics.median(getattr(r, name) for r in runs))


def table(real: list[Run], bare: list[Run]) -> str:
    rows = [
        ("both seats taken -> ICE connected (ms)", "ice_ms", "{:.0f}"),
        ("both seats taken -> first frame (ms)", "first_frame_ms", "{:.0f}"),
        ("frames per second received", "fps", "{:.1f}"),
        ("glass-to-glass p50 (ms)", "p50_ms", "{:.1f}"),
        ("glass-to-glass p95 (ms)", "p95_ms", "{:.1f}"),
        ("CPU per peer (% of one core)", "cpu_pct", "{:.0f}"),
    ]
    return ratio_table(
        ("figure (median of runs)", "peers", "floor", "ratio"),
        ((label, fmt, median(real, name), median(bare, name)) for label, name, fmt in rows),
        (40, 8, 8, 7),
    )


async def main(args: argparse.Namespace) -> int:
    if reason := netns_missing():
        print(f"bench-call: {reason}", file=sys.stderr)
        return 2
    print(
        f"{os.cpu_count()} CPUs; VP8 {WIDTH}x{HEIGHT} at {FPS} fps; "
        f"{args.runs} runs of {args.seconds:g} s"
    )
    real: list[Run] = []
    bare: list[Run] = []
    async with Network("epc-bench") as net:
        lan = await net.lan("198.18.0.2/24")
        for n in range(args.runs):
            bare.append(await floor(lan, args.seconds))
            with tempfile.TemporaryDirectory() as tmp:
                real += await through_relay(lan, Path(tmp), args.seconds)
            print(
                f"  run {n + 1}: floor first frame {bare[-1].first_frame_ms:.0f} ms, "
                f"peers {real[-1].first_frame_ms:.0f} ms",
                flush=True,
            )
        print(table(real, bare))
        held = 0
        for calls in range(1, args.max_calls + 1):
            with tempfile.TemporaryDirectory() as tmp:
                runs = await through_relay(lan, Path(tmp), args.seconds, calls)
            worst = min(r.fps for r in runs)
            print(f"  {calls} simultaneous call(s): lowest received fps {worst:.1f}", flush=True)
            if worst < 25:
                break
            held = calls
        print(f"simultaneous 640x480 calls held at >= 25 fps on this machine: {held}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="aiortc calls through the relay vs the floor.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--max-calls", type=int, default=6)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
