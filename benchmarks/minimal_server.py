"""The least a WebSocket MD server can do, as the floor that `mlip serve`'s per-step overhead is measured against.

Speaks the /v1/stream protocol well enough for ``RemoteCalculator``: uvicorn and Starlette as `mlip serve`
runs them, msgpack frames, one model thread fed by a queue (the event loop must stay free while the
model runs) and a reused neighbour search; no validation, limits, batching, auth or error replies, and two metrics.
Whatever `mlip serve` costs above this server is the cost of those; what this server costs above
in-process is the transport, the thread hand-offs and waking idle cores.

    python benchmarks/minimal_server.py --checkpoint C --dtype float64 --port 8001  (service_overhead.py starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from mlip import Potential, Structure, wire
from mlip.verlet import VerletGraphs


def create_app(potential: Potential) -> Starlette:
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    ref = {"name": potential.name, "sha256": potential.sha256}
    # (sum s, count) in `mlip serve`'s metric names: the whole answer, and the model's call
    totals = {"mlip_request_seconds": [0.0, 0], "mlip_compute_seconds": [0.0, 0]}

    def add(name: str, seconds: float) -> None:
        totals[name][0] += seconds
        totals[name][1] += 1

    def model_thread() -> None:
        while True:
            graph, properties, future, loop = jobs.get()
            start = time.perf_counter()
            (result,) = potential.evaluate_graphs([graph], properties)
            add("mlip_compute_seconds", time.perf_counter() - start)
            loop.call_soon_threadsafe(future.set_result, result)

    threading.Thread(target=model_thread, daemon=True).start()

    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        loop = asyncio.get_running_loop()
        structure, neighbors, properties = None, None, set()
        while (message := await websocket.receive())["type"] != "websocket.disconnect":
            start = time.perf_counter()
            data: dict[str, Any] = wire.unpackb(message["bytes"])
            if data["type"] == "start":
                structure = Structure.from_arrays(data["numbers"], data["positions"], data["cell"], data["pbc"])
                neighbors = VerletGraphs(potential.species_index, potential.cutoff)
                properties = set(data["properties"])
            else:
                structure = Structure(structure.numbers, data["positions"], structure.cell, structure.pbc, structure.frame)
            future = loop.create_future()
            jobs.put((neighbors.graph(structure), properties, future, loop))
            result = await future
            add("mlip_request_seconds", time.perf_counter() - start)
            await websocket.send_bytes(wire.packb({"type": "result", "model": ref, "results": result, "id": data["id"]}))

    async def ready(_: Any) -> PlainTextResponse:
        return PlainTextResponse("ready")

    async def metrics(_: Any) -> PlainTextResponse:
        return PlainTextResponse("".join(f"{name}_sum {s}\n{name}_count {n}\n" for name, (s, n) in totals.items()))

    routes = [WebSocketRoute("/v1/stream", stream), Route("/health/ready", ready), Route("/metrics", metrics)]
    return Starlette(routes=routes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    # loaded in a thread that then ends, as `mlip serve` does: with 2 OpenMP threads on the 2-vCPU VM, a model
    # loaded (run) in the main thread and then run in the model thread evaluated 2.2x slower (measured)
    loaded: list[Potential] = []
    loader = threading.Thread(target=lambda: loaded.append(Potential.load(args.checkpoint, args.device, args.dtype)))
    loader.start()
    loader.join()
    app = create_app(loaded[0])
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ws_per_message_deflate=False)


if __name__ == "__main__":
    main()
