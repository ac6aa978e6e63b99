"""Surfaces, 2-D materials and wires: cells with a zero vector along a non-periodic direction."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import graphene
from ase.calculators.calculator import PropertyNotImplementedError

from mlip import MLIPCalculator, Structure, save_checkpoint
from mlip.graph import estimate_edges

from .conftest import random_rotation


def sheet() -> Atoms:
    """Rattled 3x3 graphene with a nitrogen (C, N): pbc (T, T, F), third cell vector zero, as ase.build makes it."""
    atoms = graphene(size=(3, 3, 1))
    atoms.numbers[4] = 7
    atoms.rattle(0.05, seed=3)
    assert not atoms.cell[2].any() and list(atoms.pbc) == [True, True, False]
    return atoms


def wire() -> Atoms:
    """A zig-zag carbon chain periodic along x only: two zero cell vectors."""
    positions = [[0.0, 0.0, 0.0], [1.3, 0.7, 0.1], [2.6, 0.05, -0.1], [3.9, 0.75, 0.0]]
    return Atoms("C4", positions=positions, cell=[[5.2, 0, 0], [0, 0, 0], [0, 0, 0]], pbc=[True, False, False])


def evaluate(potential, atoms: Atoms) -> dict:
    return potential.evaluate([Structure.from_atoms(atoms)], ["energy", "forces", "stress"])[0]


@pytest.mark.parametrize("make", [sheet, wire], ids=["2-D sheet", "1-D wire"])
def test_zero_cell_vector_equals_any_vacuum_vector(potential, make):
    """Along a non-periodic direction the cell vector is irrelevant: zero, 30 Å or oblique give one answer."""
    atoms = make()
    ref = evaluate(potential, atoms)
    assert "stress" not in ref  # no volume: no stress, as ASE's own calculators do
    assert np.abs(ref["forces"]).max() > 1e-3
    for vacuum in ([0.0, 0.0, 30.0], [3.0, -2.0, 25.0]):
        padded = atoms.copy()
        padded.cell[2] = vacuum
        if not atoms.cell[1].any():
            padded.cell[1] = [0.0, 40.0, 0.0]
        out = evaluate(potential, padded)
        assert out["energy"] == pytest.approx(ref["energy"], abs=1e-10)
        np.testing.assert_allclose(out["forces"], ref["forces"], atol=1e-10)
        assert np.isfinite(out["stress"]).all()  # a 3-D cell: stress is defined again


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "rotoreflection"])
def test_sheet_in_any_orientation(potential, reflect):
    """The sheet's plane need not be xy: a rotated sheet with its rotated zero vector is accepted and equivariant."""
    atoms = sheet()
    ref = evaluate(potential, atoms)
    rot = random_rotation(7, reflect)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T
    moved.cell = atoms.cell.array @ rot.T
    out = evaluate(potential, moved)
    assert out["energy"] == pytest.approx(ref["energy"], abs=1e-9)
    np.testing.assert_allclose(out["forces"], ref["forces"] @ rot.T, atol=1e-9)


def test_sheet_sees_its_periodic_images(potential):
    """Periodic along a and b: the 3x3 sheet is the same material as its 6x6 supercell (extensive energy)."""
    small = sheet()
    large = small.repeat((2, 2, 1))
    assert evaluate(potential, large)["energy"] == pytest.approx(4 * evaluate(potential, small)["energy"], abs=1e-8)


def test_stress_request_on_a_sheet_raises_like_ase(tmp_path, model):
    atoms = sheet()
    save_checkpoint(tmp_path / "m.safetensors", model)
    atoms.calc = MLIPCalculator(tmp_path / "m.safetensors")
    assert np.isfinite(atoms.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError, match="non-zero volume"):
        atoms.get_stress()


def test_edge_estimate_of_a_sheet_is_sane():
    """The pre-search estimate uses the sheet's area, not the (zero) cell volume: no false 'too dense'."""
    atoms = sheet()
    from mlip.graph import SpeciesIndex, build_graph

    graph = build_graph(Structure.from_atoms(atoms), SpeciesIndex([6, 7]), 4.0)
    estimate = estimate_edges(Structure.from_atoms(atoms), 4.0)
    assert graph.edge_index.shape[1] / 3 < estimate < 3 * graph.edge_index.shape[1]


@pytest.mark.parametrize(
    "cell, pbc, message",
    [
        ([[2.5, 0, 0], [5.0, 0, 0], [0, 0, 0]], [True, True, False], "degenerate"),  # parallel periodic vectors
        ([[2.5, 0, 0], [0, 0, 0], [0, 0, 0]], [True, True, False], "degenerate"),  # a periodic vector is zero
        ([[0.3, 0, 0], [0, 0, 0], [0, 0, 0]], [True, False, False], "thick"),  # a wire shorter than its atoms
    ],
)
def test_degenerate_low_dimensional_cells_are_refused(cell, pbc, message):
    with pytest.raises(ValueError, match=message):
        Structure.from_arrays([6], [[0, 0, 0]], cell, pbc)


def test_stress_rule_is_the_same_for_one_cell_and_a_batch():
    """``cell_has_stress`` (numpy, one cell: the clients), ``cells_have_stress`` (numpy, a batch: before the forward
    pass) and ``stress_defined`` (torch, a batch: inside it) agree, on random cells that are full, flat (a zero or
    dependent vector) or tiny, with every periodicity."""
    import torch

    from mlip.cell import MIN_VOLUME, cell_has_stress, cells_have_stress
    from mlip.graph import stress_defined

    rng = np.random.default_rng(0)
    cells, pbcs = [], []
    for _ in range(300):
        cell = rng.normal(size=(3, 3)) * rng.choice([1e-3, 0.011, 1.0, 10.0])
        kind = rng.integers(3)
        if kind == 1:
            cell[rng.integers(3)] = 0.0
        elif kind == 2:
            cell[2] = cell[0] - 2 * cell[1]
        cells.append(cell)
        pbcs.append(rng.random(3) < 0.5)
    batch = stress_defined(torch.tensor(np.array(cells)), torch.tensor(np.array(pbcs))).tolist()
    single = [cell_has_stress(c, p) for c, p in zip(cells, pbcs)]
    assert single == batch == cells_have_stress(np.array(cells), np.array(pbcs)).tolist()
    volumes = np.abs(np.linalg.det(np.array(cells)))
    assert any(single) and not all(single) and ((volumes > 0) & (volumes < MIN_VOLUME)).any()  # every case occurs
