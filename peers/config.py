"""The peers' settings: YAML (config.yaml) to typed settings, each error naming its key.

    settings = PeerSettings.load(Path("config.yaml"))   # raises ConfigError

The relay's own sections (auth, tls, limits, turn) are the relay's business;
this reads ``relay.url``, ``session``, ``token``, ``ice`` and ``media``.
Settings that aiortc would silently ignore are refused or warned about here,
naming the key: a second STUN or TURN URL (aiortc uses only the first of
each), a credential that is not a password, ``turns:`` over UDP (DTLS).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from relay import ConfigError, read_yaml

__all__ = [
    "ConfigError",
    "IceServer",
    "PeerSettings",
    "VideoSettings",
    "check_session",
    "parse_ice_urls",
]

logger = logging.getLogger(__name__)

SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ICE_URL_RE = re.compile(r"(stun|stuns|turn|turns):([^?]+)(\?transport=(udp|tcp))?")


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


@dataclass(frozen=True)
class PeerSettings:
    relay_url: str = "ws://127.0.0.1:5001/ws"
    session: str = "test123"
    token: str | None = None
    ice_servers: tuple[IceServer, ...] = ()
    ice_policy: str = "all"
    ice_timeout_s: float = 20.0
    turn_ca_file: Path | None = None
    video: VideoSettings = VideoSettings()
    audio: bool = True
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def load(cls, path: Path) -> PeerSettings:
        return cls.from_mapping(read_yaml(path))

    @classmethod
    def from_mapping(cls, data: object) -> PeerSettings:
        if not isinstance(data, Mapping):
            raise ConfigError("(top level)", "expected a mapping of sections")
        relay = _section(data, "relay")
        ice = _section(data, "ice", known={"servers", "policy", "timeout_s"})
        media = _section(data, "media", known={"video", "audio"})
        turn = _section(data, "turn")
        video = _section(media, "video", "media.", known={"width", "height", "fps", "codec"})
        audio = media.get("audio", True)
        if isinstance(audio, Mapping):
            audio = _flag(audio, "enabled", "media.audio.", True)
        elif not isinstance(audio, bool):
            raise ConfigError("media.audio", "expected true or false")
        warnings: list[str] = []
        servers = _ice_servers(ice.get("servers"), warnings)
        ca_file = turn.get("ca_file")
        settings = cls(
            relay_url=_text(relay, "url", "relay.", cls.relay_url),
            session=_session(data.get("session", cls.session), "session"),
            token=_optional_text(data, "token", ""),
            ice_servers=servers,
            ice_policy=_choice(ice, "policy", "ice.", ("all", "relay"), "all"),
            ice_timeout_s=_number(ice, "timeout_s", "ice.", 20.0, minimum=1.0),
            turn_ca_file=None if ca_file is None else Path(str(ca_file)),
            video=VideoSettings(
                width=int(_number(video, "width", "media.video.", 640, minimum=16)),
                height=int(_number(video, "height", "media.video.", 480, minimum=16)),
                fps=int(_number(video, "fps", "media.video.", 30, minimum=1)),
                codec=_choice(video, "codec", "media.video.", ("vp8", "h264"), "vp8"),
            ),
            audio=audio,
            warnings=tuple(warnings),
        )
        for warning in warnings:
            logger.warning("%s", warning)
        return settings


def check_session(value: str, key: str = "--session") -> str:
    return _session(value, key)


def parse_ice_urls(urls: list[str], key: str = "--ice-server") -> tuple[IceServer, ...]:
    """``--ice-server URL`` flags: ``turn:USER:PASS@HOST:PORT`` carries credentials.

    USER and PASS are percent-decoded (a TURN REST username has a colon: ``%3A``).
    """
    servers = []
    for given in urls:
        url, username, credential = given, None, None
        match = re.fullmatch(r"(turns?):([^:@]+):([^@]+)@(.+)", given)
        if match:
            url = f"{match.group(1)}:{match.group(4)}"
            username, credential = unquote(match.group(2)), unquote(match.group(3))
        servers.append({"urls": url, "username": username, "credential": credential})
    warnings: list[str] = []
    parsed = _ice_servers(servers, warnings, key)
    for warning in warnings:
        logger.warning("%s", warning)
    return parsed


# -- helpers --------------------------------------------------------------------------------


def _section(
    data: Mapping[Any, Any], name: str, prefix: str = "", known: set[str] | None = None
) -> Mapping[Any, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(prefix + name, "expected a mapping")
    if known is not None:
        for key in value:
            if key not in known:
                raise ConfigError(f"{prefix}{name}.{key}", f"unknown key (known: {sorted(known)})")
    return value


def _text(data: Mapping[Any, Any], name: str, prefix: str, default: str) -> str:
    value = data.get(name, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(prefix + name, "expected a non-empty string")
    return value


def _optional_text(data: Mapping[Any, Any], name: str, prefix: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(prefix + name, "expected a string or null")
    return value


def _flag(data: Mapping[Any, Any], name: str, prefix: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(prefix + name, "expected true or false")
    return value


def _number(
    data: Mapping[Any, Any], name: str, prefix: str, default: float, minimum: float
) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(prefix + name, f"expected a number >= {minimum:g}, got {value!r}")
    return float(value)


def _choice(
    data: Mapping[Any, Any], name: str, prefix: str, choices: tuple[str, ...], default: str
) -> str:
    value = data.get(name, default)
    if value not in choices:
        raise ConfigError(prefix + name, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _session(value: object, key: str) -> str:
    if not isinstance(value, str) or not SESSION_RE.fullmatch(value):
        raise ConfigError(key, f"expected 1-64 characters of A-Z a-z 0-9 _ -, got {value!r}")
    return value


def _ice_servers(
    value: object, warnings: list[str], key: str = "ice.servers"
) -> tuple[IceServer, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of {urls, username, credential}")
    servers = []
    seen = {"stun": "", "turn": ""}
    for n, entry in enumerate(value):
        where = f"{key}[{n}]" if key == "ice.servers" else key
        if not isinstance(entry, Mapping):
            raise ConfigError(where, "expected a mapping with urls, username, credential")
        for name in entry:
            if name not in {"urls", "username", "credential", "credentialType"}:
                raise ConfigError(
                    f"{where}.{name}", "unknown key (known: urls, username, credential)"
                )
        urls = entry.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ConfigError(f"{where}.urls", "expected a URL or a list of URLs")
        if entry.get("credentialType", "password") != "password":
            raise ConfigError(
                f"{where}.credentialType", "aiortc supports only password credentials"
            )
        for url in urls:
            match = ICE_URL_RE.fullmatch(url)
            if match is None:
                raise ConfigError(
                    f"{where}.urls",
                    f"{url!r} is not stun:HOST[:PORT] or turn[s]:HOST[:PORT][?transport=udp|tcp]",
                )
            scheme, transport = match.group(1), match.group(4)
            if scheme == "stuns":
                raise ConfigError(f"{where}.urls", f"{url!r}: aiortc does not support stuns:")
            if scheme == "turns" and transport == "udp":
                raise ConfigError(
                    f"{where}.urls", f"{url!r}: aiortc does not support turns: over UDP (DTLS)"
                )
            if scheme.startswith("turn") and not (
                entry.get("username") and entry.get("credential")
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
        username = entry.get("username")
        credential = entry.get("credential")
        for name, item in (("username", username), ("credential", credential)):
            if item is not None and not isinstance(item, str):
                raise ConfigError(f"{where}.{name}", "expected a string")
        servers.append(IceServer(tuple(urls), username, credential))
    return tuple(servers)
