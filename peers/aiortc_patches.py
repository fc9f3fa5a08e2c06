"""Every reach into aioice's and aiortc's internals, fenced in one module.

aiortc keeps its aioice ``Connection`` private and aioice exposes neither its
TURN client under a relayed candidate, nor the nominated pair, nor a way to be
told when a TURN allocation is lost. The peers need all four. Each function
below names the upstream line it stands in for (aioice 0.13.0, aiortc 1.16.0)
and is written as it could be proposed upstream: an accessor for a private
attribute, or a hook on a public coroutine. Nothing outside this module may
touch a private attribute of either library; ``check_versions()`` refuses, in
one line, any other version than the pinned ones, because these patches are
only proven against them (tests/test_aiortc_patches.py proves each one fires).

The patches:

- ``ice_connection``: ``RTCIceTransport._connection`` (aiortc rtcicetransport.py:202).
- ``turn_client``: ``TurnTransport.__inner_protocol`` (aioice turn.py:426).
- ``relay_protocols``: ``Connection._protocols`` (aioice ice.py:451).
- ``nominated_pair``: ``Connection._nominated`` (aioice ice.py:449).
- ``local_address``: the address a pair's packets leave from, read from its
  ``StunProtocol.transport`` (aioice ice.py:266) or, for a relayed candidate, from
  its TURN client's (``TurnTransport.__inner_protocol``, turn.py:426), whose own
  ``get_extra_info("sockname")`` is the relayed address (turn.py:452).
- ``set_check_retries``: the module global ``aioice.stun.RETRY_MAX`` (aioice stun.py:20),
  read by every ``stun.Transaction`` (stun.py:358) that has no explicit count.
- ``use_tls_context``: ``Connection.turn_ssl`` is typed bool (ice.py:427) but is
  passed on as ``ssl=`` (ice.py:125), where a context works too.
- ``instrument``: hooks ``Connection.gather_candidates`` (ice.py:568) and
  ``Connection.connect`` (ice.py:608) to bind TURN channels early (the
  bookkeeping of ``TurnClientMixin.send_data``, turn.py:320, without sending),
  and ``StunProtocol.error_received`` / ``connection_lost`` (ice.py:305 and
  ice.py:274) of each relayed candidate to report a lost allocation.
- ``bytes_received``: ``RTCDtlsTransport._get_stats()`` (aiortc rtcdtlstransport.py:583),
  the transport's RTCTransportStats.bytesReceived (RTP, RTCP and SCTP), read
  without a whole ``getStats()`` report several times a second.
- ``request_keyframe``: ``RTCRtpReceiver._send_rtcp_pli`` (rtcrtpreceiver.py:630).
- ``send_keyframe``: ``RTCRtpSender._send_keyframe`` (rtcrtpsender.py:351).
- ``watch_handshake``: hooks ``RTCDtlsTransport.__log_debug`` (rtcdtlstransport.py:755),
  the only place that says why a DTLS handshake failed (rtcdtlstransport.py:423,
  429, 449, 466); upstream, the W3C ``RTCDtlsTransport.onerror`` with the cause.
- ``opus_settings``: Opus at 32 kbit/s with in-band FEC instead of aiortc's fixed
  96 kbit/s without (codecs/opus.py:34, :37), and ``useinbandfec=1`` in its SDP
  (codecs/__init__.py:33-35), now that the receiver decodes FEC (``peers/aiortc_opus.py``).
- ``steady_media``: the media path that holds on lossy links and narrow ones, from
  the siblings ``peers/aiortc_receive.py`` (with ``peers/aiortc_opus.py``, the Opus
  decoder with FEC and loss concealment, and the audio sender that catches up in one
  go after its event loop was held up) and ``peers/aiortc_send.py`` (the VP8
  floor and start, the resolution / frame-rate ladder, and RED + ULPFEC: their negotiation,
  ``negotiate_fec``, extends aiortc's ``CODECS["video"]``) and ``peers/aiortc_rate.py`` (the
  receiver's bandwidth estimate, sent as REMB) (whole replacements of aiortc's ``NackGenerator``,
  its video ``JitterBuffer`` and ``RemoteStreamTrack.recv``; the lines it
  replaces are named there).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

import aioice.stun
from aioice import Connection, stun
from aioice.ice import CandidatePair, StunProtocol
from aioice.turn import TurnClientMixin, TurnTransport
from aiortc import RTCDtlsTransport, RTCIceTransport, RTCRtpReceiver, RTCRtpSender, codecs
from aiortc.codecs import opus

from peers import aiortc_opus, aiortc_rate, aiortc_receive, aiortc_send, aiortc_vp8
from peers.errors import PeerError

__all__ = [
    "PINNED",
    "UnsupportedVersion",
    "bind_channel",
    "bytes_received",
    "check_retries",
    "check_versions",
    "forbidden_peer",
    "ice_connection",
    "instrument",
    "nominated_pair",
    "opus_settings",
    "relay_protocols",
    "request_keyframe",
    "send_keyframe",
    "set_check_retries",
    "steady_media",
    "turn_client",
    "turn_transport_client",
    "use_tls_context",
    "watch_handshake",
]

logger = logging.getLogger(__name__)

PINNED = {"aioice": "0.13.0", "aiortc": "1.16.0"}
FORBIDDEN = 403  # coturn: the peer address is in denied-peer-ip
LOST_CODES = frozenset({400, 437})  # after these, a Refresh tells whether the allocation is gone
EARLY_BIND_S = 1.0  # at most this long spent binding channels before the checks start


class UnsupportedVersion(PeerError):
    """aioice or aiortc is not the version these patches were proven against."""

    code = "unsupported-version"


def check_versions(installed: Callable[[str], str] | None = None) -> None:
    """Raise UnsupportedVersion (one line) unless aioice and aiortc are the pinned versions.

    ``installed(name)`` gives a distribution's version (importlib.metadata's by default).
    """
    installed = installed or importlib.metadata.version
    wrong = [
        f"{name} {installed(name)} (expected {version})"
        for name, version in PINNED.items()
        if installed(name) != version
    ]
    if wrong:
        raise UnsupportedVersion(
            "peers/aiortc_patches.py is proven against the pinned versions only; installed: "
            + ", ".join(wrong)
            + " (run `make setup`)"
        )
    try:
        aiortc_vp8.check()  # the libvpx that PyAV ships, driven directly
    except RuntimeError as exc:
        raise UnsupportedVersion(f"{exc} (run `make setup`)") from exc


def steady_media() -> None:
    """Install the receive path of ``peers/aiortc_receive.py`` and the Opus settings (once).

    Call after ``check_versions()``: the replacements are proven against aiortc 1.16.0 only.
    """
    aiortc_receive.install()
    aiortc_opus.install_sender()
    aiortc_send.install()
    aiortc_rate.install()
    aiortc_receive.install_drain()  # after aiortc_rate's kernel stamps: each datagram stamped
    opus_settings()


OPUS_BITRATE = 32_000  # bit/s: speech in wideband with room for FEC (aiortc: 96 000)
OPUS_EXPECTED_LOSS = 10  # percent: how much in-band FEC the encoder plans for


def opus_settings(bitrate: int = OPUS_BITRATE, expected_loss: int = OPUS_EXPECTED_LOSS) -> None:
    """Opus at ``bitrate`` with in-band FEC (libopus ``fec``/``packet_loss`` through av).

    Upstream: ``OpusEncoder(bitrate=..., fec=True)`` instead of the fixed
    ``bit_rate = 96000`` and ``options = {"application": "voip"}`` (aiortc
    codecs/opus.py:34 and :37). 96 kbit/s of a 300 kbit/s link starves video;
    FEC lets a receiver that can use it (Chromium's NetEq) rebuild a lost
    packet from the next one. aiortc's own receiver cannot (FFmpeg's libopus
    decoder has no FEC decoding and av 18.1 exposes none); the decoder of
    ``peers/aiortc_opus.py`` takes its place, and does. So the Opus codec's SDP
    says ``useinbandfec=1`` (RFC 7587 6.1: this side's decoder uses FEC; aiortc
    gives the codec no parameters, codecs/__init__.py:33-35), which is what makes
    Chromium send FEC to an aiortc peer.
    """
    for codec in codecs.CODECS["audio"]:
        if codec.mimeType.lower() == "audio/opus":
            codec.parameters["useinbandfec"] = 1
    if getattr(opus.OpusEncoder.__init__, "_epc_opus", None) == (bitrate, expected_loss):
        return
    original = getattr(opus.OpusEncoder.__init__, "_epc_original", opus.OpusEncoder.__init__)

    def __init__(self: opus.OpusEncoder) -> None:
        original(self)
        self.codec.bit_rate = bitrate
        self.codec.options = {
            "application": "voip",
            "fec": "1",
            "packet_loss": str(expected_loss),
        }

    __init__._epc_opus = (bitrate, expected_loss)  # type: ignore[attr-defined]
    __init__._epc_original = original  # type: ignore[attr-defined]
    opus.OpusEncoder.__init__ = __init__  # type: ignore[method-assign]


# -- accessors ----------------------------------------------------------------------------------


def ice_connection(transport: RTCIceTransport) -> Connection:
    """The aioice Connection behind an aiortc ICE transport.

    Upstream: a public ``RTCIceTransport.connection`` property for
    ``self._connection`` (aiortc rtcicetransport.py:202).
    """
    connection: Connection = transport._connection
    return connection


def turn_client(protocol: StunProtocol) -> TurnClientMixin | None:
    """The TURN client under a relayed candidate's protocol (None for other candidates).

    Upstream: a public ``TurnTransport.turn_client`` property for the
    name-mangled ``self.__inner_protocol`` (aioice turn.py:426).
    """
    transport = getattr(protocol, "transport", None)
    if not isinstance(transport, TurnTransport):
        return None
    return turn_transport_client(transport)


def turn_transport_client(transport: TurnTransport) -> TurnClientMixin:
    """The TURN client of a ``TurnTransport`` (aioice turn.py:426, name-mangled)."""
    inner: TurnClientMixin = getattr(transport, "_TurnTransport__inner_protocol")  # noqa: B009
    return inner


def relay_protocols(connection: Connection) -> list[tuple[StunProtocol, TurnClientMixin]]:
    """Each relayed candidate's protocol with its TURN client.

    Upstream: a public view of ``Connection._protocols`` (aioice ice.py:451).
    """
    pairs = []
    for protocol in connection._protocols:
        inner = turn_client(protocol)
        if inner is not None:
            pairs.append((protocol, inner))
    return pairs


def nominated_pair(connection: Connection) -> CandidatePair | None:
    """The nominated pair of component 1 (or any), None before ICE completes.

    Upstream: a public ``Connection.nominated`` for ``self._nominated``
    (aioice ice.py:449).
    """
    nominated = connection._nominated
    return nominated.get(1) or next(iter(nominated.values()), None)


def local_address(pair: CandidatePair) -> str | None:
    """The local IP address the pair's packets leave from (its socket's), None if unknown.

    Upstream: a ``CandidatePair.local_address`` reading the socket of
    ``pair.protocol`` (``StunProtocol.transport``, aioice ice.py:266); for a relayed
    candidate, the socket of its TURN client (``TurnTransport.__inner_protocol``,
    turn.py:426), since ``TurnTransport.get_extra_info("sockname")`` is the relayed
    address on the server (turn.py:452).
    """
    client = turn_client(pair.protocol)
    transport = (
        client.transport if client is not None else getattr(pair.protocol, "transport", None)
    )
    if transport is None:
        return None
    sockname = transport.get_extra_info("sockname")
    return str(sockname[0]) if sockname else None


def set_check_retries(retries: int) -> None:
    """How many times aioice retransmits a STUN request (its checks included).

    Upstream: ``Connection(stun_retransmissions=...)`` instead of the module
    global ``RETRY_MAX`` (aioice stun.py:20), read by ``Transaction.__init__``
    (stun.py:358) when it is given no count.
    """
    aioice.stun.RETRY_MAX = retries


def check_retries() -> int:
    """The retransmission count aioice uses now."""
    return aioice.stun.RETRY_MAX


def use_tls_context(transport: RTCIceTransport, context: ssl.SSLContext) -> None:
    """Make a ``turns:`` allocation verify with ``context`` (call before gathering).

    Upstream: ``Connection.turn_ssl`` typed ``bool | ssl.SSLContext`` (aioice
    ice.py:427); it is passed on as ``ssl=`` (ice.py:125), where a context works.
    """
    connection = ice_connection(transport)
    if connection.turn_ssl:
        connection.turn_ssl = cast(bool, context)


def bytes_received(transport: RTCDtlsTransport) -> int:
    """Bytes received so far on a DTLS transport (RTP, RTCP and SCTP; not STUN).

    Upstream: the W3C ``RTCDtlsTransport``'s RTCTransportStats, which aiortc
    builds in ``RTCDtlsTransport._get_stats()`` (rtcdtlstransport.py:583) only
    for a whole ``RTCPeerConnection.getStats()``.
    """
    for stats in transport._get_stats().values():
        received = getattr(stats, "bytesReceived", None)
        if isinstance(received, int):
            return received
    return 0


def request_keyframe(receiver: RTCRtpReceiver) -> bool:
    """Send a PLI for each stream of a video receiver (RFC 4585 6.3.1); False for audio.

    Upstream: ``RTCRtpReceiver._send_rtcp_pli`` (rtcrtpreceiver.py:630) made public,
    with the SSRCs of ``RTCRtpReceiver.__remote_streams`` (rtcrtpreceiver.py:315).
    """
    if receiver.track is None or receiver.track.kind != "video":
        return False
    for ssrc in list(getattr(receiver, "_RTCRtpReceiver__remote_streams")):  # noqa: B009
        _spawn(receiver._send_rtcp_pli(ssrc))
    return True


def send_keyframe(sender: RTCRtpSender) -> bool:
    """Make a video sender's next frame a keyframe, as a PLI from the other side would.

    Upstream: ``RTCRtpSender._send_keyframe`` (rtcrtpsender.py:351) made public
    (the W3C has ``RTCRtpSender.generateKeyFrame`` for encoded transforms).
    Returns False for an audio sender or one without a track.
    """
    if sender.track is None or sender.track.kind != "video":
        return False
    sender._send_keyframe()
    return True


def watch_handshake(transport: RTCDtlsTransport, on_failure: Callable[[str], None]) -> None:
    """Call ``on_failure(cause)`` when the transport's DTLS handshake fails.

    aiortc says why only in a debug line (rtcdtlstransport.py:423 "error ...",
    429 "connection error", 449 "fingerprint mismatch", 466 "no SRTP profile
    negotiated") written by the name-mangled ``__log_debug`` (rtcdtlstransport.py:755)
    just before ``_set_state(State.FAILED)``; this wraps that method on the one
    instance. Upstream: the W3C ``RTCDtlsTransport.onerror`` (an RTCError with
    errorDetail "dtls-failure") carrying the cause.
    """
    name = "_RTCDtlsTransport__log_debug"
    original: Callable[..., None] = getattr(transport, name)
    prefix = "x DTLS handshake failed ("

    def log_debug(msg: str, *args: object) -> None:
        original(msg, *args)
        if msg.startswith(prefix):
            text = (msg % args) if args else msg
            on_failure(text.removeprefix(prefix).removesuffix(")"))

    setattr(transport, name, log_debug)


# -- hooks ---------------------------------------------------------------------------------------


def instrument(
    transport: RTCIceTransport,
    *,
    on_lost: Callable[[str], None] | None = None,
    early_channels: bool = True,
) -> None:
    """Hook one ICE transport before gathering: early TURN channels, lost allocations.

    After gathering, a channel is bound from each relayed candidate to its own
    relayed address; when the checks start, to each remote relay and srflx
    candidate; and, with ``on_lost``, relayed allocations are watched.
    Upstream: hooks around ``Connection.gather_candidates`` (aioice ice.py:568)
    and ``Connection.connect`` (ice.py:608), or the same steps inside them.
    """
    connection = ice_connection(transport)
    connect = connection.connect
    gather = connection.gather_candidates

    async def gather_with_channels() -> None:
        await gather()
        if early_channels:
            await _bind_all(connection, _server_binds(connection))

    connection.gather_candidates = gather_with_channels  # type: ignore[method-assign]

    async def connect_with_channels() -> None:
        if on_lost is not None:
            watch_allocations(connection, on_lost)
        if early_channels:
            await _bind_all(connection, _remote_binds(connection))
        await connect()

    connection.connect = connect_with_channels  # type: ignore[method-assign]


def _remote_binds(connection: Connection) -> list[tuple[TurnClientMixin, tuple[str, int]]]:
    """Each relayed candidate to each remote relay and srflx candidate.

    aioice discards data indications from addresses it has no channel to, which
    loses the peer's first check; a channel bound before the checks avoids it.
    """
    remotes = [
        (c.host, c.port)
        for c in connection.remote_candidates
        if c.type in ("relay", "srflx") and c.transport.lower() == "udp"
    ]
    return [
        (inner, addr)
        for _, inner in relay_protocols(connection)
        for addr in remotes
        if addr not in inner.peer_to_channel and addr not in inner.peer_connect_waiters
    ]


def _server_binds(connection: Connection) -> list[tuple[TurnClientMixin, tuple[str, int]]]:
    """Each relayed candidate to its own relayed address.

    aioice's filter of data indications looks at the peer's IP only, and the
    other peer's relayed candidate on the same TURN server has the server's IP:
    with this channel, the other peer's first check is accepted even when it
    arrives before this side has learnt the other's candidates.
    """
    return [
        (inner, inner.relayed_address)
        for _, inner in relay_protocols(connection)
        if inner.relayed_address is not None and inner.relayed_address not in inner.peer_to_channel
    ]


async def _bind_all(
    connection: Connection, binds: list[tuple[TurnClientMixin, tuple[str, int]]]
) -> None:
    # Failures are left to aioice, which binds again when it sends.
    if binds:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EARLY_BIND_S):
                await asyncio.gather(
                    *(bind_channel(inner, addr) for inner, addr in binds), return_exceptions=True
                )


async def bind_channel(inner: TurnClientMixin, addr: tuple[str, int]) -> None:
    """Bind a TURN channel to ``addr``; coturn's 403 (Forbidden IP) is named at WARNING."""
    # The bookkeeping of aioice's TurnClientMixin.send_data (turn.py:320-360), without sending.
    if inner.channel_number > 0x4FFF:
        return
    channel = inner.channel_number
    inner.channel_number += 1
    waiters: list[asyncio.Future[None]] = []
    inner.peer_connect_waiters[addr] = waiters
    try:
        await inner.channel_bind(channel, addr)
    except Exception as exc:
        name_refusal(exc, addr)
        inner.peer_to_failed_channel[addr] = channel
        for waiter in inner.peer_connect_waiters.pop(addr, []):
            waiter.set_exception(exc)
        raise
    inner.channel_refresh_at[channel] = time.time() + inner.channel_refresh_time
    inner.channel_to_peer[channel] = addr
    inner.peer_to_channel[addr] = channel
    for waiter in inner.peer_connect_waiters.pop(addr, []):
        waiter.set_result(None)


def watch_allocations(connection: Connection, on_lost: Callable[[str], None]) -> None:
    """Call ``on_lost(reason)`` once when coturn has dropped a relayed candidate's allocation.

    coturn may delete an allocation (it does when relaying towards an
    unroutable peer fails); aioice then only logs each refused channel binding
    at DEBUG (``StunProtocol.error_received``, ice.py:305, reached from
    turn.py:496). A refused binding is confirmed here with a Refresh; a closed
    TURN connection (``StunProtocol.connection_lost``, ice.py:274) outside a
    deliberate close is a loss too. Upstream: an ``allocation_lost`` event.
    """
    reported = False

    def report(reason: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            on_lost(reason)

    for protocol, inner in relay_protocols(connection):
        original_error = protocol.error_received
        original_lost = protocol.connection_lost

        def error_received(
            exc: Exception,
            original: Callable[[Exception], None] = original_error,
            inner: TurnClientMixin = inner,
        ) -> None:
            original(exc)
            name_refusal(exc, None)
            if isinstance(exc, stun.TransactionFailed) and exc.response.error_code in LOST_CODES:
                _spawn(_confirm_lost(inner, exc, report))

        def connection_lost(
            exc: Exception | None,
            original: Callable[[Exception | None], None] = original_lost,
            inner: TurnClientMixin = inner,
        ) -> None:
            original(exc)
            if not connection._closing:  # ice.py:664: a deliberate close is no loss
                report(f"the TURN allocation {inner.relayed_address} was closed")

        protocol.error_received = error_received  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]


_named: set[str] = set()  # refusals already logged (once each per process)


def forbidden_peer(exc: BaseException, addr: tuple[str, int] | None) -> str | None:
    """coturn's 403 (Forbidden IP) as a sentence naming the address, or None for any other error.

    coturn answers a CreatePermission or ChannelBind towards an address in its
    ``denied-peer-ip`` ranges with 403; aioice logs it at DEBUG only
    (``StunProtocol.error_received``, ice.py:305) and the call just never
    connects.
    """
    if not (isinstance(exc, stun.TransactionFailed) and exc.response.error_code == FORBIDDEN):
        return None
    where = addr[0] if addr is not None else "a peer's address"
    return f"coturn refuses to relay to {where} (403 Forbidden IP): add it to turn.allowed_peers"


def name_refusal(exc: BaseException, addr: tuple[str, int] | None) -> None:
    """Log coturn's refusal to relay to ``addr`` at WARNING, once per address."""
    message = forbidden_peer(exc, addr)
    if message is not None and message not in _named:
        _named.add(message)
        logger.warning("%s", message)


_tasks: set[asyncio.Task[None]] = set()


def _spawn(coroutine: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coroutine)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _confirm_lost(
    inner: TurnClientMixin, exc: stun.TransactionFailed, report: Callable[[str], None]
) -> None:
    request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
    request.attributes["LIFETIME"] = inner.lifetime
    try:
        await inner.request_with_retry(request)
    except stun.TransactionFailed as refused:
        if refused.response.error_code == 437:
            report(
                f"coturn dropped the TURN allocation {inner.relayed_address} "
                f"(a channel binding got {exc.response.error_code}, a refresh got 437)"
            )
    except (stun.TransactionError, ConnectionError, OSError) as failed:
        report(f"the TURN server stopped answering for {inner.relayed_address} ({failed})")
