"""A model on a device: validated structures in, per-structure numpy results out (batched)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .cell import cells_have_stress
from .checkpoint import Checkpoint
from .cuda_graphs import CudaGraphs
from .edge_budget import default_edge_limit
from .graph import AtomicGraph, SpeciesIndex, Structure, batch_graphs, build_graph
from .host_memory import retain_freed_host_memory
from .kernels import kernels_of, use_kernels
from .model import MLIPModel
from .properties import compute_properties

PROPERTIES = ("energy", "free_energy", "forces", "stress", "energies")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first GPU if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class Potential:
    """Evaluates energy (eV), forces (eV/Å), stress (eV/Å³) and per-atom energies for structures."""

    def __init__(
        self,
        model: MLIPModel,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
        name: str = "model",
        sha256: str = "",
        metadata: dict | None = None,
        compile: bool = False,
        kernels: str = "e3nn",
        cuda_graphs: bool = False,
    ):
        """``kernels="cueq"`` swaps in cuEquivariance's tensor product and symmetric contraction (``mlip.kernels``:
        converted weights, the same results to float64 round-off, CUDA kernels on GPUs); "e3nn" keeps the model's own.
        ``cuda_graphs`` (CUDA devices only): small structures are evaluated by replaying captured CUDA graphs
        (``mlip.cuda_graphs``), one per padded size."""
        self.device = resolve_device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {self.device}")
        self.dtype = resolve_dtype(dtype)
        if self.device.type == "cpu":
            retain_freed_host_memory()  # activations of large structures are reused, not page-faulted afresh
        # edges per structure: what fits in half the memory there is now (a larger structure is a ValueError, not an OOM kill)
        self.max_edges = default_edge_limit(model.config, self.device, self.dtype)
        self.model = use_kernels(model, kernels, self.device).to(device=self.device, dtype=self.dtype).eval()
        self.kernels = kernels_of(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # torch.compile fuses the many small e3nn ops (1.3x on aspirin float32, 2 CPU threads); the first call compiles
        self.energy_model = torch.compile(self.model, dynamic=True) if compile else self.model
        self.config = model.config
        self.species_index = SpeciesIndex(self.config.species)
        self.name, self.sha256, self.metadata = name, sha256, metadata or {}
        self.cuda_graphs = CudaGraphs(self.energy_model, self.cutoff, self.device, self.dtype) if cuda_graphs else None

    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", dtype: str = "float64", compile: bool = False,
        sha256: str | None = None, kernels: str = "e3nn", cuda_graphs: bool = False,
    ) -> "Potential":
        """Load a verified checkpoint; ``sha256`` pins it (``ValueError`` for any other file)."""
        ckpt = Checkpoint(path, sha256)
        model = ckpt.build_model()
        return cls(model, device, dtype, ckpt.path.stem, ckpt.sha256, ckpt.metadata, compile, kernels, cuda_graphs)

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    def graph(self, structure: Structure, max_edges: int | None = None) -> AtomicGraph:
        """The structure's neighbour-list graph; ``ValueError`` if it would exceed ``max_edges`` edges
        (default ``self.max_edges``: raise it for larger systems on machines with the memory)."""
        return build_graph(structure, self.species_index, self.cutoff, max_edges=max_edges or self.max_edges)

    def evaluate(
        self, structures: Sequence[Structure], properties: Iterable[str] = ("energy", "forces")
    ) -> list[dict[str, np.ndarray | float]]:
        """Evaluate many structures in one batched forward pass; results in input order."""
        return self.evaluate_graphs([self.graph(s) for s in structures], properties)

    def evaluate_graphs(
        self, graphs: Sequence[AtomicGraph], properties: Iterable[str] = ("energy", "forces")
    ) -> list[dict[str, np.ndarray | float]]:
        """Like ``evaluate`` for prebuilt graphs, in batches of at most ``max_edges`` edges together (so a
        long list cannot exhaust the memory either). Stress only where it is defined (``cells_have_stress``)."""
        properties = set(properties)
        unknown = properties - set(PROPERTIES)
        if unknown:
            raise ValueError(f"unknown properties {sorted(unknown)}; choose from {list(PROPERTIES)}")
        return [result for batch in self.edge_batches(graphs) for result in self._evaluate_batch(batch, properties)]

    def edge_batches(self, graphs: Sequence[AtomicGraph]) -> list[list[AtomicGraph]]:
        """Consecutive runs of ``graphs`` with at most ``max_edges`` edges together; ``ValueError`` for one above it."""
        batches: list[list[AtomicGraph]] = []
        edges_in_last = 0
        for graph in graphs:
            edges = graph.edge_index.shape[1]
            if edges > self.max_edges:
                raise ValueError(f"a graph has {edges} edges, more than Potential.max_edges = {self.max_edges}")
            if not batches or edges_in_last + edges > self.max_edges:
                batches.append([])
                edges_in_last = 0
            batches[-1].append(graph)
            edges_in_last += edges
        return batches

    def _evaluate_batch(self, graphs: list[AtomicGraph], properties: set[str]) -> list[dict[str, np.ndarray | float]]:
        """One batched forward pass over ``graphs``; per-structure results in their order."""
        host = batch_graphs(graphs)
        counts = host.num_atoms.tolist()  # read on the host: no device synchronisation before the forward pass
        has_stress = cells_have_stress(host.cell.cpu().numpy(), host.pbc.cpu().numpy()).tolist()
        want_stress = "stress" in properties and any(has_stress)
        forces = "forces" in properties
        out = self.cuda_graphs(host, forces, want_stress) if self.cuda_graphs is not None else None
        if out is None:  # no CUDA graphs, or a structure too large for them
            out = compute_properties(self.energy_model, host.to(self.device, self.dtype), forces=forces, stress=want_stress)
        keys = ["energy"] + [k for k in ("forces", "energies") if k in properties] + (["stress"] if want_stress else [])
        # one device -> host copy for everything, in float64
        flat = torch.cat([out[k].detach().reshape(-1).to(torch.float64) for k in keys]).cpu().numpy()
        arrays, start = {}, 0
        for k in keys:
            arrays[k], start = flat[start : start + out[k].numel()], start + out[k].numel()
        starts = np.cumsum([0] + counts)
        results = []
        for b in range(len(counts)):
            energy = float(arrays["energy"][b])
            r: dict[str, np.ndarray | float] = {"energy": energy}
            if "free_energy" in properties:
                r["free_energy"] = energy
            if "forces" in arrays:
                r["forces"] = arrays["forces"].reshape(-1, 3)[starts[b] : starts[b + 1]]
            if "energies" in arrays:
                r["energies"] = arrays["energies"][starts[b] : starts[b + 1]]
            if want_stress and has_stress[b]:
                r["stress"] = arrays["stress"].reshape(-1, 3, 3)[b]
            results.append(r)
        return results
