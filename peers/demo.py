"""``make demo``: the relay, a practitioner and a patient in a real call, then a summary.

Starts ``relay.py``, then ``python -m peers.practitioner`` and ``python -m
peers.patient`` on the generated test pattern and tone, holds the call for
about 10 s, prints what it achieved (ICE path, time to first frame, frames per
second, resolution, audio, latency from the stamps) and stops every process it
started by its PID. Exit status 0 only when video and audio arrived both ways.

As root it holds the call inside a private network namespace that it creates
and deletes (nothing leaves the machine); otherwise it uses the machine's own
addresses, as on a laptop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peers.netns import Network, netns_missing

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0


@dataclass
class Process:
    """A child process whose standard error is collected line by line."""

    name: str
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def stop(self, grace: float = 10.0) -> int:
        """SIGTERM by PID, then SIGKILL after ``grace`` seconds; the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 5)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def wait(self, limit: float) -> int:
        """The exit status; stopped by PID when it runs over ``limit`` seconds."""
        try:
            await asyncio.wait_for(self.proc.wait(), limit)
        except TimeoutError:
            await self.stop()
        if self.reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 5)
        assert self.proc.returncode is not None
        return self.proc.returncode

    def log(self) -> str:
        return "\n".join(self.lines)


async def spawn(
    name: str, argv: Sequence[str], prefix: Sequence[str] = (), stdin: int | None = None
) -> Process:
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        *argv,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    child = Process(name, proc)

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            child.lines.append(line.decode(errors="replace").rstrip())

    child.reader = asyncio.create_task(read())
    return child


async def start_relay(
    config: Path, prefix: Sequence[str] = (), port: int = 0, host: str = "127.0.0.1"
) -> tuple[Process, str]:
    """``relay.py`` on ``host`` (inside the namespace of ``prefix``); its ws:// URL."""
    relay = await spawn(
        "relay",
        [
            sys.executable,
            str(ROOT / "relay.py"),
            "--config",
            str(config),
            "--host",
            host,
            "--port",
            str(port),
        ],
        prefix,
    )
    for _ in range(int(START_TIMEOUT * 20)):
        for line in relay.lines:
            if match := re.search(r"relay listening on (ws://\S+)", line):
                return relay, match.group(1)
        if relay.proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    await relay.stop()
    raise RuntimeError(f"the relay did not start:\n{relay.log()}")


def peer_argv(role: str, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", f"peers.{role}", "--config", str(config), *args]


@contextlib.asynccontextmanager
async def place(private: bool) -> AsyncIterator[list[str]]:
    """The command prefix that runs a process where the call happens."""
    if not private:
        yield []
        return
    async with Network("epc-demo") as net:
        lan = await net.lan("198.18.0.2/24")
        yield lan.command()


def summary_lines(summaries: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for role, got in summaries.items():
        ice = got.get("ice") or {}
        video, audio, latency = got["video"], got["audio"], got.get("latency_ms") or {}
        path = (
            f"{ice.get('local_type')} -> {ice.get('remote_type')} over {ice.get('protocol')}"
            if ice
            else "none"
        )
        lines.append(
            f"  {role:<12} ICE {path}; first frame {got.get('first_frame_ms')} ms; "
            f"video {video['frames']} frames {video['width']}x{video['height']} "
            f"at {video['fps']} fps ({video.get('stamped', 0)} stamped); "
            f"audio {audio['frames']} frames; latency p50 {latency.get('p50', '-')} ms "
            f"p95 {latency.get('p95', '-')} ms"
        )
    return lines


def succeeded(summaries: dict[str, dict[str, Any]]) -> bool:
    return len(summaries) == 2 and all(
        got["video"]["frames"] > 0 and got["audio"]["frames"] > 0 for got in summaries.values()
    )


async def demo(data: dict[str, Any], seconds: float, private: bool) -> int:
    session = f"demo-{os.getpid()}"
    where = "a private network namespace (198.18.0.2)" if private else "this machine's addresses"
    print(
        f"demo: relay, practitioner and patient in {where}; session {session}; {seconds:g} s call"
    )
    with tempfile.TemporaryDirectory(prefix="epc-demo-") as tmp:
        out = Path(tmp)
        data.setdefault("relay", {})
        data["relay"].update({"host": "127.0.0.1", "port": 0})
        settings = out / "config.yaml"
        settings.write_text(yaml.safe_dump(data), encoding="utf-8")
        async with place(private) as prefix:
            relay, url = await start_relay(settings, prefix)
            peers: dict[str, Process] = {}
            try:
                for role in ("practitioner", "patient"):
                    argv = peer_argv(
                        role, settings, "--relay", url, "--session", session,
                        "--video", "pattern", "--audio", "tone", "--duration", str(seconds),
                        "--stats-json", str(out / f"{role}.json"),
                    )  # fmt: skip
                    peers[role] = await spawn(role, argv, prefix)
                statuses = {role: await p.wait(seconds + 30) for role, p in peers.items()}
            finally:
                for p in peers.values():
                    await p.stop()
                await relay.stop()
        summaries = {}
        for role, status in statuses.items():
            path = out / f"{role}.json"
            if path.exists():
                summaries[role] = json.loads(path.read_text(encoding="utf-8"))
            if status != 0:
                print(f"demo: the {role} exited with status {status}:\n{peers[role].log()}")
    print("demo: what each side received")
    for line in summary_lines(summaries):
        print(line)
    ok = succeeded(summaries) and all(status == 0 for status in statuses.values())
    print("demo: video and audio arrived both ways" if ok else "demo: FAILED: media missing")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peers.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the call")
    parser.add_argument(
        "--no-netns", action="store_true", help="use this machine's addresses even as root"
    )
    args = parser.parse_args(argv)
    private = not args.no_netns and netns_missing() is None
    try:
        data = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"demo: {args.config}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(demo(data, args.seconds, private))


if __name__ == "__main__":
    sys.exit(main())
