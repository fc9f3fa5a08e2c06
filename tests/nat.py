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

Also here: ``make_tls_files`` (a test CA and a server certificate for an IP
address, for ``turns:``) and two tiny commands run inside the namespaces by
``test_nat.py``: ``python -m tests.nat reflect HOST PORT...`` answers each UDP
datagram with the address it came from, ``python -m tests.nat mapped HOST PORT...``
prints how those ports saw one socket of this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import ipaddress
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransport,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    VideoStreamTrack,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack
from av import VideoFrame
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peers.netns import Netns, Network, netns_missing
from peers.turnclient import (
    IcePath,
    TurnUnavailable,
    check_relay_gathered,
    first_turn_server,
    instrument,
    selected_path,
)

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


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Sockets created in this block (by this thread) belong to ``ns``.

    setns(2) switches only the calling thread, and back at the end of the block,
    so one test process can gather aiortc candidates in two namespaces: sockets
    keep the namespace they were created in. Nothing else may create sockets on
    the event loop while the block runs.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns.name} failed")
        yield
    finally:
        if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover (cannot fail for our own)
            raise OSError(ctypes.get_errno(), "setns back failed")
        os.close(own)
        os.close(target)


def iptables_missing() -> str | None:
    if shutil.which("iptables") is None:
        return "`iptables` is missing: run `make system-deps` (Debian's iptables)"
    return None


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


STRIPES = 12  # bits of the frame counter drawn into each video frame
STRIPE_WIDTH = 16
WIDTH, HEIGHT = STRIPES * STRIPE_WIDTH, 144


class StampedVideo(VideoStreamTrack):
    """Synthetic video whose frames carry their number as black and white stripes."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[int, float] = {}
        self.count = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        number = self.count % (1 << STRIPES)
        self.count += 1
        row = b"".join(
            (b"\xff" if number >> bit & 1 else b"\x00") * STRIPE_WIDTH for bit in range(STRIPES)
        )
        gray = VideoFrame(WIDTH, HEIGHT, "gray")
        gray.planes[0].update(row * HEIGHT)
        frame = gray.reformat(format="yuv420p")
        frame.pts, frame.time_base = pts, time_base
        self.sent[number] = time.perf_counter()
        return frame


def frame_number(frame: VideoFrame) -> int:
    plane = frame.reformat(format="gray").planes[0]
    middle = bytes(plane)[plane.line_size * (frame.height // 2) :]
    return sum(
        1 << bit for bit in range(STRIPES) if middle[bit * STRIPE_WIDTH + STRIPE_WIDTH // 2] > 128
    )


@dataclass
class Side:
    """One peer of an in-process call."""

    name: str
    ns: Netns
    pc: RTCPeerConnection
    video: StampedVideo
    first: dict[str, float]  # kind -> perf_counter of the first frame received
    latencies: list[float]  # glass-to-glass (s) of received video frames
    lost: list[str]

    def transports(self) -> list[RTCIceTransport]:
        found: list[RTCIceTransport] = []
        for transceiver in self.pc.getTransceivers():
            dtls = transceiver.sender.transport
            if dtls is not None and dtls.transport not in found:
                found.append(dtls.transport)
        return found


@dataclass
class CallResult:
    connected: bool
    paths: tuple[IcePath | None, IcePath | None]
    error: str | None = None
    ice_start: float = 0.0  # perf_counter when the answerer started its checks
    first: tuple[dict[str, float], dict[str, float]] = ({}, {})
    latencies: tuple[list[float], list[float]] = ([], [])
    lost: tuple[list[str], list[str]] = ([], [])

    def first_frame_ms(self, side: int, kind: str = "video") -> float | None:
        at = self.first[side].get(kind)
        return None if at is None else 1000 * (at - self.ice_start)


async def _consume(
    side: Side, track: MediaStreamTrack, peer_video: StampedVideo, progress: asyncio.Event
) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            now = time.perf_counter()
            if track.kind not in side.first:
                side.first[track.kind] = now
                progress.set()
            if isinstance(frame, VideoFrame):
                sent = peer_video.sent.get(frame_number(frame))
                if sent is not None:
                    side.latencies.append(now - sent)


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

    Signaling is in memory (this is the ICE and media proof; the relay has its
    own tests; ``answer_delay`` stands for the answer's trip through it). Returns
    once media flowed both ways (plus ``media_s``), or when
    ``wait`` s passed, or when a configured TURN server gave no relay candidate.
    """
    sides: list[Side] = []
    for name, ns, ice in zip(("patient", "practitioner"), topology.hosts, servers, strict=True):
        config = RTCConfiguration(
            iceServers=ice,
            iceTransportPolicy=RTCIceTransportPolicy.RELAY
            if policy == "relay"
            else RTCIceTransportPolicy.ALL,
        )
        side = Side(name, ns, RTCPeerConnection(config), StampedVideo(), {}, [], [])
        side.pc.addTrack(side.video)
        side.pc.addTrack(AudioStreamTrack())
        sides.append(side)
    a, b = sides
    progress = asyncio.Event()

    for side, other in ((a, b), (b, a)):

        @side.pc.on("track")
        def on_track(track: MediaStreamTrack, side: Side = side, other: Side = other) -> None:
            task = asyncio.ensure_future(_consume(side, track, other.video, progress))
            _consumers.add(task)
            task.add_done_callback(_consumers.discard)

    try:
        for side in sides:
            for transport in side.transports():
                instrument(
                    transport,
                    ca_file=ca_file,
                    on_lost=side.lost.append,
                    early_channels=early_channels,
                )
        with inside(a.ns):
            await a.pc.setLocalDescription(await a.pc.createOffer())
        await _check_gathered(a, servers[0], ca_file)
        await b.pc.setRemoteDescription(a.pc.localDescription)
        with inside(b.ns):
            await b.pc.setLocalDescription(await b.pc.createAnswer())
        await _check_gathered(b, servers[1], ca_file)
        ice_start = time.perf_counter()  # the practitioner's checks start now
        await asyncio.sleep(answer_delay)  # the answer's trip through the relay
        await a.pc.setRemoteDescription(b.pc.localDescription)

        async def flowing() -> None:
            while not all({"video", "audio"} <= set(s.first) for s in sides):
                progress.clear()
                await progress.wait()

        try:
            await asyncio.wait_for(flowing(), wait)
            connected = True
            await asyncio.sleep(media_s)
        except TimeoutError:
            connected = False
        return CallResult(
            connected=connected,
            paths=(_path(a), _path(b)),
            error=None if connected else f"no media both ways within {wait:g} s",
            ice_start=ice_start,
            first=(dict(a.first), dict(b.first)),
            latencies=(list(a.latencies), list(b.latencies)),
            lost=(list(a.lost), list(b.lost)),
        )
    except TurnUnavailable as exc:
        return CallResult(connected=False, paths=(None, None), error=str(exc))
    finally:
        for side in sides:
            await side.pc.close()


_consumers: set[asyncio.Task[None]] = set()


async def _check_gathered(side: Side, servers: list[RTCIceServer], ca_file: Path | None) -> None:
    server = first_turn_server(servers)
    if server is not None:
        for transport in side.transports():
            with inside(side.ns):  # a diagnosis talks to the server from the host
                await check_relay_gathered(transport, server, ca_file)


def _path(side: Side) -> IcePath | None:
    for transport in side.transports():
        path = selected_path(transport)
        if path is not None:
            return path
    return None


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
