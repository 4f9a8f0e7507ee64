"""The CLI's HTTP client of a Berth (or Ollama) server."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import httpx

from server.address import HostAddress, client_address, host_from_env


class ClientError(Exception):
    """An error to print as one line; `exit_code` is what the command exits with."""

    def __init__(self, message: str, exit_code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


class Client:
    def __init__(self, address: HostAddress | None = None, timeout: float | httpx.Timeout | None = 30.0) -> None:
        self.address = client_address(address or host_from_env())
        key = os.environ.get("BERTH_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.address.url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                content: Iterator[bytes] | bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """One request; a JSON `body`, or raw `content` (streamed when it is an iterator)."""
        try:
            response = self._http.request(method, path, json=body, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise self._transport_error(path, exc) from None
        if response.status_code >= 400:
            raise ClientError(_error_text(response), status=response.status_code)
        return response

    def stream_json(self, method: str, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each NDJSON line of a streamed answer; closing the iterator closes the request."""
        try:
            with self._http.stream(method, path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_error_text(response), status=response.status_code)
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise self._transport_error(path, exc) from None

    def _transport_error(self, path: str, exc: httpx.HTTPError) -> ClientError:
        if isinstance(exc, httpx.ConnectError):
            return ClientError(
                f"could not connect to a Berth server at {self.address.url}; start one with `berth serve`, "
                "or set BERTH_HOST to the server's address"
            )
        return ClientError(f"request to {self.address.url}{path} failed: {exc}")

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body).json()


def _error_text(response: httpx.Response) -> str:
    try:
        doc = response.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    except (json.JSONDecodeError, ValueError):
        pass
    return f"server answered {response.status_code}: {response.text.strip()[:200]}"
