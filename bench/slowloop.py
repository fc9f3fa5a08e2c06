"""Audio and video of a call whose event loop is slow, as on a loaded machine (issue 13).

    sudo .venv/bin/python -m bench.slowloop                        # 10 ms turns, 2 runs
    sudo .venv/bin/python -m bench.slowloop --turn-ms 0 5 10 20 --stall-ms 300 --runs 3
    sudo .venv/bin/python -m bench.slowloop --turn-ms 0 --stall-ms 0 --cpu-percent 20

Two ``Call``s in two namespaces (tests/inprocess.py), each sending the stamped
pattern (320x240, 15 fps) and the tone, the patient's interface at 2 % loss both
ways (tests/netem.py), as tests/test_media.py's 2 % test. While the link is
impaired, every turn of this process's event loop is made ``--turn-ms`` longer
(tests/mediacheck.py ``SlowTurns``: on a loaded machine each time the loop has
waited it waits again for a CPU) and the loop is held up ``--stall-ms`` every 2 s
(``Stalls``). Each setting is run with the audio fixes ("patched":
``aiortc_opus.CATCH_UP``, the sender's frames due read and encoded in one go;
``aiortc_receive.DRAIN``, every datagram waiting read in one turn) and without
("today", aiortc's one frame per executor job and asyncio's one datagram per
turn), alternating, so that both see the same load. Printed per call, over
``--seconds``: the audio media time that reached it (frames of 20 ms, due: 50 a
second), missing and concealed; how far behind real time the other side's tone
was read at the end; video frames shown and the most a frame was behind the
call's best delay. And the process's CPU. ``--cpu-percent P`` holds this process (not the
link emulator) to P % of one core while the link is impaired (a cgroup v1 ``cpu``
group, ``cpu.cfs_quota_us``, removed afterwards). Never asserted: see docs/benchmarks.md
("Audio when the event loop is slow").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from peers import aiortc_opus, aiortc_receive
from peers.media import ToneTrack
from peers.netns import Network, netns_missing
from tests import netem
from tests.inprocess import LocalPair
from tests.mediacheck import SlowTurns, Stalls, audio_counts
from tests.netem import Impairment, Link
from tests.support import within

FPS = 15
STALL_EVERY_S = 2.0
CGROUP_CPU = "/sys/fs/cgroup/cpu"
VARIANTS = ("today", "patched")


@contextlib.contextmanager
def cpu_share(percent: float | None) -> Iterator[None]:
    """This process (all its threads) held to ``percent`` % of one core while the block runs."""
    if percent is None:
        yield
        return
    group = os.path.join(CGROUP_CPU, f"epc-slowloop-{os.getpid()}")
    os.makedirs(group, exist_ok=True)
    try:
        for name, value in (("cpu.cfs_period_us", 100_000), ("cpu.cfs_quota_us", percent * 1000)):
            with open(os.path.join(group, name), "w") as f:
                f.write(str(int(value)))
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        yield
    finally:
        with open(os.path.join(CGROUP_CPU, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        os.rmdir(group)


def tone_behind_s(track: Any) -> float:
    """How far behind real time a tone's next frame is (s): what its sender has yet to read."""
    if not isinstance(track, ToneTrack) or track._begin is None:
        return 0.0
    return max(0.0, time.monotonic() - (track._begin + track._pts / track.RATE))


async def run_call(
    variant: str, turn_s: float, stall_s: float, seconds: float, cpu_percent: float | None
) -> list[str]:
    aiortc_opus.CATCH_UP = aiortc_receive.DRAIN = variant == "patched"
    rows = []
    async with Network("slowloop") as net:
        a, b, dev = await netem.pair(net)
        async with contextlib.aclosing(LocalPair(namespaces=(a, b), fps=FPS)) as pair:
            await within(pair.connect(), 5)
            await within(pair.flowing(video=FPS), 8)
            async with Link(a, dev, both=Impairment(loss=0.02)):
                with cpu_share(cpu_percent):
                    async with SlowTurns(turn_s), Stalls(stall_s, STALL_EVERY_S):
                        start, cpu = time.monotonic(), time.process_time()
                        audio = {c.name: audio_counts(c.receiver.received) for c in pair.calls}
                        await asyncio.sleep(seconds)
                        elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
                        behind = [tone_behind_s(c.audio) for c in pair.calls]
            for call, other_behind in zip(pair.calls, reversed(behind), strict=True):
                got = call.receiver.received
                media_frames, missing, concealed = (
                    now - then
                    for now, then in zip(audio_counts(got), audio[call.name], strict=True)
                )
                shown = [(t, latency) for t, latency, _ in got.history if t >= start]
                most_behind = max((lat for _, lat in shown), default=0.0) - (
                    got.best_latency_ms or 0.0
                )
                rows.append(
                    f"{variant:8} turn {turn_s * 1000:4.0f} ms stall {stall_s * 1000:4.0f} ms"
                    f" | {call.name:12} audio {media_frames:5d} of {50 * elapsed:5.0f} due"
                    f" ({100 * media_frames / (50 * elapsed):5.1f} %), missing {missing},"
                    f" concealed {concealed}; its tone {other_behind:5.2f} s behind"
                    f" | video {len(shown):4d} of {FPS * elapsed:4.0f}, behind max"
                    f" {most_behind:6.0f} ms | cpu {cpu:.1f} s"
                )
    return rows


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turn-ms", type=float, nargs="+", default=[10.0])
    parser.add_argument("--stall-ms", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cpu-percent", type=float, default=None)
    args = parser.parse_args(argv)
    if reason := netns_missing():
        print(f"bench.slowloop: {reason}", file=sys.stderr)
        return 2
    print(f"load average before: {os.getloadavg()}", flush=True)
    for turn_ms in args.turn_ms:
        for _ in range(args.runs):
            for variant in VARIANTS:
                for row in await run_call(
                    variant, turn_ms / 1000, args.stall_ms / 1000, args.seconds, args.cpu_percent
                ):
                    print(row, flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
