"""Padded sizes and replayed CUDA graphs: the real structures' results are those of the eager evaluation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.build import bulk, graphene, molecule

from mlip import Potential, Structure
from mlip.cuda_graphs import CudaGraphs
from mlip.graph import batch_graphs
from mlip.padding import MIN_ATOMS, bucket, pad_graph, padded_sizes
from mlip.properties import compute_properties

from .conftest import TEST_DEVICE, needs_cuda


def structures() -> list:
    """A molecule, a periodic cell (stress) and a 2-D sheet (no stress), rattled."""
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.numbers[1] = 13
    sheet = graphene(size=(2, 2, 1))
    sheet.numbers[0] = 7
    atoms = [molecule("CH3CONH2"), crystal, sheet]
    for i, a in enumerate(atoms):
        a.rattle(0.05, seed=i)
    return atoms


def graphs_of(potential: Potential, atoms) -> list:
    return [potential.graph(Structure.from_atoms(a)) for a in atoms]


def test_bucket_ladder_holds_the_count_with_bounded_waste():
    sizes = {bucket(n, MIN_ATOMS) for n in range(1, 5000)}
    assert len(sizes) <= 20  # few sizes, so few captures
    for n in range(1, 5000):
        size = bucket(n, MIN_ATOMS)
        assert size >= n and size % 8 == 0 and (size <= 1.5 * n + 8 or size == MIN_ATOMS)


@pytest.fixture
def cpu_model(model) -> torch.nn.Module:
    """A float64 CPU copy of the session model (which sits on the test device, maybe a GPU)."""
    copied = copy.deepcopy(model).to("cpu", torch.float64).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def test_padding_leaves_every_real_structure_unchanged(potential, cpu_model):
    """Energies, forces, per-atom energies and stress of the real structures equal the unpadded batch's
    (float64, 1e-12), for a molecule, a periodic cell and a sheet evaluated together."""
    host = batch_graphs(graphs_of(potential, structures()))
    atoms, edges, count = padded_sizes(host)
    assert atoms > host.species.shape[0] and edges >= host.edge_index.shape[1] and count > host.num_graphs
    padded = pad_graph(host, atoms + 8, edges + 40, count + 1, potential.cutoff)  # edges that loop on padding atoms
    ref = compute_properties(cpu_model, host, forces=True, stress=True)
    got = compute_properties(cpu_model, padded, forces=True, stress=True)
    n, b = host.species.shape[0], host.num_graphs
    for key, size in (("energy", b), ("stress", b), ("forces", n), ("energies", n)):
        np.testing.assert_allclose(got[key][:size].detach().numpy(), ref[key].detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=key)
    assert torch.isfinite(got["forces"]).all() and torch.isfinite(got["energy"]).all()


def test_cached_evaluations_reuse_buffers_trim_and_evict(potential, cpu_model):
    """On the CPU the cache runs the same fixed buffers without capture. A size is taken on its second
    evaluation; after that, other structures of that padded size (moved atoms; the same molecule with its
    atoms in another order, so species and edges differ too) reuse the buffers and get their own results;
    a larger structure takes a new size and the least recently used is evicted; structures above the
    limit are left to the caller."""
    molecule_a, crystal, _ = structures()
    molecule_b = molecule_a.copy()
    molecule_b.positions += np.random.default_rng(1).normal(0, 0.05, molecule_b.positions.shape)
    molecule_c = molecule_a[np.random.default_rng(2).permutation(len(molecule_a))]
    cache = CudaGraphs(cpu_model, potential.cutoff, torch.device("cpu"), torch.float64, max_atoms=100, max_captured=1)
    (first,) = graphs_of(potential, [molecule_a])
    assert cache(first, forces=True, stress=False) is None  # a size seen once runs eagerly
    for atoms in (molecule_a, molecule_b, molecule_c, molecule_a):
        (graph,) = graphs_of(potential, [atoms])
        assert padded_sizes(graph) == padded_sizes(first)
        got = cache(graph, forces=True, stress=False)
        ref = compute_properties(cpu_model, graph, forces=True, stress=False)
        assert got["forces"].shape == ref["forces"].shape and got["energy"].shape == (1,)
        np.testing.assert_allclose(got["forces"].detach().numpy(), ref["forces"].detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["energy"].detach().numpy(), ref["energy"].detach().numpy(), rtol=1e-12)
    assert len(cache._captured) == 1
    (first_key,) = cache._captured
    (big,) = graphs_of(potential, [crystal * (2, 1, 1)])
    assert cache(big, forces=True, stress=True) is None and cache(big, forces=True, stress=True) is not None
    assert first_key not in cache._captured and len(cache._captured) == 1  # evicted
    (too_big,) = graphs_of(potential, [crystal * (4, 4, 2)])
    assert cache(too_big, forces=True, stress=True) is None and cache(too_big, forces=True, stress=True) is None


def test_a_size_that_cannot_be_captured_runs_eagerly_for_good(potential, cpu_model, monkeypatch):
    """A capture that raises (an operation CUDA graphs cannot hold) leaves that size to the eager path:
    the caller gets None, and the capture is not tried again."""
    import mlip.cuda_graphs

    attempts = []

    def failing_capture(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("operation not permitted when stream is capturing")

    monkeypatch.setattr(mlip.cuda_graphs, "CapturedEvaluation", failing_capture)
    cache = CudaGraphs(cpu_model, potential.cutoff, torch.device("cpu"), torch.float64)
    (graph,) = graphs_of(potential, [structures()[0]])
    assert [cache(graph, forces=True, stress=False) for _ in range(4)] == [None] * 4
    assert len(attempts) == 1 and len(cache._failed) == 1 and not cache._captured


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the test device replaces the CPU")
def test_cuda_graphs_need_a_cuda_device(model):
    with pytest.raises(ValueError, match="CUDA device"):
        Potential(copy.deepcopy(model), device="cpu", cuda_graphs=True)


def replayed_equals_eager(model, device: str, dtype: str, tolerance: float) -> Potential:
    """MD-like steps of one molecule, then a mixed batch (molecule, periodic cell, sheet) twice, evaluated
    with and without CUDA graphs on ``device``: equal results, each replay answering for its own inputs."""
    eager = Potential(copy.deepcopy(model), device=device, dtype=dtype)
    graphed = Potential(copy.deepcopy(model), device=device, dtype=dtype, cuda_graphs=True)
    atoms = structures()
    rng = np.random.default_rng(0)
    start = atoms[0].positions.copy()
    properties = ["energy", "forces", "energies", "stress"]
    for step in range(6):
        atoms[0].positions = start + rng.normal(0, 0.02, start.shape)
        batch = [Structure.from_atoms(atoms[0])] if step < 4 else [Structure.from_atoms(a) for a in atoms]
        for got, ref in zip(graphed.evaluate(batch, properties), eager.evaluate(batch, properties)):
            assert got.keys() == ref.keys()
            for key in ref:
                np.testing.assert_allclose(got[key], ref[key], rtol=tolerance, atol=tolerance, err_msg=key)
    return graphed


@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 1e-4)])
def test_replayed_cuda_graphs_equal_eager_evaluation(model, dtype, tolerance):
    graphed = replayed_equals_eager(model, "cuda", dtype, tolerance)
    assert len(graphed.cuda_graphs._captured) >= 2 and not graphed.cuda_graphs._failed  # replayed, none fell back


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_replayed_cuda_graphs_on_a_device_that_is_not_the_current_one(model):
    """On cuda:1 while cuda:0 is current, the capture runs on cuda:1's streams (else it records nothing
    and every replay returns the first structure's results)."""
    graphed = replayed_equals_eager(model, "cuda:1", "float64", 1e-10)
    assert torch.cuda.current_device() == 0 and len(graphed.cuda_graphs._captured) >= 2


def test_server_setting_applies_on_cuda_devices_only(tmp_path):
    """`mlip serve --cuda-graphs` on a machine without a GPU serves as usual (the setting is for CUDA devices),
    and answers like the in-process potential."""
    from fastapi.testclient import TestClient

    from mlip.server.app import create_app
    from mlip.server.settings import Settings

    from .test_server import make_checkpoint, wait_ready

    checkpoint = make_checkpoint(tmp_path / "small.safetensors")
    with TestClient(create_app(Settings(checkpoint=checkpoint, cuda_graphs=True))) as client:
        wait_ready(client)
        potential = client.app.state.registry.models["small"].potential
        assert (potential.cuda_graphs is not None) == (potential.device.type == "cuda")
        atoms = structures()[0]
        body = {"structures": [{"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist()}]}
        (result,) = client.post("/v1/calculate", json=body).json()["results"]
    ref = Potential.load(checkpoint).evaluate([Structure.from_atoms(atoms)])[0]
    assert result["energy"] == pytest.approx(ref["energy"], abs=1e-9)
    np.testing.assert_allclose(result["forces"], ref["forces"], atol=1e-9)
