"""Fuzzing: the OpenAPI schema (schemathesis), WebSocket frames and the geometry checks (hypothesis). No 5xx, no crash."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlip import Structure
from mlip.graph import SpeciesIndex, build_graph

schemathesis = pytest.importorskip("schemathesis")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from mlip.server.app import create_app  # noqa: E402
from mlip.server.settings import Settings  # noqa: E402

from .serverproc import SERVER_SPECIES, make_checkpoint  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "small.safetensors")
    with TestClient(create_app(Settings(checkpoint=checkpoint))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield client


def test_schema_fuzz_gives_no_server_error(client):
    """Every operation of /openapi.json with schema-conforming inputs: 2xx/4xx only, server alive after."""
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(operation.as_strategy())
        def call(case) -> None:
            body = case.body if isinstance(case.body, (dict, list)) else None  # GETs carry schemathesis' NOT_SET
            r = client.request(case.method, case.formatted_path, json=body, headers=case.headers or {}, params=case.query)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (case.body, r.text)

        call()
    assert sum(statuses.values()) >= 60 and 422 in statuses
    assert client.get("/health/live").status_code == 200


coordinates = st.one_of(
    st.floats(-6.0, 6.0), st.floats(-1e7, 1e7), st.sampled_from([0.0, 1e-9, 999.9, 1000.1, 3000.0, 1e5, -1e5])
)
cells = st.one_of(
    st.none(),
    st.lists(st.floats(-2000.0, 2000.0), min_size=9, max_size=9),
    st.sampled_from([[0.02, 0, 0, 0, 0.02, 0, 0, 0, 0.02], [1e300, 0, 0, 0, 1, 0, 0, 0, 1], [3, 0, 0, 0, 3, 0, 0, 0, 0]]),
)


@st.composite
def structures(draw) -> dict:
    """Well-shaped structures (matching numbers and positions) with hostile values: what a schema fuzzer rarely reaches."""
    n = draw(st.integers(1, 6))
    structure = {
        "numbers": [draw(st.sampled_from(SERVER_SPECIES)) for _ in range(n)],
        "positions": draw(st.lists(st.lists(coordinates, min_size=3, max_size=3), min_size=n, max_size=n)),
    }
    cell = draw(cells)
    if cell is not None:
        structure["cell"] = np.reshape(cell, (3, 3)).tolist()
        structure["pbc"] = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    return structure


def test_structure_fuzz_over_http_gives_no_server_error(client):
    statuses: dict[int, int] = {}

    @FUZZ
    @given(st.lists(structures(), min_size=1, max_size=3))
    def call(batch) -> None:
        r = client.post("/v1/calculate", json={"structures": batch})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code in (200, 413, 422), (batch, r.text)

    call()
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0, statuses
    assert client.get("/health/live").status_code == 200


MSGPACK_INTEGERS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can encode at all (the client's limit, not the server's)


def step_frames(draw_positions) -> st.SearchStrategy:
    """One WebSocket frame: junk bytes, a msgpack value of the wrong kind, a start with a hostile structure,
    or a step with hostile positions, cell or pbc."""
    from mlip import wire

    junk = st.one_of(st.binary(max_size=64), st.just(b"\xc1"), st.just(wire.packb([1, 2, 3])))
    start = structures().map(lambda s: wire.packb({"type": "start", "id": 1, **s}))
    step = st.fixed_dictionaries(
        {"type": st.just("step"), "id": st.integers(0, 9), "positions": draw_positions},
        optional={"cell": st.one_of(st.none(), cells), "pbc": st.lists(st.booleans(), min_size=3, max_size=3),
                  "extra": MSGPACK_INTEGERS},
    ).map(lambda m: wire.packb({k: np.reshape(v, (3, 3)) if k == "cell" and v is not None else v for k, v in m.items()}))
    other = st.dictionaries(st.sampled_from(["type", "id", "positions", "numbers"]), MSGPACK_INTEGERS | st.text(max_size=4)).map(wire.packb)
    return st.one_of(junk, start, step, other)


def test_websocket_frame_fuzz_keeps_the_session_answering(client):
    """Sequences of junk and hostile frames on an open WebSocket session: every frame gets one reply, a result
    or a 4xx error (never a 5xx or a dropped connection), and a valid start and step still work afterwards."""
    from mlip import wire

    positions = st.one_of(
        st.lists(st.lists(coordinates, min_size=3, max_size=3), min_size=0, max_size=7).map(np.array),
        st.lists(coordinates, max_size=5), MSGPACK_INTEGERS, st.text(max_size=3),
    )
    statuses: dict[int, int] = {}
    good = {"type": "start", "id": 7, "numbers": [1, 8], "positions": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.97]]}
    # valid steps of the session's two atoms among the hostile frames (a run drew none once without them)
    valid_steps = st.floats(0.8, 3.0).map(lambda d: wire.packb({"type": "step", "id": 1, "positions": [[0.0, 0.0, 0.0], [0.0, 0.0, d]]}))

    @FUZZ
    @given(st.lists(step_frames(positions) | valid_steps, min_size=1, max_size=5))
    def session(frames) -> None:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_bytes(wire.packb(good))  # a session to step: the frames below hit its positions checks
            assert wire.unpackb(ws.receive_bytes())["type"] == "result"
            for frame in frames:
                ws.send_bytes(frame)
                reply = wire.unpackb(ws.receive_bytes())
                status = 200 if reply["type"] == "result" else reply["status"]
                statuses[status] = statuses.get(status, 0) + 1
                assert status in (200, 400, 413, 422), (frame, reply)
            ws.send_bytes(wire.packb(good))
            assert wire.unpackb(ws.receive_bytes())["type"] == "result"
            ws.send_bytes(wire.packb({"type": "step", "id": 8, "positions": [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]}))
            assert wire.unpackb(ws.receive_bytes())["type"] == "result"

    session()
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0 and statuses.get(400, 0) > 0, statuses
    assert client.get("/health/live").status_code == 200


@FUZZ
@given(
    n=st.integers(1, 6),
    data=st.data(),
    cell=cells,
    pbc=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_geometry_fuzz_is_value_error_or_graph(n, data, cell, pbc):
    """Any finite geometry either builds a bounded graph or raises ValueError: never a crash or a hang."""
    positions = np.array(data.draw(st.lists(st.lists(coordinates, min_size=3, max_size=3), min_size=n, max_size=n)))
    numbers = [SERVER_SPECIES[0]] * n
    start = time.perf_counter()
    try:
        structure = Structure.from_arrays(numbers, positions, None if cell is None else np.reshape(cell, (3, 3)), pbc)
        graph = build_graph(structure, SpeciesIndex(SERVER_SPECIES), 4.0, max_edges=200_000)
        assert graph.edge_index.shape[1] <= 200_000
    except ValueError:
        pass
    assert time.perf_counter() - start < 5.0


def test_atoms_many_cells_apart_are_searched_quickly_and_give_the_same_edges():
    """vesin's search time grows with the number of cells between atoms (36 s for two atoms 1000 Å apart along a
    1.7 Å periodic vector, a case the geometry fuzz found): positions are wrapped first and the shifts corrected."""
    cell = np.array([[12.0, 0.0, 0.0], [0.0, 13.0, 0.0], [1.04, 1.02, 0.87]])
    pbc = [False, False, True]
    near = np.array([[0.0, 0.0, 0.0], [0.3, 0.2, 0.1], [1.5, 0.4, 0.0]])
    far = near + np.array([[0], [700], [-1500]]) * cell[2]  # the same atoms, whole periodic vectors apart

    def edge_vectors(positions: np.ndarray) -> np.ndarray:
        graph = build_graph(Structure.from_arrays([1, 1, 1], positions, cell, pbc), SpeciesIndex([1]), 4.0)
        receiver, sender = graph.edge_index.numpy()
        vectors = positions[sender] - positions[receiver] + graph.edge_shift.numpy() @ cell
        return np.array(sorted(zip(receiver, sender, *np.round(vectors, 9).T)))

    start = time.perf_counter()
    expected, got = edge_vectors(near), edge_vectors(far)
    assert time.perf_counter() - start < 2.0
    assert len(expected) > 10
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_small_structures_are_searched_directly_with_vesins_edges(monkeypatch):
    """Few atoms are searched by all pairs over all images (vesin took over a minute for 4 atoms ~1000 Å apart across
    the non-periodic directions of a 1-D periodic cell); the edges equal vesin's for any cell and periodicity."""
    import mlip.neighbors as neighbors

    slow = ([[71.01, -471.57, 381.46], [508.63, -478.45, -300.58], [-391.58, 418.99, 492.33], [-546.87, -201.10, -369.01]],
            [[-12.074, 3.309, -0.363], [-13.363, 4.767, 12.678], [-14.596, 1.798, 9.347]], [True, False, False])
    start = time.perf_counter()
    graph = build_graph(Structure.from_arrays([1] * 4, *slow), SpeciesIndex([1]), 4.0)
    assert time.perf_counter() - start < 2.0 and graph.edge_index.shape[1] == 0

    rng, edges = np.random.default_rng(0), 0
    for _ in range(100):  # cells down to 1 Å (many images of one pair), every periodicity
        n, pbc = int(rng.integers(1, 20)), rng.random(3) < 0.6
        cell, positions = np.diag(rng.uniform(1.0, 12.0, 3)) + rng.normal(0, 1.0, (3, 3)), rng.uniform(-5, 15, (n, 3))
        direct = neighbors.neighbor_list(positions, cell, pbc, 4.0)
        with monkeypatch.context() as patch:
            patch.setattr(neighbors, "MAX_DIRECT_DISTANCES", -1)  # vesin for everything
            vesin = neighbors.neighbor_list(positions, cell, pbc, 4.0)
        assert sorted(zip(*direct[:2], map(tuple, direct[2]))) == sorted(zip(*vesin[:2], map(tuple, vesin[2])))
        edges += len(direct[0])
    assert edges > 1000
