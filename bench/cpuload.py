"""A controlled CPU load for the benchmarks, and who got the CPU while it ran (Linux /proc).

``busy(n)`` starts ``n`` processes, each a plain busy loop at nice 0, and stops them by PID
when the block ends (also on an exception): ``make bench-network ARGS="--cpu-load 2"``
runs every call beside two of them.

``snapshot()`` reads every task's ``/proc/PID/task/TID/schedstat`` (nanoseconds on a CPU,
nanoseconds runnable but waiting for one); ``shares(before, after, seconds)`` groups the
difference by process kind (Chromium's renderer, GPU and browser processes, the aiortc
peers, the relay, the link emulator, the busy loops, everything else) and by the network
namespace a process runs in, as percent of one core: how much CPU each kind got, and how
long it waited for one (the starved kind waits).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

BUSY_LOOP = "while True: pass"
PROC = Path("/proc")


def cpu_load(text: str) -> int:
    """``--cpu-load N``: how many busy processes (0 to 16)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a whole number of processes"
        ) from None
    if not 0 <= count <= 16:
        raise argparse.ArgumentTypeError(f"{text!r}: between 0 and 16 busy processes")
    return count


@contextlib.contextmanager
def busy(count: int) -> Iterator[list[int]]:
    """``count`` busy-loop processes at nice 0 for the block; their PIDs. Killed by PID after."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            proc = subprocess.Popen(
                [sys.executable, "-c", BUSY_LOOP],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is for the bench, which stops it
            )
            procs.append(proc)
            os.setpriority(os.PRIO_PROCESS, proc.pid, 0)  # nice 0 whatever the bench's own
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()


@dataclass(frozen=True)
class Task:
    """One thread's counters, and the kind and namespace of its process."""

    kind: str
    netns: int
    on_cpu_ns: int
    waiting_ns: int
    ours: bool = True  # the process is this one or a descendant (else: another's)


def kind(pid: int, cmdline: list[str], busy_pids: frozenset[int]) -> str:
    """What a process is, from its command line (Chromium's children rewrite theirs)."""
    text = " ".join(cmdline)
    words = text.split()
    if pid in busy_pids:
        return "busy loop"
    if pid == os.getpid():
        return "bench"
    if not words:
        return "kernel"
    name = Path(words[0]).name
    if "chrom" in name or "headless_shell" in name:
        for arg in words:
            if arg.startswith("--type="):
                return f"chromium {arg.removeprefix('--type=').removesuffix('-process')}"
        return "chromium browser"
    if "peers.patient" in text or "peers.practitioner" in text:
        return "aiortc peer"
    if "relay.py" in text:
        return "relay"
    if "tests.netem" in text:
        return "emulator"
    if "playwright" in text:
        return "playwright driver"
    return "other"


def snapshot(busy_pids: frozenset[int] = frozenset()) -> dict[tuple[int, int], Task]:
    """Every live thread's counters, keyed by (pid, tid)."""
    seen: dict[int, tuple[int, str, int, list[int]]] = {}  # pid: ppid, kind, netns, tids
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            raw = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text(errors="replace")
            netns = (entry / "ns" / "net").stat().st_ino
            tids = [int(t.name) for t in (entry / "task").iterdir()]
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        what = kind(pid, [a.decode(errors="replace") for a in raw.split(b"\0") if a], busy_pids)
        seen[pid] = (ppid, what, netns, tids)
    out: dict[tuple[int, int], Task] = {}
    for pid, (_, what, netns, tids) in seen.items():
        ours = descends(pid, os.getpid(), {p: v[0] for p, v in seen.items()})
        for tid in tids:
            try:
                fields = (PROC / str(pid) / "task" / str(tid) / "schedstat").read_text().split()
            except OSError:
                continue
            out[(pid, tid)] = Task(what, netns, int(fields[0]), int(fields[1]), ours)
    return out


def descends(pid: int, ancestor: int, parents: Mapping[int, int]) -> bool:
    """``pid`` is ``ancestor`` or one of its descendants, by the ``{pid: ppid}`` map."""
    for _ in range(64):  # deeper than any tree here; a loop in a racy read ends too
        if pid == ancestor:
            return True
        if pid not in parents or pid <= 1:
            return False
        pid = parents[pid]
    return False


def netns_inodes(names: Mapping[str, str]) -> dict[int, str]:
    """``{role: netns name}`` as ``{inode of /run/netns/NAME: role}`` (missing ones left out)."""
    out = {}
    for role, name in names.items():
        with contextlib.suppress(OSError):
            out[Path("/run/netns", name).stat().st_ino] = role
    return out


def shares(
    before: Mapping[tuple[int, int], Task],
    after: Mapping[tuple[int, int], Task],
    seconds: float,
    roles: Mapping[int, str] | None = None,
) -> dict[str, tuple[float, float]]:
    """``{group: (% of a core on a CPU, % of a core waiting for one)}`` between two snapshots.

    A group is the kind, prefixed by its namespace's role when ``roles`` names it (``patient
    chromium renderer``), or ``others'`` for a process that is not this one's descendant.
    Threads born in between count from zero; those gone are not seen.
    """
    roles = roles or {}
    sums: dict[str, list[int]] = {}
    for key, task in after.items():
        was = before.get(key)
        on = task.on_cpu_ns - (was.on_cpu_ns if was else 0)
        waiting = task.waiting_ns - (was.waiting_ns if was else 0)
        group = f"{roles[task.netns]} {task.kind}" if task.netns in roles else task.kind
        if not task.ours:
            group = f"others' {task.kind}"
        total = sums.setdefault(group, [0, 0])
        total[0] += on
        total[1] += waiting
    scale = 100 / (seconds * 1e9)
    return {g: (on * scale, waiting * scale) for g, (on, waiting) in sums.items()}


def machine_ticks() -> tuple[int, int]:
    """Clock ticks every CPU spent busy (``steal`` included) and stolen, from /proc/stat."""
    fields = [int(f) for f in (PROC / "stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, steal


def machine_line(before: tuple[int, int], after: tuple[int, int], seconds: float) -> str:
    """``machine B/C busy (steal S)`` in % of a core: what all the processes above add up to."""
    scale = 100 / (os.sysconf("SC_CLK_TCK") * seconds)
    cores = os.cpu_count() or 1
    busy_pct, steal_pct = ((a - b) * scale for a, b in zip(after, before, strict=True))
    return f"machine {busy_pct:.0f}/{100 * cores} busy (steal {steal_pct:.0f})"


def shares_line(groups: Mapping[str, tuple[float, float]], least: float = 2.0) -> str:
    """``group on/waiting`` in % of a core, busiest first; groups under ``least`` % left out."""
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    return ", ".join(f"{g} {on:.0f}/{w:.0f}" for g, (on, w) in ranked if on + w >= least)
