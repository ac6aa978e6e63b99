"""Neighbour-search reuse (Verlet skin): every graph equals a fresh neighbour list, and searches are rare."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet

from mlip import MLIPCalculator
from mlip.graph import SpeciesIndex, Structure, build_graph
from mlip.verlet import VerletGraphs

from .conftest import SPECIES

CUTOFF = 4.0


def edges(graph) -> set[tuple]:
    """The graph's directed edges with their lattice shifts, order-free."""
    pairs = graph.edge_index.T.tolist()
    shifts = graph.edge_shift.round().long().tolist()
    return {(i, j, *s) for (i, j), s in zip(pairs, shifts)}


def assert_same_graph(cache: VerletGraphs, structure: Structure) -> None:
    fresh = build_graph(structure, SpeciesIndex(SPECIES), CUTOFF)
    reused = cache.graph(structure)
    assert edges(reused) == edges(fresh)
    assert np.array_equal(reused.positions.numpy(), structure.positions)


@pytest.mark.parametrize("fixture", ["molecule_atoms", "crystal_atoms"])
def test_every_step_has_the_fresh_edges_and_searches_are_rare(fixture, request) -> None:
    atoms = request.getfixturevalue(fixture)
    cache = VerletGraphs(SpeciesIndex(SPECIES), CUTOFF, skin=0.5)
    rng = np.random.default_rng(0)
    positions = atoms.positions.copy()
    for _ in range(40):
        positions += rng.normal(0.0, 0.02, positions.shape)  # 0.035 Å per step on average
        assert_same_graph(cache, Structure.from_arrays(atoms.numbers, positions, atoms.cell.array, atoms.pbc))
    assert 1 < cache.searches < 20


def test_search_reruns_past_half_the_skin_and_on_any_other_change(crystal_atoms) -> None:
    cache = VerletGraphs(SpeciesIndex(SPECIES), CUTOFF, skin=0.5)
    base = Structure.from_atoms(crystal_atoms)
    cache.graph(base)

    def variant(**changes) -> Structure:
        arrays = dict(numbers=base.numbers, positions=base.positions, cell=base.cell, pbc=base.pbc) | changes
        return Structure.from_arrays(**arrays)

    nudged = base.positions.copy()
    nudged[0, 0] += 0.24  # within skin/2: reused
    assert cache.reusable(variant(positions=nudged))
    moved = base.positions.copy()
    moved[0, 0] += 0.26
    strained = base.cell * 1.01
    swapped = base.numbers.copy()
    swapped[0] = 8
    for changed in (variant(positions=moved), variant(cell=strained), variant(numbers=swapped), variant(pbc=[True, True, False])):
        assert not cache.reusable(changed)
        assert_same_graph(cache, changed)
        cache.graph(base)


def test_jump_toward_a_neighbour_is_caught(molecule_atoms) -> None:
    """An atom that moves 1 Å toward another within one call must not keep the old pair list."""
    cache = VerletGraphs(SpeciesIndex(SPECIES), CUTOFF, skin=0.3)
    base = Structure.from_atoms(molecule_atoms)
    cache.graph(base)
    far = base.positions.copy()
    far[0] += 10.0  # leaves every neighbour behind
    assert_same_graph(cache, Structure.from_arrays(base.numbers, far))
    assert_same_graph(cache, base)


def test_overlap_after_reuse_is_refused(molecule_atoms) -> None:
    cache = VerletGraphs(SpeciesIndex(SPECIES), CUTOFF, skin=2.0)
    base = Structure.from_atoms(molecule_atoms)
    cache.graph(base)
    distances = molecule_atoms.get_all_distances() + 1e9 * np.eye(len(molecule_atoms))
    i, j = np.unravel_index(distances.argmin(), distances.shape)
    gap = base.positions[j] - base.positions[i]
    step = 0.5 * (1.0 - 0.05 / np.linalg.norm(gap)) * gap  # each atom moves ~0.5 Å: the pair ends 0.05 Å apart
    squeezed = base.positions.copy()
    squeezed[i] += step
    squeezed[j] -= step
    structure = Structure.from_arrays(base.numbers, squeezed)
    assert cache.reusable(structure)
    with pytest.raises(ValueError, match="overlap"):
        cache.graph(structure)


def test_calculator_md_with_reuse_equals_fresh_search(potential, crystal_atoms) -> None:
    """ASE updates atoms.positions in place: the calculator must still notice how far atoms moved."""
    reusing, fresh = MLIPCalculator(potential, skin=0.5), MLIPCalculator(potential, skin=0.0)
    atoms = crystal_atoms
    atoms.calc = reusing
    atoms.set_momenta(np.random.default_rng(3).normal(0.0, 2.0, (len(atoms), 3)))
    dyn = VelocityVerlet(atoms, 2.0 * units.fs)
    for _ in range(30):
        dyn.run(1)
        check = atoms.copy()
        check.calc = fresh
        np.testing.assert_allclose(atoms.get_forces(), check.get_forces(), rtol=0, atol=1e-10)
    assert 1 < reusing.neighbors.searches < 30


def test_moved_structure_checks_positions(molecule_atoms) -> None:
    base = Structure.from_atoms(molecule_atoms)
    far = base.positions.copy()
    far[0, 2] += 2000.0
    nan = base.positions.copy()
    nan[1, 0] = np.nan
    for positions, message in ((nan, "NaN"), (base.positions[:3], "shape"), (far, "span"), (base.positions + 2e5, "within")):
        with pytest.raises(ValueError, match=message):
            base.moved_to(positions)
    moved, fresh = base.moved_to(base.positions + 0.1), Structure.from_arrays(base.numbers, base.positions + 0.1)
    for name in ("numbers", "positions", "cell", "pbc", "frame"):
        assert np.array_equal(getattr(moved, name), getattr(fresh, name))


def test_calculator_validates_whatever_changed_between_calls(potential, crystal_atoms) -> None:
    """A rejected step must not let the next one skip the checks of a cell that changed with it."""
    calc = MLIPCalculator(potential)
    atoms = crystal_atoms
    atoms.calc = calc
    atoms.get_forces()
    good = atoms.positions.copy()
    atoms.positions[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        atoms.get_forces()
    atoms.set_cell(np.diag([30.0, 30.0, 0.1]))  # thinner than any cell may be
    atoms.positions = good
    with pytest.raises(ValueError, match="thick"):
        atoms.get_forces()


def test_http_neighbor_cache_reuses_searches_for_repeated_structures_only(potential, crystal_atoms, molecule_atoms) -> None:
    from mlip.server.neighbor_cache import NeighborCache

    cache = NeighborCache(potential, skin=0.5)
    rng = np.random.default_rng(1)
    positions = crystal_atoms.positions.copy()
    for _ in range(30):  # MD over HTTP: the same atoms, cell and pbc with moving positions
        positions += rng.normal(0.0, 0.02, positions.shape)
        structure = Structure.from_arrays(crystal_atoms.numbers, positions, crystal_atoms.cell.array, crystal_atoms.pbc)
        assert edges(cache.graph(structure, 10**6)) == edges(build_graph(structure, potential.species_index, potential.cutoff))
    assert 20 <= cache.reused < 29  # searched on the first two sightings and when atoms moved past skin/2
    kept = len(cache._searches)
    for n in range(2, 12):  # screening: every structure once
        molecule = molecule_atoms.copy()
        molecule.cell = np.eye(3) * (10.0 + n)
        cache.graph(Structure.from_atoms(molecule), 10**6)
    assert len(cache._searches) == kept == 1  # nothing kept for structures seen once


def test_http_neighbor_cache_stays_within_its_pair_budget_and_is_thread_safe(potential, crystal_atoms) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mlip.server.neighbor_cache import NeighborCache

    budget = 1000  # ~340 candidate pairs per cell: room for two or three of the eight cells
    cache = NeighborCache(potential, skin=0.5, max_pairs=budget)
    cells = [crystal_atoms.cell.array * (1.0 + 0.01 * k) for k in range(8)]
    rng = np.random.default_rng(2)

    def step(k: int) -> bool:
        positions = crystal_atoms.positions + rng.normal(0.0, 0.02, crystal_atoms.positions.shape)
        structure = Structure.from_arrays(crystal_atoms.numbers, positions, cells[k % len(cells)], crystal_atoms.pbc)
        fresh = build_graph(structure, potential.species_index, potential.cutoff)
        return edges(cache.graph(structure, 10**6)) == edges(fresh)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(step, range(200)))
    assert 0 < len(cache._searches) < len(cells) and cache.reused > 0
    assert sum(v.candidate_pairs for v in cache._searches.values()) == cache._pairs <= budget
