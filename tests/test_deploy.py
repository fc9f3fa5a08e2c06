"""deploy/: the systemd units pass systemd-analyze, the production config loads, and a
real nginx and a real Caddy from Debian terminate TLS in front of the real relay.

nginx runs from deploy/nginx/epedicare.conf as shipped, with only the
host-specific values replaced (addresses, ports, certificate and log paths),
on 127.0.0.1 with a throwaway CA; the relay runs from deploy/config.yaml with
its secrets in the environment, as the systemd unit gives them. Caddy runs
deploy/Caddyfile the same way: its site block as shipped, the site address
and the certificate (``tls`` with the throwaway CA's files instead of ACME)
replaced, and global options that keep it to this test (no admin endpoint,
its own ports and storage).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import relay
from peers.netns import Netns, Network, netns_missing
from tests.browser import Browsers, join, wait_state
from tests.nat import make_tls_files
from tests.processes import RelayProcess, relay_process
from tests.support import TIMEOUT, Client, within

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = ["epedicare-relay.service", "epedicare-turn.service"]
AUTH_SECRET = "deploy-test-auth-secret"
TURN_SECRET = "deploy-test-turn-secret"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_MISSING = not Path(NGINX).exists()
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
CADDY_MISSING = not Path(CADDY).exists()


def installed_unit(name: str, directory: Path) -> Path:
    """The unit as installed from this checkout: /opt/epedicare is this repository."""
    text = (DEPLOY / name).read_text(encoding="utf-8")
    python = Path(os.path.realpath(ROOT / ".venv" / "bin" / "python"))
    text = text.replace("/opt/epedicare/.venv/bin/python", str(python))
    text = text.replace("/opt/epedicare", str(ROOT))
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing: run `make systemd-deps`")
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    """systemd-analyze verify accepts the unit without a single warning."""
    result = subprocess.run(
        [systemd_analyze(), "verify", str(installed_unit(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warnings


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened(tmp_path: Path, unit: str) -> None:
    """The unit runs as its own user, sandboxed: systemd rates its exposure 2.0 or lower."""
    text = (DEPLOY / unit).read_text(encoding="utf-8")
    for line in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "PrivateDevices=yes",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^User=(epedicare|turnserver)$", text, re.M)
    assert re.search(r"^RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", text, re.M)
    installed = installed_unit(unit, tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--threshold=20", str(installed)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 2.0, result.stdout[-300:]


def test_production_config_takes_its_secrets_from_the_environment() -> None:
    """deploy/config.yaml loads, on loopback, with both secrets from the unit's environment."""
    env = {relay.AUTH_SECRET_ENV: AUTH_SECRET, relay.TURN_SECRET_ENV: TURN_SECRET}
    config = relay.RelayConfig.load(DEPLOY / "config.yaml", env=env)
    assert (config.host, config.port) == ("127.0.0.1", 5001)
    assert config.auth.secret == AUTH_SECRET
    assert config.turn.secret == TURN_SECRET
    assert config.turn.urls[0].startswith("turn:") and config.turn.urls[1].startswith("turns:")
    assert config.tls.cert is None  # TLS is the proxy's
    config.check_exposure()
    bare = relay.RelayConfig.load(DEPLOY / "config.yaml", env={})
    assert bare.auth.secret is None and bare.turn.secret is None  # nothing secret in the file
    with pytest.raises(relay.ConfigError, match=r"^auth\.secret: required when behind a proxy"):
        bare.check_exposure()  # forgetting relay.env stops the relay instead of running open


# -- nginx in front of the relay ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proxy:
    relay: RelayProcess
    https: int
    http: int
    tls: ssl.SSLContext
    directory: Path

    @property
    def access_log(self) -> str:
        return (self.directory / "epedicare.access.log").read_text(encoding="utf-8")


def nginx_site(directory: Path, relay_port: int, address: str, https: int, http: int) -> str:
    """deploy/nginx/epedicare.conf with this host's addresses, ports and paths."""
    site = (DEPLOY / "nginx" / "epedicare.conf").read_text(encoding="utf-8")
    replacements = [
        ("server 127.0.0.1:5001;", f"server 127.0.0.1:{relay_port};"),
        ("    listen [::]:80;\n", ""),
        ("    listen [::]:443 ssl http2;\n", ""),
        ("listen 80;", f"listen {address}:{http};"),
        ("listen 443 ssl http2;", f"listen {address}:{https} ssl http2;"),
        ("/etc/letsencrypt/live/call.example.org/fullchain.pem", str(directory / "cert.pem")),
        ("/etc/letsencrypt/live/call.example.org/privkey.pem", str(directory / "key.pem")),
        ("/var/log/nginx/", f"{directory}/"),
        ("/var/www/letsencrypt", str(directory / "www")),
    ]
    for old, new in replacements:
        assert old in site, f"deploy/nginx/epedicare.conf no longer has {old!r}"
        site = site.replace(old, new)
    return site


def nginx_main(directory: Path) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
master_process on;
worker_processes 1;
{"user root;" if os.geteuid() == 0 else ""}
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
{temp}
    include {directory}/site.conf;
}}
"""


async def listening(
    prefix: list[str], https: int, http: int, proc: asyncio.subprocess.Process
) -> None:
    """Wait until both ports listen (asked with ss, inside the namespace if any)."""
    while True:
        assert proc.returncode is None, "the proxy exited"
        ss = await asyncio.create_subprocess_exec(
            *prefix, "ss", "-Hltn", f"( sport = :{https} or sport = :{http} )",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await ss.communicate()
        if len(out.decode().splitlines()) >= 2:
            return
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def nginx(
    directory: Path, relay_port: int, address: str = "127.0.0.1", netns: str | None = None
) -> AsyncIterator[tuple[int, int]]:
    """nginx from deploy/nginx in front of the relay; yields its https and http ports."""
    if NGINX_MISSING:
        pytest.skip("nginx is missing: run `make nginx-deps` (apt-get install nginx)")
    https, http = free_port(), free_port()
    (directory / "www").mkdir(exist_ok=True)
    (directory / "site.conf").write_text(
        nginx_site(directory, relay_port, address, https, http), encoding="utf-8"
    )
    (directory / "nginx.conf").write_text(nginx_main(directory), encoding="utf-8")
    prefix = Netns(netns).command() if netns else []
    argv = [*prefix, NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf")]
    check = await asyncio.create_subprocess_exec(
        *argv, "-t", stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, stderr = await within(check.communicate())
    assert check.returncode == 0, stderr.decode()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL)
    try:
        # Ready when both ports listen (its pid file comes before the sockets).
        await within(listening(prefix, https, http, proc))
        yield https, http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                await within(proc.wait())
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest_asyncio.fixture
async def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    """The relay from deploy/config.yaml behind nginx from deploy/nginx, on 127.0.0.1."""
    files = make_tls_files(tmp_path, "127.0.0.1")
    monkeypatch.setenv(relay.AUTH_SECRET_ENV, AUTH_SECRET)
    monkeypatch.setenv(relay.TURN_SECRET_ENV, TURN_SECRET)
    async with (
        relay_process(DEPLOY / "config.yaml") as running,
        nginx(tmp_path, running.port) as (https, http),
    ):
        tls = ssl.create_default_context(cafile=files.ca)
        yield Proxy(running, https, http, tls, tmp_path)


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    handlers: list[urllib.request.BaseHandler] = [NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def serves_page_and_hides_metrics(proxy: Proxy) -> str:
    """What nginx and Caddy both promise: page and /health over https with HSTS, /metrics hidden.

    Returns the proxy's https base URL.
    """
    base = f"https://127.0.0.1:{proxy.https}"
    status, headers, body = await asyncio.to_thread(get, f"{base}/health", proxy.tls)
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    assert headers["Strict-Transport-Security"] == "max-age=63072000"
    status, headers, body = await asyncio.to_thread(get, f"{base}/", proxy.tls)
    assert status == 200 and b"e-PediCare Call" in body
    assert headers["Content-Security-Policy"] == relay.CSP  # the relay's, passed on
    status, _, body = await asyncio.to_thread(get, f"{base}/metrics", proxy.tls)
    assert status == 404
    assert b"relay_connections" not in body
    status, _, body = await asyncio.to_thread(get, f"{proxy.relay.http_url}/metrics")
    assert status == 200 and b"relay_connections" in body  # the host's own Prometheus
    return base


@pytest.mark.asyncio
async def test_nginx_serves_the_page_and_health_over_https_and_hides_metrics(
    proxy: Proxy,
) -> None:
    """Through nginx: the page and /health over https with HSTS; /metrics is 404 (local only)."""
    base = await serves_page_and_hides_metrics(proxy)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(urllib.request.urlopen, f"{base}/health", timeout=TIMEOUT)


@pytest.mark.asyncio
async def test_nginx_redirects_http_to_https_and_logs_no_session_id(proxy: Proxy) -> None:
    """Plain http is sent to https with its query string; the access log keeps no query."""
    url = f"http://127.0.0.1:{proxy.http}/?session=secret-session-id&role=patient"
    status, headers, _ = await asyncio.to_thread(get, url)
    assert status == 301
    assert headers["Location"] == "https://127.0.0.1/?session=secret-session-id&role=patient"
    base = f"https://127.0.0.1:{proxy.https}"
    await asyncio.to_thread(get, f"{base}/?session=another-session-id&token=v1.x.y", proxy.tls)
    log = proxy.access_log
    assert '"GET /" 301' in log and '"GET /" 200' in log
    assert "session" not in log and "v1.x.y" not in log


async def signals_through(proxy: Proxy, session: str) -> dict[str, Any]:
    """wss:// through the proxy: a join without a token is refused, both seats join with
    tokens and an offer and an answer cross. Returns the patient's ``joined``."""
    url = f"wss://127.0.0.1:{proxy.https}/ws"
    expiry = int(time.time()) + 600
    token = {
        role: relay.mint_token(AUTH_SECRET, session, role, expiry)
        for role in ("patient", "practitioner")
    }
    patient = await Client.open(url, ssl=proxy.tls)
    practitioner = await Client.open(url, ssl=proxy.tls)
    try:
        await patient.send(type="join", session=session, role="patient")
        await patient.expect_error("bad-token")  # the production config wants tokens
        joined = await patient.join(session, "patient", token=token["patient"])
        assert joined["peer"] is False
        await practitioner.join(session, "practitioner", token=token["practitioner"])
        await patient.expect("peer-joined", role="practitioner")
        await patient.send(type="offer", sdp="v=0 offer")
        await practitioner.expect("offer", sdp="v=0 offer")
        await practitioner.send(type="answer", sdp="v=0 answer")
        await patient.expect("answer", sdp="v=0 answer")
        return joined
    finally:
        for client in (patient, practitioner):
            with contextlib.suppress(Exception):
                await client.close()


@pytest.mark.asyncio
async def test_websocket_call_signaling_through_nginx(proxy: Proxy) -> None:
    """wss:// through nginx: both seats join with tokens and frames cross both ways."""
    joined = await signals_through(proxy, "clinic-1")
    # The TURN secret from the environment: short-lived credentials for coturn.
    (servers,) = joined["ice_servers"]
    assert servers["urls"][0] == "turn:turn.example.org:3478?transport=udp"
    assert servers["username"].endswith(":clinic-1-patient")


@pytest.mark.netns
@pytest.mark.asyncio
async def test_chromium_call_through_nginx(
    browsers: Browsers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pages over https through nginx: the check passes, both join with tokens, connect."""
    if reason := netns_missing():
        pytest.skip(reason)
    address = "198.18.0.2"
    files = make_tls_files(tmp_path, address)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Chromium trusts this one certificate as if a public CA had signed it.
    digest = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    trust = f"--ignore-certificate-errors-spki-list={digest}"
    monkeypatch.setenv(relay.AUTH_SECRET_ENV, AUTH_SECRET)  # no TURN secret: a LAN call
    async with Network("epc-nginx") as network:
        ns = (await network.lan(f"{address}/24")).name
        async with (
            relay_process(DEPLOY / "config.yaml", netns=ns) as running,
            nginx(tmp_path, running.port, address, netns=ns) as (https, _),
        ):
            browser = await browsers.launch(netns=ns, extra_args=(trust,))
            expiry = int(time.time()) + 600
            pages = []
            for role in ("practitioner", "patient"):
                token = relay.mint_token(AUTH_SECRET, "clinic-2", role, expiry)
                url = f"https://{address}:{https}/?session=clinic-2&role={role}&token={token}"
                page = await browsers.open(role, url, browser=browser, locale="en-US")
                await page.wait_for_selector('#precheck[data-verdict="ok"]')  # /health and wss
                await join(page, "clinic-2", role)
                pages.append(page)
            for page in pages:
                await wait_state(page, "connected", units=3)
                assert await page.inner_text("#status .status-call") == "Direct connection"
                assert await page.evaluate("location.protocol") == "https:"
            for role in ("practitioner", "patient"):
                assert browsers.problems(role) == []
    assert "token" not in (tmp_path / "epedicare.access.log").read_text(encoding="utf-8")


# -- Caddy in front of the relay ------------------------------------------------------------


def caddy_env(directory: Path) -> dict[str, str]:
    """Caddy's home, data and config under the test's directory (nothing in /root or /var)."""
    return {
        **os.environ,
        "HOME": str(directory),
        "XDG_DATA_HOME": str(directory / "caddy-data"),
        "XDG_CONFIG_HOME": str(directory / "caddy-config"),
    }


def caddy_site(directory: Path, relay_port: int, https: int, http: int) -> str:
    """deploy/Caddyfile with this host's address, ports, certificate and log path."""
    site = (DEPLOY / "Caddyfile").read_text(encoding="utf-8")
    replacements = [
        (
            "call.example.org {\n",
            f"https://127.0.0.1:{https} {{\n\ttls {directory}/cert.pem {directory}/key.pem\n",
        ),
        ("reverse_proxy 127.0.0.1:5001 {", f"reverse_proxy 127.0.0.1:{relay_port} {{"),
        ("/var/log/caddy/", f"{directory}/"),
    ]
    for old, new in replacements:
        assert old in site, f"deploy/Caddyfile no longer has {old!r}"
        site = site.replace(old, new)
    options = f"""{{
\tadmin off
\tskip_install_trust
\thttp_port {http}
\thttps_port {https}
\tdefault_bind 127.0.0.1
\tstorage file_system {directory}/caddy-storage
}}

"""
    return options + site


@contextlib.asynccontextmanager
async def caddy(directory: Path, relay_port: int) -> AsyncIterator[tuple[int, int]]:
    """Caddy from deploy/Caddyfile in front of the relay; yields its https and http ports."""
    if CADDY_MISSING:
        pytest.skip("caddy is missing: run `make caddy-deps` (apt-get install caddy)")
    https, http = free_port(), free_port()
    config = directory / "Caddyfile"
    config.write_text(caddy_site(directory, relay_port, https, http), encoding="utf-8")
    argv = [CADDY, "run", "--adapter", "caddyfile", "--config", str(config)]
    log = (directory / "caddy.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=caddy_env(directory)
    )
    try:
        await within(listening([], https, http, proc))
        yield https, http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # Caddy's graceful stop
            try:
                await within(proc.wait())
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


@pytest_asyncio.fixture
async def caddy_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    """The relay from deploy/config.yaml behind Caddy from deploy/Caddyfile, on 127.0.0.1."""
    files = make_tls_files(tmp_path, "127.0.0.1")
    monkeypatch.setenv(relay.AUTH_SECRET_ENV, AUTH_SECRET)
    monkeypatch.setenv(relay.TURN_SECRET_ENV, TURN_SECRET)
    async with (
        relay_process(DEPLOY / "config.yaml") as running,
        caddy(tmp_path, running.port) as (https, http),
    ):
        tls = ssl.create_default_context(cafile=files.ca)
        yield Proxy(running, https, http, tls, tmp_path)


@pytest.mark.parametrize("command", ["validate", "adapt"])
def test_the_shipped_caddyfile_is_valid(tmp_path: Path, command: str) -> None:
    """caddy validate (modules provisioned) and caddy adapt accept deploy/Caddyfile as shipped."""
    if CADDY_MISSING:
        pytest.skip("caddy is missing: run `make caddy-deps` (apt-get install caddy)")
    result = subprocess.run(
        [CADDY, command, "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        check=False,
        env=caddy_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if command == "validate":
        assert "Valid configuration" in result.stdout + result.stderr
        return
    config = json.loads(result.stdout)
    (log,) = [v for k, v in config["logging"]["logs"].items() if k != "default"]
    assert log["writer"]["roll_keep_days"] == 14  # what README's log privacy table says
    fields = log["encoder"]["fields"]
    deleted = {action["parameter"] for action in fields["request>uri"]["actions"]}
    assert deleted == {"session", "token"}


@pytest.mark.asyncio
async def test_caddy_serves_the_page_and_health_over_https_and_hides_metrics(
    caddy_proxy: Proxy,
) -> None:
    """Through Caddy: the page and /health over https with HSTS; /metrics is 404 (local only)."""
    base = await serves_page_and_hides_metrics(caddy_proxy)
    status, headers, _ = await asyncio.to_thread(get, f"{base}/health", caddy_proxy.tls)
    assert status == 200
    assert headers["Referrer-Policy"] == "no-referrer"


@pytest.mark.asyncio
async def test_caddy_redirects_http_and_its_access_log_drops_session_and_token(
    caddy_proxy: Proxy,
) -> None:
    """http is sent to https; the JSON access log keeps the path, not the session id or token."""
    url = f"http://127.0.0.1:{caddy_proxy.http}/?session=secret-session-id&role=patient"
    status, headers, _ = await asyncio.to_thread(get, url)
    assert status == 308
    assert headers["Location"].startswith("https://127.0.0.1")
    base = f"https://127.0.0.1:{caddy_proxy.https}"
    query = "?session=another-session-id&role=patient&token=v1.x.y"
    status, _, _ = await asyncio.to_thread(get, f"{base}/{query}", caddy_proxy.tls)
    assert status == 200
    path = caddy_proxy.directory / "epedicare.access.log"
    for _ in range(int(TIMEOUT / 0.05)):  # Caddy writes the line once the response is sent
        if path.exists() and "role=patient" in path.read_text(encoding="utf-8"):
            break
        await asyncio.sleep(0.05)
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    (entry,) = [e for e in entries if e["request"]["uri"].startswith("/?")]
    assert entry["request"]["uri"] == "/?role=patient"
    assert entry["status"] == 200
    text = path.read_text(encoding="utf-8")
    assert "session" not in text and "v1.x.y" not in text


@pytest.mark.asyncio
async def test_websocket_call_signaling_through_caddy(caddy_proxy: Proxy) -> None:
    """wss:// through Caddy: the upgrade passes, both seats join with tokens, frames cross."""
    await signals_through(caddy_proxy, "clinic-3")
