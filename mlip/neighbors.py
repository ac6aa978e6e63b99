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
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=True).compute(
        np.ascontiguousarray(positions, dtype=np.float64), box, [bool(p) for p in pbc], "ijS"
    )
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)
