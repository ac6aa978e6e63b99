"""Soak: many concurrent clients (HTTP JSON, HTTP msgpack, WebSocket) for a long time, every answer
checked against the in-process potential, bad requests mixed in, liveness probed throughout.

The long form of tests/test_server_process.py's concurrent test. Each client sends aspirin
structures rattled by its own seed over one persistent connection; every ``--bad-every``-th
request overlaps two atoms and must get a 422 (WebSocket: an error frame) while the rest go on.
Afterwards all answered structures are re-evaluated in-process in one batch and compared.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from ase.io import read
from websockets.asyncio.client import connect

from common import REPO_ROOT, Server, default_out, machine_info, markdown_table, settings_of, write_json
from mlip import Potential, Structure, wire
from mlip.checkpoint import find_checkpoint

TRANSPORTS = ("http-json", "http-msgpack", "ws")
STRUCTURE = REPO_ROOT / "examples" / "aspirin.xyz"


def positions_for(base: np.ndarray, client: int, step: int, bad: bool) -> np.ndarray:
    """Deterministic rattle of ``base`` (Å); a bad one puts atom 1 on atom 0."""
    positions = base + np.random.default_rng([client, step]).normal(scale=0.05, size=base.shape)
    if bad:
        positions[1] = positions[0]
    return positions


async def client(url: str, transport: str, index: int, numbers: list[int], base: np.ndarray, until: float,
                 bad_every: int) -> dict[str, Any]:
    """Requests back to back until ``until``; returns answered (positions, energy, forces) and status counts."""
    answers: list[tuple[np.ndarray, float, np.ndarray]] = []
    statuses: dict[str, int] = {}
    step = 0

    def record(status: Any) -> None:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    if transport == "ws":
        async with connect(url.replace("http", "ws", 1) + "/v1/stream", compression=None, max_size=None) as ws:
            start = {"type": "start", "numbers": numbers, "positions": positions_for(base, index, 0, False),
                     "properties": ["energy", "forces"]}
            await ws.send(wire.packb(start))
            assert wire.unpackb(await ws.recv())["type"] == "result"
            while time.perf_counter() < until:
                step += 1
                bad = step % bad_every == 0
                positions = positions_for(base, index, step, bad)
                await ws.send(wire.packb({"type": "step", "id": step, "positions": positions}))
                reply = wire.unpackb(await ws.recv())
                record(reply.get("status", 200))
                assert reply["id"] == step and (reply["type"] == "error") == bad, reply
                if not bad:
                    answers.append((positions, reply["results"]["energy"], np.asarray(reply["results"]["forces"])))
        return {"answers": answers, "statuses": statuses}
    async with httpx.AsyncClient(base_url=url, timeout=180) as http:
        while time.perf_counter() < until:
            step += 1
            bad = step % bad_every == 0
            positions = positions_for(base, index, step, bad)
            body = {"structures": [{"numbers": numbers, "positions": positions}], "properties": ["energy", "forces"]}
            if transport == "http-json":
                r = await http.post("/v1/calculate", content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                                    headers={"Content-Type": wire.JSON})
                data = orjson.loads(r.content)
            else:
                r = await http.post("/v1/calculate", content=wire.packb(body),
                                    headers={"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK})
                data = wire.unpackb(r.content)
            record(r.status_code)
            assert (r.status_code == 422) == bad, (r.status_code, r.content[:300])
            if not bad:
                result = data["results"][0]
                answers.append((positions, result["energy"], np.asarray(result["forces"])))
    return {"answers": answers, "statuses": statuses}


async def probe_liveness(url: str, until: float) -> list[float]:
    """GET /health/live every 0.2 s; latencies in ms."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            assert (await http.get("/health/live")).status_code == 200
            latencies.append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(0.2)
    return latencies


def server_peak_rss_mb(pid: int) -> float:
    """VmHWM of the server process (Linux), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(server: Server, clients: int, seconds: float, bad_every: int, numbers: list[int], base: np.ndarray):
    until = time.perf_counter() + seconds
    runs = [client(server.url, TRANSPORTS[i % 3], i, numbers, base, until, bad_every) for i in range(clients)]
    *results, live = await asyncio.gather(*runs, probe_liveness(server.url, until))
    return results, live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="aspirin-rmd17", help="a file or a shipped name")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bad-every", type=int, default=25, help="every N-th request of a client is invalid")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--out", type=Path, default=default_out("soak"))
    args = parser.parse_args()

    atoms = read(STRUCTURE)
    numbers, base = atoms.numbers.tolist(), atoms.positions
    checkpoint = find_checkpoint(args.checkpoint)
    potential = Potential.load(checkpoint, "cpu", args.dtype)
    with Server(checkpoint, args.threads, args.dtype) as server:
        started = time.perf_counter()
        results, live = asyncio.run(soak(server, args.clients, args.seconds, args.bad_every, numbers, base))
        elapsed = time.perf_counter() - started
        assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200
        rss_mb = server_peak_rss_mb(server.process.process.pid)

    answers = [a for r in results for a in r["answers"]]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    structures = [Structure.from_arrays(numbers, p) for p, _, _ in answers]
    refs = [ref for i in range(0, len(structures), 64) for ref in potential.evaluate(structures[i:i + 64], ["energy", "forces"])]
    energy_dev = max(abs(e - ref["energy"]) for (_, e, _), ref in zip(answers, refs))
    forces_dev = max(float(np.abs(f - ref["forces"]).max()) for (_, _, f), ref in zip(answers, refs))
    summary = {
        "clients": args.clients, "seconds": elapsed, "requests": sum(statuses.values()), "statuses": statuses,
        "answers_checked": len(answers), "requests_per_s": sum(statuses.values()) / elapsed,
        "max_energy_dev_eV": energy_dev, "max_forces_dev_eV_per_A": forces_dev,
        "live_p50_ms": float(np.percentile(live, 50)), "live_max_ms": float(np.max(live)),
        "server_peak_rss_mb": rss_mb,
    }
    print(markdown_table(list(summary), [[str(v) if isinstance(v, dict) else v for v in summary.values()]]))
    write_json(args.out, {"machine": machine_info(args.threads), "settings": settings_of(args), "summary": summary})


if __name__ == "__main__":
    main()
