"""`bench-network --cpu-load N`: the busy loops and the per-process CPU (bench/cpuload.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import network
from bench.cpuload import (
    Task,
    busy,
    cpu_load,
    descends,
    kind,
    machine_line,
    shares,
    shares_line,
    snapshot,
)
from tests.browser import Browsers, chromium_missing


def test_the_option_takes_a_count_of_processes() -> None:
    assert cpu_load("0") == 0
    assert cpu_load("4") == 4
    for bad in ("-1", "17", "two", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_load(bad)


def test_the_bench_refuses_a_bad_count_before_it_starts_anything() -> None:
    with pytest.raises(SystemExit) as exit_:
        asyncio.run(network.main(["--cpu-load", "-2"]))
    assert exit_.value.code == 2


def on_cpu_ns(pid: int) -> int:
    return sum(
        int((task / "schedstat").read_text().split()[0])
        for task in Path(f"/proc/{pid}/task").iterdir()
    )


def test_the_busy_loops_run_and_are_gone_after_the_block() -> None:
    with busy(2) as pids:
        assert len(set(pids)) == 2
        deadline = time.monotonic() + 10.0  # they get the CPU even on a loaded machine
        while not all(on_cpu_ns(pid) > 20_000_000 for pid in pids):
            assert time.monotonic() < deadline, "a busy loop got no CPU in 10 s"
            time.sleep(0.05)
        for pid in pids:
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [
                b"-c",
                b"while True: pass",
            ]
        seen = snapshot(frozenset(pids))
        assert {t.kind for (pid, _), t in seen.items() if pid in pids} == {"busy loop"}
    for pid in pids:  # killed by PID and reaped: no process, no zombie
        assert not Path(f"/proc/{pid}").exists()


def test_the_busy_loops_run_at_nice_0_under_a_niced_bench() -> None:
    script = (
        "import os; from bench.cpuload import busy\n"
        "with busy(1) as pids: print(os.getpriority(os.PRIO_PROCESS, 0),"
        " os.getpriority(os.PRIO_PROCESS, pids[0]))"
    )
    out = subprocess.run(
        ["nice", "-n", "5", sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.split() == ["5", "0"]


def test_the_busy_loops_are_stopped_when_the_call_fails() -> None:
    with pytest.raises(RuntimeError), busy(1) as pids:
        raise RuntimeError("the call failed")
    assert not Path(f"/proc/{pids[0]}").exists()


def test_processes_are_named_by_kind() -> None:
    none: frozenset[int] = frozenset()
    # Chromium's children rewrite their command line as one string
    renderer = ["/usr/lib/chromium/chromium --type=renderer --user-data-dir=/tmp/playwright_x"]
    assert kind(10, renderer, none) == "chromium renderer"
    assert kind(10, ["/usr/lib/chromium/chromium", "--type=gpu-process"], none) == "chromium gpu"
    assert kind(10, ["/usr/lib/chromium/chromium", "--headless"], none) == "chromium browser"
    peer = ["/x/.venv/bin/python", "-m", "peers.patient", "--relay", "ws://198.18.0.1"]
    assert kind(10, peer, none) == "aiortc peer"
    assert kind(10, ["python", "relay.py", "--config", "c.yaml"], none) == "relay"
    assert kind(10, ["python", "-m", "tests.netem", "serve", "eth0", "t"], none) == "emulator"
    assert kind(10, [], none) == "kernel"
    assert kind(10, ["python", "-c", "while True: pass"], frozenset({10})) == "busy loop"
    assert kind(os.getpid(), ["python", "-m", "bench.network"], none) == "bench"


def test_shares_are_percent_of_a_core_by_role_and_kind() -> None:
    second = 1_000_000_000
    before = {
        (1, 1): Task("chromium renderer", 7, 0, 0),
        (1, 2): Task("chromium renderer", 7, second, 0),
        (2, 2): Task("busy loop", 9, 0, 0),
        (3, 3): Task("aiortc peer", 9, 0, 0, ours=False),
    }
    after = {
        (1, 1): Task("chromium renderer", 7, second, second // 2),
        (1, 2): Task("chromium renderer", 7, 2 * second, 0),
        (1, 4): Task("chromium renderer", 7, second // 2, 0),  # a thread born meanwhile
        (2, 2): Task("busy loop", 9, 2 * second, 2 * second),
        (3, 3): Task("aiortc peer", 9, second // 5, 0, ours=False),
    }
    got = shares(before, after, 2.0, roles={7: "patient"})
    assert got == {
        "patient chromium renderer": (125.0, 25.0),
        "busy loop": (100.0, 100.0),
        "others' aiortc peer": (10.0, 0.0),
    }
    line = "patient chromium renderer 125/25, busy loop 100/100, others' aiortc peer 10/0"
    assert shares_line(got) == line
    assert shares_line(got, least=50) == "patient chromium renderer 125/25, busy loop 100/100"


def test_the_machine_line_is_percent_of_a_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    ticks = os.sysconf("SC_CLK_TCK")
    line = machine_line((5 * ticks, 0), (8 * ticks, ticks // 10), 2.0)
    assert line == "machine 150/200 busy (steal 5)"


def chromium_threads() -> list[tuple[str, int, int]]:
    """(thread name, nice, scheduling policy) of every Chromium thread this process started."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out = []
    for pid in parents:
        with contextlib.suppress(OSError):
            if b"chromium" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                continue
            if not descends(pid, os.getpid(), parents):
                continue
            for task in Path(f"/proc/{pid}/task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                name = (task / "comm").read_text().strip()
                out.append((name, int(fields[16]), int(fields[38])))
    return out


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: Chromium raises its threads then")
async def test_chromium_without_cap_sys_nice_keeps_its_threads_at_nice_0(tmp_path: Path) -> None:
    """``--chromium-no-sys-nice``: none of its threads above nice 0; as root, some are."""
    if reason := chromium_missing():
        pytest.skip(reason)
    seen = {}
    for prefix in ((), network.NO_SYS_NICE):
        async with Browsers(tmp_path, prefix) as browsers:
            page = await (await browsers.launch()).new_page()
            await page.evaluate("new AudioContext().resume()")  # the audio threads too
            await asyncio.sleep(1.0)
            seen[prefix] = chromium_threads()
    assert seen[()], "no Chromium thread found"
    raised = [t for t in seen[()] if t[1] < 0 or t[2] != 0]
    assert raised, f"as root Chromium raised none of its threads: {seen[()]}"
    assert seen[network.NO_SYS_NICE]
    assert [t for t in seen[network.NO_SYS_NICE] if t[1] < 0 or t[2] != 0] == []
