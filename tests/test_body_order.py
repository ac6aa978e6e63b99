"""The many-body product basis: equivariance, polynomial degree, and angles a two-body model cannot see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

from mlip import MLIPModel, ModelConfig, Potential, Structure
from mlip.product import SymmetricContraction

from .conftest import make_config

IRREPS_A = o3.Irreps("3x0e+3x1o+3x2e")
IRREPS_OUT = o3.Irreps("3x0e+3x1o")
SCALARS_OUT = o3.Irreps("3x0e")  # few outputs: the last factor is contracted densely (the other evaluation order)


def wigner_d(irreps: o3.Irreps, rot: torch.Tensor) -> torch.Tensor:
    """e3nn builds D from generators in the default dtype: float32 would limit the test to 1e-6."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return irreps.D_from_matrix(rot)
    finally:
        torch.set_default_dtype(previous)


def contraction(correlation: int, irreps_out: o3.Irreps = IRREPS_OUT) -> SymmetricContraction:
    torch.manual_seed(correlation)
    return SymmetricContraction(IRREPS_A, irreps_out, correlation, num_species=2).double()


def by_definition(block: SymmetricContraction, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """Σ_ν Σ_k W_ν[s, k, u] Σ_P B_ν[P, m, k] Π_{i in P} x_ui, written out over the monomials of every degree."""
    from mlip.product import _monomials, symmetric_basis

    n, u = x.shape[0], block.channels
    blocks = x.split([u * d for d in block.dims_in], dim=1)
    components = torch.cat([b.reshape(n, u, d) for b, d in zip(blocks, block.dims_in)], dim=2)  # (N, u, D)
    one_channel = str(o3.Irreps([(1, ir) for _, ir in block.irreps_in]))
    outputs = []
    for o, (_, ir) in enumerate(block.irreps_out):
        total = torch.zeros(n, u, ir.dim, dtype=x.dtype)
        for degree in range(1, block.correlation + 1):
            basis = symmetric_basis(one_channel, str(ir), degree)  # (P, M, K)
            monomials = components[:, :, _monomials(components.shape[2], degree)[0]].prod(-1)  # (N, u, P)
            start = sum(block.num_basis[degree - 1][:o])
            weights = getattr(block, f"weights_{degree}")[species][:, start : start + basis.shape[-1]]  # (N, K, u)
            total = total + torch.einsum("nup,pmk,nku->num", monomials, basis.to(x.dtype), weights)
        outputs.append(total.reshape(n, -1))
    return torch.cat(outputs, dim=1)


# (irreps_out, correlation, contracts_last_factor): both evaluation orders at every correlation
ORDERS = [(IRREPS_OUT, 1, False), (IRREPS_OUT, 2, False), (IRREPS_OUT, 3, False),
          (SCALARS_OUT, 1, False), (SCALARS_OUT, 2, True), (SCALARS_OUT, 3, True)]


@pytest.mark.parametrize("irreps_out, correlation, contracts_last_factor", ORDERS,
                         ids=[f"{o}-nu{c}" for o, c, _ in ORDERS])
def test_product_block_equals_its_definition(irreps_out, correlation, contracts_last_factor):
    """Either evaluation order (monomials projected, or the last factor contracted densely) is the defined polynomial."""
    block = contraction(correlation, irreps_out)
    assert block.contracts_last_factor == contracts_last_factor
    x = torch.randn(6, IRREPS_A.dim, dtype=torch.float64)
    species = torch.tensor([0, 1, 1, 0, 1, 0])
    expected = by_definition(block, x, species)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(block(x, species), expected, atol=1e-12 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "rotoreflection"])
@pytest.mark.parametrize("irreps_out", [IRREPS_OUT, SCALARS_OUT], ids=["projected", "last-factor-contracted"])
def test_product_block_is_equivariant(reflect, irreps_out):
    block = contraction(3, irreps_out)
    x = torch.randn(7, IRREPS_A.dim, dtype=torch.float64)
    species = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    for seed in range(3):
        torch.manual_seed(seed)
        rot = o3.rand_matrix(dtype=torch.float64) * (-1 if reflect else 1)
        rotated = block(x @ wigner_d(IRREPS_A, rot).T, species)
        expected = block(x, species) @ wigner_d(irreps_out, rot).T
        torch.testing.assert_close(rotated, expected, atol=1e-11, rtol=0)
    assert block(x, species).abs().max() > 1e-2


def test_product_block_weights_depend_on_species():
    block = contraction(2)
    x = torch.randn(1, IRREPS_A.dim, dtype=torch.float64)
    assert (block(x, torch.tensor([0])) - block(x, torch.tensor([1]))).abs().max() > 1e-3


@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("irreps_out", [IRREPS_OUT, SCALARS_OUT], ids=["projected", "last-factor-contracted"])
def test_product_block_is_a_polynomial_of_degree_correlation(correlation, irreps_out):
    """f(t·A) = Σ_k c_k t^k: the degree-ν coefficient is non-zero and nothing above it (nor a constant)."""
    block = contraction(correlation, irreps_out)
    x = torch.randn(4, IRREPS_A.dim, dtype=torch.float64)
    species = torch.tensor([0, 1, 0, 1])
    ts = np.linspace(-2.0, 2.0, 11)
    values = np.stack([block(t * x, species).detach().numpy().ravel() for t in ts])
    degree = 6
    vandermonde = np.vander(ts, degree + 1, increasing=True)
    coefficients, *_ = np.linalg.lstsq(vandermonde, values, rcond=None)
    size = np.abs(coefficients).max(axis=1)
    assert size[correlation] > 1e-3 * size.max()
    assert size[0] < 1e-10
    assert (size[correlation + 1 :] < 1e-9 * size.max()).all()


@pytest.mark.parametrize(
    "settings", [dict(num_layers=1, correlation=3), dict(num_layers=2, correlation=3, l_max=0)], ids=["one-layer", "scalar-features"]
)
def test_angle_sensitivity(settings):
    """Bent A-B-C with |A-C| beyond the cutoff: only a model that couples the two bonds sees the angle."""
    torch.manual_seed(0)
    config = make_config(**settings)
    potential = Potential(MLIPModel(config))
    bond = 0.9 * config.cutoff / 1.0
    energies = []
    for angle in (130.0, 150.0, 170.0):  # |A-C| = 2 bond sin(angle/2) > cutoff for all three
        half = np.radians(angle) / 2
        positions = [[-bond * np.sin(half), bond * np.cos(half), 0], [0, 0, 0], [bond * np.sin(half), bond * np.cos(half), 0]]
        assert np.linalg.norm(np.subtract(positions[0], positions[2])) > config.cutoff
        atoms = Atoms("HCO", positions=positions)
        energies.append(potential.evaluate([Structure.from_atoms(atoms)], ["energy"])[0]["energy"])
    assert np.ptp(energies) > 1e-6


def test_radial_only_model_is_refused():
    with pytest.raises(ValueError, match="angles"):
        ModelConfig(species=[1], num_layers=1, correlation=1)
    with pytest.raises(ValueError, match="angles"):
        ModelConfig(species=[1], num_layers=3, correlation=1, l_max=0)


def test_float32_graphs_keep_float64_energy_targets():
    from mlip.graph import SpeciesIndex, build_graph

    structure = Structure.from_arrays([1, 8], [[0, 0, 0], [0.97, 0, 0]])
    energy = -2057.123456789  # eV: float32 would round this to -2057.1235 (~0.1 meV off)
    graph = build_graph(structure, SpeciesIndex([1, 8]), 4.0, {"energy": energy, "forces": np.zeros((2, 3))})
    moved = graph.to(dtype=torch.float32)
    assert moved.targets["energy"].dtype == torch.float64 and moved.targets["energy"].item() == energy
    assert moved.targets["forces"].dtype == torch.float32 and moved.positions.dtype == torch.float32


def test_product_basis_is_canonical_whatever_the_thread_count():
    """The basis defines what trained weights mean: it must not depend on LAPACK's threading (an SVD did)."""
    from mlip.product import symmetric_basis

    before = torch.get_num_threads()
    bases = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        symmetric_basis.cache_clear()
        bases.append(symmetric_basis("1x0e+1x1o+1x2e", "1o", 3))
    torch.set_num_threads(before)
    symmetric_basis.cache_clear()
    torch.testing.assert_close(bases[0], bases[1], atol=1e-12, rtol=0)
