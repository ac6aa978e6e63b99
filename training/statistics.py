"""Dataset statistics that set a model's E0s, scale and neighbour normalisation."""

from __future__ import annotations

import numpy as np

from mlip.graph import AtomicGraph

from .data import Sample


def fit_e0s(samples: list[Sample], species: list[int]) -> dict[int, float]:
    """Least-squares per-element reference energies (eV): energy ≈ Σ_Z count_Z · E0_Z."""
    counts = np.array([[np.sum(s.structure.numbers == z) for z in species] for s in samples], dtype=np.float64)
    energies = np.array([s.energy for s in samples])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(e) for z, e in zip(species, e0)}


def isolated_atom_e0s(samples: list[Sample]) -> dict[int, float]:
    """E0s from single-atom reference configurations."""
    return {int(s.structure.numbers[0]): s.energy for s in samples}


def force_rms(samples: list[Sample]) -> float:
    """Root-mean-square force component (eV/Å): the natural scale of per-atom energies."""
    forces = np.concatenate([s.forces.reshape(-1) for s in samples])
    rms = float(np.sqrt(np.mean(forces**2)))
    return rms if rms > 0 else 1.0


def average_num_neighbors(graphs: list[AtomicGraph]) -> float:
    edges = sum(g.edge_index.shape[1] for g in graphs)
    atoms = sum(int(g.num_atoms.sum()) for g in graphs)
    return max(edges / atoms, 1.0)
