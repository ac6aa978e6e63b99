"""The in-process ASE calculator: properties, bad input, and use inside ASE MD and optimisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

from mlip import MLIPCalculator, MLIPModel, Potential, Structure, save_checkpoint

from .conftest import make_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, model)
    return path


def test_properties_match_potential(checkpoint, potential, crystal_atoms):
    atoms = crystal_atoms.copy()
    atoms.calc = MLIPCalculator(checkpoint)
    (ref,) = potential.evaluate([Structure.from_atoms(crystal_atoms)], ["energy", "forces", "stress", "energies"])
    assert atoms.get_potential_energy() == pytest.approx(ref["energy"], abs=1e-12)
    assert atoms.get_potential_energy(force_consistent=True) == pytest.approx(ref["energy"], abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energies(), ref["energies"], atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), ref["stress"], atol=1e-12)
    assert atoms.get_stress().shape == (6,)


def test_results_are_reused_exactly_until_numbers_positions_cell_or_pbc_change(potential, crystal_atoms, monkeypatch):
    evaluations = []
    evaluate_graphs = potential.evaluate_graphs
    monkeypatch.setattr(potential, "evaluate_graphs", lambda *a, **k: evaluations.append(1) or evaluate_graphs(*a, **k))
    atoms = crystal_atoms.copy()
    atoms.calc = MLIPCalculator(potential)
    energy = atoms.get_potential_energy()
    atoms.get_forces(), atoms.get_stress()
    atoms.set_initial_magnetic_moments(np.ones(len(atoms)))  # not an input of the potential: nothing to redo
    assert atoms.get_potential_energy() == energy and len(evaluations) == 1
    changes = [
        lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] + 1e-12),
        lambda a: a.set_cell(a.cell.array * (1 + 1e-9), scale_atoms=False),
        lambda a: a.set_pbc([True, True, False]),
        lambda a: a.numbers.__setitem__(0, 13 if a.numbers[0] != 13 else 29),
    ]
    for n, change in enumerate(changes, start=2):
        change(atoms)
        atoms.get_potential_energy()
        assert len(evaluations) == n


def test_stress_only_for_periodic(checkpoint, molecule_atoms):
    molecule_atoms.calc = MLIPCalculator(checkpoint)
    molecule_atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError):
        molecule_atoms.get_stress()


def test_float32_calculator(checkpoint, crystal_atoms):
    crystal_atoms.calc = MLIPCalculator(checkpoint, dtype="float32")
    assert crystal_atoms.get_forces().dtype == np.float64
    assert np.isfinite(crystal_atoms.get_stress()).all()


@pytest.mark.parametrize(
    "atoms, message",
    [
        (Atoms("Fe", positions=[[0, 0, 0]]), r"element\(s\) \['Fe'\] not supported"),
        (Atoms("CO", positions=[[0, 0, 0], [np.nan, 0, 0]]), "NaN or inf"),
        (Atoms("CO", positions=[[0, 0, 0], [np.inf, 0, 0]]), "NaN or inf"),
        (Atoms("CO", positions=[[0, 0, 0], [1, 0, 0]], cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True), "degenerate"),
        (Atoms("CO", positions=[[0, 0, 0], [0, 0, 0]]), "overlap"),
    ],
    ids=["unknown-element", "nan", "inf", "zero-volume", "overlap"],
)
def test_bad_input_raises_value_error(checkpoint, atoms, message):
    atoms.calc = MLIPCalculator(checkpoint)
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


def test_mismatched_shapes_raise_value_error():
    with pytest.raises(ValueError, match=r"positions must have shape \(3, 3\)"):
        Structure.from_arrays([1, 6, 8], [[0, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"cell must have shape \(3, 3\)"):
        Structure.from_arrays([1], [[0, 0, 0]], cell=[1, 2, 3], pbc=True)
    with pytest.raises(ValueError, match="atomic numbers"):
        Structure.from_arrays([0], [[0, 0, 0]])


def test_unknown_property_raises(potential, molecule_atoms):
    with pytest.raises(ValueError, match="unknown properties"):
        potential.evaluate([Structure.from_atoms(molecule_atoms)], ["hessian"])


def test_nve_conserves_energy(checkpoint, molecule_atoms):
    atoms = molecule_atoms.copy()
    atoms.calc = MLIPCalculator(checkpoint)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    # an untrained many-body model is rough (forces of tens of eV/Å): a short step resolves it
    dyn = VelocityVerlet(atoms, timestep=0.05 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(100)
    kinetic = 1.5 * len(atoms) * units.kB * 300
    assert np.ptp(energies) < 1e-3 * kinetic + 1e-5
    assert np.linalg.norm(atoms.positions - molecule_atoms.positions) > 1e-3


def test_langevin_runs(checkpoint, molecule_atoms):
    molecule_atoms.calc = MLIPCalculator(checkpoint, dtype="float32")
    Langevin(molecule_atoms, 0.5 * units.fs, temperature_K=300, friction=0.01, fixcm=False, rng=np.random.default_rng(0)).run(20)
    assert np.isfinite(molecule_atoms.positions).all()


@pytest.mark.parametrize("optimizer", [BFGS, FIRE])
def test_relaxation_with_cell_filter(optimizer):
    """A pair-repulsive toy model (large positive shift of the scale) relaxes a rattled Cu cell."""
    import torch

    torch.manual_seed(3)
    potential = Potential(MLIPModel(make_config(num_layers=2)))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=4)
    atoms.calc = MLIPCalculator(potential)
    start_energy = atoms.get_potential_energy()
    filtered = FrechetCellFilter(atoms)
    start_fmax = np.abs(filtered.get_forces()).max()
    converged = optimizer(filtered, logfile=None).run(fmax=0.05 * start_fmax, steps=300)
    assert atoms.get_potential_energy() < start_energy
    assert np.abs(filtered.get_forces()).max() < 0.05 * start_fmax or not converged and pytest.fail(
        "optimiser did not reduce the generalised forces"
    )


HOSTILE_GEOMETRIES = [
    # (numbers, positions Å, cell Å, pbc, message): each once killed the process or exhausted memory
    ([1, 1, 1], [[0, 0, 0], [3000, 0, 0], [0, 3000, 0]], None, False, "non-periodic axis"),
    ([1, 1], [[0, 0, 0], [1e6, 0, 0]], None, False, "within ±"),
    ([1], [[0, 0, 0]], np.eye(3) * 1e300, True, "longer than"),
    ([1], [[0, 0, 0]], np.eye(3) * 0.1, True, "thick"),
    ([1], [[0, 0, 0]], np.eye(3) * 0.02, True, "thick"),
    ([1], [[0, 0, 0]], np.eye(3) * 0.6, True, "too dense"),
    ([1] * 4096, np.zeros((4096, 3)) + np.arange(4096)[:, None] * [1e-3, 0, 0], None, False, "too dense"),
    ([1, 1], [[0, 0, 0], [0.001, 0, 0]], None, False, "overlap"),
    ([1, 1], [[0, 0, 0], [1, 1, 1]], [[1000, 0, 0], [999.9, 0.01, 0], [0, 0, 1000]], True, "thick"),  # 6 s search before
]


@pytest.mark.parametrize("numbers, positions, cell, pbc, message", HOSTILE_GEOMETRIES)
def test_hostile_geometry_is_a_value_error_not_a_crash(numbers, positions, cell, pbc, message):
    """Checked before any neighbour search, in a fraction of a second, whatever the geometry."""
    import time

    from mlip.graph import SpeciesIndex, build_graph

    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        build_graph(Structure.from_arrays(numbers, positions, cell, pbc), SpeciesIndex([1]), 5.0)
    assert time.perf_counter() - start < 2.0


def test_edge_limit_is_enforced_and_realistic_systems_pass():
    from ase.build import bulk

    from mlip.graph import SpeciesIndex, build_graph, estimate_edges

    crystal = Structure.from_atoms(bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3))
    graph = build_graph(crystal, SpeciesIndex([29]), 5.0)
    edges = graph.edge_index.shape[1]
    assert 0.5 < estimate_edges(crystal, 5.0) / edges < 2.0  # the estimate tracks the real count
    with pytest.raises(ValueError, match="more than the limit of 1000"):
        build_graph(crystal, SpeciesIndex([29]), 5.0, max_edges=1000)


def test_default_edge_limit_follows_memory_model_width_and_dtype(monkeypatch):
    import mlip.edge_budget as budget

    monkeypatch.setattr(budget, "available_memory_bytes", lambda device: 8 * 10**9)
    narrow, wide = MLIPModel(make_config(num_channels=8)), MLIPModel(make_config(num_channels=16))
    limit = Potential(narrow, dtype="float64").max_edges
    assert limit * budget.bytes_per_edge(narrow.config, torch.float64) <= 0.5 * 8 * 10**9
    assert Potential(wide, dtype="float64").max_edges == pytest.approx(limit / 2, rel=1e-3)  # twice the width
    assert Potential(narrow, dtype="float32").max_edges == pytest.approx(2 * limit, rel=1e-3)  # half the bytes
    monkeypatch.setattr(budget, "available_memory_bytes", lambda device: 4 * 10**9)
    assert Potential(narrow, dtype="float64").max_edges == pytest.approx(limit / 2, rel=1e-3)
    monkeypatch.setattr(budget, "available_memory_bytes", lambda device: None)  # unreadable: the fixed ceiling
    assert Potential(narrow, dtype="float64").max_edges == budget.DEFAULT_MAX_EDGES


def test_calculator_refuses_a_structure_beyond_the_memory_before_allocating(checkpoint, monkeypatch, molecule_atoms):
    import mlip.edge_budget as budget

    monkeypatch.setattr(budget, "available_memory_bytes", lambda device: 10 * 10**6)  # a 10 MB machine
    calc = MLIPCalculator(checkpoint)
    assert calc.potential.max_edges < 1000
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)
    atoms.calc = calc
    with pytest.raises(ValueError, match="structure too large"):
        atoms.get_potential_energy()
    molecule = molecule_atoms.copy()
    molecule.calc = calc
    assert np.isfinite(molecule.get_potential_energy())  # the same calculator goes on with what fits


def test_evaluate_batches_by_edges_with_the_results_of_one_batch(model, molecule_atoms):
    rng = np.random.default_rng(3)
    structures = []
    for _ in range(6):
        atoms = molecule_atoms.copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        structures.append(Structure.from_atoms(atoms))
    whole = Potential(model, dtype="float64")
    split = Potential(model, dtype="float64")
    graphs = [split.graph(s) for s in structures]
    edges = graphs[0].edge_index.shape[1]
    split.max_edges = 2 * edges + edges // 2  # two structures per batch
    assert [len(b) for b in split.edge_batches(graphs)] == [2, 2, 2]
    properties = ["energy", "forces", "energies"]
    for got, want in zip(split.evaluate_graphs(graphs, properties), whole.evaluate(structures, properties)):
        for key in properties:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-10)
    split.max_edges = edges - 1
    with pytest.raises(ValueError, match="more than Potential.max_edges"):
        split.evaluate_graphs(graphs)
