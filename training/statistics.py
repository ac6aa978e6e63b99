"""Dataset statistics that set a model's E0s, scale and neighbour normalisation."""

from __future__ import annotations

import warnings

import numpy as np

from mlip.graph import AtomicGraph

from .data import Sample


def fit_e0s(samples: list[Sample], species: list[int]) -> tuple[dict[int, float], str]:
    """Per-element reference energies (eV) from energy ≈ Σ_Z count_Z · E0_Z, and what they mean.

    When the compositions do not determine every E0 (rank of the count matrix below the number of
    elements, e.g. a data set of one molecule), a least-squares E0 is an arbitrary point of a line
    (E0(H) = -875 eV for aspirin): every element then gets the mean energy per atom instead, and the
    note says that per-atom energies are a partition, not energies relative to isolated atoms.
    """
    counts = np.array([[np.sum(s.structure.numbers == z) for z in species] for s in samples], dtype=np.float64)
    energies = np.array([s.energy for s in samples])
    rank = int(np.linalg.matrix_rank(counts))
    if rank < len(species):
        mean = float(energies.sum() / counts.sum())
        note = (
            f"mean energy per atom ({mean:.4f} eV) for every element: the training compositions have rank {rank} "
            f"< {len(species)} elements, so per-element E0s are not identifiable. Per-atom energies are a partition of "
            "the total only; the model has no isolated-atom (dissociation) limit"
        )
        warnings.warn(f"E0s: {note}", stacklevel=2)
        return {z: mean for z in species}, note
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(e) for z, e in zip(species, e0)}, "least-squares fit to the training energies"


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
