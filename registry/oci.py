"""The HTTP client of the OCI distribution API that pull and push speak through.

Why not the `oras` package: it has no timeouts, one bearer token per client
(scope-strict registries fail a push), retries only on 500 and ignores `Retry-After`, cannot send
`Range`, returns parsed manifests instead of their bytes, reads whole blobs into memory on upload and
does not resume. Overriding all of that leaves nothing of it, so this module sits directly on httpx;
oras is kept as a second, independent client in the tests (tests/registry/test_oras.py).

Why synchronous: pull and push run on worker threads. A blob is fetched as several ranged
streams at once, and each thread spends its time in `recv`, `pwrite` and sha256, all of which
release the GIL, so streams really run in parallel; on one event loop they would share one core.
`httpx.Client` is safe to share between threads, and the token cache here has its own lock.

Security rules enforced for every request:
* a bearer realm must be on the registry's own host and port (CVE-2025-51471: otherwise the token
  request and any credentials would go to whoever wrote the challenge);
* redirects are followed by hand, only to http(s), never from https down to http, and the
  `Authorization` header is dropped as soon as the host changes (blob storage gets no credentials);
* every body read into memory is bounded; blob bodies are streamed raw (no content decoding), so a
  gzip bomb is just bytes that fail their digest;
* `insecure` means plain http for the requests of that one pull or push, nothing global.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from berth.registry import bounded_json
from berth.registry.credentials import Credential
from berth.registry.digest import Digest
from berth.registry.errors import BerthError, NotFound, TooLarge
from berth.registry.names import ModelName
from berth.registry.network import NetworkSettings
from berth.registry.ollama_auth import RequestSigner

USER_AGENT = "berth/0.1 (registry client)"
# Tokens, error bodies and upload status answers are tiny; this bounds what a hostile peer can make
# us hold in memory.
MAX_SMALL_BODY = 1024 * 1024
MAX_REDIRECTS = 10
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class CredentialSource(Protocol):
    """Where logins come from: `CredentialStore`, or one trial credential during `berth login`."""

    def get(self, registry: str) -> Credential | None: ...


class RegistryError(BerthError):
    """A registry answered with an error, or could not be reached."""


class RegistryUnauthorized(RegistryError):
    """The registry refused our credentials (or we had none)."""


class RegistryRefused(RegistryError):
    """We refused to do what the registry asked because it would be unsafe."""


class RegistryNotFound(NotFound):
    """The registry has no such manifest or blob."""


@dataclass(frozen=True)
class Timeouts:
    """Per-request limits. `read` is the longest silence tolerated inside a body: a stall detector."""

    connect: float = 10.0
    read: float = 30.0
    write: float = 30.0
    pool: float = 60.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 10.0
    # A registry asking us to wait longer than this is treated as down rather than obeyed.
    max_retry_after: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Exponential with jitter, so many clients retrying do not stampede in step."""
        delay = min(self.base_delay * (2 ** attempt), self.max_delay)
        return delay * random.uniform(0.5, 1.5)

    def delay_for(self, response: httpx.Response, attempt: int) -> float:
        after = retry_after_seconds(response.headers.get("retry-after"))
        if after is None:
            return self.backoff(attempt)
        return min(after, self.max_retry_after)


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Repository:
    """One repository on one registry: where URLs for a model name point."""

    host: str
    path: str
    insecure: bool = False

    @classmethod
    def of(cls, name: ModelName, insecure: bool = False) -> "Repository":
        return cls(name.host.lower(), name.repository, insecure or name.scheme == "http")

    @property
    def root(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.host}/"

    @property
    def origin(self) -> str:
        """scheme://host:port of the registry: the only place its credentials and tokens go."""
        return _origin(self.root)

    @property
    def base(self) -> str:
        return f"{self.root}v2/{self.path}"

    def manifest_url(self, reference: str) -> str:
        return f"{self.base}/manifests/{reference}"

    def blob_url(self, digest: Digest) -> str:
        return f"{self.base}/blobs/{digest}"

    def uploads_url(self, **query: str) -> str:
        return f"{self.base}/blobs/uploads/" + (f"?{urlencode(query)}" if query else "")

    def absolute(self, location: str) -> str:
        """Resolve a `Location` the registry gave (often relative) against the registry. It may
        name another host (which then gets no credentials), but not plain http from https."""
        return _followed(self.root, location, f"{self.host} named as its upload location")

    def scope(self, *actions: str) -> str:
        return f"repository:{self.path}:{','.join(actions)}"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, header: str) -> "Challenge":
        scheme, _, rest = header.strip().partition(" ")
        return cls(scheme.lower(), _auth_params(rest))


def _auth_params(text: str) -> dict[str, str]:
    """Parse `key="value", key=value` pairs properly (quoted commas and escapes included)."""
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lower()
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            value = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
            i += 1
            params[key] = "".join(value)
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            params[key] = text[i:end].strip()
            i = end
    return params


def read_bounded(response: httpx.Response, limit: int, what: str) -> bytes:
    """Read a (streamed) body whole, refusing more than `limit` bytes after decoding. A gzip or
    deflate body is inflated here, never more than the bound at a time: httpx's own decoder inflates
    each network read whole, and 64 KiB of a gzip bomb is 64 MiB."""
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        response.close()
        raise TooLarge(f"{what} is {declared} bytes, more than the {limit}-byte limit")
    chunks: list[bytes] = []
    total = 0
    try:
        inflate = _Inflater.for_encoding(response.headers.get("content-encoding", ""), what)
        for raw in response.iter_raw():
            for chunk in inflate.feed(raw, limit + 1 - total) if inflate else (raw,):
                total += len(chunk)
                if total > limit:
                    raise TooLarge(f"{what} is larger than the {limit}-byte limit; refusing it")
                chunks.append(chunk)
    except zlib.error as exc:
        raise RegistryError(f"{what} could not be decoded: {exc}") from None
    except httpx.TransportError as exc:
        raise RegistryError(f"reading {what} failed: {describe(exc)}") from None
    finally:
        response.close()
    return b"".join(chunks)


class _Inflater:
    """gzip (concatenated members too) or deflate, inflated at most `room` bytes per step."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._state = zlib.decompressobj(wbits)

    @classmethod
    def for_encoding(cls, header: str, what: str) -> "_Inflater | None":
        encoding = header.strip().lower()
        if encoding in ("", "identity"):
            return None
        if encoding in ("gzip", "x-gzip"):
            return cls(16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            return cls(zlib.MAX_WBITS)
        raise RegistryError(f"{what} came with Content-Encoding {header!r}, which Berth does not decode")

    def feed(self, data: bytes, room: int) -> Iterator[bytes]:
        """Inflate `data`, yielding pieces of at most `room` bytes in all; the caller stops the
        iteration once the bound is passed, so no more than that is ever held."""
        while data:
            piece = self._state.decompress(data, max(1, room))
            room -= len(piece)
            yield piece
            data = self._state.unconsumed_tail
            if self._state.eof:  # a gzip member ended: whatever follows is the next one
                data = data or self._state.unused_data
                self._state = zlib.decompressobj(self._wbits)


def describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        # Behind a TLS-intercepting proxy or with a private CA this is the usual cause.
        text += " (if a proxy or private CA signs this certificate, point BERTH_CA_BUNDLE at its PEM file)"
    return text


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or ''}:{parts.port or (443 if parts.scheme == 'https' else 80)}".lower()


class RegistryClient:
    """Authenticated, retrying, bounded requests to OCI registries. One per app (or per CLI call)."""

    def __init__(self, credentials: CredentialSource | None = None, timeouts: Timeouts = Timeouts(),
                 retry: RetryPolicy = RetryPolicy(), user_agent: str = USER_AGENT,
                 network: NetworkSettings = NetworkSettings(), signer: RequestSigner | None = None) -> None:
        """`network`: proxies and CA bundle (registry/network.py); `signer`: the user's key, for
        registries whose token endpoint wants Ollama's signed requests (registry/ollama_auth.py)."""
        self.credentials = credentials
        self.timeouts = timeouts
        self.retry = retry
        self.network = network
        self.signer = signer
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        verify = network.ssl_context()
        # follow_redirects=False: redirects are followed by hand (see module docstring);
        # trust_env=False: proxies and CAs come from `network`, read once and explicitly, and no
        # netrc is picked up behind the user's back.
        self._http = httpx.Client(follow_redirects=False, trust_env=False, timeout=timeouts.httpx(),
                                  headers={"User-Agent": user_agent}, limits=limits, verify=verify,
                                  mounts=network.mounts(verify, limits))
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], str] = {}
        # (host, scope) -> the challenge it answered with, so the next request sends credentials up front.
        self._challenges: dict[tuple[str, str], Challenge] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------------

    def request(self, method: str, url: str, repo: Repository, scope: str, *,
                headers: Mapping[str, str] | None = None, content: bytes | None = None,
                retry: bool = True, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        """Send a request with auth, retries and safe redirects; return the (streamed) response.

        The caller must close the response (or read it with `read_bounded`). A status outside `ok`
        raises: 404 RegistryNotFound, 401/403 RegistryUnauthorized, others RegistryError with the
        registry's own message.
        """
        attempts = self.retry.attempts if retry else 1
        authenticated_again = False
        attempt = 0
        while True:
            try:
                response = self._send(method, url, repo, scope, headers or {}, content)
            except httpx.TransportError as exc:
                attempt += 1
                if attempt >= attempts:
                    raise RegistryError(f"{method} {_redact(url)} failed after {attempt} attempts: "
                                        f"{describe(exc)}; check that the registry is reachable and "
                                        "retry") from None
                time.sleep(self.retry.backoff(attempt - 1))
                continue
            status = response.status_code
            # Only the registry's own challenge is answered with its credentials: a 401 from
            # blob storage or an upload host elsewhere is that host's business.
            if status == 401 and not authenticated_again and _origin(str(response.url)) == repo.origin:
                challenge = response.headers.get("www-authenticate", "")
                response.close()
                self._authenticate(repo, scope, Challenge.parse(challenge))
                authenticated_again = True
                continue
            if status in RETRY_STATUSES and attempt + 1 < attempts:
                delay = self.retry.delay_for(response, attempt)
                response.close()
                attempt += 1
                time.sleep(delay)
                continue
            if status in ok:
                return response
            raise self._status_error(method, url, repo, response)

    def _send(self, method: str, url: str, repo: Repository, scope: str, headers: Mapping[str, str],
              content: bytes | None) -> httpx.Response:
        current, current_method, body = url, method, content
        auth = self._authorization(repo, scope)
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            # Credentials go only to the registry itself: not to a host it redirected to, nor to
            # one it named as an upload's Location.
            if auth and _origin(current) == repo.origin:
                sent["Authorization"] = auth
            request = self._http.build_request(current_method, current, headers=sent, content=body)
            response = self._http.send(request, stream=True)
            location = response.headers.get("location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                return response
            # Upload answers (202/201) carry Location too; only 3xx are redirects, handled here.
            response.close()
            target = _followed(current, location, "the registry redirected to")
            if response.status_code == 303:
                current_method, body = "GET", None
            current = target
        raise RegistryError(f"{method} {_redact(url)}: more than {MAX_REDIRECTS} redirects")

    def _status_error(self, method: str, url: str, repo: Repository, response: httpx.Response) -> BerthError:
        status = response.status_code
        try:
            detail = _error_message(read_bounded(response, MAX_SMALL_BODY, "error body"))
        except BerthError:
            detail = ""
        where = f"{method} {_redact(url)}"
        if status == 404:
            return RegistryNotFound(f"{where}: not found on {repo.host}" + (f" ({detail})" if detail else ""))
        if status in (401, 403):
            return RegistryUnauthorized(
                f"{repo.host} refused access to {repo.path} ({status}{': ' + detail if detail else ''}); "
                f"run `berth login {repo.host}` with an account that may access it")
        return RegistryError(f"{where}: {status}" + (f": {detail}" if detail else ""))

    # -- authentication ------------------------------------------------------------------------------

    def _authorization(self, repo: Repository, scope: str) -> str | None:
        with self._lock:
            challenge = self._challenges.get((repo.host, scope)) or self._challenges.get((repo.host, ""))
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            credential = self._credential(repo)
            return credential.basic_header() if credential else None
        key = self._token_key(challenge, scope)
        with self._lock:
            token = self._tokens.get(key)
        return f"Bearer {token}" if token else None

    def _credential(self, repo: Repository) -> Credential | None:
        return self.credentials.get(repo.host) if self.credentials is not None else None

    @staticmethod
    def _token_key(challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return (challenge.params.get("realm", ""), challenge.params.get("service", ""),
                challenge.params.get("scope") or scope)

    def _authenticate(self, repo: Repository, scope: str, challenge: Challenge) -> None:
        if challenge.scheme == "basic":
            if self._credential(repo) is None:
                raise RegistryUnauthorized(f"{repo.host} requires a login; run `berth login {repo.host}`")
            with self._lock:
                self._challenges[(repo.host, "")] = challenge
            return
        if challenge.scheme != "bearer":
            raise RegistryUnauthorized(f"{repo.host} asked for unsupported authentication "
                                       f"{challenge.scheme!r}; only Basic and Bearer are supported")
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryRefused(f"{repo.host} sent an invalid token realm {realm!r}")
        expected = repo.origin
        actual = _origin(realm)
        if actual != expected or "@" in parts.netloc:
            raise RegistryRefused(
                f"refusing token realm host {actual!r}: it does not match the registry host {expected!r} "
                "(a registry may only send tokens requests to itself)")
        if parts.scheme == "http" and not repo.insecure:
            raise RegistryRefused(f"{repo.host} asked for a token over plain http; use https or --insecure")
        key = self._token_key(challenge, scope)
        headers = {}
        credential = self._credential(repo)
        if credential is None and self.signer is not None and self.signer.covers(repo.host):
            # Ollama's registry: the token request is signed with the user's key.
            token_url = self.signer.token_url(realm, key[1], key[2])
            headers["Authorization"] = self.signer.authorization("GET", token_url)
        else:
            query = {"service": key[1], "scope": key[2]} if key[1] else {"scope": key[2]}
            separator = "&" if parts.query else "?"
            token_url = f"{realm}{separator}{urlencode(query)}"
            if credential is not None:
                headers["Authorization"] = credential.basic_header()
        try:
            # Streamed and read through the bound: a compressed body is refused as it inflates.
            response = self._http.send(self._http.build_request("GET", token_url, headers=headers), stream=True)
        except httpx.TransportError as exc:
            raise RegistryError(f"token request to {repo.host} failed: {describe(exc)}") from None
        if response.status_code in (401, 403):
            response.close()
            raise RegistryUnauthorized(f"{repo.host} refused to issue a token for {key[2]}; "
                                       f"run `berth login {repo.host}`")
        if response.status_code != 200:
            response.close()
            raise RegistryError(f"token request to {repo.host} answered {response.status_code}")
        body = read_bounded(response, MAX_SMALL_BODY, "token response")
        try:
            doc = bounded_json.decode(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token response from {repo.host} had no token")
        with self._lock:
            self._tokens[key] = token
            self._challenges[(repo.host, scope)] = challenge

    # -- conveniences ----------------------------------------------------------------------------------

    @contextmanager
    def stream(self, method: str, url: str, repo: Repository, scope: str, **kwargs: object) -> Iterator[httpx.Response]:
        response = self.request(method, url, repo, scope, **kwargs)  # type: ignore[arg-type]
        try:
            yield response
        finally:
            response.close()

    def ping(self, repo: Repository) -> None:
        """`GET /v2/` with credentials: proves a login works (used by `berth login`)."""
        url = f"{'http' if repo.insecure else 'https'}://{repo.host}/v2/"
        with self.stream("GET", url, repo, ""):
            pass


def _error_message(body: bytes) -> str:
    """The registry's own words: OCI `{"errors":[{"code","message"}]}` or a short text."""
    try:
        doc = bounded_json.decode(body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors:
            return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                             for e in errors if isinstance(e, dict))[:500]
    except ValueError:
        pass
    return body.decode("utf-8", errors="replace").strip()[:200]


def _followed(base: str, location: str, what: str) -> str:
    """`location` resolved against `base`: where a registry sends us next (a redirect, an upload's
    Location). Only http(s), and never plain http from https."""
    url = urljoin(base, location)
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise RegistryRefused(f"{what} {_redact(url)}, a {scheme!r} URL; only http(s) is followed")
    if scheme == "http" and urlsplit(base).scheme == "https":
        raise RegistryRefused(f"{what} {_redact(url)}, plain http after https; refusing the downgrade "
                              "(only https is followed from an https registry)")
    return url


def _redact(url: str) -> str:
    """URLs in messages lose their query: presigned storage URLs carry credentials there."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
