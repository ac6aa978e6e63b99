"""Bearer API keys: every path except /health/* needs ``Authorization: Bearer <key>`` when keys are set."""

from __future__ import annotations

import hmac
from typing import Callable

import orjson

from .errors import ApiError
from .metrics import ASGIApp

UNAUTHORIZED = ApiError(401, "Authorization", "missing or invalid API key: send 'Authorization: Bearer <key>'")


class ApiKeys:
    """The accepted keys; checks compare in constant time against every key."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def allows(self, authorization: str | None) -> bool:
        """True if auth is off or the header carries one of the keys."""
        if not self.keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token.strip().encode(), key)
        return matched and scheme.lower() == "bearer"


class AuthMiddleware:
    """Answers 401 (HTTP, or the WebSocket handshake) without a valid key; /health/* stays open."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith("/health/") or self.keys.allows(
            _header(scope, b"authorization")
        ):
            await self.app(scope, receive, send)
            return
        body = orjson.dumps(UNAUTHORIZED.body())
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": UNAUTHORIZED.message})


def _header(scope: dict, name: bytes) -> str | None:
    """One request header from an ASGI scope, decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
