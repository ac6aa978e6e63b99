"""WebSocket sessions for MD and relaxations: the structure once, then only positions (and cell) per step."""

from __future__ import annotations

import time
from typing import Any

from pydantic import TypeAdapter

from mlip import AtomicGraph, Structure, wire
from mlip.verlet import VerletGraphs

from .errors import ApiError
from .inputs import ON_LOOP_MAX_ATOMS, evaluate, graph_of, input_errors, off_loop, parse, structure_of
from .metrics import Metrics
from .models import ModelRegistry, ServedModel
from .schemas import StreamMessage, StreamStart, StreamStep
from .settings import Settings

STREAM_MESSAGE: TypeAdapter[StreamStart | StreamStep] = TypeAdapter(StreamMessage)


class StreamSession:
    """One connection's model, structure (numbers, positions Å, cell Å, pbc) and properties; every frame gets one reply.

    A start frame is validated in full; a step that changes only positions has only its positions
    checked (``Structure.moved_to``). The neighbour search is reused between steps (``VerletGraphs``),
    and a small structure's frame never leaves the event loop before the worker.
    """

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.served: ServedModel | None = None
        self.structure: Structure | None = None  # the last valid frame: the next steps move its atoms
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

        def prepare() -> tuple[Structure, AtomicGraph]:
            structure = structure_of(self.settings, message.numbers, message.positions, message.cell, message.pbc)
            return structure, graph_of(potential, self.settings, structure, neighbors)

        structure, graph = await off_loop(prepare, small=len(message.numbers) <= ON_LOOP_MAX_ATOMS)
        self.close()
        served.worker.session_opened()
        self.served, self.neighbors, self.structure = served, neighbors, structure
        self.properties = list(message.properties)
        return await self._evaluate(graph)

    async def _step(self, message: StreamStep) -> dict[str, Any]:
        served, neighbors, last = self.served, self.neighbors, self.structure
        if served is None or neighbors is None or last is None:
            raise ApiError(400, "type", "send a 'start' message (numbers, positions, ...) before any 'step'")

        def prepare() -> tuple[Structure, AtomicGraph]:
            if message.cell is None and message.pbc is None:
                with input_errors():
                    structure = last.moved_to(message.positions)  # numbers, cell and pbc were validated before
            else:
                cell = last.cell if message.cell is None else message.cell
                pbc = last.pbc if message.pbc is None else message.pbc
                structure = structure_of(self.settings, last.numbers, message.positions, cell, pbc)
            return structure, graph_of(served.potential, self.settings, structure, neighbors)

        self.structure, graph = await off_loop(prepare, small=len(last.numbers) <= ON_LOOP_MAX_ATOMS)
        return await self._evaluate(graph)

    def close(self) -> None:
        """The session leaves its model's worker (which then stops expecting its steps)."""
        if self.served is not None:
            self.served.worker.session_closed()
            self.served = None

    async def _evaluate(self, graph: AtomicGraph) -> dict[str, Any]:
        assert self.served is not None
        (result,) = await evaluate(self.served, self.settings, [graph], self.properties, None, session=True)
        return {"type": "result", "model": self.served.ref, "results": result}

