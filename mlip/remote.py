"""ASE calculator that evaluates on an `mlip serve` server over one persistent WebSocket or HTTP connection.

WebSocket sessions send the structure once, then only positions (and the cell or pbc when they
change). A dropped connection or a restarting server is retried with exponential backoff, and
the structure and the step are sent again, so no step is lost or doubled. A 4xx answer is raised
at once as ``RemoteError`` (a ``ValueError``) carrying the server's message.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from websockets.exceptions import InvalidHandshake, InvalidStatus

from . import wire
from .ase_properties import StructureInputs, ase_results, wanted_properties
from .cell import cell_has_stress
from .http_connection import HTTPConnection
from .websocket import WebSocket

T = TypeVar("T")
# Retried: the server failed (500, counted and visible in its readiness), is restarting or is overloaded.
# Not retried: 504 and read timeouts (the work may still be running: a retry would queue it twice).
RETRY_STATUSES = frozenset({500, 502, 503})
MAX_BACKOFF_S = 5.0
MAX_MESSAGE_BYTES = 2**28


class RemoteError(ValueError):
    """The server rejected the request (4xx); ``status``, ``field`` and ``message`` are the server's."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"server answered {status}" + (f" for {field}" if field else "") + f": {message}")
        self.status, self.field, self.message = status, field, message


class _Unavailable(Exception):
    """Worth retrying: no connection, a dropped connection, or a 5xx 'try again' answer."""


def _error_from(status: int, body: Any) -> RemoteError | _Unavailable:
    """An error answer as the exception to raise (retryable statuses become ``_Unavailable``)."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message") or str(body)[:500]
    if status in RETRY_STATUSES:
        return _Unavailable(f"{status}: {message}")
    if status == 504:
        return TimeoutError(f"server answered 504: {message}")
    return RemoteError(status, error.get("field"), message)


def _structure(atoms: Atoms) -> dict[str, Any]:
    """An ASE Atoms as the wire structure (raw float64 arrays, Å)."""
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions,
        "cell": atoms.cell.array,
        "pbc": [bool(p) for p in atoms.pbc],
    }


class RemoteCalculator(StructureInputs, Calculator):
    """ASE calculator backed by a server: energy/free_energy (eV), forces (eV/Å), stress (eV/Å³), energies (eV)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        api_key: str | None = None,
        transport: str = "ws",
        timeout: float = 150.0,
        reconnect_s: float = 180.0,
        backoff_s: float = 0.1,
        **kwargs: Any,
    ):
        """``timeout`` (s) bounds one answer and exceeds the server's own 120 s deadline, so the server's
        504 arrives first; ``reconnect_s`` is how long a dropped connection, a restarting server (a GPU
        model load takes tens of seconds) or a 5xx is retried with exponential backoff before giving up."""
        super().__init__(**kwargs)
        if transport not in ("ws", "http"):
            raise ValueError(f"transport must be 'ws' or 'http', got {transport!r}")
        self.url, self.model, self.transport = url.rstrip("/"), model, transport
        self.timeout, self.reconnect_s, self.backoff_s = timeout, reconnect_s, backoff_s
        api_key = api_key or os.environ.get("MLIP_API_KEY")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HTTPConnection(self.url, self._headers, timeout)  # connects on first use; checks the URL now
        self._ws: WebSocket | None = None
        self._session: tuple | None = None  # what the server's WebSocket session holds: (numbers, properties)
        self._sent_cell: np.ndarray | None = None
        self._sent_pbc: list[bool] | None = None
        self._message_id = 0
        self.server_model: dict[str, str] | None = None  # {"name", "sha256"} of the model that answered

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        wanted = wanted_properties(properties, cell_has_stress(self.atoms.cell.array, self.atoms.pbc))
        if self.transport == "ws":
            result = self._retrying(lambda: self._ws_step(self.atoms, wanted))
        else:
            (result,) = self._retrying(lambda: self._post([self.atoms], wanted))
        self.results = ase_results(result)

    def calculate_many(
        self, images: Sequence[Atoms], properties: Iterable[str] = ("energy", "forces")
    ) -> list[dict[str, Any]]:
        """Evaluate many structures in one HTTP request; dicts of energy (eV), forces (eV/Å), stress (3×3 eV/Å³)..."""
        properties = list(properties)
        return self._retrying(lambda: self._post(list(images), properties))

    def close(self) -> None:
        """Close the WebSocket and HTTP connections (a later calculation reopens them)."""
        self._drop_ws()
        self._http.close()

    def __enter__(self) -> "RemoteCalculator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, call: Callable[[], T]) -> T:
        """Run ``call``; on ``_Unavailable`` back off exponentially and retry for up to ``reconnect_s`` seconds."""
        deadline = time.monotonic() + self.reconnect_s
        for attempt in itertools.count():
            try:
                return call()
            except _Unavailable as err:
                pause = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
                if time.monotonic() + pause > deadline:
                    raise ConnectionError(f"no answer from {self.url} within {self.reconnect_s:g} s ({attempt + 1} attempts): {err}") from err
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _post(self, images: list[Atoms], properties: list[str]) -> list[dict[str, Any]]:
        """One msgpack POST /v1/calculate over the persistent HTTP connection."""
        payload = {"model": self.model, "structures": [_structure(a) for a in images], "properties": properties}
        try:
            status, content_type, data = self._http.post(
                "/v1/calculate", wire.packb(payload), {"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK}
            )
        except TimeoutError as err:  # the server may still be computing: never queue it twice
            raise TimeoutError(f"no answer from {self.url} within {self.timeout:g} s") from err
        except (OSError, http.client.HTTPException) as err:
            raise _Unavailable(f"{type(err).__name__}: {err}") from err
        body = wire.unpackb(data) if content_type.startswith(wire.MSGPACK) else _json_body(data)
        if status != 200:
            raise _error_from(status, body)
        self.server_model = body["model"]
        return body["results"]

    def _ws_step(self, atoms: Atoms, properties: list[str]) -> dict[str, Any]:
        """Send one start (new session) or step message and return that structure's results."""
        session = (atoms.numbers.tobytes(), tuple(properties))
        cell, pbc = atoms.cell.array.copy(), [bool(p) for p in atoms.pbc]
        if self._ws is None or self._session != session:
            message = {"type": "start", "model": self.model, **_structure(atoms), "properties": properties}
        else:
            message = {"type": "step", "positions": atoms.positions}
            if not np.array_equal(cell, self._sent_cell):
                message["cell"] = cell
            if pbc != self._sent_pbc:
                message["pbc"] = pbc
        self._message_id += 1
        message["id"] = self._message_id
        reply = self._exchange(message)
        if reply["type"] == "error":
            raise _error_from(reply["status"], reply)
        self._session, self._sent_cell, self._sent_pbc = session, cell, pbc
        self.server_model = reply["model"]
        return reply["results"]

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one frame and receive its reply; any connection failure drops the session."""
        if self._ws is None:
            try:
                self._ws = self._connect()
            except InvalidStatus as err:  # the handshake's HTTP answer (401, 503 while loading, ...)
                raise _error_from(err.response.status_code, _json_body(err.response.body)) from err
            except (InvalidHandshake, OSError, TimeoutError) as err:  # nothing was sent: safe to retry
                raise _Unavailable(f"cannot connect: {type(err).__name__}: {err}") from err
        try:
            self._ws.send(wire.packb(message))
            reply = wire.unpackb(self._ws.recv(self.timeout))
        except TimeoutError as err:  # the server may still be computing: never queue it twice
            self._drop_ws()
            raise TimeoutError(f"no answer from {self.url} within {self.timeout:g} s") from err
        except (InvalidHandshake, OSError) as err:
            self._drop_ws()
            raise _Unavailable(f"{type(err).__name__}: {err}") from err
        if reply.get("id") != message["id"]:
            self._drop_ws()
            raise _Unavailable(f"reply to message {reply.get('id')} instead of {message['id']}")
        return reply

    def _connect(self) -> WebSocket:
        ws_url = "ws" + self.url.removeprefix("http") + "/v1/stream"
        return WebSocket(ws_url, self._headers, self.timeout, MAX_MESSAGE_BYTES)

    def _drop_ws(self) -> None:
        """Forget the WebSocket session; the next step starts a new one with the whole structure."""
        if self._ws is not None:
            self._ws.close()
        self._ws, self._session = None, None


def _json_body(data: bytes | None) -> Any:
    """A JSON error body, or the raw text when it is not JSON."""
    try:
        return json.loads(data or b"")
    except ValueError:
        return (data or b"").decode(errors="replace")
