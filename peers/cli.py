"""The command line shared by ``python -m peers.patient`` and ``python -m peers.practitioner``.

Each flag overrides one key of config.yaml. Exit status: 0 after a hang-up
(Ctrl-C, SIGTERM, ``--duration``), 1 when the call cannot be made (``CallFailed``:
the message names the likely cause), 2 for a refused join, a relay URL that
answers HTTP instead of a WebSocket (``not-websocket``), a configuration or
media error, or aioice/aiortc not at their pinned versions (one line naming the
code, key or flag).

Lines typed on standard input (a terminal, a pipe or a socket) go to the other
side over the call's chat channel; what it sends is printed as ``chat> text``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from stat import S_ISFIFO, S_ISSOCK
from typing import Any

from peers import aiortc_patches
from peers.config import ConfigError, PeerSettings, check_session, parse_ice_urls
from peers.errors import CallFailed, JoinRefused, NotWebSocket, PeerError, Replaced
from peers.media import open_sources
from peers.seat import Seat
from peers.stats import log_stats, summary

logger = logging.getLogger("peers")


def parse_args(role: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m peers.{role}",
        description=f"e-PediCare Call: the {role}'s side of a consultation (aiortc).",
    )
    parser.add_argument(
        "--config", type=Path, default=Path("config.yaml"), help="YAML file (default: config.yaml)"
    )
    parser.add_argument("--session", help="session id (overrides session)")
    parser.add_argument("--relay", help="relay URL, ws:// or wss:// (overrides relay.url)")
    parser.add_argument("--token", help="join token (overrides token)")
    parser.add_argument(
        "--ice-policy",
        choices=["all", "relay"],
        help="all, or relay for TURN only (overrides ice.policy)",
    )
    parser.add_argument(
        "--ice-server",
        action="append",
        metavar="URL",
        help="STUN/TURN URL, repeatable, replaces ice.servers "
        "(turn:USER:PASS@HOST:PORT carries credentials)",
    )
    parser.add_argument(
        "--ice-timeout",
        type=float,
        metavar="S",
        help="seconds before ICE gives up (overrides ice.timeout_s)",
    )
    parser.add_argument(
        "--video",
        default="auto",
        help="pattern | camera | DEVICE | FILE | none "
        "(default: the camera if there is one, else pattern)",
    )
    parser.add_argument(
        "--audio",
        default="auto",
        help="tone | mic | FILE | none (default: the microphone if there is one, else tone)",
    )
    parser.add_argument(
        "--record-to",
        type=Path,
        metavar="FILE",
        help="record the received audio and video (.mp4 or .mkv)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="hang up after S seconds (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--stats-json", type=Path, metavar="FILE", help="write a summary of the call at exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> PeerSettings:
    settings = PeerSettings.load(args.config)
    changes: dict[str, object] = {}
    if args.session is not None:
        changes["session"] = check_session(args.session)
    if args.relay is not None:
        if not args.relay.startswith(("ws://", "wss://")):
            raise ConfigError("--relay", f"expected a ws:// or wss:// URL, got {args.relay!r}")
        changes["relay_url"] = args.relay
    if args.token is not None:
        changes["token"] = args.token
    if args.ice_policy is not None:
        changes["ice_policy"] = args.ice_policy
    if args.ice_server is not None:
        changes["ice_servers"] = parse_ice_urls(args.ice_server)
    if args.ice_timeout is not None:
        if args.ice_timeout < 1:
            raise ConfigError("--ice-timeout", "expected at least 1 second")
        changes["ice_timeout_s"] = args.ice_timeout
    if args.record_to is not None and args.record_to.suffix.lower() not in {".mp4", ".mkv"}:
        raise ConfigError("--record-to", "expected a .mp4 or .mkv file")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration", "expected a positive number of seconds")
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]


async def run(role: str, args: argparse.Namespace, settings: PeerSettings) -> tuple[int, str]:
    video = settings.video
    sources = open_sources(
        args.video,
        args.audio if settings.audio else "none",
        video.width,
        video.height,
        video.fps,
    )
    seat = Seat(role, settings, sources, record_to=args.record_to, on_chat=print_chat)
    logger.info(
        "%s: session %s via %s; %s; ICE servers %d, policy %s",
        role,
        settings.session,
        settings.relay_url,
        sources.description,
        len(settings.ice_servers),
        settings.ice_policy,
    )
    stop = asyncio.Event()
    reason = "duration"
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        nonlocal reason
        reason = name
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signal.Signals(signum).name)
    main = asyncio.create_task(seat.run())
    helpers = [asyncio.create_task(log_stats(seat)), asyncio.create_task(chat_input(seat))]
    stopper = asyncio.create_task(asyncio.wait_for(stop.wait(), args.duration))
    status = 0
    try:
        await asyncio.wait([main, stopper], return_when=asyncio.FIRST_COMPLETED)
        if main.done():
            main.result()  # raises what ended it
    except TimeoutError:
        pass
    except JoinRefused as exc:
        print(f"{role}: join refused: {exc}", file=sys.stderr)
        status, reason = 2, exc.code
    except CallFailed as exc:
        print(f"{role}: {exc}", file=sys.stderr)
        status, reason = 1, "ice-failed"
    except Replaced as exc:
        print(f"{role}: {exc}", file=sys.stderr)
        status, reason = 0, "replaced"
    except NotWebSocket as exc:
        print(f"{role}: {exc}", file=sys.stderr)
        status, reason = 2, exc.code
    finally:
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            stopper.cancel()
            await stopper
        if status == 0 and reason != "replaced":
            await seat.hang_up(send_bye=True, reason=reason)
        for task in (main, *helpers):
            task.cancel()
        for task in (main, *helpers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if args.stats_json is not None:
            text = json.dumps(summary(seat, reason), indent=2) + "\n"
            args.stats_json.write_text(text, encoding="utf-8")
        await seat.close()
    return status, reason


def main(role: str, argv: Sequence[str] | None = None) -> int:
    args = parse_args(role, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aioice", "aiortc", "websockets"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        aiortc_patches.check_versions()
        settings = settings_from(args)
        status, reason = asyncio.run(run(role, args, settings))
    except (ConfigError, PeerError) as exc:
        print(f"{role}: {exc}", file=sys.stderr)
        return 2
    logger.info("%s: exit (%s)", role, reason)
    return status


def print_chat(text: str) -> None:
    print(f"chat> {text}", flush=True)


async def chat_input(seat: Seat) -> None:
    """Send each line of standard input to the other side (when it is worth reading)."""
    if not _interactive(sys.stdin):
        return  # /dev/null, a regular file, or closed: no chat input
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        return  # stdin is a regular file or closed: no chat input
    while line := await reader.readline():
        text = line.decode("utf-8", "replace").rstrip("\n")
        if text and (why := seat.send_chat(text)) is not None:
            logger.warning("chat: %s; line dropped", why)


def _interactive(stream: Any) -> bool:
    """A terminal, a pipe or a socket: something worth reading chat lines from."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return bool(stream.isatty()) or S_ISFIFO(mode) or S_ISSOCK(mode)
