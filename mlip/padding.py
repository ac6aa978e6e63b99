"""Padding graphs to a few fixed sizes, so that a captured CUDA graph (static shapes) serves many structures.

The padding is one extra structure whose atoms sit at the origin of a cubic cell of edge 2 r_c and
whose edges each join a padding atom to its own image one cell away: 2 r_c long, beyond the cutoff,
where the envelope makes every message exactly zero. Padding atoms and edges touch only the padding
structure, so the real structures' energies, forces and stress are those of the unpadded graph.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .graph import AtomicGraph, batch_graphs

MIN_ATOMS, MIN_EDGES, MIN_GRAPHS = 16, 64, 2


def bucket(count: int, minimum: int) -> int:
    """The smallest size on the ladder minimum · 2^(k/2) (rounded up to a multiple of 8) that is >= count:
    at most ~1.5x the count, and few sizes between 16 and 10^5."""
    size, k = minimum, 0
    while size < count:
        k += 1
        size = 8 * math.ceil(minimum * 2 ** (k / 2) / 8)
    return size


def padded_sizes(graph: AtomicGraph) -> tuple[int, int, int]:
    """(atoms, edges, structures) of the bucket ``graph`` pads to: at least one padding atom and structure."""
    atoms, edges = graph.species.shape[0], graph.edge_index.shape[1]
    return bucket(atoms + 1, MIN_ATOMS), bucket(edges, MIN_EDGES), bucket(graph.num_graphs + 1, MIN_GRAPHS)


def pad_graph(graph: AtomicGraph, atoms: int, edges: int, graphs: int, cutoff: float) -> AtomicGraph:
    """``graph`` followed by padding up to exactly ``atoms`` atoms, ``edges`` edges and ``graphs`` structures
    (training targets are left out: padding is for evaluation)."""
    have = graph.species.shape[0], graph.edge_index.shape[1], graph.num_graphs
    extra_atoms, extra_edges, extra_graphs = atoms - have[0], edges - have[1], graphs - have[2]
    if extra_atoms < 1 or extra_edges < 0 or extra_graphs < 1:
        raise ValueError(f"cannot pad {have} atoms, edges and structures to {(atoms, edges, graphs)}: "
                         "padding needs at least one more atom and structure")  # fmt: skip
    float_kind = {"dtype": graph.positions.dtype, "device": graph.positions.device}
    index_kind = {"dtype": graph.edge_index.dtype, "device": graph.edge_index.device}
    loops = torch.arange(extra_edges, **index_kind) % extra_atoms
    shift = torch.zeros(extra_edges, 3, **float_kind)
    shift[:, 0] = 1.0
    num_atoms = torch.zeros(extra_graphs, dtype=graph.num_atoms.dtype, device=graph.num_atoms.device)
    num_atoms[0] = extra_atoms
    padding = AtomicGraph(
        species=torch.zeros(extra_atoms, dtype=graph.species.dtype, device=graph.species.device),
        positions=torch.zeros(extra_atoms, 3, **float_kind),
        cell=(2.0 * cutoff * torch.eye(3, dtype=graph.cell.dtype, device=graph.cell.device)).expand(extra_graphs, 3, 3),
        pbc=torch.ones(extra_graphs, 3, dtype=torch.bool, device=graph.pbc.device),
        edge_index=torch.stack([loops, loops]),
        edge_shift=shift,
        batch=torch.zeros(extra_atoms, dtype=graph.batch.dtype, device=graph.batch.device),
        num_atoms=num_atoms,
    )
    return batch_graphs([replace(graph, targets={}), padding])
