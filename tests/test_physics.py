"""Physical properties of a randomly initialised model (float64): symmetry, conservation, locality."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from mlip import MLIPModel, Potential, Structure

from .conftest import make_config, random_rotation


def evaluate(potential: Potential, atoms: Atoms) -> dict:
    properties = ["energy", "forces", "energies"] + (["stress"] if atoms.pbc.any() else [])
    return potential.evaluate([Structure.from_atoms(atoms)], properties)[0]


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "rotoreflection"])
@pytest.mark.parametrize("kind", ["molecule", "crystal"])
def test_e3_equivariance(potential, molecule_atoms, crystal_atoms, kind, reflect):
    atoms = molecule_atoms if kind == "molecule" else crystal_atoms
    ref = evaluate(potential, atoms)
    for seed in range(3):
        rot = random_rotation(seed, reflect)
        moved = atoms.copy()
        moved.positions = atoms.positions @ rot.T + np.random.default_rng(seed).normal(size=3) * 3.0
        moved.cell = atoms.cell.array @ rot.T
        out = evaluate(potential, moved)
        assert out["energy"] == pytest.approx(ref["energy"], abs=1e-9)
        np.testing.assert_allclose(out["energies"], ref["energies"], atol=1e-9)
        np.testing.assert_allclose(out["forces"], ref["forces"] @ rot.T, atol=1e-9)
        if "stress" in ref:
            np.testing.assert_allclose(out["stress"], rot @ ref["stress"] @ rot.T, atol=1e-10)
    # the test must be able to fail: a non-zero reference force and stress
    assert np.abs(ref["forces"]).max() > 1e-3


def test_energy_is_not_reflection_blind(potential, molecule_atoms):
    """Sanity for the test above: a non-rigid change (shear) does change the energy."""
    moved = molecule_atoms.copy()
    moved.positions = molecule_atoms.positions @ np.diag([1.0, 1.0, 1.1])
    assert abs(evaluate(potential, moved)["energy"] - evaluate(potential, molecule_atoms)["energy"]) > 1e-4


@pytest.mark.parametrize("kind", ["molecule", "crystal"])
def test_permutation_equivariance(potential, molecule_atoms, crystal_atoms, kind):
    atoms = molecule_atoms if kind == "molecule" else crystal_atoms
    perm = np.random.default_rng(3).permutation(len(atoms))
    ref, out = evaluate(potential, atoms), evaluate(potential, atoms[perm])
    assert out["energy"] == pytest.approx(ref["energy"], abs=1e-9)
    np.testing.assert_allclose(out["forces"], ref["forces"][perm], atol=1e-9)
    np.testing.assert_allclose(out["energies"], ref["energies"][perm], atol=1e-9)
    if "stress" in ref:
        np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-10)


@pytest.mark.parametrize("kind", ["molecule", "crystal"])
def test_forces_are_minus_energy_gradient(potential, molecule_atoms, crystal_atoms, kind):
    atoms = molecule_atoms if kind == "molecule" else crystal_atoms
    forces = evaluate(potential, atoms)["forces"]
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for a in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[i, a] += sign * h
                energies.append(evaluate(potential, displaced)["energy"])
            numeric[i, a] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(forces, numeric, atol=1e-7, rtol=1e-6)


def test_stress_is_strain_derivative(potential, crystal_atoms):
    stress = evaluate(potential, crystal_atoms)["stress"]
    volume = crystal_atoms.get_volume()
    h = 1e-6
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * h
                strained = crystal_atoms.copy()
                strained.set_cell(crystal_atoms.cell.array @ strain, scale_atoms=True)
                energies.append(evaluate(potential, strained)["energy"])
            numeric[a, b] = (energies[0] - energies[1]) / (2 * h) / volume
    numeric = 0.5 * (numeric + numeric.T)
    np.testing.assert_allclose(stress, numeric, atol=1e-8)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)
    assert np.abs(stress).max() > 1e-4


def test_supercell_is_extensive(potential, crystal_atoms):
    ref = evaluate(potential, crystal_atoms)
    out = evaluate(potential, crystal_atoms * (2, 2, 2))
    assert out["energy"] == pytest.approx(8 * ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], np.tile(ref["forces"], (8, 1)), atol=1e-9)
    np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-10)


def test_cell_smaller_than_cutoff(potential):
    """A 1-atom fcc primitive cell (nearest neighbour 2.5 Å, cutoff 4 Å) sees all its periodic images."""
    small = bulk("Cu", "fcc", a=3.6)
    small.rattle(0.0)
    large = small * (4, 4, 4)  # every image within the cutoff is a distinct atom here
    e_small, e_large = evaluate(potential, small), evaluate(potential, large)
    assert e_large["energy"] == pytest.approx(64 * e_small["energy"], rel=1e-12)
    np.testing.assert_allclose(e_large["stress"], e_small["stress"], atol=1e-10)
    # the cell is far from an isolated atom: images really interact
    assert abs(e_small["energy"] - potential.config.e0s[29]) > 1e-3


def test_energy_continuous_at_cutoff(potential):
    cutoff = potential.cutoff
    def dimer(r):
        return evaluate(potential, Atoms("CO", positions=[[0, 0, 0], [r, 0, 0]]))

    inside, outside = dimer(cutoff - 1e-7), dimer(cutoff + 1e-7)
    assert inside["energy"] == pytest.approx(outside["energy"], abs=1e-10)
    assert np.abs(inside["forces"]).max() < 1e-9
    # energies and forces vary smoothly right up to the cutoff; beyond it atoms are isolated
    assert outside["energy"] == pytest.approx(potential.config.e0s[6] + potential.config.e0s[8], abs=1e-12)
    assert abs(dimer(0.8 * cutoff)["energy"] - outside["energy"]) > 1e-6


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-12), ("float32", 1e-6)])
def test_isolated_atom_energy_is_e0(model, dtype, atol):
    """E0s stay float64 in float32 mode: -1485.3 eV in float32 would be off by ~3e-5 eV."""
    import copy

    potential = Potential(copy.deepcopy(model), dtype=dtype)  # Potential casts the module it is given
    out = evaluate(potential, Atoms("HN", positions=[[0, 0, 0], [20, 0, 0]]))
    np.testing.assert_allclose(out["energies"], [potential.config.e0s[1], potential.config.e0s[7]], atol=atol, rtol=0)
    assert out["energy"] == pytest.approx(potential.config.e0s[1] + potential.config.e0s[7], abs=atol, rel=0)
    np.testing.assert_allclose(out["forces"], 0.0, atol=atol)


def test_batch_equals_one_at_a_time(potential, molecule_atoms, crystal_atoms):
    structures = [Structure.from_atoms(a) for a in (molecule_atoms, crystal_atoms, molecule_atoms[:4])]
    props = ["energy", "forces", "stress", "energies"]
    batched = potential.evaluate(structures, props)
    for structure, out in zip(structures, batched):
        (single,) = potential.evaluate([structure], props)
        assert out.keys() == single.keys()
        for key in out:
            np.testing.assert_allclose(out[key], single[key], atol=1e-10, rtol=1e-12)
    assert "stress" in batched[1] and "stress" not in batched[0]


def test_float32_agrees_with_float64(model, molecule_atoms, crystal_atoms):
    p64, p32 = Potential(model, dtype="float64"), Potential(MLIPModel(model.config), dtype="float32")
    p32.model.load_state_dict(model.state_dict())
    for atoms in (molecule_atoms, crystal_atoms):
        a, b = evaluate(p64, atoms), evaluate(p32, atoms)
        # results come back as float64 whatever the model's dtype; these were computed in float32
        assert b["forces"].dtype == np.float64 and np.abs(b["forces"] - a["forces"]).max() > 1e-12
        # energies include E0s of ~1e3 eV: compare the interaction part at float32 resolution
        assert b["energy"] == pytest.approx(a["energy"], abs=1e-6 * sum(abs(e) for e in a["energies"]) + 1e-5)
        np.testing.assert_allclose(b["forces"], a["forces"], atol=2e-5 * (1 + np.abs(a["forces"]).max()))
        if "stress" in a:
            np.testing.assert_allclose(b["stress"], a["stress"], atol=1e-6)


@pytest.mark.parametrize("parity", [False, True])
def test_parity_option_keeps_invariance(parity, molecule_atoms):
    import torch

    torch.manual_seed(1)
    potential = Potential(MLIPModel(make_config(parity=parity, num_layers=2)))
    rot = random_rotation(7, reflect=True)
    moved = molecule_atoms.copy()
    moved.positions = molecule_atoms.positions @ rot.T
    a, b = evaluate(potential, molecule_atoms), evaluate(potential, moved)
    assert b["energy"] == pytest.approx(a["energy"], abs=1e-9)
    np.testing.assert_allclose(b["forces"], a["forces"] @ rot.T, atol=1e-9)


@pytest.mark.slow
def test_compiled_model_matches_eager(model, molecule_atoms, crystal_atoms):
    """torch.compile (opt-in, for speed) gives the same energies, forces and stress as eager mode."""
    eager, compiled = Potential(model), Potential(model, compile=True)
    structures = [Structure.from_atoms(a) for a in (molecule_atoms, crystal_atoms)]
    props = ["energy", "forces", "stress"]
    for batch in (structures, structures[:1]):  # two batch shapes: dynamic shapes, no recompilation error
        for a, b in zip(eager.evaluate(batch, props), compiled.evaluate(batch, props)):
            for key in a:
                np.testing.assert_allclose(b[key], a[key], atol=1e-9, rtol=1e-9)
