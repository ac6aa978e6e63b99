"""Periodic cells, in numpy alone (the remote client uses these without torch)."""

from __future__ import annotations

import numpy as np

MIN_VOLUME = 1e-6  # Å³; smaller periodic cells are degenerate


def cells_have_stress(cells, pbc) -> np.ndarray:
    """(B,) bool for cells (B, 3, 3) Å with pbc (B, 3): whether stress is defined, i.e. a periodic direction and
    a non-zero volume (ASE's rule, ``cell.rank == 3``).

    A 2-D material or a slab given with a zero cell vector along its non-periodic direction has
    energies and forces but no volume to divide the virial by, so no stress (like ASE's own calculators).
    """
    volumes = np.abs(np.linalg.det(np.asarray(cells, dtype=np.float64)))
    return np.any(pbc, axis=-1) & (volumes >= MIN_VOLUME)


def cell_has_stress(cell, pbc) -> bool:
    """``cells_have_stress`` for one cell (3, 3) Å and pbc (3,)."""
    return bool(cells_have_stress(np.asarray(cell)[None], np.asarray(pbc)[None])[0])


def periodic_frame(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell with each non-periodic row replaced by a unit vector orthogonal to the periodic ones (Å).

    Its determinant is the volume (3-D), area (2-D) or length (1-D) of the periodic lattice, whatever
    the non-periodic cell vectors are (zero for ``ase.build.graphene()``, vacuum for a slab); its
    non-periodic rows are the directions along which a structure has a finite extent.
    Raises ``ValueError`` when the periodic vectors are degenerate.
    """
    frame = np.eye(3)
    if not pbc.any():
        return frame
    periodic = cell[pbc]
    _, singular, vt = np.linalg.svd(periodic)
    measure = float(np.prod(singular))
    if measure < MIN_VOLUME:
        raise ValueError(
            f"periodic cell vectors are degenerate ({measure:.3g} Å^{len(periodic)}): they span no "
            f"{len(periodic)}-dimensional lattice"
        )
    frame[pbc] = periodic
    frame[~pbc] = vt[len(periodic):]
    return frame
