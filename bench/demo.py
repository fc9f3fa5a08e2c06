"""``make demo``: the relay, a practitioner and a patient in a real call, then a summary.

(In bench/ with the benchmarks: like them it starts real processes and prints
figures, with the process helpers of tests/processes.py; it is not part of
the peers themselves.)

Starts ``relay.py``, then ``python -m peers.practitioner`` and ``python -m
peers.patient`` on the generated test pattern and tone, holds the call for
about 10 s, prints what it achieved (ICE path, time to first frame, frames per
second, resolution, audio, latency from the stamps) and stops every process it
started by its PID. Exit status 0 only when video and audio arrived both ways.

As root it holds the call inside a private network namespace that it creates
and deletes (nothing leaves the machine); otherwise it uses the machine's own
addresses, as on a laptop.

``--turn`` (``make demo-turn``, as root): the same call through a local coturn
(``make turn``'s command line) inside the namespace, with the relay-only
policy (``ice.policy: relay``): the relay hands each side short-lived
credentials (``turn.secret``), coturn relays between the two relayed
addresses (its ``turn.allowed_peers`` lets the namespace's address through,
every other private range stays denied), and the demo prints the path taken
and fails unless both sides went through the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

import relay as relay_module
from peers.netns import Netns, Network, netns_missing
from tests.processes import Process, peer_argv, spawn, start_relay

DEMO_ADDRESS = "198.18.0.2"  # the namespace's one address
TURN_PORT = 3478


@contextlib.asynccontextmanager
async def place(private: bool) -> AsyncIterator[Netns | None]:
    """The namespace where the call happens (None: this machine's own)."""
    if not private:
        yield None
        return
    async with Network("epc-demo") as net:
        yield await net.lan("198.18.0.2/24")


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


def relayed(summaries: dict[str, dict[str, Any]]) -> bool:
    """Both sides' selected pair went through TURN (a relay candidate on their own side)."""
    return len(summaries) == 2 and all(
        (got.get("ice") or {}).get("local_type") == "relay" for got in summaries.values()
    )


def with_turn(data: dict[str, Any]) -> dict[str, str]:
    """Set up ``data`` for a TURN-only call through a local coturn; each role's join token.

    A fresh random TURN secret (coturn and the relay share it) and join-token
    secret: the relay refuses to hand out TURN credentials without tokens.
    """
    turn_secret, auth_secret = secrets.token_hex(16), secrets.token_hex(16)
    data["turn"] = {
        "secret": turn_secret,
        "urls": [f"turn:{DEMO_ADDRESS}:{TURN_PORT}?transport=udp"],
        "ttl": 3600,
        "listen": DEMO_ADDRESS,
        "port": TURN_PORT,
        # Both relayed addresses are the namespace's own (198.18.0.0/15 is denied).
        "allowed_peers": [f"{DEMO_ADDRESS}/32"],
    }
    data.setdefault("ice", {})["policy"] = "relay"
    data["auth"] = {"secret": auth_secret}
    expiry = int(time.time()) + 3600
    return {
        role: relay_module.mint_token(auth_secret, data.get("session", "x"), role, expiry)
        for role in relay_module.ROLES
    }


async def demo(data: dict[str, Any], seconds: float, private: bool, turn: bool = False) -> int:
    session = f"demo-{os.getpid()}"
    where = "a private network namespace (198.18.0.2)" if private else "this machine's addresses"
    via = ", TURN only through a local coturn" if turn else ""
    print(
        f"demo: relay, practitioner and patient in {where}{via}; session {session}; "
        f"{seconds:g} s call"
    )
    with tempfile.TemporaryDirectory(prefix="epc-demo-") as tmp:
        out = Path(tmp)
        data.setdefault("relay", {})
        data["relay"].update({"host": "127.0.0.1", "port": 0})
        data["session"] = session
        tokens = with_turn(data) if turn else {}
        settings = out / "config.yaml"
        settings.write_text(yaml.safe_dump(data), encoding="utf-8")
        async with place(private) as ns:
            prefix = [] if ns is None else ns.command()
            coturn = None
            if turn:
                coturn = await spawn(
                    "coturn", [sys.executable, "-m", "peers.turnserver", "--config", str(settings)],
                    prefix,
                )  # fmt: skip
                await coturn.expect("TURN URL")
                for line in coturn.lines:
                    if "coturn" in line and "listening" in line:
                        print(f"demo: {line.split(' ', 3)[-1]}")
            relay, url = await start_relay(settings, ns)
            peers: dict[str, Process] = {}
            try:
                for role in ("practitioner", "patient"):
                    token = ("--token", tokens[role]) if turn else ()
                    argv = peer_argv(
                        role, settings, "--relay", url, "--session", session,
                        "--video", "pattern", "--audio", "tone", "--duration", str(seconds),
                        "--stats-json", str(out / f"{role}.json"), *token,
                    )  # fmt: skip
                    peers[role] = await spawn(role, argv, prefix)
                statuses = {role: await p.wait(seconds + 30) for role, p in peers.items()}
            finally:
                for p in peers.values():
                    await p.stop()
                await relay.stop()
                if coturn is not None:
                    await coturn.stop()
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
    if turn and ok:
        ok = relayed(summaries)
        print(
            f"demo: relay path: both sides through coturn at {DEMO_ADDRESS}:{TURN_PORT} (TURN only)"
            if ok
            else "demo: FAILED: the call did not go through coturn"
        )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the call")
    parser.add_argument(
        "--no-netns", action="store_true", help="use this machine's addresses even as root"
    )
    parser.add_argument(
        "--turn",
        action="store_true",
        help="through a local coturn, TURN only (needs root: coturn runs in the namespace)",
    )
    args = parser.parse_args(argv)
    private = not args.no_netns and netns_missing() is None
    if args.turn and not private:
        why = "--no-netns" if args.no_netns else netns_missing()
        print(f"demo: --turn needs a private network namespace ({why})", file=sys.stderr)
        return 2
    try:
        data = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"demo: {args.config}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(demo(data, args.seconds, private, args.turn))


if __name__ == "__main__":
    sys.exit(main())
