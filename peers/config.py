"""The peers' settings: YAML (config.yaml) to typed settings, each error naming its key.

    settings = PeerSettings.load(Path("config.yaml"))   # raises ConfigError

The relay's own sections (auth, tls, limits, turn) are the relay's business;
this reads ``relay.url``, ``session``, ``token``, ``ice``, ``media`` and ``call``
(recovery: ``recovery_timeout_s``, ``media_timeout_s``, ``heartbeat_s``).
Settings that aiortc would silently ignore are refused or warned about here,
naming the key: a second STUN or TURN URL (aiortc uses only the first of
each), a credential that is not a password, ``turns:`` over UDP (DTLS).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import relay
from relay import ICE_URL_RE, ConfigError, Section, call_settings, read_yaml

__all__ = [
    "ConfigError",
    "IceServer",
    "PeerSettings",
    "VideoSettings",
    "check_session",
    "parse_ice_urls",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IceServer:
    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class VideoSettings:
    width: int = 640
    height: int = 480
    fps: int = 30
    codec: str = "vp8"
    # RED + ULPFEC offered and answered (peers/aiortc_send.py, ``negotiate_fec``), sent by the
    # aiortc sender and taken by its receive path (peers/aiortc_receive.py, ``RedFront``).
    fec: bool = True


@dataclass(frozen=True)
class PeerSettings:
    relay_url: str = "ws://127.0.0.1:5001/ws"
    relay_open_timeout_s: float = 5.0
    relay_join_timeout_s: float = 10.0
    relay_reconnect_max_s: float = 2.0
    session: str = "test123"
    token: str | None = None
    ice_servers: tuple[IceServer, ...] = ()
    ice_policy: str = "all"
    ice_timeout_s: float = 20.0
    turn_ca_file: Path | None = None
    video: VideoSettings = VideoSettings()
    audio: bool = True
    call_recovery_timeout_s: float = relay.CALL_DEFAULTS["recovery_timeout_s"]
    call_media_timeout_s: float = relay.CALL_DEFAULTS["media_timeout_s"]
    call_heartbeat_s: float = relay.CALL_DEFAULTS["heartbeat_s"]
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def load(cls, path: Path) -> PeerSettings:
        return cls.from_mapping(read_yaml(path))

    @classmethod
    def from_mapping(cls, data: object) -> PeerSettings:
        top = Section.root(data)
        relay = top.section("relay")
        ice = top.section("ice")
        media = top.section("media")
        turn = top.section("turn")
        call = top.section("call")
        calls = call_settings(call)
        video = media.section("video", known={"width", "height", "fps", "codec", "fec"})
        audio: object = media.get("audio")
        if isinstance(audio, dict):
            audio = media.section("audio", known={"enabled"}).flag("enabled", True)
        else:
            audio = media.flag("audio", True)
        warnings: list[str] = []
        servers = _ice_servers(ice.ice_servers("servers"), ice.key("servers"), warnings)
        d = VideoSettings()
        settings = cls(
            relay_url=relay.text("url", cls.relay_url),
            relay_open_timeout_s=relay.number("open_timeout_s", cls.relay_open_timeout_s),
            relay_join_timeout_s=relay.number("join_timeout_s", cls.relay_join_timeout_s),
            relay_reconnect_max_s=relay.number(
                "reconnect_max_s", cls.relay_reconnect_max_s, minimum=0.5
            ),
            session=top.session("session", cls.session),
            token=top.optional_text("token"),
            ice_servers=servers,
            ice_policy=ice.choice("policy", ("all", "relay"), "all"),
            ice_timeout_s=float(ice.number("timeout_s", cls.ice_timeout_s, minimum=1.0)),
            turn_ca_file=turn.path_value("ca_file"),
            video=VideoSettings(
                width=video.integer("width", d.width, minimum=16),
                height=video.integer("height", d.height, minimum=16),
                fps=video.integer("fps", d.fps, minimum=1),
                codec=video.choice("codec", ("vp8", "h264"), d.codec),
                fec=video.flag("fec", d.fec),
            ),
            audio=bool(audio),
            call_recovery_timeout_s=calls["recovery_timeout_s"],
            call_media_timeout_s=calls["media_timeout_s"],
            call_heartbeat_s=calls["heartbeat_s"],
            warnings=tuple(warnings),
        )
        for warning in warnings:
            logger.warning("%s", warning)
        return settings


def check_session(value: str, key: str = "--session") -> str:
    return relay.check_session(value, key)


def parse_ice_urls(urls: list[str], key: str = "--ice-server") -> tuple[IceServer, ...]:
    """``--ice-server URL`` flags: ``turn:USER:PASS@HOST:PORT`` carries credentials.

    USER and PASS are percent-decoded (a TURN REST username has a colon: ``%3A``).
    """
    servers: list[dict[str, object]] = []
    for given in urls:
        server: dict[str, object] = {"urls": given}
        match = re.fullmatch(r"(turns?):([^:@]+):([^@]+)@(.+)", given)
        if match:
            server = {
                "urls": f"{match.group(1)}:{match.group(4)}",
                "username": unquote(match.group(2)),
                "credential": unquote(match.group(3)),
            }
        servers.append(server)
    try:
        parsed = Section({"flags": servers}, "").ice_servers("flags")
    except ConfigError as exc:
        raise ConfigError(key, exc.expected) from None
    warnings: list[str] = []
    checked = _ice_servers(parsed, key, warnings)
    for warning in warnings:
        logger.warning("%s", warning)
    return checked


# -- helpers --------------------------------------------------------------------------------


def _ice_servers(
    servers: list[dict[str, Any]], key: str, warnings: list[str]
) -> tuple[IceServer, ...]:
    """Refuse what aiortc cannot use and warn about what it would ignore, naming the key.

    ``servers`` were read by ``Section.ice_servers`` (shapes and URL syntax checked).
    """
    parsed = []
    seen = {"stun": "", "turn": ""}
    for n, server in enumerate(servers):
        where = f"{key}[{n}]" if key == "ice.servers" else key
        if server.get("credentialType", "password") != "password":
            raise ConfigError(
                f"{where}.credentialType", "aiortc supports only password credentials"
            )
        for url in server["urls"]:
            match = ICE_URL_RE.fullmatch(url)
            assert match is not None  # checked by Section.ice_servers
            scheme, transport = match.group(1), match.group(4)
            if scheme == "stuns":
                raise ConfigError(f"{where}.urls", f"{url!r}: aiortc does not support stuns:")
            if scheme == "turns" and transport == "udp":
                raise ConfigError(
                    f"{where}.urls", f"{url!r}: aiortc does not support turns: over UDP (DTLS)"
                )
            if scheme.startswith("turn") and not (
                server.get("username") and server.get("credential")
            ):
                warnings.append(
                    f"{where}: {url} has no username/credential (the relay may hand some out)"
                )
            kind = "stun" if scheme == "stun" else "turn"
            if seen[kind]:
                warnings.append(
                    f"{where}.urls: aiortc uses only the first {kind.upper()} URL "
                    f"({seen[kind]}); {url} is ignored"
                )
            else:
                seen[kind] = url
        parsed.append(
            IceServer(tuple(server["urls"]), server.get("username"), server.get("credential"))
        )
    return tuple(parsed)
