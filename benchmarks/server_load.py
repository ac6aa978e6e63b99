"""Server load: requests/s and p50/p99 latency for 1, 8 and 32 concurrent clients (HTTP JSON, HTTP msgpack,
WebSocket) on aspirin-sized structures, mean batch size from /metrics, and ms per MD step in-process vs remote.

One `mlip serve` subprocess on 127.0.0.1; every client is an asyncio task with its own persistent
connection sending one 21-atom structure per request, back to back, for ``--seconds`` per case.
Without the trained aspirin checkpoint a random-weight default-config model (H, C, O) stands in:
the speed depends on the architecture and the structure, not on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from websockets.asyncio.client import connect

from common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    Server,
    aspirin_frames,
    default_out,
    machine_info,
    markdown_table,
    md_step_times_ms,
    set_threads,
    start_md,
    summarize_ms,
    write_json,
)
from mlip import MLIPCalculator, MLIPModel, ModelConfig, RemoteCalculator, save_checkpoint, wire

TRANSPORTS = ("http-json", "http-msgpack", "ws")


async def client(url: str, transport: str, frames: list[np.ndarray], numbers: list[int], until: float) -> list[float]:
    """One client: requests back to back over one connection until ``until``; latencies in ms."""
    latencies: list[float] = []
    if transport == "ws":
        async with connect(url.replace("http", "ws", 1) + "/v1/stream", compression=None) as ws:
            await ws.send(wire.packb({"type": "start", "numbers": numbers, "positions": frames[0], "properties": ["energy", "forces"]}))
            await ws.recv()
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                await ws.send(wire.packb({"type": "step", "positions": frames[len(latencies) % len(frames)]}))
                reply = wire.unpackb(await ws.recv())
                latencies.append((time.perf_counter() - t0) * 1e3)
                assert reply["type"] == "result", reply
        return latencies
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            structure = {"numbers": numbers, "positions": frames[len(latencies) % len(frames)]}
            body = {"structures": [structure], "properties": ["energy", "forces"]}
            if transport == "http-json":
                r = await http.post("/v1/calculate", content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                                    headers={"Content-Type": wire.JSON})
                orjson.loads(r.content)
            else:
                r = await http.post("/v1/calculate", content=wire.packb(body),
                                    headers={"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK})
                wire.unpackb(r.content)
            latencies.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 200, r.text
    return latencies


async def load_case(server: Server, transport: str, clients: int, seconds: float, frames, numbers) -> dict[str, Any]:
    """``clients`` concurrent clients for ``seconds``: throughput, latency percentiles, mean batch size."""
    batch_sum0, batch_count0 = server.metric_sums("mlip_batch_structures")
    start = time.perf_counter()
    runs = await asyncio.gather(*(client(server.url, transport, frames, numbers, start + seconds) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    batch_sum1, batch_count1 = server.metric_sums("mlip_batch_structures")
    latencies = np.concatenate([np.asarray(r) for r in runs])
    return {
        "transport": transport,
        "clients": clients,
        "requests": int(latencies.size),
        "requests_per_s": latencies.size / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_batch_structures": (batch_sum1 - batch_sum0) / max(batch_count1 - batch_count0, 1),
    }


def md_ms_per_step(checkpoint: Path, url: str, atoms, steps: int) -> dict[str, dict[str, float]]:
    """Median ms per velocity-Verlet step: in-process calculator vs RemoteCalculator over WS and HTTP msgpack."""
    calcs = {
        "in-process": MLIPCalculator(checkpoint),
        "remote-ws": RemoteCalculator(url, transport="ws"),
        "remote-http-msgpack": RemoteCalculator(url, transport="http"),
    }
    out = {name: summarize_ms(md_step_times_ms(start_md(atoms, calc), steps)) for name, calc in calcs.items()}
    for calc in calcs.values():
        if isinstance(calc, RemoteCalculator):
            calc.close()
    return out


def stand_in_checkpoint() -> Path:
    """A random-weight default-config model for H, C, O (aspirin's elements)."""
    path = Path(tempfile.mkdtemp(prefix="mlip-load-")) / "random-default.safetensors"
    save_checkpoint(path, MLIPModel(ModelConfig(species=[1, 6, 8])))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="rMD17 aspirin extended XYZ")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and in-process runs")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load case")
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=default_out("server_load"))
    args = parser.parse_args()

    set_threads(args.threads)
    checkpoint = args.checkpoint if args.checkpoint.is_file() else stand_in_checkpoint()
    frames = aspirin_frames(args.data, 32)
    numbers = frames[0].numbers.tolist()
    positions = [f.positions for f in frames]
    with Server(checkpoint, args.threads, args.dtype) as server:
        asyncio.run(load_case(server, "ws", 2, 1.0, positions, numbers))  # warm the server and the clients
        cases = [
            asyncio.run(load_case(server, transport, clients, args.seconds, positions, numbers))
            for clients in args.clients
            for transport in TRANSPORTS
        ]
        md = md_ms_per_step(checkpoint, server.url, frames[0], args.md_steps)

    headers = ["transport", "clients", "requests", "req/s", "p50 ms", "p99 ms", "mean batch"]
    rows = [[c["transport"], c["clients"], c["requests"], c["requests_per_s"], c["p50_ms"], c["p99_ms"], c["mean_batch_structures"]] for c in cases]
    print(markdown_table(headers, rows))
    print()
    print(markdown_table(["MD (21 atoms, 0.5 fs)", "median ms/step", "p90 ms/step"], [[k, v["median_ms"], v["p90_ms"]] for k, v in md.items()]))
    write_json(args.out, {
        "machine": machine_info(args.threads),
        "checkpoint": str(checkpoint),
        "dtype": args.dtype,
        "server_threads": args.threads,
        "seconds_per_case": args.seconds,
        "load": cases,
        "md_ms_per_step": md,
    })


if __name__ == "__main__":
    main()
