"""A real `mlip serve` subprocess: concurrent clients over HTTP JSON, HTTP msgpack and WebSocket get batched and exact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from ase.build import molecule
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from mlip import Potential, Structure, wire

from .serverproc import ServerProcess, make_checkpoint, one_torch_thread  # noqa: F401

CLIENTS, REQUESTS = 9, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("process")
    checkpoint = make_checkpoint(folder / "small.safetensors")
    process = ServerProcess(["--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "float64"], folder / "server.log")
    try:
        yield process.start(), Potential.load(checkpoint)
    finally:
        process.stop()


def batch_sizes(url: str) -> dict[float, float]:
    """Cumulative histogram of structures per batch: upper bound -> number of batches."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "mlip_batch_structures"]
    return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}


def client_run(url: str, transport: str, seed: int) -> list[tuple[np.ndarray, dict]]:
    """One client: REQUESTS rattled acetamides over one persistent connection; returns (positions, result)."""
    atoms = molecule("CH3CONH2")
    rng = np.random.default_rng(seed)
    out = []
    if transport == "ws":
        with connect(url.replace("http", "ws") + "/v1/stream", compression=None) as ws:
            for i in range(REQUESTS):
                positions = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
                message = {"type": "step", "positions": positions} if i else {"type": "start", "numbers": atoms.numbers.tolist(), "positions": positions}
                ws.send(wire.packb({**message, "id": i}))
                reply = wire.unpackb(ws.recv(timeout=60))
                assert reply["type"] == "result", reply
                out.append((positions, reply["results"]))
        return out
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(REQUESTS):
            positions = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
            structure = {"numbers": atoms.numbers.tolist(), "positions": positions}
            if transport == "json":
                r = http.post("/v1/calculate", json={"structures": [{**structure, "positions": positions.tolist()}]})
                result = r.json()["results"][0]
            else:
                r = http.post(
                    "/v1/calculate", content=wire.packb({"structures": [structure]}),
                    headers={"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK},
                )
                result = wire.unpackb(r.content)["results"][0]
            assert r.status_code == 200, r.text
            out.append((positions, result))
    return out


def test_concurrent_clients_batched_and_equal_in_process(server):
    process, reference = server
    before = batch_sizes(process.url)
    transports = ["json", "msgpack", "ws"] * (CLIENTS // 3)
    with ThreadPoolExecutor(CLIENTS) as pool:
        runs = list(pool.map(client_run, [process.url] * CLIENTS, transports, range(CLIENTS)))
    numbers = molecule("CH3CONH2").numbers
    answers = [pair for run in runs for pair in run]
    refs = reference.evaluate([Structure.from_arrays(numbers, p) for p, _ in answers], ["energy", "forces"])
    for (_, result), ref in zip(answers, refs):
        assert result["energy"] == pytest.approx(ref["energy"], abs=1e-10)
        np.testing.assert_allclose(np.asarray(result["forces"]), ref["forces"], atol=1e-10, rtol=0)
    after = batch_sizes(process.url)
    batches = after[float("inf")] - before.get(float("inf"), 0)
    single = after[1.0] - before.get(1.0, 0)
    assert batches < CLIENTS * REQUESTS  # fewer forward passes than structures
    assert batches - single > 0, "no batch held more than one structure"


def test_bad_input_answered_and_server_keeps_serving(server):
    process, _ = server
    good = {"numbers": [6, 8], "positions": [[0, 0, 0], [1.2, 0, 0]]}
    with httpx.Client(base_url=process.url, timeout=30) as http:
        cases = [
            ({"structures": [{**good, "numbers": [6, 92]}]}, 422, "structures[0].numbers"),
            ({"structures": [{**good, "positions": [[0, 0, 0], [0, 0, 0]]}]}, 422, "structures[0].positions"),
            ({"structures": [good], "model": "other"}, 404, "model"),
        ]
        for body, status, field in cases:
            r = http.post("/v1/calculate", json=body)
            assert r.status_code == status and r.json()["error"]["field"] == field
        assert http.post("/v1/calculate", content=b"\xc1", headers={"Content-Type": wire.MSGPACK}).status_code == 400
        assert http.post("/v1/calculate", json={"structures": [good]}).status_code == 200
        assert http.get("/health/ready").status_code == 200
