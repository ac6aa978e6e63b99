"""Structures -> validated atomic graphs, and batching of many graphs into one."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from ase.data import chemical_symbols

from .cell import MIN_VOLUME, cell_has_stress, periodic_frame
from .neighbors import neighbor_list

MIN_DISTANCE = 0.1  # Å; closer atoms overlap: no chemistry happens there (invalid input)
MAX_EXTENT = 1000.0  # Å; longest periodic cell vector, widest span of positions along a non-periodic axis
MIN_CELL_HEIGHT = 0.5  # Å; thinner periodic cells put atoms on top of their own images (and stall the search)
MAX_COORDINATE = 1e5  # Å; largest |position| component (periodic structures are wrapped, but not from anywhere)
MAX_NEIGHBORS_PER_ATOM = 1000  # ~10x the density of diamond at r_c = 5 Å: beyond it the input is not matter
# Directed edges of one graph unless the caller sets a limit (Potential sets its own from the memory there is,
# mlip.edge_budget): 35-90 kB per edge for the shipped models in float64, so 10^6 edges is 35-90 GB.
DEFAULT_MAX_EDGES = 1_000_000
PER_ATOM_TARGETS = ("forces",)  # every other target is per structure
FLOAT64_TARGETS = ("energy", "stress")  # totals of ~1e4 eV: float32 would round labels to ~2 meV


@dataclass
class Structure:
    """One validated structure: numbers (N,), positions (N, 3) Å, cell (3, 3) Å rows, pbc (3,).

    ``frame`` is the cell's ``periodic_frame`` (computed when not given).
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    frame: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.frame is None:
            self.frame = periodic_frame(self.cell, self.pbc)

    @classmethod
    def from_arrays(cls, numbers, positions, cell=None, pbc=None) -> "Structure":
        """Check shapes, finiteness and the cell; raises ``ValueError`` naming the problem."""
        numbers = np.asarray(numbers)
        if numbers.ndim != 1 or not np.issubdtype(numbers.dtype, np.integer) and numbers.size:
            raise ValueError(f"numbers must be a 1-D list of atomic numbers, got shape {numbers.shape}")
        numbers = numbers.astype(np.int64)
        positions = _checked_positions(positions, len(numbers))
        cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
        if not np.isfinite(cell).all():
            raise ValueError("cell contains NaN or inf")
        pbc = np.zeros(3, dtype=bool) if pbc is None else np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
        if pbc.any():
            longest = np.abs(cell[pbc]).max()
            if longest > MAX_EXTENT:
                raise ValueError(f"cell vectors longer than {MAX_EXTENT:g} Å are not supported, got a component of {longest:.3g} Å")
        frame = periodic_frame(cell, pbc)
        if pbc.any():
            heights = abs(np.linalg.det(frame)) / np.linalg.norm(np.cross(frame[[1, 2, 0]], frame[[2, 0, 1]]), axis=1)
            thin = np.flatnonzero(pbc & (heights < MIN_CELL_HEIGHT))
            if thin.size:
                k = int(thin[0])
                raise ValueError(
                    f"periodic cell is only {heights[k]:.3g} Å thick across cell vector {k}, less than {MIN_CELL_HEIGHT:g} Å: "
                    "atoms would overlap their own periodic images"
                )
        _check_spans(positions, pbc, frame)
        if (numbers < 1).any() or (numbers > 118).any():
            raise ValueError(f"numbers must be atomic numbers 1..118, got {sorted(set(numbers.tolist()))}")
        return cls(numbers, positions, cell, pbc, frame)

    def moved_to(self, positions) -> "Structure":
        """The same atoms, cell and pbc at new positions (Å), checking only what positions can break
        (an MD step: numbers and cell were validated with the first frame)."""
        positions = _checked_positions(positions, len(self.numbers))
        _check_spans(positions, self.pbc, self.frame)
        return Structure(self.numbers, positions, self.cell, self.pbc, self.frame)

    @classmethod
    def from_atoms(cls, atoms) -> "Structure":
        return cls.from_arrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)

    @property
    def has_stress(self) -> bool:
        """Whether stress is defined: see ``stress_defined``."""
        return cell_has_stress(self.cell, self.pbc)


def _checked_positions(positions, count: int) -> np.ndarray:
    """Positions (Å) as float64 (count, 3), finite and within ±MAX_COORDINATE; ``ValueError`` otherwise."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (count, 3):
        raise ValueError(f"positions must have shape ({count}, 3) to match numbers, got {positions.shape}")
    largest = np.abs(positions).max(initial=0.0)
    if not largest <= MAX_COORDINATE:  # one reduction for the common case; NaN fails this comparison too
        if not np.isfinite(positions).all():
            raise ValueError("positions contain NaN or inf")
        raise ValueError(f"positions must lie within ±{MAX_COORDINATE:g} Å, got |x| = {largest:.3g} Å")
    return positions


def _check_spans(positions: np.ndarray, pbc: np.ndarray, frame: np.ndarray) -> None:
    """``ValueError`` when atoms spread over more than MAX_EXTENT along a non-periodic direction of ``frame``."""
    if len(positions) > 1 and not pbc.all():
        spans = np.ptp(positions @ frame[~pbc].T, axis=0)
        if spans.max() > MAX_EXTENT:
            raise ValueError(
                f"positions span {spans.max():.3g} Å along a non-periodic axis, more than {MAX_EXTENT:g} Å: "
                "atoms that far apart do not interact; evaluate the fragments separately"
            )


def cell_volumes(cell: torch.Tensor) -> torch.Tensor:
    """(B,) |det| of cells (B, 3, 3) in Å³, as the triple product: elementwise kernels only (no LU
    factorisation), so it can sit inside a captured CUDA graph."""
    return (torch.linalg.cross(cell[:, 0], cell[:, 1], dim=-1) * cell[:, 2]).sum(-1).abs()


def stress_defined(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """(B,) bool: ``cell_has_stress`` (a periodic direction and a non-zero volume) for a batch of cells."""
    return pbc.any(dim=1) & (cell_volumes(cell) >= MIN_VOLUME)


@dataclass
class AtomicGraph:
    """Atoms and directed edges (receiver, sender) of one or many structures, as tensors.

    Edge vector r_ij = x_j - x_i + shift_ij · cell[batch_i] (Å) is recomputed by the model so that
    forces and stress come from autograd. ``targets`` holds optional training labels.
    """

    species: torch.Tensor  # (N,) index into the model's species list
    positions: torch.Tensor  # (N, 3) Å
    cell: torch.Tensor  # (B, 3, 3) Å
    pbc: torch.Tensor  # (B, 3) bool
    edge_index: torch.Tensor  # (2, E) receiver, sender
    edge_shift: torch.Tensor  # (E, 3) integer lattice shifts, in the positions' dtype
    batch: torch.Tensor  # (N,) structure of each atom
    num_atoms: torch.Tensor  # (B,)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_graphs(self) -> int:
        return int(self.num_atoms.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "AtomicGraph":
        """Move to a device; floating tensors (positions, cell, shifts, forces) also to ``dtype``.

        Energy and stress targets stay float64: the model's energies are float64 whatever its dtype.
        Host tensors go to a GPU from pinned memory without blocking (cast first, so fewer bytes travel).
        """
        same_dtype = dtype is None or all(t.dtype == dtype for t in (self.positions, self.cell, self.edge_shift))
        same_device = device is None or torch.device(device) == self.positions.device
        if same_dtype and same_device and not self.targets:
            return self  # already there (an MD step on a CPU): nothing to copy
        to_gpu = device is not None and torch.device(device).type == "cuda"

        def move(t: torch.Tensor, keep_float64: bool = False) -> torch.Tensor:
            cast = dtype is not None and t.is_floating_point() and not keep_float64
            t = t.to(dtype=dtype if cast else None)
            if to_gpu and t.device.type == "cpu":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device=device)

        moved = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "targets"}
        targets = {k: move(v, k in FLOAT64_TARGETS) for k, v in self.targets.items()}
        return replace(self, **moved, targets=targets)


class SpeciesIndex:
    """Maps atomic numbers to the model's species indices; unknown elements are a ``ValueError``."""

    def __init__(self, species: list[int]):
        self.species = list(species)
        self.table = np.full(119, -1, dtype=np.int64)
        self.table[self.species] = np.arange(len(self.species))

    def __call__(self, numbers: np.ndarray) -> np.ndarray:
        index = self.table[numbers]
        if (index < 0).any():
            unknown = sorted({chemical_symbols[z] for z in numbers[index < 0]})
            known = [chemical_symbols[z] for z in self.species]
            raise ValueError(f"element(s) {unknown} not supported by this model (trained on {known})")
        return index


def estimate_edges(structure: Structure, cutoff: float) -> float:
    """Directed edges expected at uniform density: N² · (4/3 π r_c³) / V.

    V is the volume of the periodic lattice times max(span, r_c) along each non-periodic direction,
    so a tiny periodic cell (every atom sees thousands of its images) or a dense clump is caught
    before the neighbour search allocates anything.
    """
    n = len(structure.numbers)
    if n == 0:
        return 0.0
    frame = structure.frame
    spans = np.maximum(np.ptp(structure.positions @ frame.T, axis=0), cutoff)
    axes = np.where(structure.pbc[:, None], frame, frame * spans[:, None])
    volume = max(abs(float(np.linalg.det(axes))), MIN_VOLUME)
    return n * n * (4.0 / 3.0) * np.pi * cutoff**3 / volume


def check_size(structure: Structure, cutoff: float, max_edges: int = DEFAULT_MAX_EDGES) -> None:
    """``ValueError`` when the structure would have more than ``max_edges`` edges within ``cutoff`` (estimated,
    before any neighbour search allocates them) or is denser than any matter."""
    estimate = estimate_edges(structure, cutoff)
    per_atom = estimate / max(len(structure.numbers), 1)
    if per_atom > MAX_NEIGHBORS_PER_ATOM:
        raise ValueError(
            f"structure too dense: about {per_atom:.3g} neighbours per atom within {cutoff:g} Å, more than "
            f"{MAX_NEIGHBORS_PER_ATOM} (a periodic cell much smaller than the cutoff, or atoms piled up?)"
        )
    if estimate > max_edges:
        raise ValueError(
            f"structure too large: about {estimate:.3g} neighbour pairs within {cutoff:g} Å, more than the limit of "
            f"{max_edges} (in-process, Potential.max_edges sets it from the memory there is: mlip.edge_budget)"
        )


def pair_lengths(structure: Structure, receiver: np.ndarray, sender: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """|x_j - x_i + S·cell| of each pair (Å)."""
    vectors = structure.positions[sender] - structure.positions[receiver] + shifts @ structure.cell
    return np.sqrt(np.einsum("ij,ij->i", vectors, vectors))


def check_edges(receiver: np.ndarray, sender: np.ndarray, lengths: np.ndarray, cutoff: float, max_edges: int) -> None:
    """``ValueError`` for more than ``max_edges`` edges, or two atoms closer than MIN_DISTANCE (lengths in Å)."""
    if len(receiver) > max_edges:
        raise ValueError(f"structure has {len(receiver)} neighbour pairs within {cutoff:g} Å, more than the limit of {max_edges}")
    if len(receiver) and lengths.min() < MIN_DISTANCE:
        k = int(lengths.argmin())
        raise ValueError(f"atoms {receiver[k]} and {sender[k]} overlap (distance {lengths[k]:.2g} Å)")


def graph_from_pairs(
    structure: Structure,
    species: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    lengths: np.ndarray,
    cutoff: float,
    targets: dict | None = None,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> AtomicGraph:
    """The graph of the pairs (receiver, sender, integer shift) with ``lengths`` < ``cutoff``.

    ``ValueError`` when there are more than ``max_edges`` of them or two atoms overlap.
    """
    receiver, sender, shifts = pairs
    if len(receiver) and lengths.max() >= cutoff:
        keep = lengths < cutoff
        receiver, sender, shifts, lengths = receiver[keep], sender[keep], shifts[keep], lengths[keep]
    check_edges(receiver, sender, lengths, cutoff, max_edges)
    return AtomicGraph(
        species=torch.from_numpy(species),
        positions=torch.from_numpy(structure.positions),
        cell=torch.from_numpy(structure.cell).unsqueeze(0),
        pbc=torch.from_numpy(structure.pbc).unsqueeze(0),
        edge_index=torch.from_numpy(np.stack([receiver, sender])),
        edge_shift=torch.from_numpy(shifts.astype(np.float64)),
        batch=torch.zeros(len(species), dtype=torch.int64),
        num_atoms=torch.tensor([len(species)]),
        targets={k: _target_tensor(k, v) for k, v in (targets or {}).items()},
    )


def build_graph(
    structure: Structure,
    species_index: SpeciesIndex,
    cutoff: float,
    targets: dict | None = None,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> AtomicGraph:
    """Neighbour list + species lookup for one structure (float64 tensors on the CPU).

    Raises ``ValueError`` before the neighbour search when the structure would have more than
    ``max_edges`` edges (estimated), and after it when the real count exceeds it.
    """
    species = species_index(structure.numbers)
    check_size(structure, cutoff, max_edges)
    pairs = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    return graph_from_pairs(structure, species, pairs, pair_lengths(structure, *pairs), cutoff, targets, max_edges)


def _target_tensor(key: str, value) -> torch.Tensor:
    """A label as float64 (a Python float would become float32), per structure with a leading batch axis."""
    tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
    return tensor if key in PER_ATOM_TARGETS else tensor.unsqueeze(0)


def batch_graphs(graphs: list[AtomicGraph]) -> AtomicGraph:
    """Concatenate graphs into one disjoint graph (targets concatenate along their first axis)."""
    if len(graphs) == 1:
        return graphs[0]
    offsets = np.cumsum([0] + [int(g.num_atoms.sum()) for g in graphs[:-1]])
    graph_offsets = np.cumsum([0] + [g.num_graphs for g in graphs[:-1]])
    targets = {key: torch.cat([g.targets[key] for g in graphs]) for key in graphs[0].targets}
    return AtomicGraph(
        species=torch.cat([g.species for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        edge_shift=torch.cat([g.edge_shift for g in graphs]),
        batch=torch.cat([g.batch + int(o) for g, o in zip(graphs, graph_offsets)]),
        num_atoms=torch.cat([g.num_atoms for g in graphs]),
        targets=targets,
    )
