"""WebSocket sessions for MD and relaxations: the structure once, then only positions (and cell) per step."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from mlip import AtomicGraph, wire
from mlip.verlet import VerletGraphs

from .errors import ApiError
from .inputs import ON_LOOP_MAX_ATOMS, build_graph, evaluate, graph_of, off_loop, parse, structure_of
from .metrics import Metrics
from .models import ModelRegistry, ServedModel
from .schemas import StreamMessage, StreamStart, StreamStep
from .settings import Settings

STREAM_MESSAGE: TypeAdapter[StreamStart | StreamStep] = TypeAdapter(StreamMessage)


class StreamSession:
    """One connection's structure (model, numbers, cell Å, pbc, properties); every frame gets one reply.

    Every frame's structure is validated in full, and the neighbour search is reused between steps
    (``VerletGraphs``); a small structure's frame never leaves the event loop before the worker.
    """

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.served: ServedModel | None = None
        self.numbers = np.zeros(0, dtype=np.int64)
        self.cell: np.ndarray | None = None
        self.pbc: Any = None
        self.properties: list[str] = []
        self.neighbors: VerletGraphs | None = None

    async def handle(self, frame: bytes | None) -> dict[str, Any]:
        """Reply to one frame: ``{"type": "result", ...}`` or ``{"type": "error", ...}``; never raises ApiError."""
        start, status, message_id = time.perf_counter(), 200, None
        try:
            if frame is None:
                raise ApiError(400, "frame", "send binary msgpack frames (see docs/server.md)")
            if len(frame) > self.settings.max_body_bytes:
                raise ApiError(413, "frame", f"frame exceeds the limit of {self.settings.max_body_bytes} bytes")
            try:
                data = wire.unpackb(frame)
            except ValueError as err:
                raise ApiError(400, "frame", str(err)) from err
            if isinstance(data, dict) and isinstance(data.get("id"), int):
                message_id = data["id"]
            message = parse(STREAM_MESSAGE, data)
            reply = await (self._start(message) if isinstance(message, StreamStart) else self._step(message))
        except ApiError as err:
            status = err.status
            reply = {"type": "error", "status": err.status, **err.body()}
        self.metrics.observe_request("/v1/stream", status, time.perf_counter() - start)
        return {**reply, "id": message_id}

    async def _start(self, message: StreamStart) -> dict[str, Any]:
        served = self.registry.get(message.model)
        potential = served.potential
        neighbors = VerletGraphs(potential.species_index, potential.cutoff, self.settings.neighbor_skin)
        graph = await self._graph(served, neighbors, message.numbers, message.positions, message.cell, message.pbc)
        self.served, self.neighbors = served, neighbors
        self.numbers, self.cell, self.pbc = message.numbers, message.cell, message.pbc
        self.properties = list(message.properties)
        return await self._evaluate(graph)

    async def _step(self, message: StreamStep) -> dict[str, Any]:
        if self.served is None or self.neighbors is None:
            raise ApiError(400, "type", "send a 'start' message (numbers, positions, ...) before any 'step'")
        cell = self.cell if message.cell is None else message.cell
        pbc = self.pbc if message.pbc is None else message.pbc
        graph = await self._graph(self.served, self.neighbors, self.numbers, message.positions, cell, pbc)
        self.cell, self.pbc = cell, pbc
        return await self._evaluate(graph)

    async def _graph(self, served: ServedModel, neighbors: VerletGraphs, numbers, positions, cell, pbc) -> AtomicGraph:
        """Validate and graph one frame, reusing the session's neighbour search while it serves."""
        structure = structure_of(self.settings, numbers, positions, cell, pbc) if len(numbers) <= ON_LOOP_MAX_ATOMS else None
        if structure is not None:
            return graph_of(served.potential, self.settings, structure, neighbors)
        return await off_loop(build_graph, served.potential, self.settings, numbers, positions, cell, pbc, neighbors)

    async def _evaluate(self, graph: AtomicGraph) -> dict[str, Any]:
        assert self.served is not None
        (result,) = await evaluate(self.served, self.settings, [graph], self.properties, None)
        return {"type": "result", "model": self.served.ref, "results": result}
