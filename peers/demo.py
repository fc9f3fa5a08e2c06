"""`make demo`, protocol stage: the real relay and two scripted protocol clients.

Starts ``relay.py`` on a free port, runs a patient and a practitioner through a
whole join, offer, answer, candidate and bye exchange, prints what happened
and stops the relay by its PID. (The aiortc peers replace the scripted clients.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 10.0


async def start_relay(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "relay.py"),
        "--config",
        str(config),
        "--port",
        "0",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while line := (await asyncio.wait_for(proc.stderr.readline(), STEP_TIMEOUT)).decode():
        if match := re.search(r"relay listening on (\S+)", line):
            return proc, match.group(1)
    raise RuntimeError(f"the relay exited with status {await proc.wait()} before listening")


async def recv(ws: ClientConnection) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), STEP_TIMEOUT))
    return data


async def exchange(url: str) -> None:
    session = f"demo-{int(time.time())}"
    started = time.perf_counter()

    def show(who: str, what: str) -> None:
        print(f"  {1000 * (time.perf_counter() - started):7.1f} ms  {who:<12} {what}")

    async with connect(url) as practitioner, connect(url) as patient:
        await practitioner.send(
            json.dumps({"type": "join", "session": session, "role": "practitioner"})
        )
        joined = await recv(practitioner)
        show("practitioner", f"joined {joined['session']} (peer present: {joined['peer']})")
        await patient.send(json.dumps({"type": "join", "session": session, "role": "patient"}))
        joined = await recv(patient)
        show("patient", f"joined (peer present: {joined['peer']})")
        show("practitioner", f"got {(await recv(practitioner))['type']}")
        await patient.send(json.dumps({"type": "offer", "sdp": "v=0\r\n(scripted offer)\r\n"}))
        show("practitioner", f"got {(await recv(practitioner))['type']}")
        await practitioner.send(
            json.dumps({"type": "answer", "sdp": "v=0\r\n(scripted answer)\r\n"})
        )
        show("patient", f"got {(await recv(patient))['type']}")
        candidate = {
            "candidate": "candidate:1 1 udp 2130706431 198.18.0.1 40000 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
        }
        for sender, receiver, name in (
            (patient, practitioner, "practitioner"),
            (practitioner, patient, "patient"),
        ):
            await sender.send(json.dumps({"type": "candidate", "candidate": candidate}))
            await sender.send(json.dumps({"type": "candidate", "candidate": None}))
            got = [await recv(receiver), await recv(receiver)]
            show(name, f"got candidate + end-of-candidates ({got[1]['candidate']})")
        await patient.send(json.dumps({"type": "bye", "reason": "demo over"}))
        bye, left = await recv(practitioner), await recv(practitioner)
        show(
            "practitioner",
            f"got {bye['type']} ({bye['reason']}), then {left['type']} ({left['reason']})",
        )


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=STEP_TIMEOUT) as response:  # noqa: S310 (http only)
        text: str = response.read().decode()
        return text


async def main_async(config: Path) -> int:
    relay, url = await start_relay(config)
    print(f"relay listening on {url} (pid {relay.pid})")
    try:
        await exchange(url)
        base = url.replace("ws", "http", 1).removesuffix("/ws")
        metrics = await asyncio.to_thread(fetch, base + "/metrics")
        relayed = re.findall(r'relay_frames_relayed_total\{type="(\w+)"\} (\S+)', metrics)
        print("relay metrics: frames relayed " + ", ".join(f"{k}={float(v):g}" for k, v in relayed))
        print("health: " + await asyncio.to_thread(fetch, base + "/health"))
    finally:
        relay.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(relay.wait(), STEP_TIMEOUT)
        print(f"relay stopped (exit status {status})")
    return 0 if status == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.config))


if __name__ == "__main__":
    sys.exit(main())
