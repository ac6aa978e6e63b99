"""Neighbour-list reuse across the steps of one simulation (a Verlet skin).

One search collects every pair within r_c + skin; each later step only measures those candidate
pairs and keeps the ones within r_c. That is exactly the fresh neighbour list as long as no atom
has moved more than skin/2 since the search (two atoms then close in by at most the skin), so the
search reruns when one has, and whenever the atoms, the cell or the periodicity change.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .graph import (
    DEFAULT_MAX_EDGES,
    AtomicGraph,
    SpeciesIndex,
    Structure,
    check_edges,
    check_size,
    graph_from_pairs,
    pair_lengths,
)
from .neighbors import neighbor_list

DEFAULT_SKIN = 0.5  # Å: an MD step moves atoms ~0.01 Å, so one search serves tens of steps


class VerletGraphs:
    """Graphs of successive configurations of one simulation, from a reused neighbour search."""

    def __init__(self, species_index: SpeciesIndex, cutoff: float, skin: float = DEFAULT_SKIN):
        if not skin >= 0:
            raise ValueError(f"neighbour-list skin must be >= 0 Å, got {skin}")
        self.species_index, self.cutoff, self.skin = species_index, cutoff, skin
        self._reference: Structure | None = None  # the structure the candidates were searched for
        self._species = np.zeros(0, dtype=np.int64)
        self._pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._last: AtomicGraph | None = None  # the last graph, and which candidates it kept
        self._inside = np.zeros(0, dtype=bool)
        self.searches = 0  # neighbour searches run so far (the rest of the calls reused one)

    @property
    def candidate_pairs(self) -> int:
        """Pairs within r_c + skin that the last search found (what this object holds in memory)."""
        return 0 if self._pairs is None else len(self._pairs[0])

    def reusable(self, structure: Structure) -> bool:
        """Whether ``graph(structure)`` can reuse the last search: same atoms, cell and pbc, and no atom
        moved more than skin/2 (cheap: call it on an event loop to decide where the work goes)."""
        ref = self._reference
        if ref is None or not (
            np.array_equal(structure.numbers, ref.numbers)
            and np.array_equal(structure.cell, ref.cell)
            and np.array_equal(structure.pbc, ref.pbc)
        ):
            return False
        moved = structure.positions - ref.positions
        return bool(np.einsum("ij,ij->i", moved, moved).max(initial=0.0) <= (0.5 * self.skin) ** 2)

    def graph(self, structure: Structure, max_edges: int = DEFAULT_MAX_EDGES) -> AtomicGraph:
        """The structure's graph within the cutoff: the same edges as ``build_graph`` (``ValueError`` likewise).

        When the same candidates are within the cutoff as last time, only the positions are new.
        """
        if not self.reusable(structure):
            self._search(structure, max_edges)
        assert self._pairs is not None
        lengths = pair_lengths(structure, *self._pairs)
        inside = lengths < self.cutoff
        if self._last is not None and np.array_equal(inside, self._inside):
            receiver, sender, _ = self._pairs
            check_edges(receiver[inside], sender[inside], lengths[inside], self.cutoff, max_edges)
            return replace(self._last, positions=torch.from_numpy(structure.positions))
        self._last = graph_from_pairs(structure, self._species, self._pairs, lengths, self.cutoff, max_edges=max_edges)
        self._inside = inside
        return self._last

    def _search(self, structure: Structure, max_edges: int) -> None:
        self._reference, self._last = None, None  # a failed search must not leave the previous candidates in place
        species = self.species_index(structure.numbers)
        check_size(structure, self.cutoff, max_edges)
        self._pairs = neighbor_list(structure.positions, structure.cell, structure.pbc, self.cutoff + self.skin)
        self._species, self.searches = species, self.searches + 1
        # copies: ASE updates atoms.positions in place, and a view would follow the atoms it should measure
        self._reference = Structure(
            structure.numbers.copy(), structure.positions.copy(), structure.cell.copy(), structure.pbc.copy(), structure.frame
        )
