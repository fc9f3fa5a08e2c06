"""A user-space netem: delay, jitter, loss, rate and outages on one namespace's interface.

This kernel has no ``sch_netem`` (``tc qdisc add ... netem`` fails) and no
dummy links, so the tests and benchmarks impair links here instead: iptables'
``NFQUEUE`` target (mangle table, ``POSTROUTING -o DEV`` for egress,
``PREROUTING -i DEV`` for ingress) hands every IPv4 packet of the interface to
a child process (``NetfilterQueue``, on Debian's ``libnetfilter-queue``), which
gives each packet its verdict later: accepted at its time to send, or dropped.

    async with Network() as net:
        a, b, dev = await pair(net)                     # two namespaces, one veth
        async with Link(a, dev, both=Impairment(delay_ms=75, loss=0.05)) as link:
            ...                                         # the call
            await link.update(outage=True)              # nothing passes, either way
            await link.update(outage=False)
            await link.update(egress=Impairment(rate_kbit=300, queue_ms=100))

The arithmetic follows Linux ``net/sched/sch_netem.c`` (``netem_enqueue``,
``tabledist``, ``loss_gilb_ell``, ``packet_time_ns``; Linux 6.x), so that figures
compare with published ``tc qdisc ... netem`` setups:

- ``delay_ms`` and ``jitter_ms``: ``tc ... netem delay D J``. Without a
  ``distribution`` table netem draws the delay uniformly from ``[D - J, D + J)``;
  so does this. Delay correlation is not modelled.
- Reordering: netem's tfifo sorts by time to send, so jitter alone reorders
  packets. Here a packet never leaves before the one ahead of it (its time to
  send is at least the previous one's) unless ``reorder=True``; that is what
  netem does once ``rate`` is set, and what a real path does.
- ``loss``: ``tc ... netem loss random P`` (a fraction here: 0.05 is 5 %), one
  independent draw per packet, before anything else.
- ``burst``: ``tc ... netem loss gemodel p r 1-h 1-k``, the Gilbert-Elliott
  model, from the good state: each packet first moves the state (good to bad
  with probability ``p``, bad to good with ``r``), then is lost with
  ``bad_loss`` (1-h) in the bad state or ``good_loss`` (1-k) in the good one.
  It replaces ``loss``, as in netem.
- ``rate_kbit``: ``tc ... netem rate R``: each packet's time to send is
  ``max(now + delay, previous packet's time to send) + length / rate``, length
  counted as netem counts it on an Ethernet (veth) device: the IP packet plus
  its 14-byte MAC header. One consequence (netem's too): with a rate set,
  ``delay_ms`` is the delay of a packet that finds the link idle.
- ``limit``: ``tc ... netem limit N``: at most N packets held at once (netem's
  default 1000); beyond, tail drop.
- ``queue_bytes`` / ``queue_ms``: the bottleneck's buffer, which netem leaves
  to ``limit`` (packets) or to a tbf child. A packet is tail-dropped when the
  bytes waiting for the link ahead of it, plus its own, would exceed
  ``queue_bytes``; ``queue_ms`` converts at the rate, as tbf's ``latency``
  does (bytes = rate x time).
- ``outage``: not in netem. While on, every packet is dropped, those already
  held included: a link that is down carries nothing, late or not.

A setting change applies to packets that arrive afterwards; held packets keep
their time to send (``tc qdisc change`` does the same), except on an outage.
One ``Link`` per interface and direction: NFQUEUE ends the chain for a packet,
so a second link on the same interface would see nothing (use ``update``).
Only IPv4 passes through iptables; the namespaces here have IPv6 off.

The child (``python -m tests.netem serve``, run through ``ip netns exec``
because NFQUEUE belongs to one network namespace) binds the queues, installs
its iptables rules, and takes JSON lines on standard input (``set``,
``stats``, ``stop``), answering each with one JSON line. It removes its rules
on every exit, including end of input (the parent died); ``Link`` stops it by
PID if it does not answer and removes any rule left under its tag. Its timer
is a ``timerfd`` armed at the next time to send (nanoseconds, absolute
``CLOCK_MONOTONIC``): ``epoll``'s millisecond timeout would add up to 1 ms.

By hand (as root): ``python -m tests.netem link NS DEV --delay-ms 75 --loss 0.05``
impairs an existing namespace's interface until Ctrl-C; ``python -m
tests.netem probe --delay-ms 50`` builds two namespaces and prints what the
probe measures through such a link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import heapq
import itertools
import json
import math
import os
import random
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from peers.netns import Netns, Network, NetworkError, inside, run_command

__all__ = [
    "GilbertElliott",
    "Impairment",
    "Link",
    "LinkError",
    "ProbeResult",
    "Shaper",
    "pair",
    "percentile",
    "probe",
    "run_in",
]

Direction = Literal["egress", "ingress"]
DIRECTIONS: tuple[Direction, Direction] = ("egress", "ingress")
ETHERNET_HEADER = 14  # netem's qdisc_pkt_len() on an Ethernet device counts the MAC header
NETEM_LIMIT = 1000  # netem's default limit (packets)
KERNEL_QUEUE_MAX = 20000  # nfnetlink_queue's own bound on held packets (above any limit here)
TIMEOUT = 5.0 * float(os.environ.get("EPEDICARE_TEST_TIMEOUT_SCALE", "1"))
_tags = itertools.count(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m tests.netem` runs


class LinkError(RuntimeError):
    """The link emulator could not start, answer or stop."""


# -- settings ---------------------------------------------------------------------------------


def _check(owner: str, name: str, value: object, low: float, high: float | None = None) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= low
        and (high is None or value <= high)
    )
    if not ok:
        expected = f"a number from {low} to {high}" if high is not None else f"a number >= {low}"
        raise ValueError(f"{owner}.{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class GilbertElliott:
    """netem's ``loss gemodel p r 1-h 1-k``: bursty loss from a two-state Markov chain."""

    p: float  # good -> bad, per packet
    r: float  # bad -> good, per packet
    bad_loss: float = 1.0  # 1-h: loss probability in the bad state
    good_loss: float = 0.0  # 1-k: loss probability in the good state

    def __post_init__(self) -> None:
        for name in ("p", "r", "bad_loss", "good_loss"):
            _check("GilbertElliott", name, getattr(self, name), 0, 1)

    @property
    def mean_loss(self) -> float:
        """The stationary loss rate: ``(p * bad_loss + r * good_loss) / (p + r)``."""
        if self.p + self.r == 0:
            return self.good_loss
        return (self.p * self.bad_loss + self.r * self.good_loss) / (self.p + self.r)


@dataclass(frozen=True)
class Impairment:
    """What one direction of a link does to its packets (see the module docstring)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: bool = False  # let jitter reorder packets, as netem without rate does
    loss: float = 0.0  # a fraction: 0.05 is 5 %
    burst: GilbertElliott | None = None  # replaces ``loss``
    rate_kbit: float | None = None  # kbit/s (1000 bit/s), None: unlimited
    limit: int = NETEM_LIMIT  # packets held at once
    queue_bytes: int | None = None  # the bottleneck's buffer (needs rate_kbit)
    queue_ms: float | None = None  # the same, as time at the rate (needs rate_kbit)
    outage: bool = False  # drop everything

    def __post_init__(self) -> None:
        _check("Impairment", "delay_ms", self.delay_ms, 0)
        _check("Impairment", "jitter_ms", self.jitter_ms, 0, self.delay_ms)
        _check("Impairment", "loss", self.loss, 0, 1)
        if self.rate_kbit is not None:
            _check("Impairment", "rate_kbit", self.rate_kbit, 1)
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ValueError(f"Impairment.limit: expected a whole number >= 1, got {self.limit!r}")
        for name in ("queue_bytes", "queue_ms"):
            value = getattr(self, name)
            if value is None:
                continue
            _check("Impairment", name, value, 1)
            if self.rate_kbit is None:
                raise ValueError(f"Impairment.{name}: a queue bound needs rate_kbit")
        if self.queue_bytes is not None and self.queue_ms is not None:
            raise ValueError("Impairment.queue_ms: give queue_bytes or queue_ms, not both")
        if self.burst is not None and not isinstance(self.burst, GilbertElliott):
            raise ValueError(f"Impairment.burst: expected a GilbertElliott, got {self.burst!r}")

    @property
    def queue_limit_bytes(self) -> float | None:
        """The bottleneck's buffer in bytes, whichever way it was given."""
        if self.queue_bytes is not None:
            return float(self.queue_bytes)
        if self.queue_ms is not None and self.rate_kbit is not None:
            return self.rate_kbit * 1000 / 8 * self.queue_ms / 1000
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Impairment:
        if not isinstance(data, dict):
            raise ValueError(f"Impairment: expected an object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"Impairment: unknown field {unknown[0]!r}")
        fields = dict(data)
        if isinstance(burst := fields.get("burst"), dict):
            fields["burst"] = GilbertElliott(**burst)
        return cls(**fields)


# -- the pure core: one direction's arithmetic --------------------------------------------------


@dataclass
class Counters:
    seen: int = 0
    passed: int = 0
    lost: int = 0  # random or Gilbert-Elliott loss
    overflow: int = 0  # tail drop: limit or queue_bytes
    blackout: int = 0  # dropped by an outage
    bytes_passed: int = 0
    late_ns_max: int = 0  # how late the latest-sent packet left, past its time to send
    late_ns_sum: int = 0
    late_over_1ms: int = 0


class Shaper:
    """One direction's netem: ``admit`` gives a packet its time to send, or drops it.

    Pure: no I/O, the clock is passed in (nanoseconds), the randomness injected.
    """

    def __init__(self, impairment: Impairment, rng: random.Random | None = None) -> None:
        self.impairment = impairment
        self.rng = rng or random.Random()
        self.counters = Counters()
        self.last_ns = 0  # time to send of the latest admitted packet
        self.held = 0  # admitted, not yet sent
        self.bad = False  # Gilbert-Elliott state

    def set(self, impairment: Impairment) -> None:
        """New settings for packets arriving from now on (the loss state restarts if changed)."""
        if impairment.burst != self.impairment.burst:
            self.bad = False
        self.impairment = impairment

    def _lost(self) -> bool:
        ge = self.impairment.burst
        if ge is None:
            loss = self.impairment.loss
            return loss > 0 and self.rng.random() < loss
        # sch_netem.c loss_gilb_ell(): first the transition, then the draw in the new state.
        if self.bad:
            if self.rng.random() < ge.r:
                self.bad = False
        elif self.rng.random() < ge.p:
            self.bad = True
        return self.rng.random() < (ge.bad_loss if self.bad else ge.good_loss)

    def admit(self, now_ns: int, length: int) -> int | None:
        """The packet's time to send (ns), or None if it is dropped. ``length``: IP bytes."""
        imp = self.impairment
        c = self.counters
        c.seen += 1
        if imp.outage:
            c.blackout += 1
            return None
        if self._lost():
            c.lost += 1
            return None
        if self.held >= imp.limit:
            c.overflow += 1
            return None
        delay_ns = int(imp.delay_ms * 1e6)
        if imp.jitter_ms:
            jitter_ns = int(imp.jitter_ms * 1e6)
            delay_ns += self.rng.randrange(-jitter_ns, jitter_ns) if jitter_ns else 0
        send_ns = now_ns + delay_ns
        if imp.rate_kbit is not None:
            rate_bytes_per_ns = imp.rate_kbit * 1000 / 8 / 1e9
            start_ns = max(send_ns, self.last_ns)
            if (queue := imp.queue_limit_bytes) is not None:
                waiting = (start_ns - send_ns) * rate_bytes_per_ns
                if waiting + length + ETHERNET_HEADER > queue:
                    c.overflow += 1
                    return None
            send_ns = start_ns + int((length + ETHERNET_HEADER) / rate_bytes_per_ns)
        elif not imp.reorder:
            send_ns = max(send_ns, self.last_ns)
        self.last_ns = max(self.last_ns, send_ns)
        self.held += 1
        return send_ns

    def sent(self, due_ns: int, now_ns: int, length: int) -> None:
        """A held packet left at ``now_ns`` (it was due at ``due_ns``)."""
        self.held -= 1
        self._passed(max(0, now_ns - due_ns), length)

    def passed_at_once(self, length: int) -> None:
        """A packet admitted with a time to send already reached, sent in the same step."""
        self.held -= 1
        self._passed(0, length)

    def _passed(self, late_ns: int, length: int) -> None:
        c = self.counters
        c.passed += 1
        c.bytes_passed += length
        c.late_ns_sum += late_ns
        c.late_ns_max = max(c.late_ns_max, late_ns)
        c.late_over_1ms += late_ns > 1_000_000

    def blacked_out(self, count: int) -> None:
        """``count`` held packets were dropped by an outage."""
        self.held -= count
        self.counters.blackout += count


# -- the child: NFQUEUE, a timerfd, JSON lines on stdin -------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """A one-shot timer on CLOCK_MONOTONIC (``time.monotonic_ns``'s clock), to the nanosecond."""

    CLOCK_MONOTONIC, TFD_NONBLOCK, TFD_CLOEXEC, TFD_TIMER_ABSTIME = 1, 0o4000, 0o2000000, 1

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(
            self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC
        )
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.armed_ns: int | None = None

    def arm(self, at_ns: int | None) -> None:
        if at_ns == self.armed_ns:
            return
        value = max(at_ns, 1) if at_ns is not None else 0  # 0 disarms
        spec = _Itimerspec(
            _Timespec(0, 0), _Timespec(value // 1_000_000_000, value % 1_000_000_000)
        )
        if self._libc.timerfd_settime(self.fd, self.TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self.armed_ns = at_ns

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        self.armed_ns = None


def _iptables_rule(direction: Direction, dev: str, tag: str, queue: int) -> list[str]:
    chain, flag = ("POSTROUTING", "-o") if direction == "egress" else ("PREROUTING", "-i")
    return [
        "-t", "mangle", chain, flag, dev, "-m", "comment", "--comment", tag,
        "-j", "NFQUEUE", "--queue-num", str(queue),
    ]  # fmt: skip


def _iptables(action: str, rule: list[str]) -> None:
    table, chain, *rest = rule[1], rule[2], *rule[3:]
    subprocess.run(
        ["iptables", "-w", "-t", table, action, chain, *rest],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


REALTIME_PRIORITY = 10  # SCHED_FIFO, low among real-time tasks (kernel threads use 50)


def _realtime() -> bool:
    """Run the loop under SCHED_FIFO when allowed: netem works from a kernel timer, and a
    normal task woken on a shared, loaded machine can start milliseconds late. The kernel
    still caps real-time tasks at 95 % of a CPU (sched_rt_runtime_us)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except (PermissionError, OSError):
        return False
    return True


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def serve(dev: str, directions: list[Direction], tag: str) -> None:
    """The packet loop (inside the namespace): bind, add rules, ready, commands until stop."""
    from netfilterqueue import NetfilterQueue, Packet

    shapers = {d: Shaper(Impairment()) for d in directions}
    heap: list[tuple[int, int, Direction, int, Packet]] = []  # (due, order, direction, len, pkt)
    order = itertools.count()
    queues: dict[int, tuple[Direction, NetfilterQueue]] = {}
    numbers: dict[str, int] = {}
    rules: list[list[str]] = []
    epoll = select.epoll()
    timer = _TimerFd()

    def handler(direction: Direction) -> Callable[[Packet], None]:
        shaper = shapers[direction]

        def on_packet(pkt: Packet) -> None:
            now = time.monotonic_ns()
            length = pkt.get_payload_len()
            due = shaper.admit(now, length)
            if due is None:
                pkt.drop()
            elif due <= now and not any_held[direction]:
                pkt.accept()
                shaper.passed_at_once(length)
            else:
                heapq.heappush(heap, (due, next(order), direction, length, pkt))
                any_held[direction] += 1

        return on_packet

    any_held: dict[Direction, int] = dict.fromkeys(directions, 0)

    def release(now: int) -> None:
        while heap and heap[0][0] <= now:
            due, _, direction, length, pkt = heapq.heappop(heap)
            pkt.accept()
            any_held[direction] -= 1
            shapers[direction].sent(due, time.monotonic_ns(), length)

    def blackout(direction: Direction) -> None:
        nonlocal heap
        kept = []
        dropped = 0
        for entry in heap:
            if entry[2] == direction:
                entry[4].drop()
                dropped += 1
            else:
                kept.append(entry)
        heapq.heapify(kept)
        heap = kept
        any_held[direction] -= dropped
        shapers[direction].blacked_out(dropped)

    def stats() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "cpu_s": time.process_time(),
            "held": len(heap),
            "directions": {d: dataclasses.asdict(s.counters) for d, s in shapers.items()},
        }

    def command(line: str) -> tuple[dict[str, Any], bool]:
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "set":
                new = {
                    d: Impairment.from_json(request[d])
                    for d in DIRECTIONS
                    if request.get(d) is not None
                }
                if missing := sorted(set(new) - set(shapers)):
                    raise ValueError(f"{missing[0]}: this link was started without that direction")
                for d, imp in new.items():
                    shapers[d].set(imp)
                    if imp.outage:
                        blackout(d)
                return {"ok": True, "at_ns": time.time_ns(), **stats()}, False
            if op == "stats":
                return {"ok": True, **stats()}, False
            if op == "stop":
                return {"ok": True, **stats()}, True
            raise ValueError(f"unknown op {op!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return {"ok": False, "error": str(exc)}, False

    try:
        try:
            socket.if_nametoindex(dev)
        except OSError:
            _say({"ready": False, "error": f"no interface {dev!r} in this namespace"})
            return
        realtime = _realtime()
        gc.disable()  # no collector pauses in the packet loop: it makes no reference cycles
        base = random.randrange(1, 60000)
        for direction in directions:
            nfq = NetfilterQueue()
            for number in range(base, base + 50):
                try:
                    nfq.bind(number, handler(direction), max_len=KERNEL_QUEUE_MAX)
                except OSError:
                    continue
                break
            else:
                raise LinkError(f"no free NFQUEUE number from {base}")
            base = number + 1
            queues[nfq.get_fd()] = (direction, nfq)
            numbers[direction] = number
            epoll.register(nfq.get_fd(), select.EPOLLIN)
        for direction in directions:
            rule = _iptables_rule(direction, dev, tag, numbers[direction])
            _iptables("-A", rule)
            rules.append(rule)
        epoll.register(timer.fd, select.EPOLLIN)
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        epoll.register(stdin, select.EPOLLIN)
        _say({"ready": True, "pid": os.getpid(), "queues": numbers, "realtime": realtime})
        pending = b""
        running = True
        while running:
            for fd, _ in epoll.poll():
                if fd == timer.fd:
                    timer.clear()
                elif fd in queues:
                    queues[fd][1].run(block=False)
                elif fd == stdin:
                    try:
                        chunk = os.read(stdin, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:  # the parent is gone
                        running = False
                        break
                    pending += chunk
                    while running and b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        reply, stop = command(line.decode())
                        _say(reply)
                        running = not stop
            release(time.monotonic_ns())
            timer.arm(heap[0][0] if heap else None)
    finally:
        for rule in rules:  # first: no new packets come to a queue about to close
            with contextlib.suppress(subprocess.CalledProcessError):
                _iptables("-D", rule)
        for _, _, _, _, pkt in heap:  # what was held leaves now rather than being lost
            with contextlib.suppress(RuntimeError):
                pkt.accept()
        for _, nfq in queues.values():
            nfq.unbind()


# -- the parent: Link ------------------------------------------------------------------------------


class Link:
    """One namespace's interface impaired while the block runs (see the module docstring).

    ``egress`` and ``ingress`` impair one direction each; ``both`` sets both
    (and the child then queues both directions). A direction given neither is
    not queued at all. ``update`` changes settings on the fly; ``outage=True``
    blacks out every queued direction until ``outage=False``.
    """

    def __init__(
        self,
        ns: Netns,
        interface: str,
        *,
        egress: Impairment | None = None,
        ingress: Impairment | None = None,
        both: Impairment | None = None,
    ) -> None:
        if both is not None and (egress is not None or ingress is not None):
            raise ValueError("Link: give both=, or egress= and/or ingress=, not both")
        if both is not None:
            egress = ingress = both
        if egress is None and ingress is None:
            raise ValueError("Link: nothing to impair (give egress=, ingress= or both=)")
        self.ns = ns
        self.interface = interface
        self.settings: dict[Direction, Impairment] = {}
        if egress is not None:
            self.settings["egress"] = egress
        if ingress is not None:
            self.settings["ingress"] = ingress
        self.tag = f"epc-netem-{os.getpid()}-{next(_tags)}"
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.queues: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Link:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        argv = [
            sys.executable, "-m", "tests.netem", "serve", self.interface, self.tag,
            *self.settings,
        ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *self.ns.command(*argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,  # a terminal's Ctrl-C is for the parent, which stops it
        )
        self.pid = self.proc.pid
        ready = await self._read()
        if not ready.get("ready"):
            raise LinkError(f"link emulator on {self.ns.name}: {ready.get('error')}")
        self.queues = ready["queues"]
        await self._request({"op": "set", **{d: i.to_json() for d, i in self.settings.items()}})

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
        except TimeoutError:
            raise LinkError(f"link emulator (pid {self.pid}) did not answer") from None
        if not line:
            status = await self.proc.wait()
            raise LinkError(f"link emulator (pid {self.pid}) exited with status {status}")
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            raise LinkError("link emulator is not running")
        async with self._lock:
            try:
                self.proc.stdin.write(json.dumps(request).encode() + b"\n")
                await self.proc.stdin.drain()
            except ConnectionError:
                status = await self.proc.wait()
                raise LinkError(
                    f"link emulator (pid {self.pid}) exited with status {status}"
                ) from None
            reply = await self._read()
        if not reply.get("ok"):
            raise LinkError(f"link emulator refused {request.get('op')}: {reply.get('error')}")
        return reply

    async def update(
        self,
        *,
        egress: Impairment | None = None,
        ingress: Impairment | None = None,
        both: Impairment | None = None,
        outage: bool | None = None,
    ) -> int:
        """New settings (directions not named keep theirs); ``outage`` toggles every direction.

        Returns when the emulator applied them: its ``time.time_ns()`` at that moment (the
        probe's clock).
        """
        if both is not None:
            egress = ingress = both
        new = dict(self.settings)
        for direction, imp in (("egress", egress), ("ingress", ingress)):
            if imp is not None:
                if direction not in self.settings:
                    raise ValueError(f"Link.update: {direction} is not queued on this link")
                new[direction] = imp
        if outage is not None:
            new = {d: dataclasses.replace(i, outage=outage) for d, i in new.items()}
        reply = await self._request({"op": "set", **{d: i.to_json() for d, i in new.items()}})
        self.settings = new
        return int(reply["at_ns"])

    async def stats(self) -> dict[str, Any]:
        """The emulator's counters per direction, its CPU seconds and packets held."""
        return await self._request({"op": "stats"})

    async def close(self) -> None:
        """Stop the child (by its PID if it does not answer) and remove any rule left behind."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "stop"}\n')
                await proc.stdin.drain()
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), TIMEOUT)
            except (TimeoutError, ConnectionError):
                proc.kill()
                await proc.wait()
        await self._remove_leftover_rules()

    async def _remove_leftover_rules(self) -> None:
        for line in await self.rules():
            argv = ["iptables", "-w", "-t", "mangle", "-D", *shlex.split(line)[1:]]
            with contextlib.suppress(NetworkError):
                await run_command(*self.ns.command(*argv))

    async def rules(self) -> list[str]:
        """This link's iptables rules still present in the namespace (``-S`` lines)."""
        try:
            out = await run_command(*self.ns.command("iptables", "-w", "-t", "mangle", "-S"))
        except NetworkError:
            return []  # the namespace is gone, and its rules with it
        return [line for line in out.splitlines() if self.tag in line]


async def run_in(ns: Netns, *argv: str) -> str:
    """Run a command inside ``ns``; its standard output, or NetworkError naming it."""
    return await run_command(*ns.command(*argv))


# -- the probe: a UDP echo between two namespaces --------------------------------------------------

PROBE_PORT = 7007
_HEADER = struct.Struct("!IQQ")  # sequence, sent (ns), the reply's departure (ns; 0 going out)


async def pair(
    net: Network, a_address: str = "198.18.0.1/24", b_address: str = "198.18.0.2/24"
) -> tuple[Netns, Netns, str]:
    """Two namespaces joined by one veth; the namespaces and ``a``'s interface name."""
    a = await net.namespace("a")
    b = await net.namespace("b")
    dev, _ = await net.link(a, a_address, b, b_address)
    return a, b, dev


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class ProbeResult:
    """What one probe run measured: one-way and round-trip delays (ms), loss, rates."""

    sent: int
    payload: int  # UDP payload bytes of each probe packet
    duration_s: float  # from the first send to the last send
    sent_ns: dict[int, int] = field(default_factory=dict)  # seq -> sent
    arrived_ns: dict[int, int] = field(default_factory=dict)  # seq -> arrived at the echo
    replied_ns: dict[int, int] = field(default_factory=dict)  # seq -> the echo left the echo
    returned_ns: dict[int, int] = field(default_factory=dict)  # seq -> the echo came back
    order: list[int] = field(default_factory=list)  # sequence numbers in arrival order

    @property
    def forward_ms(self) -> list[float]:
        return [(self.arrived_ns[s] - self.sent_ns[s]) / 1e6 for s in self.arrived_ns]

    @property
    def backward_ms(self) -> list[float]:
        return [(self.returned_ns[s] - self.replied_ns[s]) / 1e6 for s in self.returned_ns]

    @property
    def rtt_ms(self) -> list[float]:
        return [(self.returned_ns[s] - self.sent_ns[s]) / 1e6 for s in self.returned_ns]

    @property
    def forward_loss(self) -> float:
        return 1 - len(self.arrived_ns) / self.sent if self.sent else math.nan

    @property
    def backward_loss(self) -> float:
        n = len(self.arrived_ns)
        return 1 - len(self.returned_ns) / n if n else math.nan

    @property
    def reordered(self) -> int:
        """Packets that arrived after one sent later than them."""
        highest, late = -1, 0
        for seq in self.order:
            late += seq < highest
            highest = max(highest, seq)
        return late

    @property
    def offered_kbit(self) -> float:
        """What was sent, IP bytes (payload + 28) over the sending time."""
        return _kbit(self.sent, self.payload, self.duration_s)

    @property
    def throughput_kbit(self) -> float:
        """What arrived at the echo, IP bytes over its arrivals' span (first to last)."""
        times = sorted(self.arrived_ns.values())
        if len(times) < 2:
            return math.nan
        return _kbit(len(times) - 1, self.payload, (times[-1] - times[0]) / 1e9)

    def summary(self) -> dict[str, float]:
        f, b, r = self.forward_ms, self.backward_ms, self.rtt_ms
        return {
            "fwd_p50": percentile(f, 50), "fwd_p95": percentile(f, 95),
            "fwd_p99": percentile(f, 99), "fwd_min": min(f, default=math.nan),
            "fwd_max": max(f, default=math.nan),
            "back_p50": percentile(b, 50), "rtt_p50": percentile(r, 50),
            "rtt_p95": percentile(r, 95),
            "fwd_loss": self.forward_loss, "back_loss": self.backward_loss,
            "offered_kbit": self.offered_kbit, "throughput_kbit": self.throughput_kbit,
            "reordered": self.reordered,
        }  # fmt: skip


def _kbit(packets: int, payload: int, seconds: float) -> float:
    return packets * (payload + 28) * 8 / seconds / 1000 if seconds > 0 else math.nan


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


def _stamped_socket(ns: Netns, bind: tuple[str, int] | None = None) -> socket.socket:
    """A UDP socket created inside ``ns``, stamping arrivals in the kernel (CLOCK_REALTIME)."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(0.05)
    if bind is not None:
        sock.bind(bind)
    return sock


def _receive(sock: socket.socket) -> tuple[bytes, tuple[str, int], int] | None:
    """One datagram, its sender and the kernel's arrival stamp (ns), or None on timeout."""
    try:
        data, ancillary, _, addr = sock.recvmsg(65536, socket.CMSG_SPACE(_TIMESPEC.size))
    except TimeoutError:
        return None
    stamp = time.time_ns()  # only if the kernel gave none
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(value[: _TIMESPEC.size])
            stamp = sec * 1_000_000_000 + nsec
    return data, addr, stamp


def _echo(sock: socket.socket, result: ProbeResult, stop: threading.Event, reply: int) -> None:
    padding = bytes(max(0, reply - _HEADER.size))
    while not stop.is_set():
        if (got := _receive(sock)) is None:
            continue
        data, addr, stamp = got
        seq, sent, _ = _HEADER.unpack_from(data)
        result.arrived_ns[seq] = stamp
        result.order.append(seq)
        sock.sendto(_HEADER.pack(seq, sent, time.time_ns()) + padding, addr)


def _returns(sock: socket.socket, result: ProbeResult, stop: threading.Event) -> None:
    while not stop.is_set():
        if (got := _receive(sock)) is not None:
            seq, _, replied = _HEADER.unpack_from(got[0])
            result.returned_ns[seq] = got[2]
            result.replied_ns[seq] = replied


async def probe(
    a: Netns,
    b: Netns,
    b_address: str = "198.18.0.2",
    *,
    count: int = 500,
    rate_pps: float = 200,
    payload: int = 200,
    reply_payload: int = _HEADER.size,
    drain_s: float = 0.5,
    during: Callable[[ProbeResult], Awaitable[Any]] | None = None,
) -> ProbeResult:
    """``count`` UDP packets of ``payload`` bytes from ``a`` to an echo in ``b`` at ``rate_pps``.

    The sockets live in this process (created inside their namespaces), read
    by two threads; arrivals are stamped by the kernel (``SO_TIMESTAMPNS``) and
    departures just before ``send``, all on CLOCK_REALTIME, which every
    namespace shares: one-way delays are exact, and no wake-up latency of this
    process is counted. The echo answers each packet with ``reply_payload``
    bytes (20 by default; as many as ``payload`` to load both ways like a call).
    ``during(result)`` runs as a task while the packets go out (to change the
    link mid-run); stamps to compare with the results are ``time.time_ns()``.
    """
    if payload < _HEADER.size:
        raise ValueError(f"probe: payload must be at least {_HEADER.size} bytes, got {payload}")
    result = ProbeResult(sent=0, payload=payload, duration_s=0.0)
    echo_sock = _stamped_socket(b, (b_address, 0))
    send_sock = _stamped_socket(a)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_echo, args=(echo_sock, result, stop, reply_payload), daemon=True),
        threading.Thread(target=_returns, args=(send_sock, result, stop), daemon=True),
    ]
    side: asyncio.Task[Any] | None = None
    try:
        send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        send_sock.connect(echo_sock.getsockname())
        for thread in threads:
            thread.start()
        if during is not None:
            side = asyncio.ensure_future(during(result))
        padding = bytes(payload - _HEADER.size)
        start = time.time_ns()
        interval = 1e9 / rate_pps
        for seq in range(count):
            due = start + int(seq * interval)
            if (wait := (due - time.time_ns()) / 1e9) > 0:
                await asyncio.sleep(wait)
            now = time.time_ns()
            result.sent_ns[seq] = now
            send_sock.send(_HEADER.pack(seq, now, 0) + padding)
            result.sent = seq + 1
        result.duration_s = (time.time_ns() - start) / 1e9 if count > 1 else 0.0
        if side is not None:
            await side
        await asyncio.sleep(drain_s)
    finally:
        if side is not None and not side.done():
            side.cancel()
        stop.set()
        for thread in threads:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)
        send_sock.close()
        echo_sock.close()
    return result


# -- command line -------------------------------------------------------------------------------


def impairment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="fraction: 0.05 is 5 %%")
    parser.add_argument("--rate-kbit", type=float)
    parser.add_argument("--queue-ms", type=float)


def impairment_of(args: argparse.Namespace) -> Impairment:
    return Impairment(
        delay_ms=args.delay_ms,
        jitter_ms=args.jitter_ms,
        loss=args.loss,
        rate_kbit=args.rate_kbit,
        queue_ms=args.queue_ms,
    )


async def _hold(args: argparse.Namespace) -> None:
    imp = impairment_of(args)
    kwargs = {"both": imp} if args.direction == "both" else {args.direction: imp}
    async with Link(Netns(args.netns), args.dev, **kwargs) as link:
        print(f"netem: {args.netns}/{args.dev} {args.direction}: {imp} (Ctrl-C stops)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            stats = await link.stats()
            print(
                "; ".join(
                    f"{d}: {c['seen']} seen, {c['passed']} passed, {c['lost']} lost, "
                    f"{c['overflow']} overflowed, {c['blackout']} blacked out"
                    for d, c in stats["directions"].items()
                ),
                flush=True,
            )


async def _probe_once(args: argparse.Namespace) -> None:
    async with Network("netem") as net:
        a, b, dev = await pair(net)
        imp = impairment_of(args)
        async with Link(a, dev, egress=imp):
            result = await probe(
                a, b, count=args.count, rate_pps=args.rate_pps, payload=args.payload
            )
        for name, value in result.summary().items():
            print(f"{name:16} {value:10.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.netem", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser(
        "serve", help="the packet loop (started by Link, inside the namespace)"
    )
    serve_p.add_argument("dev")
    serve_p.add_argument("tag")
    serve_p.add_argument("directions", nargs="+", choices=DIRECTIONS)
    link_p = sub.add_parser("link", help="impair NETNS's DEV until Ctrl-C (as root)")
    link_p.add_argument("netns")
    link_p.add_argument("dev")
    link_p.add_argument("--direction", choices=["both", *DIRECTIONS], default="both")
    impairment_args(link_p)
    probe_p = sub.add_parser("probe", help="two namespaces, one impaired way, the probe's figures")
    impairment_args(probe_p)
    probe_p.add_argument("--count", type=int, default=1000)
    probe_p.add_argument("--rate-pps", type=float, default=200)
    probe_p.add_argument("--payload", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # finally: rules removed
            serve(args.dev, args.directions, args.tag)
        elif args.command == "link":
            asyncio.run(_hold(args))
        else:
            asyncio.run(_probe_once(args))
    except (ValueError, LinkError) as exc:
        sys.exit(f"netem: {exc}")


if __name__ == "__main__":
    main()
