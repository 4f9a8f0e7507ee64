"""The CLI's HTTP client of a Berth (or Ollama) server.

Built on the standard library's http.client rather than httpx: every `berth` command pays for
the client's import, and `berth list` should answer in well under a third of a second.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from berth.registry import bounded_json
from berth.server.address import HostAddress, client_address, host_from_env


class ClientError(Exception):
    """An error to print as one line; `exit_code` is what the command exits with."""

    def __init__(self, message: str, exit_code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


@dataclass(frozen=True)
class Response:
    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return bounded_json.decode(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class Client:
    """One server; `timeout` bounds connecting and each read (None: wait as long as it takes)."""

    def __init__(self, address: HostAddress | None = None, timeout: float | None = 30.0) -> None:
        self.address = client_address(address or host_from_env())
        self.timeout = timeout
        self._headers = {"User-Agent": "berth-cli", "Accept": "application/json"}
        key = os.environ.get("BERTH_API_KEY")
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                content: Iterable[bytes] | bytes | None = None, headers: dict[str, str] | None = None) -> Response:
        """One request with a JSON `body`, or raw `content` (streamed when it is an iterator)."""
        connection, response = self._open(method, path, body, content, headers)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._transport_error(path, exc) from None
        finally:
            connection.close()
        result = Response(response.status, data, {k.lower(): v for k, v in response.getheaders()})
        if result.status_code >= 400:
            raise ClientError(error_text(result), status=result.status_code)
        return result

    def stream_json(self, method: str, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each NDJSON line of a streamed answer; closing the iterator closes the request."""
        connection, response = self._open(method, path, body, None, None)
        try:
            if response.status >= 400:
                raise ClientError(error_text(Response(response.status, response.read())), status=response.status)
            for line in response:
                if line.strip():
                    yield bounded_json.decode(line)
        except (OSError, http.client.HTTPException) as exc:
            raise self._transport_error(path, exc) from None
        finally:
            connection.close()

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body).json()

    def _open(self, method: str, path: str, body: dict[str, Any] | None, content: Iterable[bytes] | bytes | None,
              headers: dict[str, str] | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        kind = http.client.HTTPSConnection if self.address.scheme == "https" else http.client.HTTPConnection
        connection = kind(self.address.host, self.address.port, timeout=self.timeout)
        all_headers = {**self._headers, **(headers or {})}
        payload: Iterable[bytes] | bytes | None = content
        if body is not None:
            payload = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        chunked = payload is not None and not isinstance(payload, bytes) and not any(
            k.lower() == "content-length" for k in all_headers)
        try:
            connection.request(method, self.address.path + path, body=payload, headers=all_headers,
                               encode_chunked=chunked)
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise self._transport_error(path, exc) from None

    def _transport_error(self, path: str, exc: BaseException) -> ClientError:
        if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
            return ClientError(
                f"could not connect to a Berth server at {self.address.url}; start one with `berth serve`, "
                "or set BERTH_HOST to the server's address"
            )
        if isinstance(exc, TimeoutError):
            return ClientError(f"the server at {self.address.url} did not answer {path} in time")
        return ClientError(f"request to {self.address.url}{path} failed: {exc}")


def error_text(response: Response) -> str:
    """The server's `{"error": ...}` message, or a short description of an unexpected answer."""
    try:
        doc = response.json()
        if isinstance(doc, dict):
            error = doc.get("error")
            if isinstance(error, str):
                return error
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return error["message"]  # OpenAI's shape
    except ValueError:
        pass
    return f"server answered {response.status_code}: {response.text.strip()[:200]}"
