"""Neighbour lists (vesin): all pairs within the cutoff, periodic images included."""

from __future__ import annotations

import numpy as np
from vesin import NeighborList


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full list of (receiver i, sender j, integer cell shift S) with |x_j - x_i + S·cell| < cutoff (Å).

    Works for any cell, including periodic cells smaller than the cutoff (many images of one pair).
    """
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3), dtype=np.int64)
    pbc = np.asarray(pbc, dtype=bool)
    box = np.where(pbc[:, None], cell, 0.0) if pbc.any() else np.zeros((3, 3))
    positions, moves = _into_cell(np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64), pbc)
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=True).compute(
        np.ascontiguousarray(positions), box, [bool(p) for p in pbc], "ijS"
    )
    i, j, shifts = i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)
    shifts[:, pbc] += moves[i] - moves[j]  # the same pairs of the positions as given
    return i, j, shifts


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
