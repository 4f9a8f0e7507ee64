"""The networks people have: proxies, a corporate CA bundle and a download rate cap.

Read once from the environment at start-up (`NetworkSettings.from_env`) and handed to the
`RegistryClient`; nothing reads the environment behind the caller's back.

* `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` (lower case wins, as in curl) route registry traffic
  through a proxy (ollama/ollama#729); `NO_PROXY` lists hosts that go direct, with curl's rules:
  `example.com` covers it and its subdomains, `.example.com` only subdomains, `*` everything.
  Loopback (`localhost`, `127.0.0.1`, `::1`) always goes direct: a proxy cannot reach our loopback.
* `BERTH_CA_BUNDLE` (else `SSL_CERT_FILE`): a PEM file of extra CAs trusted for TLS, for
  TLS-intercepting proxies and private registries (ollama/ollama#2622). It is added to the system's
  trust store rather than replacing it, so public registries keep working behind the same proxy.
* `BERTH_MAX_DOWNLOAD_RATE` (e.g. `50M`): a cap on all pulls of the server together (registry/rate.py).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import httpx

from berth.registry.errors import InvalidInput
from berth.registry.rate import parse_rate

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name.lower()) or env.get(name.upper())
    return value.strip() if value and value.strip() else None


def _proxy_url(value: str | None, variable: str) -> str | None:
    if value is None:
        return None
    url = value if "://" in value else f"http://{value}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{variable}={value!r} is not an http(s) proxy URL such as http://proxy:3128")
    return url


def _bypass_pattern(host: str) -> str:
    """An httpx mount pattern for one NO_PROXY entry (curl's matching rules)."""
    if "://" in host:
        return host
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # httpx reads `*.example.com` as subdomains only and `*example.com` as the domain and its
        # subdomains: exactly curl's `.example.com` and `example.com`.
        return f"all://*{host}"
    return f"all://[{address}]" if address.version == 6 else f"all://{address}"


@dataclass(frozen=True)
class NetworkSettings:
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    max_download_rate: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "NetworkSettings":
        env = os.environ if env is None else env
        everything = _env(env, "ALL_PROXY")
        bundle = env.get("BERTH_CA_BUNDLE") or env.get("SSL_CERT_FILE")
        if bundle and not Path(bundle).is_file():
            raise InvalidInput(f"the CA bundle {bundle!r} (BERTH_CA_BUNDLE or SSL_CERT_FILE) is not a file")
        no_proxy = tuple(h.strip() for h in (_env(env, "NO_PROXY") or "").split(",") if h.strip())
        return cls(http_proxy=_proxy_url(_env(env, "HTTP_PROXY") or everything, "HTTP_PROXY"),
                   https_proxy=_proxy_url(_env(env, "HTTPS_PROXY") or everything, "HTTPS_PROXY"),
                   no_proxy=no_proxy, ca_bundle=Path(bundle) if bundle else None,
                   max_download_rate=parse_rate(env.get("BERTH_MAX_DOWNLOAD_RATE")))

    def ssl_context(self) -> ssl.SSLContext:
        """The system trust store plus the configured bundle."""
        context = ssl.create_default_context()
        if self.ca_bundle is not None:
            try:
                context.load_verify_locations(cafile=str(self.ca_bundle))
            except (OSError, ssl.SSLError) as exc:
                raise InvalidInput(f"cannot load the CA bundle {self.ca_bundle}: {exc}") from None
        return context

    def mounts(self, verify: ssl.SSLContext, limits: httpx.Limits) -> dict[str, httpx.BaseTransport | None]:
        """httpx mounts: a proxy transport per scheme, and `None` (go direct) for bypassed hosts."""
        if "*" in self.no_proxy:
            return {}
        mounts: dict[str, httpx.BaseTransport | None] = {}
        for scheme, proxy in (("http", self.http_proxy), ("https", self.https_proxy)):
            if proxy is not None:
                # The bundle vouches for an https:// proxy's own certificate too (a corporate proxy's
                # private CA), not only for the registries behind it.
                tls_to_proxy = verify if proxy.startswith("https://") else None
                mounts[f"{scheme}://"] = httpx.HTTPTransport(proxy=httpx.Proxy(proxy, ssl_context=tls_to_proxy),
                                                             verify=verify, limits=limits)
        if mounts:
            for host in (*LOOPBACK_HOSTS, *self.no_proxy):
                mounts[_bypass_pattern(host)] = None
        return mounts
