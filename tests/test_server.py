"""The server app in-process (starlette TestClient): results, validation, limits, auth, readiness, batching, OOM."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import msgpack
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # starlette's TestClient warns that it still uses httpx
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient, WebSocketDenialResponse

from mlip import Potential, Structure, wire
from mlip.kernels import cueq_available
from mlip.server.app import create_app
from mlip.server.metrics import Metrics
from mlip.server.settings import Settings
from mlip.server.worker import BatchWorker, DeviceTurns

from .conftest import needs_cuda
from .serverproc import make_checkpoint, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server") / "small.safetensors")


@pytest.fixture(scope="module")
def reference(checkpoint) -> Potential:
    return Potential.load(checkpoint)


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    wait_until(lambda: client.get("/health/ready").status_code == 200, timeout)


@contextmanager
def serve(checkpoint, **settings) -> Iterator[TestClient]:
    """A started TestClient whose models are loaded and warmed up."""
    with TestClient(create_app(Settings(checkpoint=checkpoint, **settings))) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(checkpoint):
    with serve(checkpoint) as c:
        yield c


def as_json(atoms) -> dict:
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": atoms.pbc.tolist(),
    }


def structures() -> list:
    mol = molecule("CH3CONH2")
    mol.rattle(0.05, seed=1)
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.numbers[1] = 13
    crystal.rattle(0.05, seed=2)
    return [mol, crystal]


def assert_same(result: dict, ref: dict, atol: float = 1e-10) -> None:
    assert set(result) == set(ref)
    for key, value in ref.items():
        np.testing.assert_allclose(np.asarray(result[key]), value, atol=atol, rtol=0)


ALL = ["energy", "free_energy", "forces", "stress", "energies"]


def test_json_and_msgpack_match_in_process(client, reference):
    atoms = structures()
    refs = reference.evaluate([Structure.from_atoms(a) for a in atoms], ALL)
    r = client.post("/v1/calculate", json={"structures": [as_json(a) for a in atoms], "properties": ALL})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["model"] == {"name": "small", "sha256": reference.sha256}
    for result, ref in zip(r.json()["results"], refs):
        assert_same(result, ref)
    assert "stress" not in r.json()["results"][0]  # molecule: no stress

    body = {"structures": [{**as_json(a), "positions": a.positions} for a in atoms], "properties": ALL}
    r = client.post(
        "/v1/calculate", content=wire.packb(body),
        headers={"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK},
    )
    assert r.status_code == 200 and r.headers["content-type"] == wire.MSGPACK
    raw = msgpack.unpackb(r.content)["results"][1]["forces"]  # raw little-endian float64 bytes, not floats
    assert raw["dtype"] == "<f8" and raw["shape"] == [len(atoms[1]), 3] and len(raw["data"]) == len(atoms[1]) * 24
    for result, ref in zip(wire.unpackb(r.content)["results"], refs):
        assert_same(result, ref, atol=0)


def test_only_requested_properties(client, reference):
    atoms = structures()[1]
    r = client.post("/v1/calculate", json={"structures": [as_json(atoms)], "properties": ["energies"]})
    (ref,) = reference.evaluate([Structure.from_atoms(atoms)], ["energies"])
    assert list(r.json()["results"][0]) == ["energies"]
    np.testing.assert_allclose(r.json()["results"][0]["energies"], ref["energies"], atol=1e-10)


def test_http_md_steps_reuse_the_neighbour_search(client, reference):
    crystal = structures()[1]
    neighbors = client.app.state.registry.models["small"].neighbors
    reused = neighbors.reused
    rng = np.random.default_rng(3)
    for _ in range(6):  # an MD client over HTTP: the same atoms and cell, positions a little further each step
        crystal.positions += rng.normal(0.0, 0.01, crystal.positions.shape)
        r = client.post("/v1/calculate", json={"structures": [as_json(crystal)], "properties": ALL})
        (ref,) = reference.evaluate([Structure.from_atoms(crystal)], ALL)
        assert_same(r.json()["results"][0], ref)
    assert neighbors.reused - reused >= 4  # searched afresh on the first sighting (and the second), then reused


def good() -> dict:
    return {"numbers": [6, 8], "positions": [[0, 0, 0], [1.2, 0, 0]]}


def big(n: int) -> dict:
    return {"numbers": [1] * n, "positions": (np.arange(n)[:, None] * [1.0, 0, 0]).tolist()}


BAD_REQUESTS = [
    ({"structures": [good(), {**good(), "positions": [[0, 0, 0], [1, 0]]}]}, 422, "structures[1].positions", "rectangular"),
    ({"structures": [{**good(), "positions": [[0, 0, 0]]}]}, 422, "structures[0].positions", "shape (2, 3)"),
    ({"structures": [{**good(), "positions": "abc"}]}, 422, "structures[0].positions", "array of numbers"),
    ({"structures": [{**good(), "numbers": [6.5, 8]}]}, 422, "structures[0].numbers", "integer"),
    ({"structures": [{**good(), "positions": [["0", "0", "0"], ["1.2", "0", "0"]]}]}, 422, "structures[0].positions", "no strings"),
    ({"structures": [{**good(), "positions": [[0, 0, 0], [True, 0, 0]]}]}, 422, "structures[0].positions", "no strings or booleans"),
    ({"structures": [{"numbers": [], "positions": []}]}, 422, "structures[0].numbers", "at least one atom"),
    ({"structures": [{**good(), "numbers": [0, 8]}]}, 422, "structures[0].numbers", "1..118"),
    ({"structures": [{**good(), "numbers": [26, 8]}]}, 422, "structures[0].numbers", "['Fe'] not supported"),
    ({"structures": [{**good(), "positions": [[0, 0, 0], [0, 0, 0]]}]}, 422, "structures[0].positions", "overlap"),
    ({"structures": [{**good(), "cell": [[1, 0, 0], [2, 0, 0], [0, 0, 1]], "pbc": True}]}, 422, "structures[0].cell", "degenerate"),
    ({"structures": [{**good(), "cell": [[1, 0], [0, 1]], "pbc": True}]}, 422, "structures[0].cell", "(3, 3)"),
    ({"structures": [{**good(), "pbc": [True, False]}]}, 422, "structures[0].pbc", "list of 3 booleans"),
    ({"structures": [{**good(), "charge": 1}]}, 422, "structures[0].charge", "not permitted"),
    ({"structures": []}, 422, "structures", "at least 1"),
    ({"structures": [good()], "properties": ["dipole"]}, 422, "properties[0]", "'energy'"),
    ({"structures": [good()], "model": "nope"}, 404, "model", "unknown model 'nope'"),
    # geometry that crashed the neighbour-list library (SIGFPE) or exploded its memory before
    ({"structures": [{"numbers": [1, 1, 1], "positions": [[0, 0, 0], [3000, 0, 0], [0, 3000, 0]]}]}, 422, "structures[0].positions", "non-periodic axis"),
    ({"structures": [{"numbers": [1, 1], "positions": [[0, 0, 0], [1e6, 0, 0]]}]}, 422, "structures[0].positions", "within ±"),
    ({"structures": [{**good(), "cell": (np.eye(3) * 1e300).tolist(), "pbc": True}]}, 422, "structures[0].cell", "longer than"),
    ({"structures": [{"numbers": [6], "positions": [[0, 0, 0]], "cell": (np.eye(3) * 0.1).tolist(), "pbc": True}]}, 422, "structures[0].cell", "thick"),
    ({"structures": [{"numbers": [6], "positions": [[0, 0, 0]], "cell": (np.eye(3) * 0.6).tolist(), "pbc": True}]}, 422, "structures[0].positions", "too dense"),
    ({"structures": [{**good(), "positions": [[0, 0, 0], [0.001, 0, 0]]}]}, 422, "structures[0].positions", "overlap"),
    ({"structures": [big(9)]}, 413, "structures[0].numbers", "9 atoms exceed the limit of 8"),
    ({"structures": [big(8), big(8), big(8)]}, 413, "structures", "24 atoms exceed the limit of 20"),
]


@pytest.fixture(scope="module")
def limited(checkpoint):
    with serve(checkpoint, max_atoms_per_structure=8, max_atoms_per_request=20, max_body_bytes=4096) as c:
        yield c


@pytest.mark.parametrize("body, status, field, message", BAD_REQUESTS)
def test_bad_input_named_and_server_keeps_serving(limited, body, status, field, message):
    r = limited.post("/v1/calculate", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and message in error["message"], error
    assert limited.post("/v1/calculate", json={"structures": [good()]}).status_code == 200


def test_nan_in_msgpack_positions(limited):
    body = {"structures": [{"numbers": [6, 8], "positions": np.array([[0, 0, 0], [np.nan, 0, 0]])}]}
    r = limited.post("/v1/calculate", content=wire.packb(body), headers={"Content-Type": wire.MSGPACK})
    assert r.status_code == 422 and r.json()["error"] == {"field": "structures[0].positions", "message": "positions contain NaN or inf"}
    empty = {"structures": [{"numbers": np.zeros(0, dtype=np.int64), "positions": np.zeros((0, 3))}]}
    r = limited.post("/v1/calculate", content=wire.packb(empty), headers={"Content-Type": wire.MSGPACK})
    assert r.status_code == 422 and "at least one atom" in r.json()["error"]["message"]  # as in JSON
    bad_array = {"structures": [{"numbers": [6, 8], "positions": {"dtype": "<f8", "shape": [2, 3], "data": b"\0" * 40}}]}
    r = limited.post("/v1/calculate", content=wire.packb(bad_array), headers={"Content-Type": wire.MSGPACK})
    assert r.status_code == 400 and "48 raw bytes" in r.json()["error"]["message"]


def test_body_encoding_and_size_limits(limited):
    r = limited.post("/v1/calculate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = limited.post("/v1/calculate", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["field"] == "Content-Type"
    r = limited.post("/v1/calculate", content=b" " * 5000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "5000 bytes exceeds" in r.json()["error"]["message"]
    chunks = (b" " * 1000 for _ in range(5))  # chunked: no Content-Length, the bytes themselves are counted
    r = limited.post("/v1/calculate", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 4096" in r.json()["error"]["message"]
    assert limited.post("/v1/calculate", json={"structures": [good()]}).status_code == 200


def test_stream_session(client, reference):
    mol, crystal = structures()
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(wire.packb({"type": "step", "positions": mol.positions, "id": 1}))
        reply = wire.unpackb(ws.receive_bytes())
        assert reply["type"] == "error" and reply["id"] == 1 and "start" in reply["error"]["message"]

        ws.send_bytes(wire.packb({"type": "start", "id": 2, **as_json(crystal), "properties": ALL}))
        reply = wire.unpackb(ws.receive_bytes())
        assert reply["type"] == "result" and reply["id"] == 2 and reply["model"]["sha256"] == reference.sha256
        assert_same(reply["results"], reference.evaluate([Structure.from_atoms(crystal)], ALL)[0], atol=0)

        moved = crystal.copy()
        moved.positions += 0.01
        moved.set_cell(crystal.cell.array * 1.02, scale_atoms=False)
        ws.send_bytes(wire.packb({"type": "step", "id": 3, "positions": moved.positions, "cell": moved.cell.array}))
        assert_same(wire.unpackb(ws.receive_bytes())["results"], reference.evaluate([Structure.from_atoms(moved)], ALL)[0], atol=0)

        bad = moved.positions.copy()
        bad[0, 1] = np.inf
        ws.send_bytes(wire.packb({"type": "step", "id": 4, "positions": bad}))
        reply = wire.unpackb(ws.receive_bytes())
        assert reply["status"] == 422 and reply["error"]["field"] == "positions" and reply["id"] == 4
        ws.send_bytes(wire.packb({"type": "step", "id": 5, "positions": moved.positions[:2]}))
        assert wire.unpackb(ws.receive_bytes())["error"]["message"].startswith("positions must have shape (4, 3)")
        ws.send_text("{}")
        assert wire.unpackb(ws.receive_bytes())["error"]["field"] == "frame"

        moved.positions -= 0.02  # the session survived the bad steps and kept the changed cell
        ws.send_bytes(wire.packb({"type": "step", "id": 6, "positions": moved.positions}))
        reply = wire.unpackb(ws.receive_bytes())
        # the session reused its neighbour search: the same edges in another order, so equal to round-off
        assert_same(reply["results"], reference.evaluate([Structure.from_atoms(moved)], ALL)[0], atol=1e-12)


def test_openapi_models_health_metrics(client, reference):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/calculate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/msgpack"}
    schemas = spec["components"]["schemas"]
    assert {"CalculateRequest", "StructureIn", "CalculateResponse", "ErrorResponse", "StreamStart", "StreamStep"} <= set(schemas)
    assert schemas["StructureIn"]["properties"]["positions"]["type"] == "array"
    (info,) = client.get("/v1/models").json()["models"]
    assert info["species"] == [1, 6, 7, 8, 13, 29] and info["cutoff"] == 4.0 and info["sha256"] == reference.sha256
    assert info["dtype"] == "float64" and info["kernels"] == "e3nn" and info["default"]
    assert client.get("/health/live").json() == {"status": "live"}
    client.post("/v1/calculate", json={"structures": [good()], "model": "nope"})
    assert client.post("/v1/calculate", json={"structures": [good()]}).status_code == 200  # a batch, also when run alone
    text = client.get("/metrics").text
    assert 'mlip_errors_total{endpoint="/v1/calculate",status="404"}' in text
    assert 'mlip_batch_atoms_count{model="small"}' in text and "mlip_compute_seconds_bucket" in text


def test_several_models_and_model_card(tmp_path, reference):
    make_checkpoint(tmp_path / "a.safetensors", seed=1)
    make_checkpoint(tmp_path / "b.safetensors", seed=2, species=[1, 8])
    (tmp_path / "b.md").write_text("# Model b\n\nWater only, trained on nothing.\n")
    with serve(None, models=tmp_path, default_model="b") as c:
        models = c.get("/v1/models").json()
        assert models["default"] == "b"
        by_name = {m["name"]: m for m in models["models"]}
        assert by_name["b"]["summary"] == "Water only, trained on nothing." and by_name["a"]["summary"] is None
        water = {"numbers": [8, 1, 1], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]}
        assert c.post("/v1/calculate", json={"structures": [water]}).json()["model"]["name"] == "b"
        r = c.post("/v1/calculate", json={"structures": [good()]})
        assert r.status_code == 422 and "['C'] not supported" in r.json()["error"]["message"]
        assert c.post("/v1/calculate", json={"structures": [good()], "model": "a"}).json()["model"]["name"] == "a"


def test_auth(tmp_path, checkpoint):
    keys = tmp_path / "keys"
    keys.write_text("second-key\n\n")
    with serve(checkpoint, api_key="first-key", api_keys_file=keys) as c:
        assert c.get("/health/live").status_code == 200 and c.get("/health/ready").status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Basic first-key"}).status_code == 401
        for key in ("first-key", "second-key"):
            r = c.post("/v1/calculate", json={"structures": [good()]}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        with pytest.raises(WebSocketDenialResponse) as rejected:
            with c.websocket_connect("/v1/stream"):
                pass
        assert rejected.value.status_code == 401 and "invalid API key" in rejected.value.json()["error"]["message"]
        with c.websocket_connect("/v1/stream", headers={"Authorization": "Bearer second-key"}) as ws:
            ws.send_bytes(wire.packb({"type": "start", **good(), "id": 1}))
            assert wire.unpackb(ws.receive_bytes())["type"] == "result"


def test_not_ready_until_loaded_and_warmed_up(monkeypatch, checkpoint):
    release, calls = threading.Event(), []
    original = Potential.evaluate

    def slow_warm_up(self, structures, properties):
        calls.append(len(structures))
        assert release.wait(30)
        return original(self, structures, properties)

    monkeypatch.setattr(Potential, "evaluate", slow_warm_up)
    with TestClient(create_app(Settings(checkpoint=checkpoint))) as c:
        wait_until(lambda: bool(calls), 30)  # the warm-up forward pass has started but not finished
        assert c.get("/health/live").status_code == 200
        r = c.get("/health/ready")
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert c.post("/v1/calculate", json={"structures": [good()]}).status_code == 503
        release.set()
        wait_ready(c)
        assert c.post("/v1/calculate", json={"structures": [good()]}).status_code == 200


def test_failed_load_reported_by_readiness(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with TestClient(create_app(Settings(checkpoint=broken))) as c:
        wait_until(lambda: "not a readable checkpoint" in c.get("/health/ready").text)
        assert c.get("/health/ready").status_code == 503


class Gate:
    """Wraps evaluate_graphs: records batch sizes, blocks the first call until released."""

    def __init__(self, potential: Potential, fail=None):
        self.original, self.fail = potential.evaluate_graphs, fail
        self.batches: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()
        potential.evaluate_graphs = self

    def __call__(self, graphs, properties):
        self.batches.append(len(graphs))
        self.entered.set()
        assert self.release.wait(30)
        if self.fail is not None:
            self.fail(graphs)
        return self.original(graphs, properties)


def test_requests_arriving_during_a_batch_form_the_next_batch(reference):
    graphs = [reference.graph(Structure.from_atoms(a)) for a in structures()] * 3
    worker = BatchWorker(reference, Metrics(), max_batch_atoms=10_000)
    gate = Gate(reference)
    worker.start()

    async def run() -> list:
        first = worker.submit(graphs[:1], {"energy", "forces"})
        await asyncio.to_thread(gate.entered.wait, 10)
        rest = [worker.submit([g], {"energy"}) for g in graphs[1:]]  # queued while the worker computes
        gate.release.set()
        return await asyncio.gather(*first, *(f for fs in rest for f in fs))

    try:
        results = asyncio.run(run())
    finally:
        worker.stop()
        del reference.evaluate_graphs
    assert gate.batches == [1, 5]
    assert set(results[0]) == {"energy", "forces"} and set(results[1]) == {"energy"}
    for graph, result in zip(graphs, results):
        assert result["energy"] == pytest.approx(reference.evaluate_graphs([graph], ["energy"])[0]["energy"], abs=1e-10)


@pytest.mark.parametrize("max_wait_s, expected", [(1.0, [3]), (0.0, [1, 2])])
def test_max_wait_gathers_requests_arriving_later(reference, max_wait_s, expected):
    graph = reference.graph(Structure.from_atoms(structures()[0]))
    batches: list[int] = []
    original = reference.evaluate_graphs
    reference.evaluate_graphs = lambda graphs, properties: (batches.append(len(graphs)), original(graphs, properties))[1]
    worker = BatchWorker(reference, Metrics(), max_wait_s=max_wait_s)
    worker.start()

    async def run() -> list:
        first = worker.submit([graph], {"energy"})
        await asyncio.sleep(0.2)  # without max wait the worker has taken the first one by now
        rest = worker.submit([graph, graph], {"energy"})
        return await asyncio.gather(*first, *rest)

    try:
        results = asyncio.run(run())
    finally:
        worker.stop()
        del reference.evaluate_graphs
    energies = [r["energy"] for r in results]
    assert batches == expected and max(energies) - min(energies) < 1e-12  # same structure, same energy in any batch


def take_with_sessions(worker: BatchWorker, graph, open_sessions: int, late: str | None) -> tuple[int, float]:
    """Two sessions' steps queued, ``open_sessions`` open; 0.2 s into ``_take``, the third session either sends
    its step (``late="step"``) or closes (``late="close"``). Returns the batch size and the seconds ``_take`` took."""
    for _ in range(open_sessions):
        worker.session_opened()

    def timed_take() -> tuple[int, float]:
        start = time.perf_counter()
        return len(worker._take()), time.perf_counter() - start

    async def run() -> tuple[int, float]:
        for _ in range(2):
            worker.submit([graph], {"energy"}, session=True)
        take = asyncio.create_task(asyncio.to_thread(timed_take))
        await asyncio.sleep(0.2)
        if late == "step":
            worker.submit([graph], {"energy"}, session=True)
        elif late == "close":
            worker.session_closed()
        return await take

    return asyncio.run(run())


@pytest.mark.parametrize("session_wait_s, expected", [(2.0, 3), (0.0, 2)])
def test_worker_waits_for_open_sessions_next_steps(reference, session_wait_s, expected):
    """Three WebSocket sessions open, two steps queued: the third step joins the batch instead of running
    alone after it (MD clients would otherwise settle into cohorts that alternate at half the batch size)."""
    graph = reference.graph(Structure.from_atoms(structures()[0]))
    worker = BatchWorker(reference, Metrics(), session_wait_s=session_wait_s)  # not started: _take by hand
    worker._last_batch_s = 10.0
    size, _ = take_with_sessions(worker, graph, open_sessions=3, late="step")
    assert size == expected


def test_session_wait_is_bounded_by_the_last_batch_and_ends_when_a_session_closes(reference):
    graph = reference.graph(Structure.from_atoms(structures()[0]))
    worker = BatchWorker(reference, Metrics(), session_wait_s=2.0)
    worker._last_batch_s = 0.1  # at most 0.05 s of waiting, not 2 s
    size, seconds = take_with_sessions(worker, graph, open_sessions=3, late=None)
    assert size == 2 and seconds < 0.5
    worker = BatchWorker(reference, Metrics(), session_wait_s=10.0)
    worker._last_batch_s = 100.0
    size, seconds = take_with_sessions(worker, graph, open_sessions=3, late="close")
    assert size == 2 and 0.15 <= seconds < 5.0  # waited for the third session until it closed, not for 10 s
    worker = BatchWorker(reference, Metrics(), session_wait_s=10.0)
    worker._last_batch_s = 100.0
    size, seconds = take_with_sessions(worker, graph, open_sessions=2, late=None)  # everyone is in: no wait
    assert size == 2 and seconds < 0.5


def test_stream_sessions_are_counted_while_open(client):
    worker = client.app.state.registry.models["small"].worker
    with client.websocket_connect("/v1/stream") as ws:
        assert worker._sessions == 0  # connected, no model chosen yet
        for i in range(2):  # a second start on the same connection does not count twice
            ws.send_bytes(wire.packb({"type": "start", **good(), "id": i}))
            assert wire.unpackb(ws.receive_bytes())["type"] == "result"
            assert worker._sessions == 1
    wait_until(lambda: worker._sessions == 0)


def test_queue_full_answers_503_with_retry_after(checkpoint):
    with serve(checkpoint, max_queue=1, retry_after_s=3) as c:
        potential = c.app.state.registry.models["small"].potential
        gate = Gate(potential)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.post, "/v1/calculate", json={"structures": [good()]})
            assert gate.entered.wait(10)
            queued = pool.submit(c.post, "/v1/calculate", json={"structures": [good()]})
            worker = c.app.state.registry.models["small"].worker
            wait_until(lambda: len(worker._queue) == 1)
            r = c.post("/v1/calculate", json={"structures": [good()]})
            assert r.status_code == 503 and r.headers["Retry-After"] == "3" and "queue full" in r.json()["error"]["message"]
            gate.release.set()
            assert running.result(30).status_code == 200 and queued.result(30).status_code == 200
        assert c.post("/v1/calculate", json={"structures": [good()]}).status_code == 200


def test_abandoned_jobs_do_not_count_toward_the_queue_limit(reference):
    worker = BatchWorker(reference, Metrics(), max_queue=2)  # not started: jobs stay queued
    graph = reference.graph(Structure.from_atoms(molecule("H2O")))

    async def run() -> None:
        abandoned = worker.submit([graph, graph], {"energy"})
        for future in abandoned:
            future.cancel()  # the callers timed out or disconnected
        accepted = worker.submit([graph, graph], {"energy"})
        assert len(accepted) == 2 and len(worker._queue) == 2
        with pytest.raises(Exception, match="queue full"):
            worker.submit([graph], {"energy"})

    asyncio.run(run())


def test_a_large_request_cannot_starve_a_small_one(reference):
    """Strict FIFO would run the 10-structure request's batches first; fair share serves both at once."""
    water = reference.graph(Structure.from_atoms(molecule("H2O")))
    worker = BatchWorker(reference, Metrics(), max_batch_atoms=3 * 3)  # three waters per batch

    async def run() -> None:
        bulk_request = worker.submit([water] * 10, {"energy"})
        md_step = worker.submit([water], {"energy"})
        first = worker._take()
        assert [job.future for job in first] == [bulk_request[0], md_step[0], bulk_request[1]]  # round robin
        assert len(worker._queue) == 8

    asyncio.run(run())


def test_batches_are_budgeted_by_edges(reference):
    water = reference.graph(Structure.from_atoms(molecule("H2O")))  # 6 directed edges
    worker = BatchWorker(reference, Metrics(), max_batch_atoms=1000, max_batch_edges=2 * 6)

    async def run() -> None:
        worker.submit([water] * 5, {"energy"})
        assert len(worker._take()) == 2 and len(worker._queue) == 3

    asyncio.run(run())


def test_out_of_memory_splits_batch_and_rejects_only_too_large(client, reference, monkeypatch):
    potential = client.app.state.registry.models["small"].potential
    original, batches = potential.evaluate_graphs, []

    def tight_memory(graphs, properties):
        batches.append(len(graphs))
        if len(graphs) > 1 or int(graphs[0].num_atoms.sum()) > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(graphs, properties)

    monkeypatch.setattr(potential, "evaluate_graphs", tight_memory)
    atoms = [structures()[1]] * 4
    r = client.post("/v1/calculate", json={"structures": [as_json(a) for a in atoms], "properties": ALL})
    assert r.status_code == 200, r.text
    assert batches == [4, 2, 1, 1, 2, 1, 1]
    ref = reference.evaluate([Structure.from_atoms(atoms[0])], ALL)[0]
    for result in r.json()["results"]:
        assert_same(result, ref)
    large = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 3)
    r = client.post("/v1/calculate", json={"structures": [as_json(atoms[0]), as_json(large)]})
    assert r.status_code == 413 and r.json()["error"]["field"] == "structures[1]"
    assert "12 atoms does not fit" in r.json()["error"]["message"]
    assert client.post("/v1/calculate", json={"structures": [as_json(atoms[0])]}).status_code == 200


@needs_cuda
def test_real_cuda_out_of_memory_splits_batch_and_keeps_serving(checkpoint):
    """A real CUDA out-of-memory: with the allocator capped at 2.5 structures' worth, a batch of six is
    split until it fits, a structure four times larger alone is a 413, and the server keeps serving."""
    cell = bulk("Cu", "fcc", a=3.6, cubic=True) * (6, 6, 6)  # 864 atoms
    cell.rattle(0.05, seed=3)
    limits = dict(max_batch_atoms=10**6, max_atoms_per_structure=10**5, max_atoms_per_request=10**6,
                  max_edges_per_structure=10**8)  # fmt: skip
    with serve(checkpoint, device="cuda", **limits) as client:
        potential = client.app.state.registry.models["small"].potential
        gpu = potential.device.index if potential.device.index is not None else torch.cuda.current_device()
        ref = potential.evaluate([Structure.from_atoms(cell)], ALL)[0]
        torch.cuda.synchronize(gpu)
        base = torch.cuda.memory_allocated(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
        potential.evaluate([Structure.from_atoms(cell)], ALL)
        one = torch.cuda.max_memory_allocated(gpu) - base
        total = torch.cuda.get_device_properties(gpu).total_memory
        original, batches = potential.evaluate_graphs, []

        def recording(graphs, properties):
            batches.append(len(graphs))
            return original(graphs, properties)

        potential.evaluate_graphs = recording
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((base + 2.5 * one) / total, gpu)
        try:
            r = client.post("/v1/calculate", json={"structures": [as_json(cell)] * 6, "properties": ALL})
            assert r.status_code == 200, r.text
            assert batches[0] == 6 and len(batches) > 1, batches  # the batch of six did not fit and was split
            for result in r.json()["results"]:
                assert_same(result, ref, atol=1e-9)
            r = client.post("/v1/calculate", json={"structures": [as_json(cell * (2, 2, 1))]})
            assert r.status_code == 413 and "3456 atoms does not fit in cuda" in r.json()["error"]["message"], r.text
            assert client.post("/v1/calculate", json={"structures": [as_json(cell)]}).status_code == 200
            assert client.get("/health/ready").status_code == 200
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, gpu)
            del potential.evaluate_graphs


def test_unexpected_failure_hits_only_the_bad_structure(client, reference, monkeypatch):
    potential = client.app.state.registry.models["small"].potential
    gate = Gate(potential, fail=lambda graphs: [int(g.num_atoms) for g in graphs].count(3) and 1 / 0)
    try:
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(client.post, "/v1/calculate", json={"structures": [good()]})
            assert gate.entered.wait(10)
            water = {"numbers": [8, 1, 1], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]}
            bad = pool.submit(client.post, "/v1/calculate", json={"structures": [good(), water]})
            fine = pool.submit(client.post, "/v1/calculate", json={"structures": [good()]})
            worker = client.app.state.registry.models["small"].worker
            wait_until(lambda: len(worker._queue) == 3)
            gate.release.set()
            assert blocker.result(30).status_code == 200 and fine.result(30).status_code == 200
            r = bad.result(30)
        assert gate.batches[:2] == [1, 3]  # the failing batch of three, then one by one
        assert r.status_code == 500 and r.json()["error"]["field"] == "structures[1]"  # the server's fault, not the input's
        assert "ZeroDivisionError" in r.json()["error"]["message"]
        assert 'mlip_worker_failures_total{model="small"} 1.0' in client.get("/metrics").text
    finally:
        del potential.evaluate_graphs
    assert client.post("/v1/calculate", json={"structures": [good()]}).status_code == 200


def test_device_failures_fail_readiness_until_the_device_recovers(checkpoint):
    """A broken device answers 500 (retryable), and after N failures in a row /health/ready fails."""
    with serve(checkpoint, max_consecutive_failures=2) as client:
        potential = client.app.state.registry.models["small"].potential

        def broken(graphs, properties):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        potential.evaluate_graphs = broken
        try:
            for _ in range(2):
                r = client.post("/v1/calculate", json={"structures": [good()]})
                assert r.status_code == 500 and "illegal memory access" in r.json()["error"]["message"]
            ready = client.get("/health/ready")
            assert ready.status_code == 503 and "failing" in ready.json()["error"]["message"]
        finally:
            del potential.evaluate_graphs
        assert client.post("/v1/calculate", json={"structures": [good()]}).status_code == 200
        assert client.get("/health/ready").status_code == 200


def test_hung_worker_fails_liveness(checkpoint):
    with serve(checkpoint, worker_stall_s=0.2) as client:
        potential = client.app.state.registry.models["small"].potential
        gate = Gate(potential)
        try:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/v1/calculate", json={"structures": [good()]})
                assert gate.entered.wait(10)
                time.sleep(0.3)
                live = client.get("/health/live")
                assert live.status_code == 503 and "stuck" in live.json()["error"]["message"]
                gate.release.set()
                assert pending.result(30).status_code == 200
        finally:
            del potential.evaluate_graphs
        wait_until(lambda: client.get("/health/live").status_code == 200)  # the worker leaves the batch just after answering


def test_liveness_answers_while_the_worst_accepted_request_is_built(checkpoint):
    """The largest, densest structure the limits admit is built off the event loop: /health/live stays fast."""
    from ase.build import bulk

    crystal = bulk("C", "diamond", a=3.57, cubic=True) * (5, 5, 5)  # 1000 atoms, ~70 neighbours each
    crystal.numbers[:] = 6
    body = {"structures": [{**as_json(crystal), "numbers": [6] * len(crystal)}], "properties": ["energy"]}
    with serve(checkpoint) as client:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, "/v1/calculate", json=body)
            worst = 0.0
            while not pending.done():
                start = time.perf_counter()
                assert client.get("/health/live").status_code == 200
                worst = max(worst, time.perf_counter() - start)
                time.sleep(0.01)
            assert pending.result().status_code == 200
        assert worst < 0.1, f"/health/live took {worst * 1e3:.0f} ms"


@pytest.mark.parametrize("setting", ["api_key", "api_keys_file"])
def test_empty_api_key_is_a_startup_error(tmp_path, setting):
    empty = tmp_path / "keys"
    empty.write_text("\n  \n")
    settings = Settings(**({"api_key": "  "} if setting == "api_key" else {"api_keys_file": empty}))
    with pytest.raises(ValueError, match="empty|no key"):
        settings.api_keys()


def test_one_bad_file_in_models_directory_is_named(checkpoint, tmp_path):
    import shutil

    shutil.copy(checkpoint, tmp_path / "good.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with TestClient(create_app(Settings(models=tmp_path))) as client:
        wait_until(lambda: client.app.state.registry.error is not None)
        r = client.get("/health/ready")
        assert r.status_code == 503 and "broken.safetensors" in r.json()["error"]["message"]
        assert client.get("/health/live").status_code == 200


def test_pinned_checkpoint_hash_is_enforced(checkpoint):
    with TestClient(create_app(Settings(checkpoint=checkpoint, checkpoint_sha256={"small": "0" * 64}))) as client:
        wait_until(lambda: client.app.state.registry.error is not None)
        assert "not the expected" in client.get("/health/ready").json()["error"]["message"]


def test_settings_from_environment_and_flags(monkeypatch, tmp_path):
    from mlip.cli import main

    monkeypatch.setenv("MLIP_MAX_BATCH_ATOMS", "123")
    monkeypatch.setenv("MLIP_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("MLIP_API_KEY", "k")
    settings = Settings()
    assert (settings.max_batch_atoms, settings.max_wait_ms, settings.api_keys()) == (123, 2.5, ["k"])
    assert settings.host == "127.0.0.1" and settings.port == 8000 and settings.device == "auto"
    assert Settings(max_batch_atoms=7).max_batch_atoms == 7
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2


def test_unknown_kernels_setting_is_refused():
    with pytest.raises(ValueError, match="kernels"):
        Settings(kernels="triton")


@pytest.mark.skipif(not cueq_available(), reason="cuequivariance-torch is not installed")
@pytest.mark.filterwarnings("ignore:kernels='cueq' runs cuEquivariance's PyTorch fallback")
def test_server_on_cueq_kernels_matches_in_process_e3nn(checkpoint, reference):
    atoms = structures()
    refs = reference.evaluate([Structure.from_atoms(a) for a in atoms], ALL)
    with serve(checkpoint, kernels="cueq") as client:
        assert client.get("/v1/models").json()["models"][0]["kernels"] == "cueq"
        r = client.post("/v1/calculate", json={"structures": [as_json(a) for a in atoms], "properties": ALL})
    assert r.status_code == 200
    for result, ref in zip(r.json()["results"], refs):
        assert_same(result, ref)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-device", "separate-devices"])
def test_models_on_one_device_take_turns(checkpoint, shared):
    """Two models' workers on one device never run forward passes at the same time, and alternate
    (the control with separate turn-keepers overlaps, so the check can fail)."""
    intervals: list[tuple[str, float, float]] = []

    def recording(potential: Potential, name: str):
        original = potential.evaluate_graphs

        def evaluate_graphs(graphs, properties):
            start = time.perf_counter()
            time.sleep(0.02)
            result = original(graphs, properties)
            intervals.append((name, start, time.perf_counter()))
            return result

        potential.evaluate_graphs = evaluate_graphs
        return potential

    turns = DeviceTurns()
    workers = [
        BatchWorker(recording(Potential.load(checkpoint), name), Metrics(), max_batch_atoms=3,
                    device_turns=turns if shared else None)
        for name in ("a", "b")
    ]
    graph = workers[0].potential.graph(Structure.from_atoms(molecule("H2O")))
    for worker in workers:
        worker.start()

    async def run() -> None:
        futures = [f for _ in range(6) for worker in workers for f in worker.submit([graph], {"energy"})]
        await asyncio.gather(*futures)

    try:
        asyncio.run(run())
    finally:
        for worker in workers:
            worker.stop()
    intervals.sort(key=lambda i: i[1])
    overlaps = sum(later[1] < earlier[2] for earlier, later in zip(intervals, intervals[1:]))
    if shared:
        assert overlaps == 0
        switches = sum(x[0] != y[0] for x, y in zip(intervals, intervals[1:]))
        assert switches >= 6  # fair turns: neither model waits for the other's whole queue
    else:
        assert overlaps > 0
