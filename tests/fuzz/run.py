"""The fuzzing driver: sends cases from tests/fuzz/strategies.py to a live Berth server, judges
every answer, watches the server's log, and reports.

A finding is:
- a 5xx answer, or no answer at all (the connection dropped, or it hung past the timeout);
- a 4xx answer whose body is not the API's error shape (Ollama `{"error": "..."}`, OpenAI
  `{"error": {"message": ...}}`, OCI `{"errors": [...]}`);
- a stream or error message mentioning an internal failure ("internal error", a traceback, a
  RecursionError, a runner that was killed or exited), a malformed or unfinished stream;
- a 2xx answer to a field given a JSON type it does not take, or to a create request naming a
  file on the server; an answer quoting /etc/passwd;
- a server log line saying a runner died or an unexpected error happened;
- a server that no longer generates at the end.

Only 127.0.0.1 is ever contacted: the server under test, and a stub registry this module starts on
loopback for pulls and pushes (it answers 404 to everything, so they fail at once).
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
import unittest
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.fuzz.strategies import DEAD_REGISTRY, DEFAULT_MODEL, Case, Known, cases, explicit_cases

REQUEST_TIMEOUT = 60.0
MAX_READ = 4 * 1024 * 1024  # bytes of an answer read before hanging up (a model's weights are 250 MB)
MAX_JSON_BODY = 64 * 1024 * 1024
BAD_MESSAGE = re.compile(r"internal error|Traceback|RecursionError|runner\b.*\b(killed|exited)|(killed|exited)\b.*\brunner",
                         re.IGNORECASE | re.DOTALL)
LOG_PATTERNS = ("killed by signal", "exited unexpectedly", "unexpected error", "Traceback", "RecursionError",
                "error while streaming", "Exception in ASGI application")
RUNNER_DEATH = ("killed by signal", "exited unexpectedly")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ ")
PLAIN_ANSWERS = {404: b"404 page not found", 405: b"405 method not allowed"}
LOOPBACK = "127.0.0.1"


# -- the stub registry ---------------------------------------------------------------------------------


class _StubHandler(BaseHTTPRequestHandler):
    """Answers `GET /v2/` with 200 and everything else with an OCI 404, at once."""

    hits: Counter[str] = Counter()

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = self.headers.get("content-length")
        if length and length.isdigit():
            self.rfile.read(min(int(length), 64 * 1024 * 1024))
        type(self).hits[self.command] += 1
        if self.command == "GET" and self.path.rstrip("/") == "/v2":
            status, body = 200, b"{}"
        else:
            status = 404
            body = json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": "stub registry: nothing here"}]}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("docker-distribution-api-version", "registry/2.0")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _answer


class StubRegistry:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer((LOOPBACK, 0), _StubHandler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fuzz-stub-registry", daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- answers and findings ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None
    content_type: str
    body: bytes
    seconds: float
    truncated: bool = False  # more than MAX_READ bytes: the rest was not read
    cut: bool = False  # the case's cap passed: we hung up
    error: str | None = None  # no (complete) answer: the transport's error

    def text(self, limit: int = 500) -> str:
        shown = self.body[:limit].decode("utf-8", errors="backslashreplace")
        more = f" ... ({len(self.body)} bytes)" if len(self.body) > limit else ""
        head = f"{self.status} {self.content_type}".strip() if self.status is not None else "no status"
        return f"{head}: {shown}{more}" + (f"  [transport: {self.error}]" if self.error else "")


@dataclass
class Finding:
    kind: str
    detail: str
    case: Case
    answer: Answer | None
    previous: Case | None = None  # the request before (a log line may belong to it)
    count: int = 1

    def signature(self) -> tuple[str, str, str]:
        detail = re.sub(r"\d+", "N", self.detail)[:120]
        return self.kind, self.case.endpoint, detail

    def render(self, index: int) -> str:
        lines = [f"[{index}] {self.kind}: {self.detail}" + (f"  (x{self.count})" if self.count > 1 else ""),
                 "    request: " + self.case.describe()]
        if self.answer is not None:
            lines.append("    answer: " + self.answer.text())
        if self.previous is not None and self.kind.startswith("log"):
            lines.append("    (request before it: " + self.previous.describe(200).replace("\n", " ") + ")")
        return "\n".join(lines)


@dataclass
class Report:
    seconds: float = 0.0
    sent: int = 0
    explicit: int = 0
    skipped: int = 0
    unsendable: int = 0  # refused by the HTTP client itself (a URL or header it cannot send)
    statuses: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # error messages of answers that were fine
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stub_hits: int = 0
    seed: int | None = None
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def timed(self, seconds: float, case: Case) -> None:
        self.slowest.append((seconds, f"{case.method} {case.path} [{case.endpoint}: {case.label[:100]}]"))
        self.slowest.sort(key=lambda item: -item[0])
        del self.slowest[5:]

    def add(self, finding: Finding) -> None:
        known = self.findings.get(finding.signature())
        if known is None:
            self.findings[finding.signature()] = finding
        else:
            known.count += 1

    def summary(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items(), key=lambda kv: (-kv[1], kv[0])))
        endpoints = ", ".join(f"{k} {v}" for k, v in sorted(self.endpoints.items(), key=lambda kv: -kv[1]))
        lines = [
            "=== Berth API fuzz summary ===",
            f"requests: {self.sent} in {self.seconds:.1f} s ({self.explicit} fixed cases, {self.sent - self.explicit} "
            f"generated); not sent: {self.skipped} by the safety guards, {self.unsendable} that httpx cannot send; "
            f"stub registry hits: {self.stub_hits}",
            f"answers by status: {statuses}",
            f"generated cases drawn with @seed({self.seed})" if self.seed is not None else "no generated cases",
            f"requests by endpoint: {endpoints}",
        ]
        if self.refusals:
            lines.append(f"distinct error messages in accepted answers: {len(self.refusals)}; most common:")
            lines += [f"    {n:5d}  {msg}" for msg, n in self.refusals.most_common(12)]
        lines.append("slowest requests: " + "; ".join(f"{s:.1f} s {what}" for s, what in self.slowest))
        lines += [f"note: {note}" for note in self.notes]
        total = sum(f.count for f in self.findings.values())
        lines.append(f"findings: {len(self.findings)} distinct ({total} in all)")
        return "\n".join(lines)

    def findings_text(self) -> str:
        return "\n".join(f.render(i + 1) for i, f in enumerate(self.findings.values()))


class _TimeUp(unittest.SkipTest):
    """Ends the generated phase at the deadline. A skip exception, because Hypothesis re-raises
    those at once, without retrying or shrinking; the driver catches it."""


# -- the driver ----------------------------------------------------------------------------------------


def passwd_lines() -> list[str]:
    try:
        lines = Path("/etc/passwd").read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if len(line) >= 10]


def _decoded(body: bytes | None) -> Any:
    if body is None:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _model_host(text: str) -> str | None:
    """The registry host a model name would be pulled from or pushed to; None if not a valid name."""
    from berth.registry.names import ModelName

    try:
        return ModelName.parse(text).host.lower()
    except Exception:  # noqa: BLE001 - an invalid name is refused by the server too
        return None


class Fuzzer:
    def __init__(self, url: str, log_path: Path | str | None = None, out: TextIO = sys.stdout,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or parts.port is None:
            raise ValueError(f"refusing to fuzz {url!r}: only http://127.0.0.1:<port> is allowed")
        self.url = f"http://{LOOPBACK}:{parts.port}"
        self.log_path = Path(log_path) if log_path else None
        self.log_offset = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        self.out = out
        self.timeout = timeout
        self.report = Report()
        self.passwd = passwd_lines()
        # The last octet of the loopback address requests come from: not 127.0.0.1, so that the crash
        # guard's refusals of a client whose requests killed runners never fall on other clients.
        self.source = 2
        self.client = self._client()
        self.previous: Case | None = None
        self.stub: StubRegistry | None = None
        self.known: Known | None = None

    def _client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{self.source}")
        return httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport, trust_env=False,
                            follow_redirects=False)

    def _next_source(self) -> None:
        """Send from another loopback address: the crash guard refuses a client (by address) whose
        requests were in flight at several runner deaths; the fuzzing goes on as a new client."""
        self.client.close()
        self.source = self.source % 250 + 2
        self.client = self._client()
        self.report.notes.append(f"a runner died: requests now come from 127.0.0.{self.source}")

    # -- setup and teardown ----------------------------------------------------------------------------

    def prepare(self) -> Known:
        self.stub = StubRegistry()
        answer = self.client.get("/v2/library/gemma3/manifests/270m", headers={
            "accept": "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"})
        answer.raise_for_status()
        manifest = answer.json()
        layers = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
        push_model = f"{self.stub.host}/library/fuzz-push:latest"
        copied = self.client.post("/api/copy", json={"source": DEFAULT_MODEL, "destination": push_model})
        if copied.status_code != 200:
            self.report.notes.append(f"could not make the push model: {copied.status_code} {copied.text[:200]}")
        models_layer = next((d for d, layer in zip(layers[1:], manifest["layers"])
                             if layer["mediaType"].endswith(".model")), layers[-1])
        ordered = (models_layer,) + tuple(d for d in layers if d != models_layer)
        self.known = Known(self.stub.host, answer.headers.get("docker-content-digest", ""), ordered, push_model)
        return self.known

    def cleanup(self) -> None:
        """Delete the models and revoke the keys the run made (all named fuzz-...)."""
        client = self._fresh_client()
        try:
            for model in client.get("/api/tags").json().get("models", []):
                name = model.get("name", "")
                if "fuzz" in name.casefold() and "gemma" not in name.casefold():
                    client.request("DELETE", "/api/delete", json={"model": name})
            keys = client.get("/api/keys")
            if keys.status_code == 200:
                for key in keys.json().get("keys", []):
                    name = key.get("name")
                    if isinstance(name, str) and name.casefold().startswith("fuzz-") and not key.get("revoked_at"):
                        client.request("DELETE", "/api/keys", json={"name": name})
        except httpx.HTTPError as exc:
            self.report.notes.append(f"cleanup failed: {exc!r}")
        finally:
            client.close()
        if self.stub is not None:
            self.report.stub_hits = sum(_StubHandler.hits.values())
            self.stub.close()

    def _fresh_client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{self.source % 250 + 2}")
        return httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport, trust_env=False)

    # -- one request -----------------------------------------------------------------------------------

    def refusal(self, case: Case) -> str | None:
        """Why a case must not be sent: it could reach beyond loopback or touch the default model."""
        doc = _decoded(case.body)
        if not isinstance(doc, dict):
            return None
        assert self.known is not None
        if case.guard == "transfer":
            allowed = {self.known.registry.lower(), DEAD_REGISTRY}
            for key in ("model", "name"):
                value = doc.get(key)
                if isinstance(value, str):
                    host = _model_host(value)
                    if host is not None and host not in allowed:
                        return f"{key} {value!r} names registry {host}"
        if case.guard in ("delete", "copy", "create"):
            keys = {"delete": ("model", "name"), "copy": ("destination",), "create": ("model", "name")}[case.guard]
            for key in keys:
                value = doc.get(key)
                if isinstance(value, str) and "gemma" in value.casefold():
                    return f"{key} {value!r} could name the default model"
        if case.guard == "keys":
            value = doc.get("name")
            if isinstance(value, str) and value and not value.casefold().startswith("fuzz-"):
                return f"name {value!r} could be a real key"
        return None

    def send(self, case: Case) -> Answer:
        cap = case.cap
        timeout = httpx.Timeout(min(cap, self.timeout) if cap else self.timeout, connect=10.0)
        content: Any = case.body
        if case.chunked and case.body is not None:
            half = len(case.body) // 2
            content = iter([case.body[:half], case.body[half:]])
        status: int | None = None
        content_type = ""
        chunks: list[bytes] = []
        started = time.monotonic()
        try:
            with self.client.stream(case.method, case.path, content=content, headers=list(case.headers),
                                    timeout=timeout) as response:
                status = response.status_code
                content_type = response.headers.get("content-type", "")
                size = 0
                for chunk in response.iter_raw():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_READ:
                        return Answer(status, content_type, b"".join(chunks), time.monotonic() - started, truncated=True)
                    if cap and time.monotonic() - started > cap:
                        return Answer(status, content_type, b"".join(chunks), time.monotonic() - started, cut=True)
            return Answer(status, content_type, b"".join(chunks), time.monotonic() - started)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeError) as exc:
            return Answer(None, "", b"", 0.0, error=f"unsendable: {type(exc).__name__}: {exc}")
        except httpx.TimeoutException as exc:
            elapsed = time.monotonic() - started
            if cap:
                return Answer(status, content_type, b"".join(chunks), elapsed, cut=True)
            return Answer(status, content_type, b"".join(chunks), elapsed, error=f"{type(exc).__name__} after {elapsed:.0f} s")
        except httpx.HTTPError as exc:
            return Answer(status, content_type, b"".join(chunks), time.monotonic() - started,
                          error=f"{type(exc).__name__}: {exc}")

    def execute(self, case: Case) -> None:
        why = self.refusal(case)
        if why is not None:
            self.report.skipped += 1
            return
        answer = self.send(case)
        if answer.error is not None and answer.error.startswith("unsendable:"):
            self.report.unsendable += 1  # the client library refuses it: it never reached the server
            return
        self.report.timed(answer.seconds, case)
        self.report.sent += 1
        self.report.endpoints[case.endpoint] += 1
        if answer.cut:
            self.report.statuses["hung up at cap"] += 1
        elif answer.status is None:
            self.report.statuses["no answer"] += 1
        else:
            self.report.statuses[str(answer.status)] += 1
        for kind, detail in self.judge(case, answer):
            self.report.add(Finding(kind, detail, case, answer))
        lines = self.scan_log()
        if lines:
            self.report.add(Finding("log", " | ".join(lines)[:600], case, answer, self.previous))
        if any(p in line for line in lines for p in RUNNER_DEATH):
            self._next_source()
        self.previous = case

    # -- judging ---------------------------------------------------------------------------------------

    def judge(self, case: Case, answer: Answer) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = answer.body.decode("utf-8", errors="replace")
        leaked = [line for line in self.passwd if line in text]
        if leaked or (case.endpoint == "create" and "root:" in text):
            out.append(("leak", f"the answer quotes /etc/passwd: {(leaked or ['root:'])[0][:60]}"))
        if answer.error is not None:
            if case.body is not None and len(case.body) > MAX_JSON_BODY and answer.status in (None, 400, 413):
                return out  # an oversized body may be refused before it is all sent
            out.append(("no answer", answer.error))
            return out
        status = answer.status
        if status is None:
            return out  # hung up at the cap before any answer began
        if status >= 500:
            out.append(("5xx", f"{status} {self._message(case, answer) or text[:120]}"))
            return out
        if 400 <= status < 500:
            if case.method == "HEAD" or answer.cut:
                return out
            if PLAIN_ANSWERS.get(status) == answer.body.strip():
                return out
            message = self._message(case, answer)
            if message is None:
                out.append(("error shape", f"{status} answer without a {case.api} error body"))
            else:
                self._refused(message, out)
            return out
        if status >= 300:
            out.append(("unexpected status", str(status)))
            return out
        if answer.truncated or case.method == "HEAD":
            return out
        accepted = True
        if "ndjson" in answer.content_type:
            accepted = self._ndjson(case, answer, out)
        elif "event-stream" in answer.content_type:
            accepted = self._sse(case, answer, out)
        elif "json" in answer.content_type:
            doc = _decoded(answer.body)
            if doc is None and not answer.cut:
                out.append(("bad JSON", "2xx answer that is not JSON"))
            elif isinstance(doc, dict) and "error" in doc:
                out.append(("error in 2xx", f"{status} answer carries an error: {str(doc['error'])[:160]}"))
                accepted = False
        if accepted and not answer.cut:
            if case.wrong_type:
                out.append(("wrong type accepted", case.label.split(" = ")[0]))
            if case.server_path:
                out.append(("server path accepted", "a create request naming a file on the server succeeded"))
        return out

    def _message(self, case: Case, answer: Answer) -> str | None:
        """The error message of an error answer in its API's shape; None if the shape is wrong."""
        doc = _decoded(answer.body)
        if not isinstance(doc, dict):
            return None
        if case.api == "oci":
            errors = doc.get("errors")
            if isinstance(errors, list) and errors and all(isinstance(e, dict) and "code" in e and "message" in e
                                                           for e in errors):
                return str(errors[0]["message"])
            return None
        error = doc.get("error")
        if case.api == "openai":
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return error["message"]
            return None
        return error if isinstance(error, str) and error else None

    def _refused(self, message: str, out: list[tuple[str, str]]) -> None:
        if BAD_MESSAGE.search(message):
            out.append(("internal error message", message[:200]))
        else:
            self.report.refusals[re.sub(r"\d+", "N", message)[:110]] += 1

    def _ndjson(self, case: Case, answer: Answer, out: list[tuple[str, str]]) -> bool:
        lines = [line for line in answer.body.split(b"\n") if line.strip()]
        events: list[Any] = []
        for index, line in enumerate(lines):
            doc = _decoded(line)
            if not isinstance(doc, dict):
                if not (answer.cut and index == len(lines) - 1):
                    out.append(("bad stream", f"NDJSON line {index} is not a JSON object: {line[:100]!r}"))
                return False
            events.append(doc)
        errors = [e for e in events if "error" in e]
        for event in errors:
            self._refused(str(event["error"]), out)
        if errors or answer.cut:
            return not errors
        last = events[-1] if events else {}
        if case.endpoint in ("generate", "chat"):
            if last.get("done") is not True and "_debug_info" not in last:  # render-only answers as Ollama does
                out.append(("unfinished stream", "the NDJSON stream ended without done: true or an error"))
        elif last.get("status") != "success":
            out.append(("unfinished stream", f"the NDJSON stream ended with {str(last)[:100]}, not success or an error"))
        return True

    def _sse(self, case: Case, answer: Answer, out: list[tuple[str, str]]) -> bool:
        done = False
        errored = False
        for line in answer.body.decode("utf-8", errors="replace").split("\n"):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            event = _decoded(data.encode())
            if not isinstance(event, dict):
                out.append(("bad stream", f"SSE event is not a JSON object: {data[:100]!r}"))
                return False
            if "error" in event:
                errored = True
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else None
                if not isinstance(message, str):
                    out.append(("error shape", f"SSE error event not in OpenAI's shape: {data[:100]}"))
                else:
                    self._refused(message, out)
        if not done and not errored and not answer.cut:
            out.append(("unfinished stream", "the SSE stream ended without [DONE] or an error"))
        return not errored

    def scan_log(self) -> list[str]:
        """New log lines that show a failure: the line and, for a traceback, the exception's last line."""
        if self.log_path is None:
            return []
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                data = log.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.log_offset += end
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        found: list[str] = []
        index = 0
        while index < len(lines):
            line = lines[index]
            if any(p in line for p in LOG_PATTERNS):
                shown = line.strip()
                following = index + 1
                if "Traceback" in line or (following < len(lines) and lines[following].startswith("Traceback")):
                    while following < len(lines) and not EXCEPTION_LINE.match(lines[following]):
                        following += 1
                    if following < len(lines):
                        shown += " -> " + lines[following].strip()
                    index = following
                found.append(TIMESTAMP.sub("", shown)[:300])
            index += 1
        return found

    # -- the run ---------------------------------------------------------------------------------------

    def run_generated(self, deadline: float) -> None:
        assert self.known is not None

        self.report.seed = random.SystemRandom().getrandbits(64)

        @seed(self.report.seed)  # an explicit seed: Hypothesis then prints no reproduction hint at the deadline
        @settings(max_examples=10**9, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(cases(self.known))
        def fuzz_one(case: Case) -> None:
            if time.monotonic() >= deadline:
                raise _TimeUp()
            self.execute(case)

        try:
            fuzz_one()
        except _TimeUp:
            pass

    def final_check(self) -> None:
        """The server still generates: from a new address (so the crash guard's memory of this
        run's address does not count), and from the run's own address."""
        body = {"model": DEFAULT_MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 4, "temperature": 0}}
        client = self._fresh_client()
        try:
            answer = client.post("/api/generate", json=body)
            ok = answer.status_code == 200 and answer.json().get("done") is True
            if not ok:
                case = Case("final-check", "POST", "/api/generate", "ollama", "the server still generates",
                            json.dumps(body).encode())
                self.report.add(Finding("no longer generates", f"{answer.status_code}", case,
                                        Answer(answer.status_code, answer.headers.get("content-type", ""),
                                               answer.content, 0.0)))
            own = self.client.post("/api/generate", json=body)
            if own.status_code != 200:
                self.report.notes.append(f"the run's own address 127.0.0.{self.source} gets {own.status_code} "
                                         f"{own.text[:160]}")
        except httpx.HTTPError as exc:
            case = Case("final-check", "POST", "/api/generate", "ollama", "the server still generates",
                        json.dumps(body).encode())
            self.report.add(Finding("no longer generates", repr(exc), case, None))
        finally:
            client.close()
        lines = self.scan_log()
        if lines:
            self.report.add(Finding("log", " | ".join(lines)[:600],
                                    self.previous or Case("end", "-", "-", "-", "after the run"), None))

    def run(self, seconds: float) -> Report:
        started = time.monotonic()
        deadline = started + seconds
        known = self.prepare()
        # The fixed cases get at most half the time (on a slow machine), the generated ones the rest.
        fixed = explicit_cases(known)
        fixed_deadline = started + seconds / 2
        try:
            for index, case in enumerate(fixed):
                if time.monotonic() >= fixed_deadline:
                    self.report.notes.append(f"{len(fixed) - index} of {len(fixed)} fixed cases were not sent: "
                                             "their half of the time ran out (give more seconds)")
                    break
                before = self.report.sent
                self.execute(case)
                self.report.explicit += self.report.sent - before
            if time.monotonic() < deadline:
                self.run_generated(deadline)
            self.report.seconds = time.monotonic() - started
            self.final_check()
        finally:
            self.report.seconds = self.report.seconds or time.monotonic() - started
            self.cleanup()
            self.client.close()
        return self.report


def fuzz(url: str, seconds: float, log_path: Path | str | None = None, out: TextIO = sys.stdout) -> Report:
    """Fuzz the server at `url` for `seconds`, print the summary and any findings, return the report."""
    fuzzer = Fuzzer(url, log_path, out)
    try:
        fuzzer.run(seconds)
    finally:
        report = fuzzer.report
        print(report.summary(), file=out)
        if report.findings:
            print(report.findings_text(), file=out)
        out.flush()
    return report
