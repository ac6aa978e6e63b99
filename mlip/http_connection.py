"""A blocking HTTP/1.1 client on one persistent connection, in the caller's thread (the standard library's http.client).

An MD loop pays the client's cost on every step: on the 2-vCPU VM, a msgpack POST /v1/calculate round
trip that the server refuses at once takes 0.50 ms with http.client, 0.78 ms with urllib3 and 0.91 ms
with httpx (``benchmarks/http_clients.py``). A connection the server closed while it was idle (uvicorn closes keep-alive
connections after 5 s) is noticed on its next use and reopened at once, and that request sent again.
"""

from __future__ import annotations

import http.client
import ssl
from typing import Mapping
from urllib.parse import urlsplit


class HTTPConnection:
    """POST requests to one server over one keep-alive connection; ``OSError`` or ``http.client.HTTPException``
    when the connection fails, ``TimeoutError`` when the server sends nothing for ``timeout`` s."""

    def __init__(self, url: str, headers: Mapping[str, str], timeout: float):
        """``url``: http:// or https:// base URL, with an optional path prefix (a server behind a proxy)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must be http://HOST[:PORT][/PREFIX] or https://..., got {url!r}")
        self.prefix, self.headers = parts.path.rstrip("/"), dict(headers)
        if parts.scheme == "https":
            self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """Send ``body`` to ``path``; the answer's (status, Content-Type, body)."""
        for attempt in range(2):
            reused = self._conn.sock is not None
            try:
                self._conn.request("POST", self.prefix + path, body=body, headers={**self.headers, **headers})
                response = self._conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if reused and attempt == 0:  # the server closed the idle connection: once more on a new one
                    continue
                raise
            except OSError:  # TimeoutError among them: the server may still be computing, never resend
                self.close()
                raise
            return response.status, response.getheader("Content-Type", ""), data
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        self._conn.close()
