"""Neighbour searches kept between HTTP requests, for clients that run MD or relaxations over plain HTTP.

Such a client sends the same atoms, cell and periodicity at every step with positions that moved a
little, so a structure seen before reuses its search with a Verlet skin, as a WebSocket session does
(on the 2-vCPU VM, validating an aspirin request and building its graph took 0.94 ms inside the server
with a fresh search, 0.46 ms with a reused one). A structure seen for the first time gets a plain search: screening many different structures
pays nothing extra. The cache is bounded by the candidate pairs it holds and evicts the least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from mlip import AtomicGraph, Potential, Structure
from mlip.verlet import VerletGraphs

# Candidate pairs held in all cached searches together (about 40 bytes each, plus each one's last graph).
MAX_CACHED_PAIRS = 1 << 21
MAX_REMEMBERED = 4096  # structure keys remembered as seen once (a second sighting starts caching)

Key = tuple[bytes, bytes, bytes]


class NeighborCache:
    """Graphs for one model's HTTP requests; safe to call from several threads at once."""

    def __init__(self, potential: Potential, skin: float, max_pairs: int = MAX_CACHED_PAIRS):
        self.potential, self.skin, self.max_pairs = potential, skin, max_pairs
        self._lock = threading.Lock()
        self._searches: OrderedDict[Key, VerletGraphs] = OrderedDict()  # least recently used first
        self._seen: OrderedDict[Key, None] = OrderedDict()
        self._pairs = 0  # candidate pairs held in _searches
        self.reused = 0  # graphs that came from a kept search (the rest searched afresh)

    def graph(self, structure: Structure, max_edges: int) -> AtomicGraph:
        """The structure's graph, the same edges as ``Potential.graph`` (``ValueError`` likewise)."""
        key = (structure.numbers.tobytes(), structure.cell.tobytes(), structure.pbc.tobytes())
        with self._lock:  # taken out while in use: another thread with the same key searches for itself
            neighbors = self._searches.pop(key, None)
            if neighbors is not None:
                self._pairs -= neighbors.candidate_pairs
            elif key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > MAX_REMEMBERED:
                    self._seen.popitem(last=False)
                return self.potential.graph(structure, max_edges)
        if neighbors is None:
            neighbors = VerletGraphs(self.potential.species_index, self.potential.cutoff, self.skin)
        searches = neighbors.searches
        graph = neighbors.graph(structure, max_edges)
        with self._lock:
            self.reused += neighbors.searches == searches
            if key not in self._searches and neighbors.candidate_pairs <= self.max_pairs:
                self._searches[key] = neighbors
                self._pairs += neighbors.candidate_pairs
                while self._pairs > self.max_pairs:
                    _, evicted = self._searches.popitem(last=False)
                    self._pairs -= evicted.candidate_pairs
        return graph
