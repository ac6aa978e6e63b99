"""Padded sizes and replayed CUDA graphs: the real structures' results are those of the eager evaluation."""

from __future__ import annotations

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


def test_padding_leaves_every_real_structure_unchanged(potential):
    """Energies, forces, per-atom energies and stress of the real structures equal the unpadded batch's
    (float64, 1e-12), for a molecule, a periodic cell and a sheet evaluated together."""
    host = batch_graphs(graphs_of(potential, structures()))
    atoms, edges, count = padded_sizes(host)
    assert atoms > host.species.shape[0] and edges >= host.edge_index.shape[1] and count > host.num_graphs
    padded = pad_graph(host, atoms + 8, edges + 40, count + 1, potential.cutoff)  # edges that loop on padding atoms
    model = potential.model
    ref = compute_properties(model, host, forces=True, stress=True)
    got = compute_properties(model, padded, forces=True, stress=True)
    n, b = host.species.shape[0], host.num_graphs
    for key, size in (("energy", b), ("stress", b), ("forces", n), ("energies", n)):
        np.testing.assert_allclose(got[key][:size].detach().numpy(), ref[key].detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=key)
    assert torch.isfinite(got["forces"]).all() and torch.isfinite(got["energy"]).all()


def test_cached_evaluations_reuse_buffers_trim_and_evict(potential):
    """On the CPU the cache runs the same fixed buffers without capture: a second structure of the same
    padded size reuses them and gets its own results (not the first one's), a larger one takes a new size,
    the least recently used size is evicted, and structures above the limit are left to the caller."""
    molecule_a, crystal, _ = structures()
    molecule_b = molecule_a.copy()
    molecule_b.positions += np.random.default_rng(1).normal(0, 0.05, molecule_b.positions.shape)
    cache = CudaGraphs(potential.model, potential.cutoff, torch.device("cpu"), torch.float64, max_atoms=100, max_captured=1)
    for atoms in (molecule_a, molecule_b, molecule_a):
        (graph,) = graphs_of(potential, [atoms])
        got = cache(graph, forces=True, stress=False)
        ref = compute_properties(potential.model, graph, forces=True, stress=False)
        assert got["forces"].shape == ref["forces"].shape and got["energy"].shape == (1,)
        np.testing.assert_allclose(got["forces"].detach().numpy(), ref["forces"].detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["energy"].detach().numpy(), ref["energy"].detach().numpy(), rtol=1e-12)
    assert len(cache._captured) == 1
    (first_key,) = cache._captured
    (big,) = graphs_of(potential, [crystal * (2, 1, 1)])
    assert cache(big, forces=True, stress=True) is not None
    assert first_key not in cache._captured and len(cache._captured) == 1  # evicted
    (too_big,) = graphs_of(potential, [crystal * (4, 4, 2)])
    assert cache(too_big, forces=True, stress=True) is None


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the test device replaces the CPU")
def test_cuda_graphs_need_a_cuda_device(model):
    with pytest.raises(ValueError, match="CUDA device"):
        Potential(model, device="cpu", cuda_graphs=True)


@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 1e-4)])
def test_replayed_cuda_graphs_equal_eager_evaluation(model, dtype, tolerance):
    """On a GPU: captured and replayed evaluations (MD-like steps of one molecule, then a batch with a
    periodic cell) equal the eager ones, and each replay answers for its own positions."""
    eager = Potential(model, device="cuda", dtype=dtype)
    graphed = Potential(model, device="cuda", dtype=dtype, cuda_graphs=True)
    atoms = structures()
    rng = np.random.default_rng(0)
    start = atoms[0].positions.copy()
    for step in range(4):
        atoms[0].positions = start + rng.normal(0, 0.02, start.shape)
        batch = [Structure.from_atoms(atoms[0])] if step < 3 else [Structure.from_atoms(a) for a in atoms]
        properties = ["energy", "forces", "energies", "stress"]
        for got, ref in zip(graphed.evaluate(batch, properties), eager.evaluate(batch, properties)):
            assert got.keys() == ref.keys()
            for key in ref:
                np.testing.assert_allclose(got[key], ref[key], rtol=tolerance, atol=tolerance, err_msg=key)
    assert len(graphed.cuda_graphs._captured) >= 2 and not graphed.cuda_graphs._failed  # replayed, none fell back


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
