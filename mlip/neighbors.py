"""Neighbour lists (vesin): all pairs within the cutoff, periodic images included."""

from __future__ import annotations

import numpy as np
from vesin import NeighborList

# Structures with at most this many atom pairs x periodic images are searched directly (~1 ms), the rest by vesin.
MAX_DIRECT_DISTANCES = 1 << 18


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full list of (receiver i, sender j, integer cell shift S) with |x_j - x_i + S·cell| < cutoff (Å).

    Works for any cell, including periodic cells smaller than the cutoff (many images of one pair).
    """
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3), dtype=np.int64)
    pbc, cell = np.asarray(pbc, dtype=bool), np.asarray(cell, dtype=np.float64)
    positions, moves = _into_cell(np.asarray(positions, dtype=np.float64), cell, pbc)
    images = _periodic_images(cell, pbc, cutoff)
    if len(positions) ** 2 * len(images) <= MAX_DIRECT_DISTANCES:
        i, j, shifts = _direct_search(positions, cell, images, cutoff)
    else:
        box = np.where(pbc[:, None], cell, 0.0) if pbc.any() else np.zeros((3, 3))
        i, j, shifts = NeighborList(cutoff=cutoff, full_list=True).compute(
            np.ascontiguousarray(positions), box, [bool(p) for p in pbc], "ijS"
        )
        i, j, shifts = i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)
    shifts[:, pbc] += moves[i] - moves[j]  # the same pairs of the positions as given
    return i, j, shifts


def _periodic_images(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Every integer cell shift (M, 3) a pair of positions inside the cell can need within ``cutoff``."""
    if not pbc.any():
        return np.zeros((1, 3), dtype=np.int64)
    spacing = 1.0 / np.linalg.norm(np.linalg.pinv(cell[pbc]), axis=0)  # between lattice planes, Å
    # fractional differences of positions in the cell lie in (-1, 1), so |shift| < cutoff / spacing + 1
    reach = np.ceil(cutoff / spacing).astype(np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, len(reach))
    images = np.zeros((len(grid), 3), dtype=np.int64)
    images[:, pbc] = grid
    return images


def _direct_search(
    positions: np.ndarray, cell: np.ndarray, images: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs over all ``images`` at once: for small structures, where vesin's cell list can take seconds
    (a few atoms ~1000 Å apart across the non-periodic directions of a 1-D periodic cell took over a minute)."""
    vectors = positions[None, :, None] - positions[:, None, None] + (images @ cell)[None, None]  # (i, j, image, 3)
    within = np.einsum("ijmx,ijmx->ijm", vectors, vectors) < cutoff**2
    within[np.arange(len(positions)), np.arange(len(positions)), np.flatnonzero((images == 0).all(axis=1))] = False
    i, j, m = np.nonzero(within)
    return i, j, images[m]


def _into_cell(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions moved by whole periodic cell vectors into the cell, and those integer moves (N, periodic).

    vesin's search time grows with how many cells apart the atoms lie: two atoms 1000 Å apart along a
    1.7 Å periodic vector took 36 s (unwrapped MD coordinates drift the same way). Fractional
    coordinates along the periodic vectors are the least-squares coefficients of each position in them.
    """
    if not pbc.any() or len(positions) == 0:
        return positions, np.zeros((len(positions), int(pbc.sum())), dtype=np.int64)
    periodic = cell[pbc]
    fractional = np.linalg.lstsq(periodic.T, positions.T, rcond=None)[0].T
    moves = np.floor(fractional).astype(np.int64)
    return positions - moves @ periodic, moves
