"""API errors: an HTTP status plus a JSON body ``{"error": {"field": ..., "message": ...}}``."""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import ValidationError


class ApiError(Exception):
    """A client-visible failure that names the offending field (``None`` when no single field is at fault)."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON-ready error body."""
        return {"error": {"field": self.field, "message": self.message}}

    def within(self, prefix: str) -> "ApiError":
        """The same error with its field placed under ``prefix`` (e.g. ``structures[2]``)."""
        field = prefix if not self.field else f"{prefix}.{self.field}"
        return ApiError(self.status, field, self.message, self.headers)


def field_path(loc: Sequence[str | int], prefix: str = "") -> str:
    """Pydantic location ``("structures", 1, "positions")`` -> ``structures[1].positions``."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def from_validation_error(err: ValidationError, prefix: str = "") -> ApiError:
    """A pydantic schema error as a 422 naming the first bad field."""
    first = err.errors(include_url=False)[0]
    message = first["msg"].removeprefix("Value error, ")
    if len(err.errors()) > 1:
        message += f" (and {len(err.errors()) - 1} more problem(s))"
    return ApiError(422, field_path(first["loc"], prefix) or None, message)
