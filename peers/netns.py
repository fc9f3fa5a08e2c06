"""Private networks built from Linux network namespaces and veth pairs.

aioice and Chromium never gather candidates on 127.0.0.1, and a call should not
send anything (mDNS included) onto the machine's own network. So ``make demo``
(as root) and the tests hold their calls inside namespaces that they create
here and delete on exit, with addresses from 198.18.0.0/15 (the benchmarking
range) only. Nothing is ever added to the machine's own namespace.

    async with Network() as net:
        lan = await net.lan("198.18.0.2/24")       # one host with one address
        await net.run(lan, "ip", "addr")            # a command inside it
        argv = lan.command("python", "-m", "peers.patient")

Topologies with routers (NAT) are built from the same three calls:
``namespace``, ``link`` and ``run``. ``inside(ns)`` puts the sockets that this
thread creates during a block into ``ns``: how one test or benchmark process
holds both peers of a call in two namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from peers.errors import NetworkError

__all__ = [
    "Netns",
    "Network",
    "NetworkError",
    "command_missing",
    "inside",
    "netns_missing",
    "run_command",
]

_networks = itertools.count(1)


def netns_missing() -> str | None:
    """Why namespaces cannot be built on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    return command_missing("ip", "iproute2")


def command_missing(command: str, package: str) -> str | None:
    """Why ``command`` cannot run (it is not installed), or None when it can."""
    if shutil.which(command) is None:
        return f"`{command}` is missing: run `make system-deps` (Debian's {package})"
    return None


@dataclass(frozen=True)
class Netns:
    """One network namespace of a ``Network``."""

    name: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` keeps open descriptors)."""
        return ["ip", "netns", "exec", self.name, *argv]


class Network:
    """Namespaces and the links between them, all deleted when the block ends."""

    def __init__(self, prefix: str = "epc") -> None:
        self.prefix = f"{prefix}-{os.getpid()}-{next(_networks)}"
        self.namespaces: list[Netns] = []
        self._links = itertools.count(0)

    async def __aenter__(self) -> Network:
        if reason := netns_missing():
            raise NetworkError(reason)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Delete every namespace (their veth ends and processes' sockets go with them)."""
        while self.namespaces:
            ns = self.namespaces.pop()
            with contextlib.suppress(NetworkError):
                await run_command("ip", "netns", "del", ns.name)

    async def namespace(self, label: str) -> Netns:
        """A new namespace: loopback up, IPv6 off (no link-local candidates)."""
        ns = Netns(f"{self.prefix}-{len(self.namespaces)}{label}")
        await run_command("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        await self.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        await self.run(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        await run_command("ip", "-n", ns.name, "link", "set", "lo", "up")
        return ns

    async def link(self, a: Netns, a_address: str, b: Netns, b_address: str) -> tuple[str, str]:
        """A veth pair between ``a`` and ``b`` with an address (CIDR) on each end, up.

        An empty address leaves that end without one (a bridge port, say).
        Returns the two interface names.
        """
        n = next(self._links)
        a_dev, b_dev = f"v{n}a", f"v{n}b"
        await run_command(
            "ip", "link", "add", a_dev, "netns", a.name, "type", "veth",
            "peer", b_dev, "netns", b.name,
        )  # fmt: skip
        for ns, dev, address in ((a, a_dev, a_address), (b, b_dev, b_address)):
            if address:
                await run_command("ip", "-n", ns.name, "addr", "add", address, "dev", dev)
            await run_command("ip", "-n", ns.name, "link", "set", dev, "up")
        return a_dev, b_dev

    async def lan(self, address: str = "198.18.0.2/24") -> Netns:
        """One host whose only address is ``address``, on a veth to an empty namespace.

        Every process run inside it shares that address: enough for a whole call
        (relay, both peers, browsers) on one machine, with nothing leaving it.
        """
        host = await self.namespace("lan")
        stub = await self.namespace("stub")
        await self.link(host, address, stub, "")
        return host

    async def run(self, ns: Netns, *argv: str) -> str:
        """Run a command inside ``ns``; its standard output, or NetworkError naming it."""
        return await run_command(*ns.command(*argv))


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Sockets created in this block (by this thread) belong to ``ns``.

    setns(2) switches only the calling thread, and back at the end of the block,
    so one process can gather aiortc candidates in two namespaces: sockets keep
    the namespace they were created in. Nothing else may create sockets on the
    event loop while the block runs.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise NetworkError(f"setns into {ns.name} failed: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover (cannot fail for our own)
            raise NetworkError(f"setns back failed: {os.strerror(ctypes.get_errno())}")
        os.close(own)
        os.close(target)


async def run_command(*argv: str) -> str:
    """Run a command; its standard output, or NetworkError naming it and its error."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise NetworkError(f"`{_shell(argv)}` failed: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


def _shell(argv: Sequence[str]) -> str:
    return " ".join(argv)
