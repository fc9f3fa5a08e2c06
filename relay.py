"""e-PediCare Call signaling relay: protocol v1 (see docs/protocol.md).

The relay forwards JSON frames between the two seats (patient, practitioner) of
a session. Media never passes through it.

This file has three bands, in this order:

1. The pure core: configuration, frames, seats, tokens, limits. It never awaits
   and never touches a socket: ``connect``, ``receive``, ``join_expired`` and
   ``disconnect`` take the state and return a list of actions (``Send``,
   ``Close``) for the adapter to carry out.
2. The websockets adapter (``Relay``, ``serve_relay``): one handler per
   connection, plain HTTP (``/health``, ``/metrics``, the browser client) from
   ``process_request``, and metrics read from the core's counters.
3. The entry point: ``parse_args``, ``main``.

Errors::

    RelayError
    ├── ConfigError     a bad YAML key or flag; names the dotted key, the relay does not start
    └── ProtocolError   a refused frame; ``code`` is the protocol's kebab-case code and it
                        becomes an ``error`` frame (and a close, for ``server-full`` and
                        ``join-timeout``)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import contextvars
import dataclasses
import datetime
import email.utils
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import math
import os
import re
import resource
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypeAlias, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson
import uvloop
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, Event
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

if TYPE_CHECKING:  # redis is imported only by a relay of a cluster (a second at start)
    import redis.asyncio as aioredis
    from redis.asyncio.connection import AbstractConnection

__version__: Final = "0.1.0"

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# The file runs as a script, where __name__ is "__main__": name the logger.
logger = logging.getLogger("relay")

# The relay (its cluster.node_id) whose work the running code does: set where a
# relay's tasks and callbacks start, read by NodeFilter into every log record.
NODE: contextvars.ContextVar[str] = contextvars.ContextVar("relay_node", default="-")


class NodeFilter(logging.Filter):
    """Gives each log record ``node``: the id of the relay that logged it (``%(node)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = NODE.get()
        return True


logger.addFilter(NodeFilter())

ROOT: Final = Path(__file__).resolve().parent
ROLES: Final = ("patient", "practitioner")
OTHER_ROLE: Final = {"patient": "practitioner", "practitioner": "patient"}
SESSION_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Minted session ids: letters and digits only (one never starts with "-", an option).
SESSION_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
RESUME_RE: Final = SESSION_RE
NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a host:port fits
FORWARDED_TYPES: Final = frozenset({"offer", "answer", "candidate"})
RELAYED_TYPES: Final = FORWARDED_TYPES | {"bye"}  # what reaches the other seat as sent
CLIENT_TYPES: Final = frozenset({"join", "offer", "answer", "candidate", "bye", "ping", "invite"})
TEXT_OR_NULL: Final = (str, type(None))
INT_OR_NULL: Final = (int, type(None))  # exact types: true is not an integer
EXPIRY_RE: Final = re.compile(r"[1-9][0-9]{0,11}")  # [0-9] is ASCII only, unlike \d
RESUME_MAC_BYTES: Final = 18
RESUME_KEY_LEN: Final = 2 + 16 + 24  # "r1", the nonce, the MAC (unpadded base64url)
REFUSAL_SUMMARY_S: Final = 60.0  # refusals are logged at DEBUG, and counted at INFO this often

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_REPLACED: Final = 4001

AUTH_SECRET_ENV: Final = "EPEDICARE_AUTH_SECRET"  # noqa: S105 (a variable name)
TURN_SECRET_ENV: Final = "EPEDICARE_TURN_SECRET"  # noqa: S105 (a variable name)
RESUME_SECRET_ENV: Final = "EPEDICARE_RESUME_SECRET"  # noqa: S105 (a variable name)
RESUME_SECRET_FILE: Final = ".relay-resume-secret"  # noqa: S105 (a file name, next to the YAML)
API_KEYS_ENV: Final = "EPEDICARE_API_KEYS"  # comma-separated hashes, like api.keys
API_KEY_HASH_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
API_PATH: Final = "/api/consultations"
API_MAX_BODY: Final = 4096  # bytes of JSON a booking system may post
LINK_TTL_MAX_S: Final = 30 * 86_400  # the longest consultation link (invite, the API)
REDIS_URL_ENV: Final = "EPEDICARE_REDIS_URL"
REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
TURN_TTL_MAX_S: Final = 86_400  # the longest TURN credential the relay mints (24 h)
WS_REQUEST_RE: Final = re.compile(rb"GET /ws[ ?]")  # a WebSocket request line, refused early
BUSY_BODY: Final = b"Too many connections opening: retry later.\n"
BUSY_RETRY_MAX_S: Final = 60  # the longest Retry-After of a 503 (the peers cap theirs at 60 too)
# The completed handshakes the measured rate looks back on, and how many it
# needs before it replaces limits.reconnect_rate (see HandshakePacer).
HANDSHAKE_WINDOW_S: Final = 2.0
HANDSHAKE_RATE_MIN_SAMPLES: Final = 50
# The close reason of a relay that stops: "relay shutting down; reconnect in 3.25 s".
# peers/errors.py (restart_delay) and web/js/signaling.js read the delay back.
RECONNECT_REASON: Final = "relay shutting down; reconnect in {:.2f} s"
# SIGTERM to exit, at most limits.shutdown_timeout_s plus this: past it the
# event loop's own teardown is cut short (see run()).
EXIT_MARGIN_S: Final = 0.5
EXIT_LOG_S: Final = 0.2  # what the watchdog gives its last log line before it exits
FD_MARGIN: Final = 64  # descriptors beyond max_connections: listener, logs, DNS, metrics
LOOPBACK_NETS: Final = ("127.0.0.0/8", "::1/128")


# ---------------------------------------------------------------------------
# Band 1: the pure core
# ---------------------------------------------------------------------------


class RelayError(Exception):
    """Base of the relay's errors."""


class ConfigError(RelayError):
    """A configuration value is wrong; ``key`` is its dotted path."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"{key}: {expected}")
        self.key = key
        self.expected = expected


class ProtocolError(RelayError):
    """A frame was refused. ``code`` is stable; ``str()`` is for humans."""

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code


# -- configuration -----------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Every limit the relay enforces; the defaults are the documented ones."""

    max_frame_bytes: int = 65_536
    hard_max_bytes: int = 262_144
    frames_per_second: float = 50.0
    burst: int = 100
    max_connections: int = 10_000
    max_sessions: int = 5_000
    join_timeout_s: float = 10.0
    # The opening handshake (TCP accepted to HTTP 101), websockets' open_timeout.
    open_timeout_s: float = 10.0
    # Handshakes in progress (accepted, not yet answered). Past it, a new
    # connection is answered 503 with Retry-After at once: in a reconnect storm
    # the excess backs off instead of timing out behind thousands of others.
    max_handshakes: int = 4_000
    # Opening handshakes per second the relay expects to complete after a
    # restart: when it stops, its N clients are told in their close reason to
    # come back one after the other over N / reconnect_rate seconds, and a 503
    # sizes its Retry-After by it until the relay has measured its own rate.
    reconnect_rate: float = 500.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    close_timeout_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    # Bytes waiting to be written to one client; beyond it the client is not
    # reading (a slow reader, or a ping flood whose pongs pile up): it is cut.
    write_buffer_bytes: int = 262_144
    # Per client address (the socket's, or X-Forwarded-For from a trusted proxy).
    max_connections_per_address: int = 50
    max_sessions_per_address: int = 50
    handshakes_per_second_per_address: float = 20.0
    # After an unclean drop, only the seat's previous resume key may take it back.
    resume_grace_s: float = 30.0


@dataclass(frozen=True)
class AuthConfig:
    secret: str | None = None
    open: bool = False
    # Signs resume keys: this value (or EPEDICARE_RESUME_SECRET), else derived
    # from ``secret``, else read from (or generated into) ``resume_secret_file``,
    # else random for this process only.
    resume_secret: str | None = None
    resume_secret_file: Path | None = None


@dataclass(frozen=True)
class ApiConfig:
    """POST /api/consultations: off unless ``keys`` (SHA-256 hashes of API keys) is set."""

    keys: tuple[str, ...] = ()
    # The links' origin, e.g. https://call.example.org; None: the request's Host.
    base_url: str | None = None
    ttl_s: int = 7200  # a consultation's links, when the request names no ttl_s


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """Several relays as one: the Redis they share, and this relay's name among them."""

    redis_url: str | None = None  # None: seats in this process's memory (a relay alone)
    node_id: str | None = None  # None: host:port, as bound
    # A live relay refreshes its seats' time to live; a dead one's expire after it.
    seat_ttl_s: float = 15.0


@dataclass(frozen=True)
class TurnConfig:
    secret: str | None = None
    urls: tuple[str, ...] = ()
    ttl: int = 3600


def read_yaml(path: Path) -> object:
    """The YAML document of ``path`` ({} when empty), or ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only where: the message quotes the offending line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    return {} if data is None else data


# `call:`: how a call comes back after a network change (issue 12), for the peers and
# the page (served in /rtc-config.json): give up after recovery_timeout_s, a media path
# silent for media_timeout_s is dead, a signaling heartbeat every heartbeat_s.
# The `call:` section (call recovery, issue 12): read here once for the relay,
# which serves it to the pages in /rtc-config.json, and for the aiortc peers.
# name: (default, minimum)
CALL_SETTINGS: Final[Mapping[str, tuple[float, float]]] = {
    "recovery_timeout_s": (60.0, 1.0),
    "media_timeout_s": (3.0, 0.5),
    "heartbeat_s": (1.0, 0.1),
}
CALL_DEFAULTS: Final[Mapping[str, float]] = {k: v[0] for k, v in CALL_SETTINGS.items()}


def call_settings(call: Section) -> dict[str, float]:
    """The `call:` section's values, defaults filled in, each at least its minimum."""
    return {
        name: float(call.number(name, default, minimum=minimum))
        for name, (default, minimum) in CALL_SETTINGS.items()
    }


@dataclass(frozen=True)
class RelayConfig:
    """Every setting of the relay, loaded once from YAML by ``load``."""

    host: str = "127.0.0.1"
    port: int = 5001
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    limits: Limits = Limits()
    turn: TurnConfig = TurnConfig()
    api: ApiConfig = ApiConfig()
    cluster: ClusterConfig = ClusterConfig()
    # Proxies whose X-Forwarded-For names the client (addresses or networks).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Origins allowed to open /ws from a browser; () is the same origin only
    # (and any origin on loopback without auth.secret).
    origins: tuple[str, ...] = ()
    backlog: int = 4096
    # Who may read /metrics and the full /health.
    metrics_allow: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK_NETS)
    web_root: Path = ROOT / "web"
    # GET /rtc-config.json: the browsers' RTCConfiguration, from the same `ice`
    # section as the peers', so one YAML value switches both.
    browser_ice: Mapping[str, Any] = field(
        default_factory=lambda: {
            "iceServers": [],
            "iceTransportPolicy": "all",
            "call": dict(CALL_DEFAULTS),
        }
    )

    @classmethod
    def load(cls, path: Path | None, env: Mapping[str, str] | None = None) -> RelayConfig:
        """Read the relay's sections of a YAML file (``None``: the defaults)."""
        data = {} if path is None else read_yaml(path)
        config = cls.from_mapping(data, os.environ if env is None else env)
        if path is not None and config.auth.resume_secret_file is None:
            auth = dataclasses.replace(
                config.auth, resume_secret_file=path.resolve().parent / RESUME_SECRET_FILE
            )
            config = dataclasses.replace(config, auth=auth)
        return config

    @classmethod
    def from_mapping(cls, data: object, env: Mapping[str, str] | None = None) -> RelayConfig:
        env = {} if env is None else env
        top = Section.root(data)
        relay = top.section("relay")
        auth = top.section("auth")
        tls = top.section("tls")
        turn = top.section("turn")
        limits = top.section("limits")
        ice = top.section("ice")
        metrics = top.section("metrics")
        api = top.section("api")
        cluster = top.section("cluster")

        d = Limits()
        lim = Limits(
            max_frame_bytes=limits.integer("max_frame_bytes", d.max_frame_bytes),
            hard_max_bytes=limits.integer("hard_max_bytes", d.hard_max_bytes),
            frames_per_second=limits.number("frames_per_second", d.frames_per_second),
            burst=limits.integer("burst", d.burst),
            max_connections=limits.integer("max_connections", d.max_connections),
            max_sessions=limits.integer("max_sessions", d.max_sessions),
            join_timeout_s=limits.number("join_timeout_s", d.join_timeout_s),
            open_timeout_s=limits.number("open_timeout_s", d.open_timeout_s),
            max_handshakes=limits.integer("max_handshakes", d.max_handshakes),
            reconnect_rate=limits.number("reconnect_rate", d.reconnect_rate),
            ping_interval_s=limits.number("ping_interval_s", d.ping_interval_s),
            ping_timeout_s=limits.number("ping_timeout_s", d.ping_timeout_s),
            close_timeout_s=limits.number("close_timeout_s", d.close_timeout_s),
            shutdown_timeout_s=limits.number("shutdown_timeout_s", d.shutdown_timeout_s),
            write_buffer_bytes=limits.integer("write_buffer_bytes", d.write_buffer_bytes),
            max_connections_per_address=limits.integer(
                "max_connections_per_address", d.max_connections_per_address
            ),
            max_sessions_per_address=limits.integer(
                "max_sessions_per_address", d.max_sessions_per_address
            ),
            handshakes_per_second_per_address=limits.number(
                "handshakes_per_second_per_address", d.handshakes_per_second_per_address
            ),
            resume_grace_s=limits.number("resume_grace_s", d.resume_grace_s),
        )
        if lim.hard_max_bytes <= lim.max_frame_bytes:
            raise ConfigError(
                "limits.hard_max_bytes", "expected a value above limits.max_frame_bytes"
            )
        if lim.write_buffer_bytes <= lim.max_frame_bytes:
            raise ConfigError(
                "limits.write_buffer_bytes", "expected a value above limits.max_frame_bytes"
            )
        cert, key = tls.optional_text("cert"), tls.optional_text("key")
        if (cert is None) != (key is None):
            raise ConfigError("tls.cert" if cert is None else "tls.key", "set both or neither")
        urls = turn.texts("urls")
        for i, url in enumerate(urls):
            if not url.startswith(("turn:", "turns:")):
                raise ConfigError(f"turn.urls[{i}]", "expected a turn: or turns: URL")
        origins = relay.texts("origins")
        for i, origin in enumerate(origins):
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ConfigError(
                    f"relay.origins[{i}]", "expected an origin like https://call.example.org"
                )
        resume_file = auth.optional_text("resume_secret_file")
        api_config = _api_config(api, env)
        secret = env.get(AUTH_SECRET_ENV) or auth.optional_text("secret")
        if api_config.keys and not secret:
            raise ConfigError("api.keys", f"set auth.secret (or {AUTH_SECRET_ENV}) to sign links")
        redis_url = env.get(REDIS_URL_ENV) or cluster.optional_text("redis_url")
        if redis_url is not None and urlsplit(redis_url).scheme not in REDIS_SCHEMES:
            raise ConfigError("cluster.redis_url", "expected a redis://, rediss:// or unix:// URL")
        node_id = cluster.optional_text("node_id")
        if node_id is not None and not NODE_ID_RE.fullmatch(node_id):
            raise ConfigError("cluster.node_id", "expected 1 to 64 of A-Z, a-z, 0-9 and _.:-")
        return cls(
            host=relay.text("host", cls.host),
            port=relay.port("port", cls.port),
            api=api_config,
            auth=AuthConfig(
                secret=secret,
                open=auth.flag("open", False),
                resume_secret=env.get(RESUME_SECRET_ENV) or auth.optional_text("resume_secret"),
                resume_secret_file=None if resume_file is None else Path(resume_file),
            ),
            trusted_proxies=_networks(relay, "trusted_proxies", ()),
            origins=tuple(o.rstrip("/").lower() for o in origins),
            backlog=relay.integer("backlog", cls.backlog, maximum=65_535),
            metrics_allow=_networks(metrics, "allow", LOOPBACK_NETS),
            tls=TlsConfig(
                cert=None if cert is None else Path(cert),
                key=None if key is None else Path(key),
            ),
            limits=lim,
            turn=TurnConfig(
                secret=env.get(TURN_SECRET_ENV) or turn.optional_text("secret"),
                urls=tuple(urls),
                ttl=turn.integer("ttl", 3600, maximum=TURN_TTL_MAX_S),
            ),
            cluster=ClusterConfig(
                redis_url=redis_url,
                node_id=node_id,
                seat_ttl_s=cluster.number("seat_ttl_s", ClusterConfig.seat_ttl_s),
            ),
            browser_ice={
                "iceServers": ice.ice_servers("servers"),
                "iceTransportPolicy": ice.choice("policy", ("all", "relay"), "all"),
                "call": call_settings(top.section("call")),
            },
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls.cert is None or self.tls.key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls.cert, self.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls.cert", f"cannot load the certificate and key ({exc})") from exc
        return context

    def exposure(self) -> str | None:
        """Why this relay must not run without join tokens (None: it may)."""
        if not is_loopback(self.host):
            return f"listening on {self.host!r} (not loopback)"
        if self.trusted_proxies:
            return "behind a proxy (relay.trusted_proxies)"
        if self.turn.secret:
            return "handing out TURN credentials (turn.secret)"
        return None

    def check_exposure(self) -> None:
        """Refuse to run exposed without a join-token secret (unless auth.open says so)."""
        why = self.exposure()
        if self.auth.secret or why is None:
            return
        if not self.auth.open:
            raise ConfigError(
                "auth.secret",
                f"required when {why}: set auth.secret or {AUTH_SECRET_ENV}, "
                "or auth.open: true to run without join tokens",
            )
        logger.warning(
            "relay runs OPEN %s: anyone who reaches it can join any session "
            "(auth.open is true and no auth.secret is set)",
            why,
        )

    def resume_secret_bytes(self) -> tuple[bytes, str]:
        """The key that signs resume keys, and where it came from (for the start log)."""
        auth = self.auth
        if auth.resume_secret:
            return auth.resume_secret.encode(), "auth.resume_secret"
        if auth.secret:
            derived = hmac.new(auth.secret.encode(), b"epedicare resume v1", hashlib.sha256)
            return derived.digest(), "derived from auth.secret"
        path = auth.resume_secret_file
        if path is None:
            return secrets.token_bytes(32), "random, this process only"
        try:
            if not path.exists():
                # O_EXCL: two relays starting at once never overwrite each other's key.
                with contextlib.suppress(FileExistsError):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w", encoding="ascii") as out:
                        out.write(secrets.token_urlsafe(32) + "\n")
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "auth.resume_secret_file", f"cannot read or create {str(path)!r} ({exc})"
            ) from exc
        if len(text) < 16:
            raise ConfigError("auth.resume_secret_file", f"{str(path)!r} holds under 16 characters")
        return text.encode(), f"file {path}"


# Every key the YAML file may hold, by section: the relay, the peers and the local
# coturn read the same file through ``Section`` and refuse the same unknown keys.
CONFIG_KEYS: Final[Mapping[str, frozenset[str]]] = {
    # url and the *_s timeouts: the peers' relay client; the rest: relay.py.
    "relay": frozenset({"url", "host", "port", "trusted_proxies", "origins", "backlog"})
    | frozenset({"open_timeout_s", "join_timeout_s", "reconnect_max_s"}),
    "auth": frozenset({"secret", "open", "resume_secret", "resume_secret_file"}),
    "metrics": frozenset({"allow"}),
    "api": frozenset({"keys", "base_url", "ttl_s"}),
    "cluster": frozenset(f.name for f in dataclasses.fields(ClusterConfig)),
    "tls": frozenset({"cert", "key"}),
    "limits": frozenset(f.name for f in dataclasses.fields(Limits)),
    # secret, urls, ttl: the relay's short-lived credentials; ca_file: the peers' trust;
    # the rest configure the local coturn (peers/turnserver.py).
    "turn": frozenset(
        {"secret", "urls", "ttl", "ca_file", "listen", "port", "tls_port", "cert", "key"}
        | {"relay_ip", "external_ip", "min_port", "max_port", "realm", "username"}
        | {"credential", "allow_private_peers", "allowed_peers", "verbose"}
    ),
    "ice": frozenset({"servers", "policy", "timeout_s"}),
    "media": frozenset({"video", "audio"}),
    "call": frozenset({"recovery_timeout_s", "media_timeout_s", "heartbeat_s"}),
}
# Top-level scalars (the peers' defaults) besides the sections.
CONFIG_SCALARS: Final = frozenset({"session", "token"})
ICE_URL_RE: Final = re.compile(r"(stun|stuns|turn|turns):([^?]+)(\?transport=(udp|tcp))?")


class Section:
    """One mapping of the YAML tree, read with typed getters that name the dotted key.

    The one configuration reader of the project: ``Section.root(data)`` checks the
    top level, ``root.section("turn")`` a section (its known keys from
    ``CONFIG_KEYS``). A key whose value is null (or absent) takes the default.
    """

    def __init__(self, data: object, path: str, known: Iterable[str] | None = None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path or "(top level)", "expected a mapping")
        self.data: dict[str, object] = data
        self.path = path
        if known is not None:
            known = set(known)
            for name in data:
                if name not in known:
                    what = "unknown section" if not path else "unknown key"
                    raise ConfigError(self.key(str(name)), f"{what} (known: {sorted(known)})")

    @classmethod
    def root(cls, data: object) -> Section:
        """The whole document ({} for an empty file); an unknown top-level name is refused."""
        return cls({} if data is None else data, "", known=set(CONFIG_KEYS) | CONFIG_SCALARS)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str) -> object:
        return self.data.get(name)

    def section(self, name: str, known: Iterable[str] | None = None) -> Section:
        """A sub-mapping; its known keys are ``known``, or ``CONFIG_KEYS`` for a section."""
        value = self.data.get(name)
        if known is None and not self.path:
            known = CONFIG_KEYS[name]
        return Section({} if value is None else value, self.key(name), known)

    def text(self, name: str, default: str) -> str:
        value = self.optional_text(name)
        return default if value is None else value

    def optional_text(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), "expected a non-empty string")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(name)
        if value is None:
            return default
        if value not in choices:
            expected = f"expected one of {', '.join(choices)}, got {value!r}"
            raise ConfigError(self.key(name), expected)
        return str(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), "expected true or false")
        return value

    def number(
        self,
        name: str,
        default: float,
        *,
        integer: bool = False,
        minimum: float | None = None,
        maximum: float = math.inf,
    ) -> float:
        """A finite number in [minimum, maximum]; without a minimum, above 0."""
        value = self.data.get(name)
        if value is None:
            return default
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            raise ConfigError(
                self.key(name), "expected an integer" if integer else "expected a number"
            )
        assert isinstance(value, int | float)
        low = "above 0" if minimum is None else f"from {minimum:g}"
        high = f" up to {maximum:g}" if maximum < math.inf else ""
        in_range = (value > 0 if minimum is None else value >= minimum) and value <= maximum
        if not math.isfinite(value) or not in_range:
            raise ConfigError(self.key(name), f"expected a number {low}{high}, got {value!r}")
        return value

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: float = math.inf
    ) -> int:
        return int(self.number(name, default, integer=True, minimum=minimum, maximum=maximum))

    def port(self, name: str, default: int, *, minimum: int = 0) -> int:
        return int(self.number(name, default, integer=True, minimum=minimum, maximum=65_535))

    def texts(self, name: str) -> list[str]:
        value = self.data.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.key(name), "expected a string or a list of strings")
        return list(value)

    def path_value(self, name: str) -> Path | None:
        value = self.optional_text(name)
        return None if value is None else Path(value)

    def address(self, name: str) -> str | None:
        """An IP address (no host name), or None."""
        value = self.optional_text(name)
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(self.key(name), "expected an IP address") from None
        return value

    def networks(self, name: str, default: Iterable[str] = ()) -> tuple[str, ...]:
        """A list of networks in CIDR notation (an address is a /32 or /128), normalised."""
        value = self.data.get(name)
        if value is None:
            value = list(default)
        if not isinstance(value, list):
            raise ConfigError(self.key(name), "expected a list of networks (CIDR)")
        networks = []
        for i, item in enumerate(value):
            try:
                networks.append(str(ipaddress.ip_network(str(item), strict=False)))
            except ValueError:
                raise ConfigError(f"{self.key(name)}[{i}]", "expected a network (CIDR)") from None
        return tuple(networks)

    def session(self, name: str, default: str) -> str:
        value = self.data.get(name)
        return default if value is None else check_session(value, self.key(name))

    def ice_servers(self, name: str) -> list[dict[str, Any]]:
        """``ice.servers``: RTCIceServer dictionaries, ``urls`` always a list.

        What any WebRTC stack accepts is checked here; what aiortc cannot use is
        refused or warned about by the peers (peers/config.py).
        """
        value = self.data.get(name)
        key = self.key(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(key, "expected a list of {urls, username, credential}")
        servers = []
        for n, entry in enumerate(value):
            where = Section(entry, f"{key}[{n}]", known=ICE_SERVER_KEYS)
            urls = entry.get("urls")
            urls = [urls] if isinstance(urls, str) else urls
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise ConfigError(where.key("urls"), "expected a URL or a list of URLs")
            for url in urls:
                if ICE_URL_RE.fullmatch(url) is None:
                    raise ConfigError(
                        where.key("urls"),
                        f"{url!r} is not stun:HOST[:PORT] or "
                        "turn[s]:HOST[:PORT][?transport=udp|tcp]",
                    )
            server: dict[str, Any] = {"urls": urls}
            for field_name in ("username", "credential"):
                item = entry.get(field_name)
                if item is not None and not isinstance(item, str):
                    raise ConfigError(where.key(field_name), "expected a string")
                if item is not None:
                    server[field_name] = item
            if "credentialType" in entry:
                server["credentialType"] = entry["credentialType"]
            servers.append(server)
        return servers


ICE_SERVER_KEYS: Final = frozenset({"urls", "username", "credential", "credentialType"})


def check_session(value: object, key: str) -> str:
    """A session id (1-64 of ``[A-Za-z0-9_-]``), or ConfigError naming ``key``."""
    if not isinstance(value, str) or not SESSION_RE.fullmatch(value):
        raise ConfigError(key, f"expected 1-64 characters of A-Z a-z 0-9 _ -, got {value!r}")
    return value


def _api_config(api: Section, env: Mapping[str, str]) -> ApiConfig:
    from_env = env.get(API_KEYS_ENV)
    if from_env is not None:
        keys = [k.strip() for k in from_env.split(",") if k.strip()]
        where = API_KEYS_ENV
    else:
        keys, where = api.texts("keys"), "api.keys"
    for i, key in enumerate(keys):
        if not API_KEY_HASH_RE.fullmatch(key):
            raise ConfigError(
                f"{where}[{i}]",
                "expected a hash sha256:<64 hex digits> (python relay.py api-key prints one)",
            )
    base_url = api.optional_text("base_url")
    if base_url is not None:
        base_url = check_base_url(base_url, "api.base_url")
    return ApiConfig(
        keys=tuple(keys),
        base_url=base_url,
        ttl_s=api.integer("ttl_s", ApiConfig.ttl_s, minimum=60, maximum=LINK_TTL_MAX_S),
    )


def check_base_url(url: str, key: str) -> str:
    """An http(s) origin with an optional path prefix, without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(key, f"expected a URL like https://call.example.org, got {url!r}")
    return url.rstrip("/")


def hash_api_key(key: str) -> str:
    """What api.keys holds for an API key: its SHA-256 (keys are random, 256 bits)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _networks(section: Section, name: str, default: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(net) for net in section.networks(name, default))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- frames --------------------------------------------------------------------


def parse_frame(message: str | bytes, max_frame_bytes: int) -> tuple[str, dict[str, Any], str]:
    """Parse and check one client frame: (type, fields, text to forward verbatim)."""
    if not isinstance(message, str):
        raise ProtocolError("binary-frame", "Binary frames are not accepted: send JSON text.")
    # Characters never outnumber UTF-8 bytes, and never weigh more than four.
    size = len(message)
    if size * 4 > max_frame_bytes:
        size = len(message.encode("utf-8", "surrogatepass"))
    if size > max_frame_bytes:
        raise ProtocolError(
            "frame-too-large", f"The frame is {size} bytes, over the {max_frame_bytes}-byte limit."
        )
    try:
        # orjson: strict RFC 8259 (no NaN, no lone surrogates, nesting capped
        # at 1024), and a fifth of json.loads' cost on the hot path.
        data = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad-json", "The frame is not valid JSON.") from None
    if type(data) is not dict:
        raise ProtocolError("bad-json", "A frame must be one JSON object.")
    kind = data.get("type")
    # Well-formed candidates, offers and answers, nearly all of the traffic,
    # pass these tests; every other frame is checked field by field below, to
    # name what is wrong. (Two compares beat a set here.)
    if kind == "candidate":
        init = data.get("candidate")
        if (
            type(init) is dict
            and type(init.get("candidate")) is str
            and type(init.get("sdpMid")) in TEXT_OR_NULL
            and type(init.get("sdpMLineIndex")) in INT_OR_NULL
        ):
            return kind, data, message
    elif (kind == "offer" or kind == "answer") and type(data.get("sdp")) is str:  # noqa: PLR1714
        return kind, data, message
    if type(kind) is not str or kind not in CLIENT_TYPES:
        raise _bad_type(data)
    _check_fields(kind, data)
    return kind, data, message


def _bad_type(data: dict[str, Any]) -> ProtocolError:
    if "type" not in data:
        return ProtocolError("missing-field", "The frame has no 'type' field.")
    kind = data["type"]
    if not isinstance(kind, str):
        return ProtocolError("bad-field", "The field 'type' must be a string.")
    return ProtocolError("unknown-type", f"Unknown frame type {_shorten(kind)!r}.")


def _check_fields(kind: str, data: dict[str, Any]) -> None:
    if kind == "candidate":
        init = data.get("candidate")
        if type(init) is dict:
            _field(init, "candidate", str, prefix="candidate.")
            _field(init, "sdpMid", str, prefix="candidate.", optional=True)
            _field(init, "sdpMLineIndex", int, prefix="candidate.", optional=True)
        elif init is None:
            if "candidate" not in data:
                raise ProtocolError("missing-field", "The field 'candidate' is missing.")
            # else null: end-of-candidates
        else:
            raise ProtocolError("bad-field", "The field 'candidate' must be an object or null.")
    elif kind == "offer" or kind == "answer":  # noqa: PLR1714 (two compares beat a set here)
        _field(data, "sdp", str)
    elif kind == "bye":
        _field(data, "reason", str, optional=True)
    elif kind == "invite":
        _field(data, "token", str, optional=True)


def _field(
    data: dict[str, Any], name: str, kind: type, *, prefix: str = "", optional: bool = False
) -> Any:
    value = data.get(name)
    # The exact type: JSON gives no subclasses, and true is not an integer.
    if type(value) is kind or (value is None and optional):
        return value
    if name not in data:
        raise ProtocolError("missing-field", f"The field '{prefix}{name}' is missing.")
    expected = {str: "a string", int: "an integer"}[kind]
    raise ProtocolError("bad-field", f"The field '{prefix}{name}' must be {expected}.")


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def frame(kind: str, **fields: object) -> str:
    """Serialize one relay frame."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def error_frame(exc: ProtocolError) -> str:
    return frame("error", code=exc.code, message=str(exc))


# -- tokens and TURN credentials -------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _token_signature(secret: str, session: str, role: str, window: str) -> str:
    """HMAC-SHA256 over the version, session, role and the window's text.

    ``window`` is ``<expiry>`` for v1, ``<not-before>|<expiry>`` for v2.
    """
    version = "v2" if "|" in window else "v1"
    message = f"{version}|{session}|{role}|{window}".encode()
    return _b64url(hmac.new(secret.encode(), message, hashlib.sha256).digest())


def mint_token(
    secret: str, session: str, role: str, expiry: int, not_before: int | None = None
) -> str:
    """A join token for one session and role, valid until ``expiry`` (Unix seconds).

    With ``not_before`` it is a v2 token, refused (``token-not-yet-valid``)
    before that time; without, a v1 token, as before.
    """
    if not SESSION_RE.fullmatch(session):
        raise ValueError(f"bad session id {session!r}: expected 1-64 of [A-Za-z0-9_-]")
    if role not in ROLES:
        raise ValueError(f"bad role {role!r}: expected patient or practitioner")
    for name, value in (("expiry", expiry), ("not-before", not_before)):
        if value is not None and not EXPIRY_RE.fullmatch(str(value)):
            raise ValueError(f"bad {name} {value!r}: expected 1 to 12 digits of Unix seconds")
    if not_before is None:
        return f"v1.{expiry}.{_token_signature(secret, session, role, str(expiry))}"
    if not_before >= expiry:
        raise ValueError("the not-before time must come before the expiry")
    window = f"{not_before}|{expiry}"
    return f"v2.{not_before}.{expiry}.{_token_signature(secret, session, role, window)}"


def token_window(token: str) -> tuple[int | None, int, str] | None:
    """A token's (not-before, expiry, signed window text), or None when malformed.

    Strict: ``v1.<expiry>.<sig>`` or ``v2.<not-before>.<expiry>.<sig>``, each
    time in ASCII digits without a leading zero (one token, one spelling).
    """
    parts = token.split(".")
    if parts[0] == "v1" and len(parts) == 3 and EXPIRY_RE.fullmatch(parts[1]):
        return None, int(parts[1]), parts[1]
    if (
        parts[0] == "v2"
        and len(parts) == 4
        and EXPIRY_RE.fullmatch(parts[1])
        and EXPIRY_RE.fullmatch(parts[2])
    ):
        return int(parts[1]), int(parts[2]), f"{parts[1]}|{parts[2]}"
    return None


def check_token(
    secret: str, token: str | None, session: str, role: str, now: float
) -> tuple[int | None, int]:
    """Raise ``ProtocolError`` unless ``token`` signs this session and role and is current.

    Returns its (not-before, expiry).
    """
    if token is None:
        raise ProtocolError("bad-token", "This relay needs a join token.")
    window = token_window(token)
    if window is None:
        raise ProtocolError("bad-token", "The join token is malformed.")
    not_before, expiry, text = window
    expected = _token_signature(secret, session, role, text)
    signature = token.rpartition(".")[2]
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise ProtocolError("bad-token", "The join token is not valid for this session and role.")
    if expiry < now:
        raise ProtocolError("token-expired", "The join token has expired.")
    if not_before is not None and now < not_before:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_before))
        raise ProtocolError("token-not-yet-valid", f"The join token is valid from {when} only.")
    return not_before, expiry


def _resume_mac(secret: bytes, session: str, role: str, nonce: str) -> str:
    message = f"r1|{session}|{role}|{nonce}".encode()
    return _b64url(hmac.new(secret, message, hashlib.sha256).digest()[:RESUME_MAC_BYTES])


def mint_resume(secret: bytes, session: str, role: str, nonce: bytes | None = None) -> str:
    """A resume key for one seat: ``r1``, a 16-character nonce, a 24-character HMAC.

    Any relay holding ``secret`` can verify it (``verify_resume``) without
    remembering it: keys survive a restart and may be checked by another relay.
    """
    text = _b64url(secrets.token_bytes(12) if nonce is None else nonce)
    return f"r1{text}{_resume_mac(secret, session, role, text)}"


def verify_resume(secret: bytes, key: str, session: str, role: str) -> bool:
    """Whether ``key`` was minted with ``secret`` for this session and role."""
    if len(key) != RESUME_KEY_LEN or not key.startswith("r1"):
        return False
    nonce, mac = key[2:18], key[18:]
    return hmac.compare_digest(_resume_mac(secret, session, role, nonce).encode(), mac.encode())


def turn_credentials(turn: TurnConfig, session: str, role: str, now: float) -> list[dict[str, Any]]:
    """Short-lived TURN credentials (the TURN REST API scheme of coturn's use-auth-secret)."""
    if not turn.secret or not turn.urls:
        return []
    username = f"{int(now) + turn.ttl}:{session}-{role}"
    digest = hmac.new(turn.secret.encode(), username.encode(), hashlib.sha1).digest()
    credential = base64.b64encode(digest).decode("ascii")
    return [{"urls": list(turn.urls), "username": username, "credential": credential}]


def consultation_request(body: bytes, default_ttl: int) -> tuple[int | None, int]:
    """The (not_before, ttl_s) of an API request's JSON body, or ProtocolError naming the field."""
    if not body.strip():
        return None, default_ttl
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad-body", "The body is not valid JSON.") from None
    if type(data) is not dict:
        raise ProtocolError("bad-body", "The body must be one JSON object.")
    for name in data:
        if name not in ("not_before", "ttl_s"):
            raise ProtocolError(
                "bad-field", f"Unknown field {_shorten(str(name))!r}: expected not_before, ttl_s."
            )
    not_before = data.get("not_before")
    if not_before is not None and (
        type(not_before) is not int or not EXPIRY_RE.fullmatch(str(not_before))
    ):
        raise ProtocolError(
            "bad-field", "The field 'not_before' must be Unix seconds (an integer)."
        )
    ttl = data.get("ttl_s", default_ttl)
    if type(ttl) is not int or not 60 <= ttl <= LINK_TTL_MAX_S:
        raise ProtocolError(
            "bad-field", f"The field 'ttl_s' must be an integer from 60 to {LINK_TTL_MAX_S}."
        )
    return not_before, ttl


def link(base_url: str, session: str, role: str, token: str) -> str:
    query = urlencode({"session": session, "role": role, "token": token})
    return f"{base_url}/?{query}"


def new_consultation(
    secret: str, base_url: str, now: float, ttl_s: int, not_before: int | None = None
) -> dict[str, Any]:
    """A random session id and both seats' links, valid from ``not_before`` for ``ttl_s``.

    The session id has 128 random bits: it cannot be guessed, and the tokens
    bind each link to it.
    """
    session = "".join(secrets.choice(SESSION_ALPHABET) for _ in range(22))  # 131 bits
    expiry = (int(now) if not_before is None else not_before) + ttl_s
    if expiry < now:
        raise ProtocolError("bad-field", "The links would expire before they are made.")
    if not EXPIRY_RE.fullmatch(str(expiry)):
        raise ProtocolError("bad-field", "The expiry must fit in 12 digits.")
    made: dict[str, Any] = {"session": session, "not_before": not_before, "expires": expiry}
    for role in ROLES:
        token = mint_token(secret, session, role, expiry, not_before)
        made[f"{role}_url"] = link(base_url, session, role, token)
        made[f"{role}_token"] = token
    return made


# -- state and actions -----------------------------------------------------------


# One Send is made for every relayed frame: slotted, not frozen,
# dataclasses are built in 120 ns, a NamedTuple in 210 and a frozen dataclass
# in 310 (Python 3.11). The core never changes one after making it.
@dataclass(slots=True)
class Send:
    conn: int
    text: str


@dataclass(slots=True)
class Close:
    conn: int
    code: int
    reason: str


@dataclass(slots=True)
class JoinDeadline:
    """Start the join timer of a connection again (it gave up its seat with ``bye``)."""

    conn: int
    generation: int


Action = Send | Close | JoinDeadline


@dataclass(slots=True)
class Conn:
    """One WebSocket connection, as the core sees it."""

    id: int
    # Its frame budget (limits.frames_per_second, limits.burst) as the time at
    # which its bucket would be full again: see _take_token.
    full_at: float
    session: str | None = None
    role: str | None = None
    ever_joined: bool = False
    closing: bool = False
    debug: bool = False  # log its frames (at DEBUG, truncated)
    address: str = ""
    unseated: int = 0  # times it left a seat with bye: the join timer's generation
    # The TURN credentials last minted for it: (session, role, expiry, servers).
    ice: tuple[str, str, float, list[dict[str, Any]]] | None = None


@dataclass(slots=True)
class AddressUse:
    """What one client address holds: connections, sessions, a handshake bucket."""

    allowance: float
    last: float
    conns: int = 0
    sessions: int = 0


@dataclass(slots=True)
class Seat:
    conn: int
    resume: str
    resumed: bool


@dataclass
class Stats:
    """Counters read by /metrics."""

    # A plain dict, not a Counter: its += is specialized by the interpreter.
    frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELAYED_TYPES, 0))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    joins: int = 0
    resumes: int = 0
    replaced: int = 0
    connections_total: int = 0


class SeatStore(Protocol):
    """Where the seats of sessions live: the one seam between the core and a store.

    The core reads ``sessions`` (session -> role -> ``Seat``) on its hot path and
    changes seats only through the methods below, which never await. A frame
    reaches a seat through the seat's ``conn``: the adapter maps that id to what
    delivers it (the client's WebSocket, for the in-memory store). ``MemorySeats``
    is the default, for a relay alone; a store shared by several relays keeps
    ``sessions`` as the local view of the sessions it serves.
    """

    sessions: dict[str, dict[str, Seat]]

    def take(self, session: str, role: str, seat: Seat, opener: str) -> bool:
        """Seat ``seat``; True if it opened the session (``opener`` opened it)."""
        ...

    def release(self, session: str, role: str) -> tuple[Seat, str | None]:
        """Free a taken seat: the seat, and the session's opener if it is now closed."""
        ...

    def hold(self, session: str, role: str, key: str, deadline: float) -> None:
        """Keep a freed seat for ``key`` alone until ``deadline`` (monotonic)."""
        ...

    def holder(self, session: str, role: str, now: float) -> tuple[str, float] | None:
        """The key and deadline a freed seat is kept for, if it has not expired."""
        ...

    def unhold(self, session: str, role: str) -> None:
        """The seat is taken back: forget its hold."""
        ...

    def session_count(self) -> int: ...

    def seats_taken(self) -> int: ...


class MemorySeats:
    """Every seat in this process's memory: the store of a relay that is alone."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Seat]] = {}
        # Seats whose connection dropped uncleanly: (session, role) -> (key, deadline).
        self.held: dict[tuple[str, str], tuple[str, float]] = {}
        self._held_order: collections.deque[tuple[float, tuple[str, str]]] = collections.deque()
        self.opener: dict[str, str] = {}  # session -> the address that opened it

    def take(self, session: str, role: str, seat: Seat, opener: str) -> bool:
        seats = self.sessions.get(session)
        opened = seats is None
        if seats is None:
            seats = self.sessions[session] = {}
            self.opener[session] = opener
        seats[role] = seat
        return opened

    def release(self, session: str, role: str) -> tuple[Seat, str | None]:
        seats = self.sessions[session]
        seat = seats.pop(role)
        if seats:
            return seat, None
        del self.sessions[session]
        return seat, self.opener.pop(session, None)

    def hold(self, session: str, role: str, key: str, deadline: float) -> None:
        self.held[session, role] = (key, deadline)
        self._held_order.append((deadline, (session, role)))

    def holder(self, session: str, role: str, now: float) -> tuple[str, float] | None:
        order = self._held_order
        while order and order[0][0] <= now:  # expired holds are dropped here
            _, expired = order.popleft()
            held = self.held.get(expired)
            if held is not None and held[1] <= now:
                del self.held[expired]
        return self.held.get((session, role))

    def unhold(self, session: str, role: str) -> None:
        self.held.pop((session, role), None)

    def session_count(self) -> int:
        return len(self.sessions)

    def seats_taken(self) -> int:
        return sum(len(seats) for seats in self.sessions.values())


class State:
    """Every connection, and the seats (``seats``); changed only by the core functions below."""

    def __init__(
        self,
        config: RelayConfig,
        monotonic: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        resume_secret: bytes | None = None,
        seats: SeatStore | None = None,
    ) -> None:
        self.config = config
        self.limits = config.limits
        # The frame budget's token bucket in time (see _take_token): a frame
        # costs frame_interval, and a bucket may run frame_slack ahead of now.
        self.frame_interval = 1.0 / self.limits.frames_per_second
        # A millionth of a token over the burst: float rounding of the clock
        # never refuses a frame the bucket has.
        self.frame_slack = (self.limits.burst - 1 + 1e-6) * self.frame_interval
        self.monotonic = monotonic
        self.wallclock = wallclock
        self.conns: dict[int, Conn] = {}
        self.seats: SeatStore = MemorySeats() if seats is None else seats
        # The store's local view, read by receive() for every relayed frame.
        self.sessions = self.seats.sessions
        self.stats = Stats()
        self._next_id = 1
        self.resume_secret = secrets.token_bytes(32) if resume_secret is None else resume_secret
        self.addresses: dict[str, AddressUse] = {}
        self._swept = monotonic()
        self._refusals: collections.Counter[str] = collections.Counter()
        self._refusals_logged = monotonic()

    def seats_taken(self) -> int:
        return self.seats.seats_taken()

    def use(self, address: str) -> AddressUse:
        use = self.addresses.get(address)
        if use is None:
            rate = self.limits.handshakes_per_second_per_address
            use = self.addresses[address] = AddressUse(rate, self.monotonic())
        return use

    def sweep_addresses(self) -> None:
        """Forget addresses that hold nothing and whose handshake bucket is full again."""
        now = self.monotonic()
        if len(self.addresses) < 1024 or now - self._swept < 1.0:
            return
        self._swept = now
        rate = self.limits.handshakes_per_second_per_address
        for address, use in list(self.addresses.items()):
            if (
                use.conns == 0
                and use.sessions == 0
                and use.allowance + (now - use.last) * rate >= rate
            ):
                del self.addresses[address]


def admit(state: State, address: str) -> ProtocolError | None:
    """A WebSocket handshake from ``address``: None to go on, else why it is refused."""
    state.sweep_addresses()
    use = state.use(address)
    now = state.monotonic()
    rate = state.limits.handshakes_per_second_per_address
    allowance = min(rate, use.allowance + (now - use.last) * rate)
    use.last = now
    if allowance < 1.0 - 1e-9:
        use.allowance = allowance
        exc = ProtocolError(
            "address-limit", f"More than {rate:g} connection attempts per second from one address."
        )
        state.stats.errors[exc.code] += 1
        return exc
    use.allowance = allowance - 1.0
    if use.conns >= state.limits.max_connections_per_address:
        exc = ProtocolError(
            "address-limit",
            f"{use.conns} connections are open from this address, the most allowed.",
        )
        state.stats.errors[exc.code] += 1
        return exc
    return None


class HandshakePacer:
    """How fast the relay completes opening handshakes, and when a client should come back.

    ``rate(now)`` is the handshakes completed per second over the last
    ``HANDSHAKE_WINDOW_S``, once ``HANDSHAKE_RATE_MIN_SAMPLES`` completed in
    it (a relay under load is at its capacity); before that, it is
    ``limits.reconnect_rate``. ``retry_after(now, in_progress)`` is the
    ``Retry-After`` of one 503: the relay keeps a schedule of the clients it
    sent away, one every 1 / rate seconds after the handshakes in progress,
    and gives each the next place in it, so the excess of a storm comes back
    as a stream the relay can take instead of as another storm.
    ``restart_delays(n)`` are the delays its n clients are told in their close
    when it stops: one every 1 / ``limits.reconnect_rate`` seconds.
    """

    def __init__(self, default_rate: float) -> None:
        self.default_rate = default_rate
        self.done: collections.deque[float] = collections.deque()
        self.next_slot = 0.0

    def completed(self, now: float) -> None:
        self.done.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        edge = now - HANDSHAKE_WINDOW_S
        while self.done and self.done[0] < edge:
            self.done.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        if len(self.done) < HANDSHAKE_RATE_MIN_SAMPLES:
            return self.default_rate
        return len(self.done) / max(now - self.done[0], HANDSHAKE_WINDOW_S / 4)

    def retry_after(self, now: float, in_progress: int) -> int:
        rate = self.rate(now)
        self.next_slot = max(self.next_slot, now + in_progress / rate) + 1 / rate
        return min(BUSY_RETRY_MAX_S, max(1, math.ceil(self.next_slot - now)))

    def restart_delays(self, clients: int) -> list[float]:
        return [n / self.default_rate for n in range(clients)]


def connect(state: State, address: str = "") -> tuple[int, list[Action]]:
    """Register a new connection; refuse it when the relay or its address is full."""
    # Whether frames are logged is decided once per connection, as websockets does.
    debug = logger.isEnabledFor(logging.DEBUG)
    conn = Conn(state._next_id, state.monotonic(), debug=debug, address=address)
    state._next_id += 1
    state.conns[conn.id] = conn
    state.stats.connections_total += 1
    use = state.use(address)
    use.conns += 1
    if len(state.conns) > state.limits.max_connections:
        return _refuse(
            state,
            conn,
            ProtocolError(
                "server-full",
                "The relay has reached its connection limit; try again later.",
                close_code=CLOSE_TRY_AGAIN_LATER,
            ),
        )
    if use.conns > state.limits.max_connections_per_address:
        return _refuse(
            state,
            conn,
            ProtocolError(
                "address-limit",
                "Too many connections from this address; try again later.",
                close_code=CLOSE_TRY_AGAIN_LATER,
            ),
        )
    return conn.id, []


def _refuse(state: State, conn: Conn, exc: ProtocolError) -> tuple[int, list[Action]]:
    return conn.id, _error_actions(state, conn, exc)


def _error_actions(state: State, conn: Conn, exc: ProtocolError) -> list[Action]:
    """The one place where a refusal becomes frames."""
    state.stats.errors[exc.code] += 1
    _log_refusal(state, conn, exc.code, exc)
    actions: list[Action] = [Send(conn.id, error_frame(exc))]
    if exc.close_code is not None:
        conn.closing = True
        actions.append(Close(conn.id, exc.close_code, exc.code))
    return actions


def _log_refusal(state: State, conn: Conn, code: str, exc: ProtocolError) -> None:
    """Each refusal at DEBUG; their count by code at INFO, at most once a minute.

    A hostile client makes thousands of refusals a second: one line each at
    WARNING would flood the log (/metrics counts them all anyway).
    """
    if conn.debug:
        logger.debug(
            "conn=%d session=%s role=%s refused: %s (%s)",
            conn.id,
            conn.session,
            conn.role,
            code,
            exc,
        )
    state._refusals[code] += 1
    now = state.monotonic()
    if now - state._refusals_logged >= REFUSAL_SUMMARY_S:
        counts = ", ".join(f"{c}={n}" for c, n in sorted(state._refusals.items()))
        logger.info("refused in the last %.0f s: %s", now - state._refusals_logged, counts)
        state._refusals.clear()
        state._refusals_logged = now


def control_frame(state: State, conn_id: int) -> list[Action]:
    """A ping or pong from the client: it takes a token from the frame budget.

    A control frame cannot be refused with an ``error`` frame (websockets has
    already queued the pong), so one over the limit closes the connection.
    """
    conn = state.conns.get(conn_id)
    if conn is None or conn.closing:
        return []
    try:
        _take_token(state, conn)
    except ProtocolError as exc:
        state.stats.errors[exc.code] += 1
        _log_refusal(state, conn, exc.code, exc)
        conn.closing = True
        return [Close(conn.id, CLOSE_POLICY, exc.code)]
    return []


def receive(state: State, conn_id: int, message: str | bytes) -> list[Action]:
    """Handle one frame from a connection: rate limit, parse, act."""
    target = route(state, conn_id, message)
    if isinstance(target, int):
        assert isinstance(message, str)  # route() forwards text frames only
        return [Send(target, message)]
    return target


def route(state: State, conn_id: int, message: str | bytes) -> int | list[Action]:
    """``receive`` without an action for a relayed frame: the id of the connection
    to forward ``message`` to as it is, or the actions of any other frame.

    The adapter calls this for every frame. A well-formed candidate, offer or
    answer with the other seat taken, nearly all the traffic, goes through
    this function's own lines with no call but the JSON parser's and the clock's
    (a Python call costs about as much as a field check, an action object four
    times that, as counted by callgrind: see docs/benchmarks.md). Any other
    frame, or any doubt, goes to ``_receive_frame``'s explicit checks, which
    name what is wrong; a property test holds the two to the same verdicts.
    """
    conn = state.conns[conn_id]
    if conn.closing:
        return []
    # The token bucket, as _take_token (which control frames take from).
    now = state.monotonic()
    full_at = conn.full_at
    if full_at < now:  # noqa: PLR1730 (an if costs a third of max())
        full_at = now
    limits = state.limits
    if full_at - now > state.frame_slack:
        return _error_actions(state, conn, _rate_limited(limits))
    conn.full_at = full_at + state.frame_interval
    session = conn.session
    if (
        session is not None
        and not conn.debug
        and type(message) is str
        # Characters never outnumber UTF-8 bytes, nor weigh more than four.
        and len(message) * 4 <= limits.max_frame_bytes
    ):
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            data = None
        if type(data) is dict:
            kind = data.get("type")
            # parse_frame's shortcut: exact types (JSON gives no subclasses,
            # and true is not an integer); two compares beat a set here.
            if kind == "candidate":
                init = data.get("candidate")
                well_formed = (
                    type(init) is dict
                    and type(init.get("candidate")) is str
                    and type(init.get("sdpMid")) in TEXT_OR_NULL
                    and type(init.get("sdpMLineIndex")) in INT_OR_NULL
                )
            else:
                well_formed = (kind == "offer" or kind == "answer") and type(  # noqa: PLR1714
                    data.get("sdp")
                ) is str
            if well_formed:
                other = state.sessions[session].get(OTHER_ROLE[conn.role or ""])
                if other is not None:
                    # well_formed: kind is "candidate", "offer" or "answer"
                    state.stats.frames[kind] += 1  # type: ignore[index]
                    return other.conn
    return _receive_frame(state, conn, message)


def _rate_limited(limits: Limits) -> ProtocolError:
    return ProtocolError(
        "rate-limited",
        f"More than {limits.frames_per_second:g} frames per second (burst {limits.burst}): "
        "frame dropped.",
    )


def _receive_frame(state: State, conn: Conn, message: str | bytes) -> int | list[Action]:
    """A frame that took its token: every check explicit, naming what is wrong."""
    try:
        kind, data, text = parse_frame(message, state.limits.max_frame_bytes)
        if conn.debug:
            logger.debug("conn=%d > %s", conn.id, _redacted(kind, data, text))
        if kind in FORWARDED_TYPES and conn.session is not None:
            other = state.sessions[conn.session].get(OTHER_ROLE[conn.role or ""])
            if other is not None:
                state.stats.frames[kind] += 1
                return other.conn
        return handle(state, conn, kind, data, text)
    except ProtocolError as exc:
        return _error_actions(state, conn, exc)


def _redacted(kind: str, data: dict[str, Any], text: str) -> str:
    """A frame for the DEBUG log: secrets masked, quoted by repr (no forged lines)."""
    if kind == "join" or kind == "invite":  # noqa: PLR1714 (as in handle)
        shown = {k: ("***" if k in ("token", "resume") else v) for k, v in data.items()}
        return repr(_shorten(json.dumps(shown), 120))
    return repr(_shorten(text, 120))


def _take_token(state: State, conn: Conn) -> None:
    """The token bucket: refill for the time elapsed, then take a token or refuse.

    ``route`` has the same lines inline for data frames: one bucket for both.

    The bucket (``limits.burst`` tokens, ``limits.frames_per_second`` back a
    second) is kept as one time, ``full_at``, when it would be full again
    (the generic cell rate algorithm): a frame is taken while the bucket
    holds one token, that is while ``full_at`` is at most ``burst - 1``
    frames ahead of now, and moves ``full_at`` one frame later. The same
    verdicts as counting tokens, with one value read and written per frame
    instead of two.
    """
    now = state.monotonic()
    full_at = conn.full_at
    if full_at < now:  # noqa: PLR1730 (an if costs a third of max())
        full_at = now
    if full_at - now > state.frame_slack:
        raise _rate_limited(state.limits)
    conn.full_at = full_at + state.frame_interval


def handle(state: State, conn: Conn, kind: str, data: dict[str, Any], text: str) -> list[Action]:
    """Act on one valid frame that ``receive`` did not relay.

    Raises ``ProtocolError`` to refuse it.
    """
    if kind == "ping":
        return [Send(conn.id, frame("pong"))]
    if kind == "join":
        return _join(state, conn, data)
    if conn.session is None:
        raise ProtocolError("not-joined", f"Send 'join' before {kind!r}.")
    if kind == "bye":
        return _leave(state, conn, "bye", forward=text)
    if kind == "invite":
        return [Send(conn.id, invite_frame(state, conn, data.get("token")))]
    raise ProtocolError("no-peer", f"No {OTHER_ROLE[conn.role or '']} to send {kind!r} to.")


def _join(state: State, conn: Conn, data: dict[str, Any]) -> list[Action]:
    if conn.session is not None:
        raise ProtocolError("already-joined", f"Already joined session {conn.session!r}.")
    session = _field(data, "session", str)
    role = _field(data, "role", str)
    token = _field(data, "token", str, optional=True)
    resume = _field(data, "resume", str, optional=True)
    if not SESSION_RE.fullmatch(session):
        raise ProtocolError("bad-session", "A session id is 1 to 64 of A-Z, a-z, 0-9, _ and -.")
    if role not in ROLES:
        raise ProtocolError("bad-role", "The role must be 'patient' or 'practitioner'.")
    if resume is not None and not RESUME_RE.fullmatch(resume):
        raise ProtocolError("bad-field", "The field 'resume' must be a key the relay handed out.")
    if state.config.auth.secret:
        check_token(state.config.auth.secret, token, session, role, state.wallclock())
    seats = state.sessions.get(session)
    if seats is None and state.seats.session_count() >= state.limits.max_sessions:
        raise ProtocolError(
            "server-full",
            "The relay has reached its session limit; try again later.",
            close_code=CLOSE_TRY_AGAIN_LATER,
        )
    use = state.use(conn.address)
    if seats is None and use.sessions >= state.limits.max_sessions_per_address:
        raise ProtocolError(
            "address-limit",
            "Too many sessions opened from this address; try again later.",
            close_code=CLOSE_TRY_AGAIN_LATER,
        )
    # Only a key this relay (or one sharing its secret) minted for this very
    # seat counts; any other is ignored, and the join is a fresh one.
    verified = resume is not None and verify_resume(state.resume_secret, resume, session, role)
    held = None if seats is None else seats.get(role)
    if held is not None and not (
        verified and hmac.compare_digest(resume.encode(), held.resume.encode())
    ):
        raise ProtocolError("role-taken", f"The {role} seat of this session is taken.")
    hold = state.seats.holder(session, role, state.monotonic())
    if held is None and hold is not None:
        if not (verified and hmac.compare_digest(resume.encode(), hold[0].encode())):
            left = hold[1] - state.monotonic()
            raise ProtocolError(
                "seat-held",
                f"The {role} seat is kept for its previous connection for {left:.0f} s more.",
                close_code=CLOSE_TRY_AGAIN_LATER,
            )
        state.seats.unhold(session, role)

    actions: list[Action] = []
    stale = None if held is None else state.conns.get(held.conn)
    if stale is not None:
        stale.session = stale.role = None
        stale.closing = True
        state.stats.replaced += 1
        actions.append(Close(stale.id, CLOSE_REPLACED, "replaced"))
        logger.info(
            "conn=%d session=%s role=%s replaced by conn=%d", stale.id, session, role, conn.id
        )
    # A fresh key at every join: a key seen before (in a log, on a screen)
    # no longer takes a seat that is taken or held.
    seat = Seat(conn.id, mint_resume(state.resume_secret, session, role), resumed=verified)
    if state.seats.take(session, role, seat, conn.address):
        use.sessions += 1
    conn.session, conn.role, conn.ever_joined = session, role, True
    state.stats.joins += 1
    state.stats.resumes += verified
    other = state.sessions[session].get(OTHER_ROLE[role])
    joined: dict[str, object] = {
        "session": session,
        "role": role,
        "peer": other is not None,
        "resume": seat.resume,
        "resumed": seat.resumed,
        "peer_resumed": other is not None and other.resumed,
    }
    ice_servers = _ice_servers(state, conn, session, role)
    if ice_servers:
        joined["ice_servers"] = ice_servers
    actions.append(Send(conn.id, frame("joined", **joined)))
    if other is not None:
        actions.append(Send(other.conn, frame("peer-joined", role=role, resumed=seat.resumed)))
    logger.info(
        "conn=%d session=%s role=%s joined (peer=%s, resumed=%s)",
        conn.id,
        session,
        role,
        other is not None,
        seat.resumed,
    )
    return actions


def invite_frame(state: State, conn: Conn, token: str | None) -> str:
    """The patient's token for a joined practitioner's session (docs/protocol.md, invite).

    Stateless: the practitioner sends its own token back, and the patient's
    token gets the same window (not-before and expiry), so the patient's link
    works exactly when the practitioner's does. Without auth.secret, no token.
    """
    session = conn.session
    if conn.role != "practitioner" or session is None:
        raise ProtocolError("not-practitioner", "Only the practitioner may ask for an invitation.")
    secret = state.config.auth.secret
    if not secret:
        return frame("invite", session=session, role="patient", token=None, expires=None)
    not_before, expiry = check_token(secret, token, session, "practitioner", state.wallclock())
    patient = mint_token(secret, session, "patient", expiry, not_before)
    return frame("invite", session=session, role="patient", token=patient, expires=expiry)


def _ice_servers(state: State, conn: Conn, session: str, role: str) -> list[dict[str, Any]]:
    """TURN credentials, minted at most once per connection and seat while they last."""
    now = state.wallclock()
    cached = conn.ice
    if cached is not None and cached[:2] == (session, role) and cached[2] - now > 60:
        return cached[3]
    servers = turn_credentials(state.config.turn, session, role, now)
    if servers:
        conn.ice = (session, role, now + state.config.turn.ttl, servers)
    return servers


def _leave(
    state: State, conn: Conn, reason: str, forward: str | None = None, *, hold: bool = False
) -> list[Action]:
    """Free the connection's seat and tell the other seat; ``hold`` it for its key."""
    session, role = conn.session, conn.role
    if session is None or role is None:
        return []
    seat, opener = state.seats.release(session, role)
    conn.session = conn.role = None
    if hold:
        # An unclean drop: keep the seat for its key alone for a while.
        deadline = state.monotonic() + state.limits.resume_grace_s
        state.seats.hold(session, role, seat.resume, deadline)
    actions: list[Action] = []
    seats = state.sessions.get(session)
    other = None if seats is None else seats.get(OTHER_ROLE[role])
    if other is not None:
        if forward is not None:
            state.stats.frames["bye"] += 1
            actions.append(Send(other.conn, forward))
        actions.append(Send(other.conn, frame("peer-left", role=role, reason=reason)))
    if opener is not None and (use := state.addresses.get(opener)) is not None:
        use.sessions -= 1
    if reason == "bye" and not conn.closing:
        # Without a seat, the join deadline applies again.
        conn.unseated += 1
        actions.append(JoinDeadline(conn.id, conn.unseated))
    logger.info("conn=%d session=%s role=%s left (%s)", conn.id, session, role, reason)
    return actions


REMOTE_OPENER: Final = "(another relay)"  # a session opened there counts for no address here


def seat_remote(state: State, session: str, role: str, resume: str) -> int:
    """Show a seat held by another relay in the local view: the id its frames go to.

    The adapter maps that id to the other relay's inbox, so ``receive`` relays
    to it exactly as to a local connection.
    """
    proxy = state._next_id
    state._next_id += 1
    state.seats.take(session, role, Seat(proxy, resume, resumed=False), REMOTE_OPENER)
    return proxy


def unseat_remote(state: State, session: str, role: str) -> int | None:
    """Forget a remote seat of the local view: the id it had, if any."""
    seats = state.sessions.get(session)
    if seats is None or (seat := seats.get(role)) is None or seat.conn in state.conns:
        return None
    state.seats.release(session, role)
    return seat.conn


def refusal(state: State, conn_id: int, exc: ProtocolError) -> list[Action]:
    """Refuse a frame for a reason the adapter found (``unavailable``: Redis is away)."""
    return _error_actions(state, state.conns[conn_id], exc)


def replaced_elsewhere(state: State, conn_id: int) -> list[Action]:
    """The connection's seat was resumed on another relay: close it, tell nobody here."""
    conn = state.conns.get(conn_id)
    if conn is None or conn.session is None or conn.role is None:
        return []
    state.seats.release(conn.session, conn.role)
    conn.session = conn.role = None
    conn.closing = True
    state.stats.replaced += 1
    return [Close(conn.id, CLOSE_REPLACED, "replaced")]


def claim_lost(state: State, conn_id: int, exc: ProtocolError) -> list[Action]:
    """Another relay took the seat first: the join just made here is undone, silently."""
    conn = state.conns[conn_id]
    session, role = conn.session, conn.role
    if session is not None and role is not None:
        _, opener = state.seats.release(session, role)
        if opener is not None and (use := state.addresses.get(opener)) is not None:
            use.sessions -= 1
        conn.session = conn.role = None
        state.stats.joins -= 1
    return _error_actions(state, conn, exc)


def join_expired(state: State, conn_id: int, generation: int = 0) -> list[Action]:
    """The join deadline of a connection has passed (``generation``: which one)."""
    conn = state.conns.get(conn_id)
    if conn is None or conn.session is not None or conn.closing or conn.unseated != generation:
        return []
    return _error_actions(
        state,
        conn,
        ProtocolError(
            "join-timeout",
            f"No 'join' within {state.limits.join_timeout_s:g} s.",
            close_code=CLOSE_POLICY,
        ),
    )


def disconnect(state: State, conn_id: int, *, clean: bool = False) -> list[Action]:
    """A connection has closed: free its seat (not a hang-up).

    ``clean``: the client sent a close frame (it left on purpose, e.g. a page
    reload); otherwise the seat is held for its resume key for a grace period.
    """
    conn = state.conns.pop(conn_id)
    use = state.addresses.get(conn.address)
    if use is not None:
        use.conns -= 1
    return _leave(state, conn, "disconnected", hold=not clean)


# ---------------------------------------------------------------------------
# Band 2: the websockets adapter
# ---------------------------------------------------------------------------

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
}
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HSTS: Final = "max-age=31536000"
OP_TEXT, OP_CONT, OP_BINARY = Opcode.TEXT, Opcode.CONT, Opcode.BINARY
OP_PING, OP_PONG = Opcode.PING, Opcode.PONG
SECURITY_HEADERS: Final = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Permissions-Policy", "camera=(self), microphone=(self)"),
    ("Cache-Control", "no-cache"),
)


class _StateCollector:
    """Prometheus metrics read from the core's state at scrape time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.state = relay.state

    def collect(self) -> Iterable[Metric]:
        state, stats = self.state, self.state.stats
        info = GaugeMetricFamily(
            "relay_info",
            "This relay: its node id (cluster.node_id) and version.",
            labels=["node", "version"],
        )
        info.add_metric([self.relay.node_id, __version__], 1)
        yield info
        yield GaugeMetricFamily(
            "relay_connections", "Open WebSocket connections.", len(state.conns)
        )
        yield GaugeMetricFamily(
            "relay_sessions", "Sessions with at least one seat taken.", state.seats.session_count()
        )
        yield GaugeMetricFamily("relay_seats_taken", "Seats taken.", state.seats_taken())
        yield CounterMetricFamily(
            "relay_connections_opened", "WebSocket connections accepted.", stats.connections_total
        )
        yield CounterMetricFamily("relay_joins", "Joins accepted.", stats.joins)
        yield CounterMetricFamily(
            "relay_resumes", "Joins that presented a resume key.", stats.resumes
        )
        yield CounterMetricFamily(
            "relay_replaced", "Stale connections replaced by a resume.", stats.replaced
        )
        frames = CounterMetricFamily(
            "relay_frames_relayed", "Frames forwarded to the other seat.", labels=["type"]
        )
        for kind in sorted(RELAYED_TYPES):
            frames.add_metric([kind], stats.frames[kind])
        yield frames
        errors = CounterMetricFamily("relay_errors", "Frames refused, by code.", labels=["code"])
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors


class ApiBodyReader:
    """Reads the body of ``POST /api/consultations``, the one request that has one.

    websockets' HTTP parser refuses any request with a body (a WebSocket
    handshake has none) and reads lines through ``StreamReader.read_line``.
    This wraps that method for one connection: in an API request it hides
    ``Content-Length`` from the parser (renamed ``X-Api-Content-Length``) and,
    at the blank line that ends the headers, reads up to ``API_MAX_BODY`` bytes
    of body into ``body``, before websockets hands the request to
    ``process_request``. Every other request is parsed exactly as before.
    """

    def __init__(self, reader: StreamReader) -> None:
        self._read_line = reader.read_line
        self._reader = reader
        self.lines = 0
        self.api = False
        self.length: int | None = None  # -1: unreadable, or several that disagree
        self.body: bytes | None = None

    def read_line(
        self, m: int, too_long_exc_type: type[Exception] = RuntimeError
    ) -> Generator[None, None, bytearray]:
        line = yield from self._read_line(m, too_long_exc_type)
        self.lines += 1
        if self.lines == 1:
            target = line.split(b" ")[1:2]
            self.api = (
                line.startswith(b"POST ")
                and urlsplit(target[0].decode("latin-1") if target else "").path == API_PATH
            )
        elif not self.api:
            pass
        elif line[:15].lower() == b"content-length:":
            value = line[15:].strip()
            length = int(value) if re.fullmatch(rb"[0-9]{1,9}", value) else -1
            self.length = length if self.length in (None, length) else -1
            return bytearray(b"X-Api-Content-Length: " + value + b"\r\n")
        elif line.strip() == b"" and self.length is not None and 0 < self.length <= API_MAX_BODY:
            self.body = bytes((yield from self._reader.read_exact(self.length)))
        return line


# -- the seats several relays share, in Redis ----------------------------------------
#
# One hash per seat, ``epc:seat:{session}:{role}``: the relay holding it
# (``node``, ``conn``), its resume ``key``, and ``state``: ``taken`` (expires
# after cluster.seat_ttl_s unless its relay refreshes it: a dead relay's seats
# go by themselves) or ``held`` (an unclean drop: only ``key`` takes it back,
# until limits.resume_grace_s). Each change is one Lua script, so two relays
# deciding on one seat at once are served one after the other.

SEAT_KEY: Final = "epc:seat:{}:{}"
REDIS_POOL_SIZE: Final = 32  # connections from one relay to Redis (one is the inbox's reader)

# KEYS[1] the seat, KEYS[2] the other seat of its session; ARGV node, conn,
# new key, presented key ('' none or unverified), ttl ms. Returns {'ok',
# previous node, previous conn, then the other seat's state, node, conn and
# key ('' each where it has none)}: the connection a resume replaces ('' for
# none), and the other seat as it is when this claim is made, so that of two
# joins on two relays at once, the second learns of the first even where
# neither saw the other before its claim. Else {'role-taken'} or {'seat-held',
# ms left}.
_CLAIM_LUA: Final = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'key', 'node', 'conn')
local prev_node, prev_conn = '', ''
local again = cur[1] == 'taken' and cur[3] == ARGV[1] and cur[4] == ARGV[2] and cur[2] == ARGV[3]
if cur[1] and not again then  -- not this very claim again (redis-py retried it after a timeout)
  if ARGV[4] == '' or ARGV[4] ~= cur[2] then
    if cur[1] == 'taken' then return {'role-taken'} end
    return {'seat-held', tostring(redis.call('PTTL', KEYS[1]))}
  end
  if cur[1] == 'taken' then prev_node, prev_conn = cur[3], cur[4] end
  redis.call('DEL', KEYS[1])
end
if not again then
  redis.call('HSET', KEYS[1], 'state', 'taken', 'node', ARGV[1], 'conn', ARGV[2], 'key', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
local peer = redis.call('HMGET', KEYS[2], 'state', 'node', 'conn', 'key')
return {'ok', prev_node, prev_conn, peer[1] or '', peer[2] or '', peer[3] or '', peer[4] or ''}
"""

# KEYS[1] the seat; ARGV node, conn, hold ms ('0': free it at once).
# Frees (or holds) the seat only if this connection still has it: 1, else 0.
_RELEASE_LUA: Final = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'node', 'conn')
if cur[1] ~= 'taken' or cur[2] ~= ARGV[1] or cur[3] ~= ARGV[2] then return 0 end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'state', 'held')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

# KEYS the seats this relay holds; ARGV node, ttl ms, then each seat's conn
# and key. Gives the time to live back to those still this relay's, and writes
# again those Redis lost (it restarted empty): how many.
_REFRESH_LUA: Final = """
local n = 0
for i, key in ipairs(KEYS) do
  local conn, rkey = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local cur = redis.call('HMGET', key, 'state', 'node', 'conn')
  if not cur[1] then
    redis.call('HSET', key, 'state', 'taken', 'node', ARGV[1], 'conn', conn, 'key', rkey)
  end
  if not cur[1] or (cur[1] == 'taken' and cur[2] == ARGV[1] and cur[3] == conn) then
    redis.call('PEXPIRE', key, ARGV[2])
    n = n + 1
  end
end
return n
"""


# KEYS[1] a relay's inbox, KEYS[2] its read position (the last entry it
# delivered, at most one batch behind); ARGV session, role, conn, how many
# entries to scan. Takes out of the inbox (XDEL) the plain frames for that seat
# its relay has not read, in order: {sender node, sender conn, sender key, frame}.
_TAKE_LUA = """
local pos = redis.call('GET', KEYS[2])
local start = '-'
if pos then start = '(' .. pos end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[4])
local out = {}
for _, entry in ipairs(entries) do
  local f, m = entry[2], {}
  for i = 1, #f, 2 do m[f[i]] = f[i + 1] end
  if m['s'] == ARGV[1] and m['r'] == ARGV[2] and m['c'] == ARGV[3] and m['x'] == '' then
    redis.call('XDEL', KEYS[1], entry[1])
    out[#out + 1] = {m['n'], m['fc'], m['k'], m['f']}
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Taken:
    """A frame taken back from a relay's inbox (``SeatDirectory.take``)."""

    node: str  # the relay of its sender
    sender: int  # the sender's connection there
    key: str  # the sender seat's resume key
    text: str


@dataclass(frozen=True, slots=True)
class SeatRecord:
    """One seat as Redis has it."""

    state: str  # "taken" or "held"
    node: str
    conn: int
    key: str


class Claim(NamedTuple):
    """What ``SeatDirectory.claim`` did."""

    outcome: str  # "ok", "role-taken" or "seat-held"
    node: str  # "ok": the relay of the connection the claim replaced ("" none)
    previous: int  # "ok": that connection (0 none); "seat-held": ms left
    peer: SeatRecord | None = None  # "ok": the session's other seat at the claim


class SeatDirectory:
    """The cluster's seats in Redis: claimed, released, held and refreshed atomically.

    Every method awaits Redis once, so the adapter calls it, never the core.
    Redis errors (``redis.exceptions.RedisError``) are the caller's to handle:
    it refuses new joins with ``unavailable`` while Redis is away.
    """

    def __init__(self, client: aioredis.Redis, node: str, cluster: ClusterConfig, limits: Limits):
        self.redis = client
        self.node = node
        self.ttl_ms = max(1, round(cluster.seat_ttl_s * 1000))
        self.grace_ms = max(1, round(limits.resume_grace_s * 1000))
        self._claim = client.register_script(_CLAIM_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._refresh = client.register_script(_REFRESH_LUA)
        self._take = client.register_script(_TAKE_LUA)

    @classmethod
    def from_url(cls, url: str, node: str, cluster: ClusterConfig, limits: Limits) -> SeatDirectory:
        """A directory on the Redis at ``url`` (no connection until the first command)."""
        import redis.asyncio  # noqa: PLC0415 (only a relay of a cluster pays for the import)

        # A Redis that does not answer within a second is away: joins are refused
        # rather than left waiting (the client's own join timeout is longer).
        # A bounded pool: a burst of joins waits for a connection (up to 5 s,
        # within the client's join timeout) instead of opening one each, past
        # Redis's and the kernel's limits.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_POOL_SIZE,
            timeout=5.0,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        return cls(client, node, cluster, limits)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    async def claim(
        self, session: str, role: str, conn: int, key: str, presented: str | None
    ) -> Claim:
        """Take the seat for ``conn``: ("ok", node, conn) of the connection it replaces
        ("", 0 for none), ("role-taken", "", 0), or ("seat-held", "", ms left); with
        "ok", the session's other seat as Redis has it at that moment (None: empty).

        ``presented``: a resume key the caller has verified, else None.
        """
        reply = await self._claim(
            keys=[SEAT_KEY.format(session, role), SEAT_KEY.format(session, OTHER_ROLE[role])],
            args=[self.node, conn, key, presented or "", self.ttl_ms],
        )
        outcome = reply[0].decode()
        if outcome == "ok":
            node, previous = reply[1].decode(), reply[2].decode()
            state, peer_node, peer_conn, peer_key = (field.decode() for field in reply[3:7])
            peer = SeatRecord(state, peer_node, int(peer_conn), peer_key) if state else None
            return Claim(outcome, node, int(previous) if previous else 0, peer)
        if outcome == "seat-held":
            return Claim(outcome, "", max(0, int(reply[1])))
        return Claim(outcome, "", 0)

    async def release(self, session: str, role: str, conn: int, *, hold: bool) -> bool:
        """Free the seat (``hold``: keep it for its key alone a while), if still ``conn``'s."""
        done = await self._release(
            keys=[SEAT_KEY.format(session, role)],
            args=[self.node, conn, self.grace_ms if hold else 0],
        )
        return bool(done)

    async def refresh(self, seats: Iterable[tuple[str, str, int, str]]) -> int:
        """Keep this relay's seats (session, role, conn, key) alive, lost ones written again."""
        seats = list(seats)
        if not seats:
            return 0
        count = await self._refresh(
            keys=[SEAT_KEY.format(session, role) for session, role, _, _ in seats],
            args=[self.node, self.ttl_ms, *(v for _, _, c, k in seats for v in (c, k))],
        )
        return int(count)

    async def take(self, node: str, session: str, role: str, conn: int) -> list[Taken]:
        """The frames for ``conn``'s seat that ``node`` has not read, taken out of its inbox.

        The handover of a seat that moved: the frames written to its old relay's
        inbox that this relay (or none) delivered go to the new holder instead.
        """
        reply = await self._take(
            keys=[INBOX_KEY.format(node), INBOX_POS_KEY.format(node)],
            args=[session, role, conn, HANDOVER_SCAN],
        )
        return [
            Taken(sender.decode(), int(fc), key.decode(), text.decode())
            for sender, fc, key, text in reply
        ]

    def connection(self) -> AbstractConnection:
        """A connection of its own (the inbox's reader, the writer), outside the pool.

        No socket timeout on it: each read passes its own, and a write does not
        go through ``asyncio.wait_for`` (a task per frame).
        """
        pool = self.redis.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        connection: AbstractConnection = pool.connection_class(**kwargs)
        return connection

    async def seats(self, session: str) -> dict[str, SeatRecord]:
        """The session's seats, taken or held, by role."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for role in ROLES:
                pipe.hgetall(SEAT_KEY.format(session, role))
            replies = await pipe.execute()
        found: dict[str, SeatRecord] = {}
        for role, raw in zip(ROLES, replies, strict=True):
            if raw:
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                found[role] = SeatRecord(
                    fields["state"], fields["node"], int(fields["conn"]), fields["key"]
                )
        return found


INBOX_KEY: Final = "epc:inbox:{}"  # one Redis stream per relay: the frames for its seats
INBOX_POS_KEY: Final = "epc:inbox-pos:{}"  # the last entry of its inbox a relay delivered
INBOX_POS_TTL_S: Final = 86_400  # a relay gone for a day leaves no position behind
INBOX_MAXLEN: Final = 100_000  # entries kept per inbox (trimmed approximately)
INBOX_BLOCK_MS: Final = 500  # a blocking read's wait; its socket read waits a second more
REDIS_READ_TIMEOUT_S: Final = 1.0  # a reply that takes longer: Redis is away
HANDOVER_SCAN: Final = 10_000  # inbox entries scanned for a moved seat's frames


class RemoteSeat:
    """A seat on another relay: the core's ``Send`` to its id goes to that relay's inbox.

    ``ready``: set while the frames its previous relay never read are handed
    over to it (they go first); frames sent meanwhile wait for it.
    """

    __slots__ = ("cluster", "conn", "node", "ready", "role", "session")

    def __init__(self, cluster: Cluster, node: str, conn: int, session: str, role: str) -> None:
        self.cluster, self.node, self.conn = cluster, node, conn
        self.session, self.role = session, role
        self.ready: asyncio.Event | None = None

    async def send(self, text: str) -> None:
        if self.ready is not None:
            await self.ready.wait()
        self.cluster.post(self, text)


class _Gate:
    """A connection whose seat is being handed over: frames for it wait until it opens."""

    __slots__ = ("opened", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.opened = asyncio.Event()

    async def send(self, text: str) -> None:
        await self.opened.wait()
        await self.ws.send(text)

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


class Cluster:
    """A relay among several: seats claimed in Redis, frames to other relays' seats through it.

    Each relay reads its own inbox (a Redis stream) on a connection of its own
    and delivers what it finds to its connections, in the order written; with
    each read it records the last entry it delivered (``epc:inbox-pos:{node}``,
    in the same round trip). Frames for other relays are queued and written by
    one writer task on another connection, several per round trip when they
    come faster than Redis answers: a frame costs its sender no wait for Redis.

    No silent loss: when a seat moves to another relay (a resume, after its
    relay died or drained), the frames written to the old relay's inbox that it
    never read are taken out of it (``SeatDirectory.take``) and delivered to the
    new holder before any later frame. A frame that finds its seat gone goes
    back to its sender as ``no-peer`` naming the frame; a frame that cannot be
    written (Redis away) is answered with ``unavailable``.
    """

    def __init__(self, relay: Relay, directory: SeatDirectory) -> None:
        self.relay = relay
        self.state = relay.state
        self.directory = directory
        self.redis = directory.redis
        self.node = directory.node
        self.inbox = INBOX_KEY.format(self.node)
        self.remote: dict[int, RemoteSeat] = {}
        self.problem: str | None = None  # why Redis is away, while it is
        self._tasks: list[asyncio.Task[None]] = []
        self._missing: dict[int, int] = {}  # remote seats (their conn): checks found missing
        # Entries for other relays' inboxes: (inbox, fields, sender conn, frame).
        self._outbox: collections.deque[tuple[str, list[str | int], int, str]] = collections.deque()
        self._queued = 0  # entries ever queued
        self._written = 0  # entries ever written (or given up)
        self._wake = asyncio.Event()  # something is queued
        self._progress = asyncio.Event()  # something was written
        self._own: dict[str, AbstractConnection] = {}  # the reader's and the writer's

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read()),
            loop.create_task(self._write()),
            loop.create_task(self._refresh()),
        ]

    async def stop(self) -> None:
        await self.flush()  # the frames this relay's clients sent last go out first
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for connection in self._own.values():
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
        await self.directory.close()

    def _away(self, exc: Exception) -> None:
        if self.problem is None:
            logger.warning("Redis unavailable (%s): new joins refused", exc)
        self.problem = f"redis unavailable: {type(exc).__name__}"

    def _back(self) -> None:
        if self.problem is not None:
            logger.info("Redis is back")
        self.problem = None

    # -- frames from this relay's connections ---------------------------------

    async def receive(self, conn_id: int, message: str | bytes) -> list[Action]:
        """``receive`` for a relay of a cluster: joins claimed in Redis, leaves freed there."""
        import redis.exceptions  # noqa: PLC0415 (imported already by SeatDirectory.from_url)

        state = self.state
        conn = state.conns[conn_id]
        before = (conn.session, conn.role)
        presented: str | None = None
        if before[0] is None and not conn.closing:
            try:
                presented = await self._prejoin(message)
            except redis.exceptions.RedisError as exc:
                self._away(exc)
                return refusal(state, conn_id, UNAVAILABLE)
        actions = receive(state, conn_id, message)
        after = (conn.session, conn.role)
        if after == before:
            return actions
        if before[0] is not None and before[1] is not None:  # bye
            await self.relay.perform(actions)  # the remote seat is forgotten after
            actions = []
            await self._release(before[0], before[1], conn_id, hold=False)
        if after[0] is not None and after[1] is not None:  # joined
            seat = state.sessions[after[0]][after[1]]
            if not seat.resumed:
                return await self._claim(
                    conn_id, after[0], after[1], seat, presented=None, actions=actions
                )
            # A resume may bring frames written to the seat's old relay: frames
            # for this connection wait until they are delivered first.
            ws = self.relay.connections[conn_id]
            assert not isinstance(ws, RemoteSeat | _Gate)
            gate = _Gate(ws)
            self.relay.connections[conn_id] = gate
            try:
                return await self._claim(
                    conn_id, after[0], after[1], seat, presented=presented, actions=actions
                )
            finally:
                if self.relay.connections.get(conn_id) is gate:
                    self.relay.connections[conn_id] = ws
                gate.opened.set()
        return actions

    async def _claim(
        self,
        conn_id: int,
        session: str,
        role: str,
        seat: Seat,
        *,
        presented: str | None,
        actions: list[Action],
    ) -> list[Action]:
        """The seat the core just gave ``conn_id``, claimed in Redis (a resume: handed over)."""
        import redis.exceptions  # noqa: PLC0415

        state = self.state
        try:
            outcome, node, previous, peer = await self.directory.claim(
                session, role, conn_id, seat.resume, presented
            )
        except redis.exceptions.RedisError as exc:
            self._away(exc)
            return claim_lost(state, conn_id, UNAVAILABLE)
        self._back()
        for proxy, remote in list(self.remote.items()):  # the remote seat it replaced
            if (remote.session, remote.role) == (session, role):
                del self.remote[proxy], self.relay.connections[proxy]
        if outcome != "ok":
            close = CLOSE_TRY_AGAIN_LATER if outcome == "seat-held" else None
            lost = ProtocolError(outcome, CLAIM_LOST[outcome], close_code=close)
            return claim_lost(state, conn_id, lost)
        if peer is not None:
            actions = self._met_at_claim(conn_id, session, role, seat, peer=peer, actions=actions)
        if not node or node == self.node:
            return actions
        self._post(node, session, role, previous, "", replaced=True)
        # What this relay wrote to the old seat is in Redis; take what its relay
        # never read, and deliver it right after "joined".
        await self.flush()
        try:
            taken = await self.directory.take(node, session, role, previous)
        except redis.exceptions.RedisError as exc:
            self._away(exc)
            logger.warning(
                "conn=%d session=%s role=%s: the frames left on %s could not be taken back",
                conn_id,
                session,
                role,
                node,
            )
            return actions
        if not taken:
            return actions
        gate = self.relay.connections[conn_id]
        ws = gate.ws if isinstance(gate, _Gate) else gate
        own = [a for a in actions if isinstance(a, Send) and a.conn == conn_id]
        for action in own:
            await ws.send(action.text)
        for entry in taken:
            await ws.send(entry.text)
        logger.info(
            "conn=%d session=%s role=%s: %d frames left on %s delivered after the resume",
            conn_id,
            session,
            role,
            len(taken),
            node,
        )
        return [a for a in actions if not (isinstance(a, Send) and a.conn == conn_id)]

    def _met_at_claim(
        self,
        conn_id: int,
        session: str,
        role: str,
        seat: Seat,
        *,
        peer: SeatRecord,
        actions: list[Action],
    ) -> list[Action]:
        """The other seat was taken on another relay between this join's look (``_prejoin``)
        and its claim: two joins at once on two relays, each told it was alone. Of the two
        claims Redis serves one after the other, the second sees the first: its ``joined``
        says the peer is there, and the first hears ``peer-joined`` through its relay."""
        other = OTHER_ROLE[role]
        seen = self.state.sessions.get(session, {}).get(other)
        if peer.state != "taken" or peer.node == self.node or seen is not None:
            return actions  # no seat on another relay, or the core saw it already
        self._learn(session, other, peer.node, peer.conn, peer.key)
        met: list[Action] = []
        for action in actions:
            if isinstance(action, Send) and action.conn == conn_id:
                fields = json.loads(action.text)
                if fields.pop("type") == "joined":
                    met.append(Send(conn_id, frame("joined", **{**fields, "peer": True})))
                    continue
            met.append(action)
        proxy = self.state.sessions[session][other].conn
        met.append(Send(proxy, frame("peer-joined", role=role, resumed=seat.resumed)))
        logger.info(
            "conn=%d session=%s role=%s: met the %s of %s, whose claim came at the same moment",
            conn_id,
            session,
            role,
            other,
            peer.node,
        )
        return met

    async def _prejoin(self, message: str | bytes) -> str | None:
        """Before a join: the session's seats on other relays into the local view.

        The core then decides (role-taken, seat-held, peer) as for local seats.
        Returns the resume key the join presents, if any.
        """
        try:
            kind, data, _ = parse_frame(message, self.state.limits.max_frame_bytes)
        except ProtocolError:
            return None
        session, role, resume = data.get("session"), data.get("role"), data.get("resume")
        if kind != "join" or not isinstance(session, str) or not SESSION_RE.fullmatch(session):
            return None
        records = await self.directory.seats(session)
        self._back()
        state = self.state
        for seat_role in ROLES:
            record = records.get(seat_role)
            local = state.sessions.get(session, {}).get(seat_role)
            if local is not None and local.conn in state.conns:
                continue  # this relay's own seat
            if record is None or record.state != "taken" or record.node == self.node:
                self._forget(session, seat_role)
                if (
                    record is not None
                    and record.state == "held"
                    and record.node != self.node
                    and state.seats.holder(session, seat_role, state.monotonic()) is None
                ):
                    deadline = state.monotonic() + state.limits.resume_grace_s
                    state.seats.hold(session, seat_role, record.key, deadline)
                continue
            self._learn(session, seat_role, record.node, record.conn, record.key)
        return resume if isinstance(resume, str) and role in ROLES else None

    def _learn(self, session: str, role: str, node: str, conn: int, key: str) -> RemoteSeat | None:
        """The seat is held by ``conn`` on ``node``: show it in the local view.

        Returns the remote seat it replaces (the seat moved), if any.
        """
        local = self.state.sessions.get(session, {}).get(role)
        moved = None
        if local is not None:
            known = self.remote.get(local.conn)
            if known is not None and (known.node, known.conn) == (node, conn):
                return None
            if known is None:
                return None  # a seat of this relay's own
            moved = known
            self._forget(session, role)
        proxy = seat_remote(self.state, session, role, key)
        self.remote[proxy] = RemoteSeat(self, node, conn, session, role)
        self.relay.connections[proxy] = self.remote[proxy]
        return moved

    def _forget(self, session: str, role: str) -> None:
        proxy = unseat_remote(self.state, session, role)
        if proxy is not None:
            self.remote.pop(proxy, None)
            self.relay.connections.pop(proxy, None)

    def _forget_session_if_remote(self, session: str) -> None:
        """A session with no seat on this relay leaves the local view."""
        seats = self.state.sessions.get(session)
        if seats is not None and all(seat.conn in self.remote for seat in seats.values()):
            for role in list(seats):
                self._forget(session, role)

    async def _release(self, session: str, role: str, conn: int, *, hold: bool) -> None:
        import redis.exceptions  # noqa: PLC0415

        self._forget_session_if_remote(session)
        try:
            await self.directory.release(session, role, conn, hold=hold)
        except redis.exceptions.RedisError as exc:
            self._away(exc)  # its time to live frees it

    async def disconnected(self, session: str, role: str, conn: int, *, clean: bool) -> None:
        await self._release(session, role, conn, hold=not clean)

    # -- frames between relays --------------------------------------------------

    def post(self, seat: RemoteSeat, text: str) -> None:
        """Queue a frame for a remote seat, for its relay's inbox (the writer sends it)."""
        seats = self.state.sessions.get(seat.session)
        sender = None if seats is None else seats.get(OTHER_ROLE[seat.role])
        if sender is None:
            sender_conn, key = 0, ""
        else:
            sender_conn = 0 if sender.conn in self.remote else sender.conn
            key = sender.resume
        self._post(
            seat.node, seat.session, seat.role, seat.conn, text, sender_conn=sender_conn, key=key
        )

    def _post(
        self,
        node: str,
        session: str,
        role: str,
        conn: int,
        text: str,
        *,
        sender_conn: int = 0,
        key: str = "",
        replaced: bool = False,
        undelivered: bool = False,
    ) -> None:
        fields: list[str | int] = [
            "s", session, "r", role, "c", conn, "n", self.node, "fc", sender_conn, "k", key,
            "f", text, "x", "replaced" if replaced else "undelivered" if undelivered else "",
        ]  # fmt: skip
        self._outbox.append((INBOX_KEY.format(node), fields, sender_conn, text))
        self._queued += 1
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every frame queued so far is written to Redis (or given up).

        Bounded: a writer held up past twice the read timeout is not waited for.
        """
        target = self._queued
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * REDIS_READ_TIMEOUT_S):
                while self._written < target:
                    self._progress.clear()
                    await self._progress.wait()

    async def _write(self) -> None:
        """Write the queued frames, in order, on one connection: one round trip per batch."""
        import redis.exceptions  # noqa: PLC0415

        connection: AbstractConnection | None = None
        outbox = self._outbox
        while True:
            if not outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(outbox)
            outbox.clear()
            try:
                if connection is None:
                    connection = self._own["writer"] = self.directory.connection()
                commands = [
                    ("XADD", inbox, "MAXLEN", "~", INBOX_MAXLEN, "*", *fields)
                    for inbox, fields, _, _ in batch
                ]
                await connection.send_packed_command(
                    connection.pack_commands(commands), check_health=False
                )
                for _ in batch:
                    await connection.read_response(timeout=REDIS_READ_TIMEOUT_S)
            except (redis.exceptions.RedisError, OSError) as exc:
                self._away(exc)
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)  # type: ignore[union-attr]
                connection = None
                for _, _, sender_conn, text in batch:
                    await self._tell_sender(sender_conn, NOT_DELIVERED_AWAY, text)
            except Exception:
                logger.exception("the writer to other relays' inboxes failed; it goes on")
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)  # type: ignore[union-attr]
                connection = None
            else:
                self._back()
            finally:
                self._written += len(batch)
                self._progress.set()

    async def _tell_sender(self, sender_conn: int, exc: ProtocolError, text: str) -> None:
        """A frame from ``sender_conn`` (of this relay) was not delivered: an error naming it."""
        ws = self.relay.connections.get(sender_conn) if sender_conn else None
        if ws is None or isinstance(ws, RemoteSeat):
            return
        if isinstance(ws, _Gate):
            ws = ws.ws  # an error needs no order with a handover, and never waits for one
        self.state.stats.errors[exc.code] += 1
        with contextlib.suppress(ConnectionClosed):
            await ws.send(undelivered_frame(exc, text))

    async def _read(self) -> None:
        """Deliver this relay's inbox, in order, for as long as the relay runs.

        Each blocking read carries, in the same round trip, the position of the
        last entry delivered: what a relay that dies has not read is known.
        """
        import redis.exceptions  # noqa: PLC0415

        connection: AbstractConnection | None = None
        last = recorded = b"$"
        position = INBOX_POS_KEY.format(self.node)
        while True:
            try:
                if connection is None:
                    connection = self._own["reader"] = self.directory.connection()
                commands: list[tuple[str | bytes | int, ...]] = []
                if last != recorded:
                    commands.append(("SET", position, last, "EX", INBOX_POS_TTL_S))
                commands.append(
                    ("XREAD", "COUNT", 512, "BLOCK", INBOX_BLOCK_MS, "STREAMS", self.inbox, last)
                )
                await connection.send_packed_command(
                    connection.pack_commands(commands), check_health=False
                )
                if len(commands) == 2:
                    await connection.read_response(timeout=REDIS_READ_TIMEOUT_S)
                    recorded = last
                replies: Any = await connection.read_response(
                    timeout=REDIS_READ_TIMEOUT_S + INBOX_BLOCK_MS / 1000
                )
            except (redis.exceptions.RedisError, OSError) as exc:
                self._away(exc)
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)  # type: ignore[union-attr]
                connection = None
                await asyncio.sleep(0.5)
                continue
            if self.problem is not None:
                self._back()
            # RESP3 (redis-py 8's default) answers a map of streams, RESP2 a list.
            streams = (
                replies.values() if isinstance(replies, dict) else (e for _, e in replies or ())
            )
            for entries in streams:
                for entry_id, raw in entries:
                    last = entry_id
                    fields = {
                        k.decode(): v.decode() for k, v in zip(raw[::2], raw[1::2], strict=True)
                    }
                    try:
                        await self._deliver(fields)
                    except redis.exceptions.RedisError as exc:
                        self._away(exc)
                    except Exception:
                        logger.exception("a frame from another relay failed")

    async def _deliver(self, fields: dict[str, str]) -> None:
        state = self.state
        session, role, conn = fields["s"], fields["r"], int(fields["c"])
        node, sender_conn, text, special = fields["n"], int(fields["fc"]), fields["f"], fields["x"]
        seat = state.sessions.get(session, {}).get(role)
        ws = self.relay.connections.get(conn) if seat is not None and seat.conn == conn else None
        if special == "replaced":
            await self.relay.perform(replaced_elsewhere(state, conn))
            return
        if ws is None or isinstance(ws, RemoteSeat):
            left = text.startswith('{"type":"peer-left"') or text.startswith('{"type":"bye"')
            if not left and not special and sender_conn:
                self._post(node, session, OTHER_ROLE[role], sender_conn, text, undelivered=True)
            return
        if special == "undelivered":
            self.state.stats.errors[NOT_DELIVERED.code] += 1
            with contextlib.suppress(ConnectionClosed):
                await ws.send(undelivered_frame(NOT_DELIVERED, text))
            return
        other = OTHER_ROLE[role]
        if text.startswith('{"type":"peer-left"'):
            self._forget(session, other)
        elif sender_conn:
            moved = self._learn(session, other, node, sender_conn, fields["k"])
            if moved is not None:
                await self._handover(moved, session, other)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    async def _handover(self, old: RemoteSeat, session: str, role: str) -> None:
        """A remote seat moved: what this relay wrote to its old relay and was not read
        goes to its new relay first, then the frames that waited."""
        import redis.exceptions  # noqa: PLC0415

        seat = self.state.sessions.get(session, {}).get(role)
        new = None if seat is None else self.remote.get(seat.conn)
        if new is None:
            return
        new.ready = ready = asyncio.Event()
        try:
            await self.flush()
            taken = await self.directory.take(old.node, session, role, old.conn)
            for entry in taken:
                self._post(
                    new.node, session, role, new.conn, entry.text,
                    sender_conn=entry.sender, key=entry.key,
                )  # fmt: skip
            if taken:
                logger.info(
                    "session=%s role=%s: %d frames left on %s passed on to %s",
                    session,
                    role,
                    len(taken),
                    old.node,
                    new.node,
                )
        except redis.exceptions.RedisError as exc:
            self._away(exc)
        finally:
            new.ready = None
            ready.set()

    async def _refresh(self) -> None:
        """Keep this relay's seats alive in Redis; drop remote seats whose relay is gone."""
        import redis.exceptions  # noqa: PLC0415

        period = self.directory.ttl_ms / 3000
        was_ok = True
        while True:
            await asyncio.sleep(period)
            state = self.state
            mine = [
                (session, role, seat.conn, seat.resume)
                for session, seats in state.sessions.items()
                for role, seat in seats.items()
                if seat.conn in state.conns
            ]
            try:
                await self.directory.refresh(mine)
                # Right after Redis came back, the other relays may not have
                # written their seats again yet: judge remote seats next time.
                checked, was_ok = (list(self.remote.values()) if was_ok else []), True
                missing, self._missing = self._missing, {}
                for remote in checked:
                    record = (await self.directory.seats(remote.session)).get(remote.role)
                    if record is not None and (record.state, record.node, record.conn) == (
                        "taken",
                        remote.node,
                        remote.conn,
                    ):
                        continue
                    seen = missing.get(remote.conn, 0) + 1
                    if record is None and seen < MISSING_CHECKS:
                        # Redis may have restarted empty (this relay's own reads did
                        # not always fail meanwhile) and the seat's relay, whose first
                        # write after it may fail on a stale connection, not written
                        # it again yet. Missing MISSING_CHECKS times: its relay is gone.
                        self._missing[remote.conn] = seen
                        continue
                    await self._gone(remote)
            except redis.exceptions.RedisError as exc:
                self._away(exc)
                was_ok = False
                continue
            self._back()

    async def _gone(self, remote: RemoteSeat) -> None:
        """A remote seat's relay died (the seat expired) or it dropped: the other side is told,
        first of each frame its relay never read."""
        state = self.state
        self._forget(remote.session, remote.role)
        await self.flush()
        taken = await self.directory.take(remote.node, remote.session, remote.role, remote.conn)
        for entry in taken:
            if entry.node == self.node:
                await self._tell_sender(entry.sender, NOT_DELIVERED, entry.text)
        local = state.sessions.get(remote.session, {}).get(OTHER_ROLE[remote.role])
        if local is not None and local.conn in state.conns:
            gone = frame("peer-left", role=remote.role, reason="disconnected")
            await self.relay.perform([Send(local.conn, gone)])


# Checks (a third of cluster.seat_ttl_s apart) that find a remote seat missing from
# Redis before its relay is judged gone: a live relay rewrites its seats within two
# of them after Redis comes back empty, even when its first write fails.
MISSING_CHECKS: Final = 3


def undelivered_frame(exc: ProtocolError, text: str) -> str:
    """The ``error`` for a frame that was not delivered: ``frame`` names its type."""
    try:
        kind = orjson.loads(text).get("type")
    except (orjson.JSONDecodeError, AttributeError):
        kind = None
    return frame("error", code=exc.code, message=str(exc), frame=kind)


UNAVAILABLE: Final = ProtocolError(
    "unavailable",
    "The relays cannot reach their shared store; try again in a moment.",
    close_code=CLOSE_TRY_AGAIN_LATER,  # clients reconnect and join again
)
NOT_DELIVERED: Final = ProtocolError(
    "no-peer", "The other seat left its relay before the message arrived: not delivered."
)
NOT_DELIVERED_AWAY: Final = ProtocolError(
    "unavailable", "The relays cannot reach their shared store: a message was not delivered."
)
CLAIM_LOST: Final = {
    "role-taken": "This seat was just taken on another relay.",
    "seat-held": "This seat is kept a moment for the connection that just dropped.",
}


class RelayConnection(ServerConnection):
    """A server connection with a bounded write buffer and counted control frames.

    ``write_limit`` is set to ``limits.write_buffer_bytes``: when a client's
    unsent bytes pass it (a slow reader, or the pongs of a ping flood that is
    never read), the transport calls ``pause_writing`` and the client is cut.
    Nobody ever waits for it to drain, so it never holds up the sender.
    """

    relay: Relay  # set on the subclass that Relay makes for itself
    conn_id: int = 0  # set by Relay.handler
    client_address: str = ""  # set by Relay.process_request
    held: bytes | None = None  # accepted past limits.max_handshakes: its first bytes so far
    busy: bool = False  # a WebSocket request past limits.max_handshakes: answered 503 at once
    counted: bool = False  # in relay.handshaking, from the accept to the end of the handshake
    accepted_at: float = 0.0  # the event loop's time at the accept
    refusal_timer: asyncio.TimerHandle | None = None

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        # Made in the listener's accept callback: the connection's task and its
        # transport's callbacks inherit this context, and log this relay's id.
        NODE.set(self.relay.node_id)
        super().__init__(protocol, *args, **kwargs)
        self.relay.live.add(self)
        self.api_body = ApiBodyReader(protocol.reader)
        protocol.reader.read_line = self.api_body.read_line  # type: ignore[method-assign]
        # websockets started its HTTP parser in ServerProtocol.__init__ with the
        # reader's own read_line bound in: start it again (no byte has come yet).
        protocol.parser = protocol.parse()
        next(protocol.parser)
        relay = self.relay
        if relay.handshaking >= relay.config.limits.max_handshakes:
            # Held: its first bytes go through held_data_received. Every other
            # connection reads with websockets' own data_received and no call
            # of ours per read (the hot path); an instance attribute, set
            # before the transport exists, as uvloop binds it once.
            self.held = b""
            self.data_received = self.held_data_received  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Counted from the accept to the answer. Past limits.max_handshakes a
        # WebSocket request is answered 503 as soon as its request line shows
        # /ws, before websockets' handshake task and parser: a refusal costs a
        # fraction of a handshake. Other paths (/health) are served as usual.
        relay = self.relay
        self.accepted_at = asyncio.get_running_loop().time()
        if self.held is not None:
            self.transport = cast(asyncio.Transport, transport)
            # A client that sends no request line is cut at the open timeout.
            self.refusal_timer = asyncio.get_running_loop().call_later(
                relay.config.limits.open_timeout_s, self.transport.abort
            )
            return
        self.start_handshake(transport)

    def start_handshake(self, transport: asyncio.BaseTransport) -> None:
        self.relay.handshaking += 1
        self.counted = True
        super().connection_made(transport)

    def held_data_received(self, data: bytes) -> None:
        """data_received of a connection accepted past limits.max_handshakes."""
        if self.busy:
            return  # the rest of a refused request: read and dropped
        if self.held is None:
            super().data_received(data)
            return
        self.held += data
        if b"\r\n" not in self.held and len(self.held) < 2048:
            return
        held, self.held = self.held, None
        if self.refusal_timer is not None:
            self.refusal_timer.cancel()
        if WS_REQUEST_RE.match(held):
            self.refuse_at_once()
        else:
            self.start_handshake(self.transport)
            super().data_received(held)

    def refuse_at_once(self) -> None:
        """HTTP 503 + Retry-After, then read the request to its end and close (no reset)."""
        self.busy = True
        transport = self.transport
        transport.write(self.relay.busy_bytes())
        with contextlib.suppress(OSError, RuntimeError):  # not every transport half-closes
            transport.write_eof()
        # A client that never closes is cut after this (a busy client may read
        # its answer late: cut sooner, it would lose it in the reset).
        self.refusal_timer = asyncio.get_running_loop().call_later(
            self.relay.config.limits.open_timeout_s, transport.abort
        )

    def eof_received(self) -> None:
        if self.busy or self.held is not None:
            return  # refused, or gone before its request: the transport closes (falsy)
        super().eof_received()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self.uncount()
        if self.protocol.state is OPEN:
            self.relay.pacer.completed(asyncio.get_running_loop().time())

    def uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.relay.handshaking -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.live.discard(self)
        self.uncount()  # a handshake that never ran (cancelled at shutdown)
        if self.refusal_timer is not None:
            self.refusal_timer.cancel()
        if self.busy or self.held is not None:
            return  # websockets never saw it
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        self.relay.slow_reader(self)

    def process_event(self, event: Event) -> None:
        if type(event) is Frame:
            opcode = event.opcode
            if opcode is OP_TEXT or opcode is OP_CONT or opcode is OP_BINARY:
                # A data frame, nearly every event: what ServerConnection's and
                # Connection's process_event do with one (websockets 17.4,
                # pinned), without their two calls. test_relay_integration's
                # fragmented and binary frames and its pings cover the cut.
                self.recv_messages.put(event)
                return
            if opcode is OP_PING or opcode is OP_PONG:
                self.relay.control_frame(self)
        super().process_event(event)


class Relay:
    """The adapter: carries out the core's actions on real connections."""

    def __init__(self, config: RelayConfig, resume_secret: bytes | None = None) -> None:
        self.config = config
        self.state = State(config, resume_secret=resume_secret)
        # Connections by id; in a cluster, also the remote seats (frames to another relay).
        self.connections: dict[int, ServerConnection | RemoteSeat | _Gate] = {}
        self.cluster: Cluster | None = None
        self.started = time.monotonic()
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(self))
        ProcessCollector(registry=self.registry)
        self._tasks: set[asyncio.Task[None]] = set()
        self.connection_class: type[RelayConnection] = type(
            "BoundRelayConnection", (RelayConnection,), {"relay": self}
        )
        self.tls = config.tls.cert is not None
        self.stopping = False
        # Every connection with its socket open (in its handshake too), and
        # how many are in their opening handshake: see RelayConnection.
        self.live: set[RelayConnection] = set()
        self.handshaking = 0
        self.pacer = HandshakePacer(config.limits.reconnect_rate)
        self._busy_head: bytes | None = None  # the 503 written at once, remade each second
        self._busy_date = 0
        # This relay's name in a cluster: cluster.node_id, else host:port once bound.
        self.node_id = config.cluster.node_id or f"{config.host}:{config.port}"
        # Browsers from any origin may connect on loopback when nothing is exposed.
        self.any_origin = (
            not config.origins and config.exposure() is None and not config.auth.secret
        )

    async def handler(self, ws: ServerConnection) -> None:
        address = getattr(ws, "client_address", "") or _socket_address(ws)
        conn_id, actions = connect(self.state, address)
        if isinstance(ws, RelayConnection):
            ws.conn_id = conn_id
        self.connections[conn_id] = ws
        timer = asyncio.get_running_loop().call_later(
            self.config.limits.join_timeout_s, self._join_expired, conn_id, 0
        )
        logger.debug("conn=%d open from %s", conn_id, address)
        cluster = self.cluster
        state, connections = self.state, self.connections
        try:
            await self.perform(actions)
            async for message in ws:
                if cluster is None:
                    # A relayed frame, the common case, is sent here, with no
                    # action object and one coroutine less than perform().
                    target = route(state, conn_id, message)
                    if isinstance(target, int):
                        if (peer := connections.get(target)) is not None:
                            try:  # noqa: SIM105 (suppress() would build an object per frame)
                                # route() forwards text frames only: message is a str.
                                await peer.send(message)  # type: ignore[arg-type]
                            except ConnectionClosed:
                                pass
                        continue
                    actions = target
                else:
                    actions = await cluster.receive(conn_id, message)
                if (
                    len(actions) == 1
                    and isinstance(send := actions[0], Send)
                    and (peer := self.connections.get(send.conn)) is not None
                ):
                    try:  # noqa: SIM105 (suppress() would build an object per frame)
                        await peer.send(send.text)
                    except ConnectionClosed:
                        pass
                else:
                    await self.perform(actions)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("conn=%d internal error; closing it", conn_id)
            await ws.close(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            timer.cancel()
            del self.connections[conn_id]
            clean = ws.protocol.close_rcvd is not None
            conn = self.state.conns[conn_id]
            seat = (conn.session, conn.role)
            actions = disconnect(self.state, conn_id, clean=clean)
            if cluster is not None and seat[0] is not None and seat[1] is not None:
                # A relay of a cluster that stops holds its seats for their keys
                # (its clients resume on the others) and tells no one.
                hold = self.stopping or not clean
                if not self.stopping:
                    await self.perform(actions)
                await cluster.disconnected(seat[0], seat[1], conn_id, clean=not hold)
            elif not self.stopping:  # at shutdown the other seat is going too: tell nobody
                await self.perform(actions)
            logger.debug("conn=%d closed (%s %r)", conn_id, ws.close_code, ws.close_reason or "")

    async def perform(self, actions: list[Action]) -> None:
        for action in actions:
            ws = self.connections.get(action.conn)
            if ws is None:
                continue
            if isinstance(action, Send):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(action.text)
            elif isinstance(ws, RemoteSeat):
                continue  # its own relay closes it
            elif isinstance(action, Close):
                # Closing waits for the peer's answer: never block the caller on it.
                self._spawn(ws.close(action.code, action.reason))
            else:
                asyncio.get_running_loop().call_later(
                    self.config.limits.join_timeout_s,
                    self._join_expired,
                    action.conn,
                    action.generation,
                )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _join_expired(self, conn_id: int, generation: int) -> None:
        actions = join_expired(self.state, conn_id, generation)
        if actions:
            self._spawn(self.perform(actions))

    def slow_reader(self, ws: RelayConnection) -> None:
        """A client's write buffer passed its bound: cut it (its seat is held for it)."""
        self.state.stats.errors["slow-reader"] += 1
        logger.info(
            "conn=%d cut: over %d bytes unsent (not reading)",
            ws.conn_id,
            self.config.limits.write_buffer_bytes,
        )
        # On the loop's next turn, not inside pause_writing: websockets is then
        # writing one read's pongs one by one (a ping flood: some 2,000), and
        # each write to an aborted transport logs asyncio's "socket.send() raised
        # exception." The rest of that read is buffered, then freed by the abort.
        asyncio.get_running_loop().call_soon(ws.transport.abort)

    def control_frame(self, ws: RelayConnection) -> None:
        actions = control_frame(self.state, ws.conn_id)
        if actions:
            self._spawn(self.perform(actions))

    # -- plain HTTP on the same port --

    def client_address(self, ws: ServerConnection, request: Request) -> str:
        """The socket's peer, or X-Forwarded-For's last hop before a trusted proxy."""
        address = _socket_address(ws)
        proxies = self.config.trusted_proxies
        if not proxies or not _in_networks(address, proxies):
            return address
        hops = [h.strip() for v in request.headers.get_all("X-Forwarded-For") for h in v.split(",")]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # garbled: trust nothing further left
            address = hop
            if not _in_networks(hop, proxies):
                break
        return address

    def origin_allowed(self, request: Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or self.any_origin:
            return True  # not a browser (browsers always send Origin on a WebSocket)
        origin = origin.rstrip("/").lower()
        if self.config.origins:
            return origin in self.config.origins
        parts = urlsplit(origin)
        host = request.headers.get("Host", "").lower()
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path == API_PATH:
            return self.consultations(ws, request)
        if request.method != "GET":
            response = self.http_response(405, b"Only GET.\n", "text/plain; charset=utf-8")
            response.headers["Allow"] = "GET"
            return response
        address = self.client_address(ws, request)
        if isinstance(ws, RelayConnection):
            ws.client_address = address
        path = urlsplit(request.path).path
        if path == "/ws":
            if isinstance(ws, RelayConnection) and self.late(ws):
                return self.busy_response()
            if not self.origin_allowed(request):
                self.state.stats.errors["bad-origin"] += 1
                logger.debug("refused a WebSocket from origin %r", request.headers.get("Origin"))
                return self.http_response(
                    403, b"Origin not allowed.\n", "text/plain; charset=utf-8"
                )
            refused = admit(self.state, address)
            if refused is not None:
                response = self.http_response(
                    429, f"{refused}\n".encode(), "text/plain; charset=utf-8"
                )
                response.headers["Retry-After"] = "1"
                return response
            return None
        trusted = _in_networks(address, self.config.metrics_allow)
        if path == "/health":
            problem = None if self.cluster is None else self.cluster.problem
            status: dict[str, object] = {"status": "ok" if problem is None else problem}
            if trusted:
                status |= {
                    "node": self.node_id,
                    "sessions": self.state.seats.session_count(),
                    "connections": len(self.state.conns),
                    "uptime_s": round(time.monotonic() - self.started, 3),
                    "version": __version__,
                }
            code = 200 if problem is None else 503  # a load balancer sends no one here
            return self.http_response(code, json.dumps(status).encode(), "application/json")
        if path == "/metrics":
            if not trusted:
                return self.http_response(
                    403, b"Not in metrics.allow.\n", "text/plain; charset=utf-8"
                )
            return self.http_response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if path == "/rtc-config.json":
            config = public_ice(self.config.browser_ice)
            if minted := self.precheck_turn(urlsplit(request.path).query):
                config = {**config, "iceServers": [*minted, *config["iceServers"]]}
            body = json.dumps(config).encode()
            return self.http_response(200, body, "application/json")
        return self.static_file(path)

    def precheck_turn(self, query: str) -> list[dict[str, Any]]:
        """``?session=S&role=R[&token=T]``: the TURN credentials a join of that seat would get.

        For the page's pre-call TURN check (web/js/precheck.js), before it joins:
        nothing that the join itself would not hand out (with ``auth.secret``, only
        for a token valid for that session and role right now), and no seat taken.
        """
        params = parse_qs(query)
        session, role, token = (params.get(k, [None])[0] for k in ("session", "role", "token"))
        if session is None or role not in ROLES or not SESSION_RE.fullmatch(session):
            return []
        now = time.time()
        if self.config.auth.secret:
            try:
                check_token(self.config.auth.secret, token, session, role, now)
            except ProtocolError:
                return []
        return turn_credentials(self.config.turn, session, role, now)

    def late(self, ws: RelayConnection) -> bool:
        """Its request waited half of limits.open_timeout_s: the relay cannot keep up, shed it."""
        waited = asyncio.get_running_loop().time() - ws.accepted_at
        return waited > self.config.limits.open_timeout_s / 2

    def _busy_place(self) -> int:
        """Count one 503; its Retry-After: this client's place in the pacer's schedule."""
        self.state.stats.errors["busy"] += 1
        return self.pacer.retry_after(asyncio.get_running_loop().time(), self.handshaking)

    def busy_response(self) -> Response:
        """HTTP 503 for a request that came late: Retry-After is this client's place."""
        response = self.http_response(503, BUSY_BODY, "text/plain; charset=utf-8")
        response.headers["Retry-After"] = str(self._busy_place())
        return response

    def busy_bytes(self) -> bytes:
        """The same 503 written at once, past limits.max_handshakes, before any request."""
        place = self._busy_place()
        second = int(time.time())
        head = self._busy_head
        if head is None or self._busy_date != second:
            response = self.http_response(503, BUSY_BODY, "text/plain; charset=utf-8")
            self._busy_date = second
            head = self._busy_head = response.serialize()
        return head.replace(b"\r\n\r\n", f"\r\nRetry-After: {place}\r\n\r\n".encode(), 1)

    def consultations(self, ws: ServerConnection, request: Request) -> Response:
        """``POST /api/consultations``: a new session and its two links, for a booking system."""
        api = self.config.api
        if not api.keys:
            return self.api_error(404, "api-off", "The API is off: no api.keys are set.")
        if request.method != "POST":
            response = self.api_error(405, "bad-method", "Only POST.")
            response.headers["Allow"] = "POST"
            return response
        address = self.client_address(ws, request)
        refused = admit(self.state, address)
        if refused is not None:
            response = self.api_error(429, refused.code, str(refused))
            response.headers["Retry-After"] = "1"
            return response
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        hashed = hash_api_key(key.strip()).encode()
        # Every hash is compared (constant time), so timing tells nothing of which.
        matches = [hmac.compare_digest(hashed, k.encode()) for k in api.keys]
        if scheme.lower() != "bearer" or not key.strip() or not any(matches):
            self.state.stats.errors["bad-api-key"] += 1
            logger.warning("api: refused a request from %s: bad API key", address)
            response = self.api_error(
                401, "bad-api-key", "Send a valid API key: Authorization: Bearer <key>."
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="consultations"'
            return response
        reader = ws.api_body if isinstance(ws, RelayConnection) else None
        length = None if reader is None else reader.length
        if length is not None and (length < 0 or length > API_MAX_BODY):
            return self.api_error(
                413 if length > API_MAX_BODY else 400,
                "bad-body",
                f"The body must be JSON with one Content-Length, at most {API_MAX_BODY} bytes.",
            )
        body = b"" if reader is None or reader.body is None else reader.body
        try:
            fields = consultation_request(body, api.ttl_s)
            base_url = api.base_url or self.base_url(ws, request)
            assert self.config.auth.secret  # the loader requires it with api.keys
            made = new_consultation(
                self.config.auth.secret, base_url, time.time(), fields[1], fields[0]
            )
        except ProtocolError as exc:
            return self.api_error(400, exc.code, str(exc))
        logger.info("api: consultation session=%s created for %s", made["session"], address)
        return self.http_response(200, json.dumps(made).encode(), "application/json")

    def base_url(self, ws: ServerConnection, request: Request) -> str:
        """The links' origin when api.base_url is unset: this request's scheme and Host.

        The scheme is X-Forwarded-Proto's when a trusted proxy sent it.
        """
        host = request.headers.get("Host", "")
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,255}", host):
            raise ProtocolError("bad-host", "No usable Host header: set api.base_url.")
        scheme = "https" if self.tls else "http"
        proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        proxies = self.config.trusted_proxies
        if proto in ("http", "https") and _in_networks(_socket_address(ws), proxies):
            scheme = proto
        return f"{scheme}://{host}"

    def api_error(self, status: int, code: str, message: str) -> Response:
        body = json.dumps({"code": code, "message": message}).encode()
        return self.http_response(status, body, "application/json")

    def static_file(self, path: str) -> Response:
        root = self.config.web_root.resolve()
        name = "index.html" if path in {"", "/"} else path.lstrip("/")
        candidate = (root / name).resolve()
        content_type = CONTENT_TYPES.get(candidate.suffix)
        if content_type is None or not candidate.is_relative_to(root) or not candidate.is_file():
            return self.http_response(404, b"Not found.\n", "text/plain; charset=utf-8")
        return self.http_response(200, candidate.read_bytes(), content_type)

    def http_response(self, status: int, body: bytes, content_type: str) -> Response:
        response = http_response(status, body, content_type)
        if self.tls:
            response.headers["Strict-Transport-Security"] = HSTS
        return response


def _socket_address(ws: ServerConnection) -> str:
    peer = ws.remote_address
    return str(peer[0]) if peer else ""


def _in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def public_ice(browser_ice: Mapping[str, Any]) -> dict[str, Any]:
    """The browsers' RTCConfiguration without long-term credentials (never published).

    Servers that need ``username``/``credential`` are left out: with a TURN
    secret, browsers get TURN through ``joined.ice_servers`` instead.
    """
    servers = [
        s for s in browser_ice["iceServers"] if "username" not in s and "credential" not in s
    ]
    return {**browser_ice, "iceServers": servers}


def http_response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            *SECURITY_HEADERS,
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


@dataclass
class RunningRelay:
    """A relay that is listening; ``url`` is the real WebSocket address."""

    relay: Relay
    server: Server
    url: str
    http_url: str
    port: int

    @property
    def state(self) -> State:
        return self.relay.state


@contextlib.asynccontextmanager
async def serve_relay(config: RelayConfig) -> AsyncIterator[RunningRelay]:
    """Listen until the block exits, then close every connection with 1001."""
    config.check_exposure()
    secret, origin = config.resume_secret_bytes()
    relay = Relay(config, secret)
    limits = config.limits
    ssl_context = config.ssl_context()
    somaxconn = _somaxconn()
    if somaxconn is not None and somaxconn < config.backlog:
        logger.warning(
            "relay.backlog is %d but the kernel caps it at %d (net.core.somaxconn): "
            "a reconnect storm may overflow the listen queue",
            config.backlog,
            somaxconn,
        )
    server = await serve(
        relay.handler,
        config.host,
        config.port,
        create_connection=relay.connection_class,
        backlog=config.backlog,
        process_request=relay.process_request,
        server_header=f"e-pedicare-relay/{__version__}",
        # Compression off: it costs ~40 % more CPU per frame and 3x the memory
        # per connection for SDP-sized frames.
        compression=None,
        # Limits: the application answers frames over max_frame_bytes with an
        # error frame; max_size is the hard ceiling (close 1009).
        max_size=limits.hard_max_bytes,
        max_queue=16,
        # Past it a client is cut (RelayConnection.pause_writing), never waited for.
        write_limit=limits.write_buffer_bytes,
        # Timeouts.
        open_timeout=limits.open_timeout_s,
        ping_interval=limits.ping_interval_s,
        ping_timeout=limits.ping_timeout_s,
        close_timeout=limits.close_timeout_s,
        ssl=ssl_context,
    )
    try:
        host, port = server.sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "wss" if ssl_context else "ws"
        if config.cluster.node_id is None:
            relay.node_id = f"{shown}:{port}"
        # This relay's lines and tasks carry its id; the caller's context gets it back.
        node_token = NODE.set(relay.node_id)
        if config.cluster.redis_url is not None:
            directory = SeatDirectory.from_url(
                config.cluster.redis_url, relay.node_id, config.cluster, limits
            )
            relay.cluster = Cluster(relay, directory)
            relay.cluster.start()
            logger.info("seats shared through Redis")
        running = RunningRelay(
            relay,
            server,
            f"{scheme}://{shown}:{port}/ws",
            f"{'https' if ssl_context else 'http'}://{shown}:{port}",
            port,
        )
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        logger.info("relay listening on %s (event loop: %s)", running.url, loop)
        logger.info("node id %s (cluster.node_id)", relay.node_id)
        logger.info("resume keys signed with a key %s", origin)
        NODE.reset(node_token)
        yield running
    finally:
        NODE.set(relay.node_id)
        await _shut_down(relay, server, limits)
        NODE.set("-")


async def _shut_down(relay: Relay, server: Server, limits: Limits) -> None:
    """Close every connection with 1001 within limits.shutdown_timeout_s; abort the rest."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.shutdown_timeout_s
    relay.stopping = True
    # No new connection from here (a client told to come back at once must
    # find the next relay, not this one's 503 "shutting down").
    server.server.close()
    # Each client is told when to come back, one every 1 / limits.reconnect_rate
    # seconds (oldest first), so that the restarted relay sees a stream it can
    # take rather than every client at once. These closes start before the
    # server's own, which then passes over them (no longer OPEN).
    open_now = sorted(
        (ws for ws in relay.live if ws.protocol.state is OPEN), key=lambda ws: ws.conn_id
    )
    for ws, delay in zip(open_now, relay.pacer.restart_delays(len(open_now)), strict=True):
        relay._spawn(ws.close(CLOSE_GOING_AWAY, RECONNECT_REASON.format(delay)))
    server.close(code=CLOSE_GOING_AWAY, reason=RECONNECT_REASON.format(0))
    # What has not closed a second before the bound (a client that never
    # reads its close frame, a handshake still going) is aborted, leaving
    # that second for the handlers to end.
    grace = max(limits.shutdown_timeout_s - 1.0, limits.shutdown_timeout_s / 2)
    try:
        await asyncio.wait_for(asyncio.shield(server.wait_closed()), grace)
    except TimeoutError:
        left = list(relay.live)  # server.all_connections misses those in their handshake
        logger.warning("shutdown: aborting %d connections after %gs", len(left), grace)
        for ws in left:
            ws.transport.abort()
        # An aborted connection's handler may still wait on its close: end them all.
        for task in list(server.handler_tasks):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(server.wait_closed()), max(0.0, deadline - loop.time())
            )
    if relay.cluster is not None:
        await relay.cluster.stop()
    logger.info("relay stopped")


def _somaxconn() -> int | None:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Band 3: the entry point
# ---------------------------------------------------------------------------


LOOPS: Final[dict[str, Callable[[], asyncio.AbstractEventLoop] | None]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": None,  # asyncio.Runner's default
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="relay.py", description="e-PediCare Call signaling relay (protocol v1)."
    )
    parser.add_argument(
        "--config", type=Path, default=Path("config.yaml"), help="YAML file (default: config.yaml)"
    )
    parser.add_argument("--host", help="address to listen on (overrides relay.host)")
    parser.add_argument(
        "--port", type=int, help="port to listen on, 0 for a free one (overrides relay.port)"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (default uvloop; asyncio is the standard library's)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log frames (DEBUG)")
    commands = parser.add_subparsers(dest="command", metavar="{token,invite,api-key}")
    token = commands.add_parser("token", help="print a join token signed with auth.secret")
    # SUPPRESS: a --config given before the subcommand is kept.
    token.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="YAML file")
    token.add_argument("--session", required=True, help="session id")
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--ttl", type=int, default=3600, help="seconds of validity (default 3600)")
    token.add_argument(
        "--valid-from", type=valid_from, help="not before this time (ISO 8601 with offset, or Unix)"
    )
    invite = commands.add_parser(
        "invite", help="print a new random session id and its patient and practitioner links"
    )
    invite.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="YAML file")
    invite.add_argument(
        "--base-url", required=True, help="the page's address, e.g. https://call.example.org"
    )
    invite.add_argument(
        "--valid-from",
        type=valid_from,
        help="the links work from this time on (ISO 8601 with an offset, e.g. "
        "2026-12-09T14:45+01:00, or Unix seconds); default: now",
    )
    invite.add_argument(
        "--ttl", type=int, default=7200, help="seconds of validity from --valid-from (default 7200)"
    )
    api_key = commands.add_parser(
        "api-key", help="print a new random API key and its hash (for api.keys)"
    )
    api_key.add_argument(
        "--stdin", action="store_true", help="hash the key read from standard input instead"
    )
    return parser.parse_args(argv)


def valid_from(text: str) -> int:
    """A time for --valid-from: Unix seconds, or ISO 8601 with a UTC offset (or Z)."""
    if re.fullmatch(r"[0-9]{1,12}", text):
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ISO 8601 like 2026-12-09T14:45+01:00, or Unix seconds"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: add a UTC offset (+01:00, Z)")
    return int(when.timestamp())


async def run(config: RelayConfig) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection with 1001.

    SIGHUP (logrotate's) and SIGUSR1 are logged and ignored: the relay logs to
    stderr, which it never reopens, and neither signal may kill it.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The relay's own shutdown holds limits.shutdown_timeout_s; then
    # asyncio.Runner cancels the tasks that remain and closes the loop, which
    # with 10,000 connections took up to 12 s more. The bound is the
    # process's: armed at the signal, a timer exits without that teardown
    # once the bound (plus EXIT_MARGIN_S) has passed.
    watchdog = threading.Timer(config.limits.shutdown_timeout_s + EXIT_MARGIN_S, _exit_now)
    watchdog.daemon = True

    def stopping() -> None:
        if not stop.is_set():
            watchdog.start()
            stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping)
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        loop.add_signal_handler(signum, _ignored, signum)
    async with serve_relay(config):
        await stop.wait()
        logger.info("signal received: closing every connection")


def _exit_now() -> None:
    # The last line is written by a thread of its own and given EXIT_LOG_S: a
    # stderr that nobody drains (a busy supervisor's pipe) or a handler lock held
    # by the stuck loop would otherwise hold the exit (15.4 s against 10.5 in
    # make bench-storm, the bench's loop busy with 10,000 clients).
    def last_line() -> None:
        logger.warning(
            "shutdown: the event loop's teardown passed limits.shutdown_timeout_s + %gs; exiting",
            EXIT_MARGIN_S,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()

    writer = threading.Thread(target=last_line, daemon=True)
    writer.start()
    writer.join(EXIT_LOG_S)
    os._exit(0)


def _ignored(signum: int) -> None:
    logger.info("%s received: ignored (logs go to stderr)", signal.Signals(signum).name)


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one; refuse when it cannot hold the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    need = max_connections + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < need:
        raise ConfigError(
            "limits.max_connections",
            f"{max_connections} connections need {need} file descriptors, "
            f"but the limit is {soft} (ulimit -n; the hard limit is {hard})",
        )


def command(args: argparse.Namespace, config: RelayConfig) -> int:
    """The subcommands: token, invite, api-key (their output is the CLI's, on stdout)."""
    if args.command == "api-key":
        key = sys.stdin.readline().strip() if args.stdin else secrets.token_urlsafe(32)
        if len(key) < 16:
            raise ConfigError("--stdin", "expected a key of at least 16 characters")
        if not args.stdin:
            print(f"key:  {key}")
        print(f"hash: {hash_api_key(key)}")
        return 0
    if not config.auth.secret:
        raise ConfigError("auth.secret", f"needed to sign tokens (or {AUTH_SECRET_ENV})")
    if args.ttl <= 0:
        raise ConfigError("--ttl", "expected a positive number of seconds")
    if args.command == "invite" and args.ttl > LINK_TTL_MAX_S:
        raise ConfigError("--ttl", f"expected at most {LINK_TTL_MAX_S} seconds (30 days)")
    now = int(time.time())
    start = args.valid_from
    expiry = (now if start is None else start) + args.ttl
    if not EXPIRY_RE.fullmatch(str(expiry)):
        raise ConfigError("--ttl", "too long: the expiry must fit in 12 digits")
    if expiry < now:
        raise ConfigError("--valid-from", "the links would expire before they are made")
    if args.command == "token":
        print(mint_token(config.auth.secret, args.session, args.role, expiry, start))
        return 0
    base_url = check_base_url(args.base_url, "--base-url")
    made = new_consultation(config.auth.secret, base_url, now, args.ttl, start)
    window = "now" if start is None else _utc(start)
    print(f"session:      {made['session']}")
    print(f"valid:        from {window} until {_utc(expiry)}")
    print(f"patient:      {made['patient_url']}")
    print(f"practitioner: {made['practitioner_url']}")
    return 0


def _utc(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(node)s]: %(message)s",
    )
    for handler in logging.getLogger().handlers:  # websockets' and redis's lines too
        handler.addFilter(NodeFilter())
    logging.getLogger("websockets").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        config = RelayConfig.load(args.config)
        if args.command is not None:
            return command(args, config)
        if args.host is not None:
            config = dataclasses.replace(config, host=args.host)
        if args.port is not None:
            if not 0 <= args.port <= 65_535:
                raise ConfigError("--port", "expected 0 to 65535")
            config = dataclasses.replace(config, port=args.port)
        raise_fd_limit(config.limits.max_connections)
        # uvloop reads each socket into one reused buffer; the standard
        # loop's recv() allocates 256 KiB per read, which glibc may serve
        # with mmap, mremap and munmap for every frame (CPython issue 85451).
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            runner.run(run(config))
    except (ConfigError, ValueError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"relay: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
