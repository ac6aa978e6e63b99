"""Shared fixtures: small random models and structures the tests make themselves."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from mlip import MLIPModel, ModelConfig, Potential

torch.set_num_threads(2)

# `MLIP_TEST_DEVICE=cuda pytest` runs the suite with every Potential the tests build (and every server they
# start) on that device instead of the CPU; CI runs on the CPU. GPU-only tests skip where CUDA is absent.
TEST_DEVICE = os.environ.get("MLIP_TEST_DEVICE", "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_reproduced(actual, desired) -> None:
    """Bit-identical on the CPU; on a GPU to float64 round-off (1e-12 relative), since its scatter-adds are
    atomic and sum in a varying order (seen on an H200: 5e-15 differences between identical evaluations)."""
    if TEST_DEVICE == "cpu":
        np.testing.assert_array_equal(actual, desired)
    else:
        np.testing.assert_allclose(actual, desired, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="session", autouse=True)
def potentials_on_test_device():
    """Route the CPU device the tests ask for to ``MLIP_TEST_DEVICE`` (servers too, via MLIP_DEVICE)."""
    if TEST_DEVICE == "cpu":
        yield
        return
    import mlip.potential

    resolve = mlip.potential.resolve_device
    patch = pytest.MonkeyPatch()
    patch.setattr(mlip.potential, "resolve_device", lambda device: resolve(TEST_DEVICE if str(device) in ("cpu", "auto") else device))
    patch.setenv("MLIP_DEVICE", TEST_DEVICE)
    yield
    patch.undo()


SPECIES = [1, 6, 7, 8, 13, 29]  # H C N O Al Cu


def make_config(**overrides) -> ModelConfig:
    """Small but complete config: every irrep order, several layers, nonzero E0s, scale and shift."""
    defaults = dict(
        species=SPECIES,
        cutoff=4.0,
        num_channels=8,
        l_max=2,
        num_layers=3,
        num_radial=6,
        kernel_hidden=16,
        avg_num_neighbors=8.0,
        e0s={1: -13.6, 6: -1029.8, 7: -1485.3, 8: -2042.6, 13: -6.3, 29: -3.9},
        scale=1.3,
        shift=0.0,
    )
    defaults.update(overrides)
    return ModelConfig(**defaults)


@pytest.fixture(scope="session")
def model() -> MLIPModel:
    torch.manual_seed(0)
    return MLIPModel(make_config())


@pytest.fixture(scope="session")
def potential(model) -> Potential:
    return Potential(model, dtype="float64")


@pytest.fixture
def molecule_atoms() -> Atoms:
    atoms = molecule("CH3CONH2")  # acetamide: H C N O, 9 atoms
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.fixture
def crystal_atoms() -> Atoms:
    """Rattled, sheared Cu/Al fcc cell (periodic, 8 atoms)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)
    atoms.numbers[[1, 4]] = 13
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, -0.03], [0.02, 0.0, 1.0]]), scale_atoms=True)
    atoms.rattle(0.08, seed=2)
    return atoms


def random_rotation(seed: int, reflect: bool = False) -> np.ndarray:
    """Uniform random orthogonal matrix; det = -1 when ``reflect``."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if reflect else q
