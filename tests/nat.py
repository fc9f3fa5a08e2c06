"""NAT topologies for the TURN tests and benchmark, built on ``peers.netns``.

::

    host A (198.18.1.2) ── router A ──┐                   ┌── router B ── host B (198.18.2.2)
       LAN 198.18.1.0/24   WAN 198.19.1.2   "public" 198.19.0.1   WAN 198.19.2.2   LAN 198.18.2.0/24
                                       (relay, coturn; no route to the LANs)

Each router namespace forwards between its LAN and the public namespace and,
depending on ``nat``:

- ``symmetric``: MASQUERADE ``--random-fully`` (a new mapped port for every
  destination, as mobile and corporate NATs do), which defeats STUN;
- ``port-preserving``: plain MASQUERADE (the mapped port is the host's port,
  whatever the destination): STUN hole punching works;
- ``none``: no router at all, each host is linked to the public namespace,
  which routes between them (a flat network where a direct path exists).

Both NAT flavours accept no inbound connection: only replies pass (conntrack),
and new packets addressed to the router itself are dropped, otherwise an early
inbound check would take the mapped port in conntrack before the host's own
packet and even port-preserving hole punching would fail.

Also here: ``World``, coturn started in the public namespace with ``make
turn``'s command line (``world()``, ``start_coturn``); ``call()``, a whole
call between the two hosts in this process; ``make_tls_files`` (a test CA and
a server certificate for an IP address, for ``turns:``) and two tiny commands
run inside the namespaces by ``test_nat.py``: ``python -m tests.nat reflect
HOST PORT...`` answers each UDP datagram with the address it came from,
``python -m tests.nat mapped HOST PORT...`` prints how those ports saw one
socket of this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from aiortc import RTCIceServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import relay
from peers.call import CallOptions
from peers.errors import CallFailed
from peers.media import Received
from peers.netns import Netns, Network, command_missing, netns_missing
from peers.turnclient import IcePath
from tests.inprocess import LocalPair
from tests.support import TIMEOUT, within

Nat = Literal["symmetric", "port-preserving", "none"]

PUBLIC_ADDRESS = "198.19.0.1"  # relay and coturn, on the public namespace's loopback
PUBLIC_NETWORK = "198.19.0.0/16"  # every public address (coturn's allowed peers)
LANS = ("198.18.1", "198.18.2")  # host A's and host B's private /24
WANS = ("198.19.1", "198.19.2")  # the public /24 towards each router (or host, without NAT)


@dataclass(frozen=True)
class Topology:
    """The namespaces of a built topology (deleted with their ``Network``)."""

    net: Network
    nat: Nat
    public: Netns
    hosts: tuple[Netns, Netns]
    routers: tuple[Netns, ...]  # empty without NAT
    host_addresses: tuple[str, str]
    router_addresses: tuple[str, ...]  # the routers' public (WAN) addresses
    public_address: str = PUBLIC_ADDRESS


async def build(net: Network, nat: Nat) -> Topology:
    """Two hosts, each behind its own router doing ``nat`` (or none), and a public namespace."""
    public = await net.namespace("pub")
    await net.run(public, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    await net.run(public, "ip", "addr", "add", f"{PUBLIC_ADDRESS}/32", "dev", "lo")
    hosts: list[Netns] = []
    routers: list[Netns] = []
    host_addresses: list[str] = []
    router_addresses: list[str] = []
    for i, (lan, wan) in enumerate(zip(LANS, WANS, strict=True)):
        host = await net.namespace(f"h{i}")
        hosts.append(host)
        if nat == "none":
            await net.link(public, f"{wan}.1/24", host, f"{wan}.2/24")
            await net.run(host, "ip", "route", "add", "default", "via", f"{wan}.1")
            host_addresses.append(f"{wan}.2")
            continue
        router = await net.namespace(f"r{i}")
        routers.append(router)
        _, wan_dev = await net.link(public, f"{wan}.1/24", router, f"{wan}.2/24")
        lan_dev, _ = await net.link(router, f"{lan}.1/24", host, f"{lan}.2/24")
        await net.run(router, "ip", "route", "add", "default", "via", f"{wan}.1")
        await net.run(host, "ip", "route", "add", "default", "via", f"{lan}.1")
        await net.run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["-j", "MASQUERADE"]
        if nat == "symmetric":
            masquerade.append("--random-fully")
        rules = [
            ["-t", "nat", "-A", "POSTROUTING", "-o", wan_dev, *masquerade],
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
             "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", lan_dev, "-o", wan_dev, "-j", "ACCEPT"],
            ["-P", "FORWARD", "DROP"],
            ["-A", "INPUT", "-i", wan_dev, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
             "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", wan_dev, "-j", "DROP"],
        ]  # fmt: skip
        for rule in rules:
            await net.run(router, "iptables", "-w", *rule)
        host_addresses.append(f"{lan}.2")
        router_addresses.append(f"{wan}.2")
    return Topology(
        net=net,
        nat=nat,
        public=public,
        hosts=(hosts[0], hosts[1]),
        routers=tuple(routers),
        host_addresses=(host_addresses[0], host_addresses[1]),
        router_addresses=tuple(router_addresses),
    )


@contextlib.asynccontextmanager
async def topology(nat: Nat) -> AsyncIterator[Topology]:
    """A topology in its own ``Network``, deleted when the block ends (also on failure)."""
    async with Network("nat") as net:
        yield await build(net, nat)


def iptables_missing() -> str | None:
    return command_missing("iptables", "iptables")


# -- certificates for turns: ----------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, address: str) -> TlsFiles:
    """A throwaway CA and a server certificate for ``address`` (an IP SAN), in PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e-PediCare test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem"
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


# -- probes run inside the namespaces -------------------------------------------------------


def reflect(host: str, ports: Sequence[int]) -> None:
    """Answer every UDP datagram on ``ports`` with ``ip:port`` of its sender (until killed)."""
    import selectors

    selector = selectors.DefaultSelector()
    sockets = {}
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        selector.register(sock, selectors.EVENT_READ)
        sockets[sock.fileno()] = sock
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = sockets[key.fd]
            _, (ip, port) = sock.recvfrom(2048)
            sock.sendto(f"{ip}:{port}".encode(), (ip, port))


def mapped(host: str, ports: Sequence[int], timeout: float = 2.0) -> None:
    """From one UDP socket, ask each port how it saw us; print ``local`` then one line each."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(timeout)
    print(f"local {sock.getsockname()[1]}")
    for port in ports:
        sock.sendto(b"?", (host, port))
        try:
            data, _ = sock.recvfrom(2048)
            print(data.decode())
        except TimeoutError:
            print("timeout")


async def wait_ready(proc: asyncio.subprocess.Process, marker: str, wait: float) -> None:
    """Read ``proc``'s stdout until a line contains ``marker``."""
    assert proc.stdout is not None
    async with asyncio.timeout(wait):
        while line := (await proc.stdout.readline()).decode():
            if marker in line:
                return
    raise RuntimeError(f"exited with status {await proc.wait()} before printing {marker!r}")


if __name__ == "__main__":
    command, address, *rest = sys.argv[1:]
    if command == "reflect":
        reflect(address, [int(p) for p in rest])
    else:
        mapped(address, [int(p) for p in rest])


# -- a whole call between the two hosts, in this process ------------------------------------


@dataclass
class CallResult:
    connected: bool
    paths: tuple[IcePath | None, IcePath | None]
    error: str | None = None
    ice_start: float = 0.0  # time.monotonic() when the answerer started its checks
    first: tuple[dict[str, float], dict[str, float]] = ({}, {})  # kind -> monotonic time
    latencies_ms: tuple[list[float], list[float]] = ([], [])  # glass-to-glass, from the stamps
    lost: tuple[list[str], list[str]] = ([], [])  # TURN allocations reported lost

    def first_frame_ms(self, side: int, kind: str = "video") -> float | None:
        at = self.first[side].get(kind)
        return None if at is None else 1000 * (at - self.ice_start)


async def call(
    topology: Topology,
    servers: tuple[list[RTCIceServer], list[RTCIceServer]],
    *,
    policy: Literal["all", "relay"] = "all",
    ca_file: Path | None = None,
    wait: float = 10.0,
    media_s: float = 0.0,
    early_channels: bool = True,
    answer_delay: float = 0.0,
) -> CallResult:
    """A patient on host A calls a practitioner on host B; both send video and audio.

    Two ``Call``s with their signaling in memory (tests/inprocess.py: this is the
    ICE and media proof; the relay has its own tests; ``answer_delay`` stands for
    the answer's trip through it). Returns once media flowed both ways (plus
    ``media_s``), or when ``wait`` s passed, or when a configured TURN server gave
    no relay candidate.
    """
    options = tuple(
        CallOptions(
            servers=tuple(side),
            policy=policy,
            timeout_s=wait + 60,  # the result says what happened within wait; no watchdog
            ca_file=ca_file,
            early_channels=early_channels,
        )
        for side in servers
    )
    pair = LocalPair((options[0], options[1]), topology.hosts, width=WIDTH, height=HEIGHT)
    async with contextlib.aclosing(pair):
        try:
            await pair.connect(answer_delay)
        except CallFailed as exc:
            return CallResult(connected=False, paths=(None, None), error=str(exc))
        try:
            await asyncio.wait_for(pair.flowing(), wait)
            connected = True
            await asyncio.sleep(media_s)  # a benchmark's length of media
        except TimeoutError:
            connected = False
        got = [c.receiver.received for c in pair.calls]
        return CallResult(
            connected=connected,
            paths=(pair.a.path, pair.b.path),
            error=None if connected else f"no media both ways within {wait:g} s",
            ice_start=pair.answered_at or 0.0,
            first=(_firsts(got[0]), _firsts(got[1])),
            latencies_ms=(list(got[0].latencies_ms), list(got[1].latencies_ms)),
            lost=(list(pair.a.lost), list(pair.b.lost)),
        )


WIDTH, HEIGHT = 320, 240


def _firsts(got: Received) -> dict[str, float]:
    firsts = {"video": got.first_video, "audio": got.first_audio}
    return {kind: at for kind, at in firsts.items() if at is not None}


# -- coturn in the public namespace, as `make turn` starts it -------------------------------

SECRET = "nat-test-secret"  # coturn's turn.secret; the relay mints credentials with it


@dataclass
class World:
    topology: Topology
    tls: TlsFiles
    coturn: asyncio.subprocess.Process

    @property
    def address(self) -> str:
        return self.topology.public_address

    def url(self, kind: str) -> str:
        return {
            "udp": f"turn:{self.address}:3478?transport=udp",
            "tcp": f"turn:{self.address}:3478?transport=tcp",
            "tls": f"turns:{self.address}:5349?transport=tcp",
            "stun": f"stun:{self.address}:3478",
        }[kind]

    def servers(
        self, kind: str | None, secret: str = SECRET, age: float = 0.0
    ) -> tuple[list[RTCIceServer], list[RTCIceServer]]:
        """Each peer's ice servers: none, STUN, or TURN credentials minted by the relay."""
        if kind is None:
            return [], []
        if kind == "stun":
            return [RTCIceServer(self.url(kind))], [RTCIceServer(self.url(kind))]
        config = relay.RelayConfig.from_mapping(
            {"turn": {"secret": secret, "urls": [self.url(kind)], "ttl": 600}}, env={}
        )
        minted = [
            relay.turn_credentials(config.turn, "nat", role, time.time() - age)[0]
            for role in ("patient", "practitioner")
        ]
        return tuple(  # type: ignore[return-value]
            [RTCIceServer(m["urls"], m["username"], m["credential"])] for m in minted
        )


async def start_coturn(
    topology: Topology, tls: TlsFiles, directory: Path, **turn: Any
) -> asyncio.subprocess.Process:
    """``make turn``'s command line in the public namespace; returns once coturn answers."""
    config = directory / "config.yaml"
    settings = {
        "secret": SECRET,
        "listen": topology.public_address,
        "cert": str(tls.cert),
        "key": str(tls.key),
        "allowed_peers": [PUBLIC_NETWORK],
        **turn,
    }
    config.write_text(yaml.safe_dump({"turn": settings}))
    proc = await asyncio.create_subprocess_exec(
        *topology.public.command(sys.executable, "-m", "peers.turnserver", "--config", str(config)),
        stderr=asyncio.subprocess.STDOUT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await wait_ready(proc, "TURN URL", TIMEOUT * 2)
    except BaseException:
        await stop(proc)
        raise
    return proc


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await within(proc.wait(), 2)


@contextlib.asynccontextmanager
async def world(nat_kind: Nat, directory: Path, **turn: Any) -> AsyncIterator[World]:
    async with topology(nat_kind) as built:
        tls = make_tls_files(directory, built.public_address)
        coturn = await start_coturn(built, tls, directory, **turn)
        try:
            yield World(built, tls, coturn)
        finally:
            await stop(coturn)


def skip_without_nat_or_coturn() -> list[pytest.MarkDecorator]:
    """The marks of a test module that builds NATs and starts coturn (skipped, saying why)."""
    return [
        pytest.mark.netns,
        pytest.mark.skipif(
            (reason := netns_missing() or iptables_missing()) is not None, reason=reason or ""
        ),
        pytest.mark.skipif(
            shutil.which("turnserver") is None,
            reason="coturn's turnserver is missing: run `make turn-deps` (Debian's coturn)",
        ),
    ]
