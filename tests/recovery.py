"""The recovery scenarios' network: a patient on two links, a practitioner, the relay between.

Shared by tests/test_recovery.py and ``make bench-recovery`` (any pairing: the
peers are started by the caller, inside ``net.patient`` and ``net.practitioner``;
the relay listens on ``RELAY_ADDRESS`` in the hub)::

    async with recovery_network() as net:
        relay = RelayProcess(config, net.hub.name, host=RELAY_ADDRESS)   # auth.open: true
        ...start the peers with net.patient.command(...), net.practitioner.command(...)
        changed_at = await net.change("patient")      # new interface and address, old gone
        async with net.outage("patient"):             # nothing passes; addresses unchanged
            await asyncio.sleep(3)
        back = await media_back(process, after=changed_at)  # wall-clock time of the line

::

    patient ──v0── hub ──v1── practitioner         198.18.1.2 / .1    198.18.2.1 / .2
            ╰─vN── (after change("patient"))       198.18.{10+n}.2 / .1
    the relay: 198.18.0.1 on the hub's loopback, reached by both through their default route

A network change adds a veth with a new 198.18.x address, moves the default
route to it and deletes the old link (as a phone going from Wi-Fi to mobile
data); an outage drops everything to and from one side in the hub (iptables
DROP rules, removed at the end of the block): the kernel has no sch_netem.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from playwright.async_api import Page

from peers.netns import Netns, Network, command_missing
from tests.processes import Process

__all__ = [
    "FRAMES_SHOWN",
    "RELAY_ADDRESS",
    "Outage",
    "RecoveryNetwork",
    "first_shown",
    "log_time",
    "media_back",
    "recovery_network",
    "stalled",
]

RELAY_ADDRESS = "198.18.0.1"
MEDIA_BACK = re.compile(r"media back after (\d+) ms \(([a-z-]+)")


@dataclass
class RecoveryNetwork:
    """The hub (relay, router), the patient and the practitioner; their current links."""

    net: Network
    hub: Netns
    patient: Netns
    practitioner: Netns
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # side: (its dev, hub's dev)
    addresses: dict[str, str] = field(default_factory=dict)  # side: its current address
    restored_at = 0.0  # time.time() when the last outage() ended: its rules' removal began...
    restored_by = 0.0  # ...and was done
    _subnets: itertools.count[int] = field(default_factory=lambda: itertools.count(10))

    def side(self, name: str) -> Netns:
        return self.patient if name == "patient" else self.practitioner

    async def attach(self, name: str, subnet: int) -> None:
        """A new link from ``name`` to the hub on 198.18.SUBNET.0/24; the default route on it."""
        ns = self.side(name)
        address = f"198.18.{subnet}.2"
        devs = await self.net.link(ns, f"{address}/24", self.hub, f"198.18.{subnet}.1/24")
        await self.net.run(ns, "ip", "route", "replace", "default", "via", f"198.18.{subnet}.1")
        self.links[name], self.addresses[name] = devs, address

    async def change(self, name: str) -> float:
        """``name`` moves to a new interface and address, the old link gone; time.time() then."""
        old_dev = self.links[name][0]
        await self.attach(name, next(self._subnets))
        await self.net.run(self.side(name), "ip", "link", "del", old_dev)
        return time.time()

    @contextlib.asynccontextmanager
    async def outage(self, name: str) -> AsyncIterator[Outage]:
        """Nothing passes to or from ``name`` during the block (its addresses stay).

        The DROP rules go in at once and out at once, in one commit each (iptables-restore):
        the media (forwarded through the hub) and the relay's own connection (to and from the
        hub itself) come back together, both ways at one moment, as a network that returns
        (one ``iptables -D`` per rule let it through one way up to a few hundred ms before the
        other under load). ``Outage.relay_back()`` lets the relay's traffic through before the
        block ends, the media to the other side still dropped. ``restored_at`` is time.time()
        just before the last rules go, ``restored_by`` when they are gone.
        """
        dev = self.links[name][1]
        cut = Outage(
            self,
            media_rules=[f"FORWARD -i {dev}", f"FORWARD -o {dev}"],
            relay_rules=[f"INPUT -i {dev}", f"OUTPUT -o {dev}"],
        )
        await self.iptables_commit("-I", cut.media_rules + cut.relay_rules)
        try:
            yield cut
        finally:
            self.restored_at = time.time()  # no media passes before this
            await self.iptables_commit("-D", cut.media_rules + cut.relay_rules)
            self.restored_by = time.time()

    async def iptables_commit(self, verb: str, rules: list[str]) -> None:
        """``verb`` (-I, -D) each of the hub's DROP ``rules`` ("CHAIN match...") in one commit."""
        if not rules:
            return
        lines = [f"{verb} {rule} -j DROP" for rule in rules]
        with tempfile.NamedTemporaryFile("w", prefix="epc-outage-", encoding="utf-8") as file:
            file.write("\n".join(["*filter", *lines, "COMMIT", ""]))
            file.flush()
            await self.net.run(self.hub, "iptables-restore", "-w", "--noflush", file.name)


@dataclass
class Outage:
    """The DROP rules of one ``RecoveryNetwork.outage()``: the media's and the relay's."""

    net: RecoveryNetwork
    media_rules: list[str]  # "CHAIN match...", as iptables-restore reads them
    relay_rules: list[str] = field(default_factory=list)
    relay_back_at = 0.0  # time.time() when relay_back() removed the first of its rules

    async def relay_back(self) -> None:
        """The side reaches the relay again; the media between the sides stays dropped."""
        rules, self.relay_rules = self.relay_rules, []
        self.relay_back_at = time.time()
        await self.net.iptables_commit("-D", rules)


@contextlib.asynccontextmanager
async def recovery_network(prefix: str = "epc-rec") -> AsyncIterator[RecoveryNetwork]:
    """The two sides and the hub, namespaces deleted at the end (NetworkError without root)."""
    async with Network(prefix) as net:
        if reason := command_missing("iptables", "iptables") or command_missing(
            "iptables-restore", "iptables"
        ):
            from peers.errors import NetworkError

            raise NetworkError(reason)
        hub = await net.namespace("hub")
        await net.run(hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        await net.run(hub, "ip", "addr", "add", f"{RELAY_ADDRESS}/32", "dev", "lo")
        rec = RecoveryNetwork(net, hub, await net.namespace("pat"), await net.namespace("pra"))
        await rec.attach("patient", 1)
        await rec.attach("practitioner", 2)
        yield rec


def log_time(line: str) -> float:
    """The time.time() of a peer's log line (logging's asctime, local time, milliseconds)."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


async def media_back(
    process: Process, start: int = 0, wait: float = 20.0
) -> tuple[float, int, str]:
    """The peer's next ``media back after N ms (METHOD`` line from line ``start`` on.

    Returns its time.time(), N (from the last byte received) and the method.
    """
    match = await process.expect(MEDIA_BACK, wait, start=start)
    line = next(line for line in process.lines[start:] if match.group(0) in line)
    return log_time(line), int(match.group(1)), match.group(2)


# A page's remote video, timed by the page itself: each frame it presents, from
# requestVideoFrameCallback, as [presented, received] in ms since the epoch (the clock of
# time.time()): when the frame went to the screen, and when its last packet arrived
# (null where the browser does not say). Not a poll: a frame decoded at any moment is
# timed at that moment, whether or not anyone asks. Kept in ``epcShown``, the latest 3000.
# And the page's stalls, [from, to] in ms since the epoch (``epcStalls``, the latest 1000):
# a 25 ms timer that fired 100 ms or more late, the page (its renderer) starved of CPU.
FRAMES_SHOWN = """
(() => {
  if (globalThis.epcShown) return;
  const video = document.getElementById("remote-video");
  const origin = performance.timeOrigin;
  globalThis.epcShown = [];
  const onFrame = (now, meta) => {
    const received = meta.receiveTime === undefined ? null : origin + meta.receiveTime;
    epcShown.push([origin + meta.presentationTime, received]);
    if (epcShown.length > 3000) epcShown.splice(0, 1000);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  globalThis.epcStalls = [];
  let last = Date.now();
  setInterval(() => {
    const now = Date.now();
    if (now - last >= 125) epcStalls.push([last + 25, now]); // 100 ms late or more
    if (epcStalls.length > 1000) epcStalls.splice(0, 500);
    last = now;
  }, 25);
})()
"""


async def first_shown(page: Page, after: float) -> tuple[float, float | None] | None:
    """The first frame the page's remote video presented after ``after`` (time.time()), as
    (presented, received) in time.time() seconds; None: none yet (FRAMES_SHOWN runs there)."""
    found: list[float | None] | None = await page.evaluate(
        "(after) => epcShown.find(([at]) => at > after) ?? null", after * 1000
    )
    if found is None:
        return None
    presented, received = found
    assert presented is not None
    return presented / 1000, None if received is None else received / 1000


async def stalled(page: Page, start: float, end: float) -> float:
    """Seconds of ``start`` to ``end`` (time.time()) during which the page was stalled (its
    timers late by 100 ms or more: FRAMES_SHOWN's ``epcStalls``)."""
    stalls: list[list[float]] = await page.evaluate("epcStalls")
    return sum(max(0.0, min(end, b / 1000) - max(start, a / 1000)) for a, b in stalls)
