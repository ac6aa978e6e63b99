"""From request bytes to validated graphs, and from graphs to results via a model's worker.

Everything that can reject input (body size, encoding, schema, limits, structure checks,
unknown elements, overlapping atoms) happens here, before the worker sees anything.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from mlip import AtomicGraph, Potential, Structure, wire
from mlip.verlet import VerletGraphs

from .errors import ApiError, from_validation_error
from .models import ServedModel
from .neighbor_cache import NeighborCache
from .settings import Settings
from .worker import QueueFull

T = TypeVar("T")
# Validation and neighbour lists of this many atoms or fewer run on the event loop: ~0.1 ms for aspirin and
# ~10 ms at the densest packing a structure may have (1000 neighbours per atom), where a thread-pool round
# trip costs ~0.9 ms (measured on 2 busy cores). Bodies up to ON_LOOP_MAX_BODY_BYTES are decoded there too.
ON_LOOP_MAX_ATOMS = 64
ON_LOOP_MAX_BODY_BYTES = 4096
# First words of mlip's ValueError messages -> the input field they are about.
_MESSAGE_FIELDS = {
    "numbers": "numbers", "positions": "positions", "cell": "cell", "periodic": "cell",
    "element(s)": "numbers", "atoms": "positions", "structure": "positions",
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 if Content-Length or the bytes actually sent exceed ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, "body", f"body of {length} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(body: bytes, content_type: str | None) -> Any:
    """JSON or msgpack by Content-Type (JSON if absent); 415 for other types, 400 if undecodable."""
    media = (content_type or wire.JSON).split(";")[0].strip().lower()
    try:
        if media == wire.JSON:
            return orjson.loads(body)
        if media in (wire.MSGPACK, "application/x-msgpack"):
            return wire.unpackb(body)
    except (orjson.JSONDecodeError, ValueError) as err:
        raise ApiError(400, "body", f"body is not valid {media}: {err}") from err
    raise ApiError(415, "Content-Type", f"unsupported Content-Type {media!r}; use {wire.JSON} or {wire.MSGPACK}")


def parse(adapter: TypeAdapter[T], data: Any) -> T:
    """Validate decoded data against a pydantic schema; 422 naming the first bad field."""
    try:
        return adapter.validate_python(data)
    except ValidationError as err:
        raise from_validation_error(err) from err


def _field_of(message: str) -> str | None:
    """The input field an ``mlip`` ValueError message is about (its messages start with the field)."""
    return _MESSAGE_FIELDS.get(message.split(" ", 1)[0])


@contextmanager
def input_errors() -> Iterator[None]:
    """mlip's ``ValueError`` about a structure -> 422 naming the field it is about."""
    try:
        yield
    except ValueError as err:
        raise ApiError(422, _field_of(str(err)), str(err)) from err


def structure_of(settings: Settings, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None, pbc: Any) -> Structure:
    """A validated structure; 413 beyond the atom limit, 422 naming the field otherwise."""
    if len(numbers) > settings.max_atoms_per_structure:
        raise ApiError(413, "numbers", f"{len(numbers)} atoms exceed the limit of {settings.max_atoms_per_structure} per structure")
    with input_errors():
        return Structure.from_arrays(numbers, positions, cell, pbc)


def graph_of(
    potential: Potential, settings: Settings, structure: Structure, neighbors: VerletGraphs | NeighborCache | None = None
) -> AtomicGraph:
    """The structure's neighbour-list graph (reusing ``neighbors``' searches where it can); 422 if it is refused."""
    with input_errors():
        if neighbors is None:
            return potential.graph(structure, settings.max_edges_per_structure)
        return neighbors.graph(structure, settings.max_edges_per_structure)


def build_graphs(served: ServedModel, settings: Settings, structures: list) -> list[AtomicGraph]:
    """Validated graphs for a request's structures; request-wide limits first, errors named ``structures[i].<field>``."""
    if len(structures) > settings.max_structures_per_request:
        raise ApiError(413, "structures", f"{len(structures)} structures exceed the limit of {settings.max_structures_per_request} per request")
    total = sum(len(s.numbers) for s in structures)
    if total > settings.max_atoms_per_request:
        raise ApiError(413, "structures", f"{total} atoms exceed the limit of {settings.max_atoms_per_request} per request")
    graphs = []
    for i, s in enumerate(structures):
        try:
            structure = structure_of(settings, s.numbers, s.positions, s.cell, s.pbc)
            graphs.append(graph_of(served.potential, settings, structure, served.neighbors))
        except ApiError as err:
            raise err.within(f"structures[{i}]") from err
    return graphs


async def off_loop(build: Callable[..., T], *args: Any, small: bool = False) -> T:
    """Run ``build(*args)`` on the thread pool, so the event loop keeps answering health probes meanwhile;
    ``small`` work (see ``ON_LOOP_MAX_ATOMS``) runs right here, where a thread-pool round trip costs more."""
    if small:
        return build(*args)
    return await run_in_threadpool(build, *args)


async def evaluate(
    served: ServedModel, settings: Settings, graphs: list[AtomicGraph], properties: Iterable[str], prefix: str | None,
    session: bool = False,
) -> list[dict[str, Any]]:
    """Queue graphs on the model's worker and await their results (503 if full, 504 on timeout);
    ``session``: a WebSocket session's step."""
    try:
        futures = served.worker.submit(graphs, set(properties), session)
    except QueueFull as err:
        raise ApiError(503, None, f"{err}; retry later", {"Retry-After": str(settings.retry_after_s)}) from err
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), settings.request_timeout_s)
    except asyncio.TimeoutError as err:  # gather's cancellation cancels the futures: the worker skips them
        raise ApiError(504, None, f"no result within {settings.request_timeout_s} s") from err
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, ApiError):
            raise outcome.within(f"{prefix}[{i}]") if prefix else outcome
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
