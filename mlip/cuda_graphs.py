"""Energy, forces and stress of small structures replayed from captured CUDA graphs.

A small molecule's evaluation is a few thousand short kernels, and on a GPU launching them costs
more than running them. Each padded size (``mlip.padding``) is captured once, forward and backward
together, as a CUDA graph that reads its inputs from fixed buffers; later structures of that size are
copied into the buffers and the graph replayed as a single launch. Larger structures, and any size
whose capture fails, run eagerly. On a CPU the same buffers are used without capture (what the CPU
tests check: padding, buffer reuse and trimming).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import fields, replace

import torch

from .graph import AtomicGraph
from .padding import pad_graph, padded_sizes
from .properties import compute_properties

log = logging.getLogger("mlip")
WARMUP_CALLS = 3  # eager calls on a side stream before capture (cuBLAS handles, autograd buffers)
PER_ATOM = ("forces", "energies")


class CapturedEvaluation:
    """``compute_properties`` for one padded size: fixed input buffers, one CUDA graph, fixed outputs."""

    def __init__(self, model: torch.nn.Module, example: AtomicGraph, forces: bool, stress: bool):
        self.model, self.forces, self.stress = model, forces, stress
        self.inputs = example  # on the device; every later call copies into these tensors
        self.graph: torch.cuda.CUDAGraph | None = None
        if example.positions.device.type != "cuda":
            return
        side = torch.cuda.Stream(example.positions.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                compute_properties(model, example, forces, stress)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may touch CUDA meanwhile without invalidating the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = compute_properties(model, example, forces, stress)

    def __call__(self, graph: AtomicGraph) -> dict[str, torch.Tensor]:
        """Results for ``graph`` (same padded sizes; host or device); valid until the next call."""
        for f in fields(AtomicGraph):
            if f.name != "targets":
                target, source = getattr(self.inputs, f.name), getattr(graph, f.name)
                if source.device.type == "cpu" and target.device.type == "cuda":
                    source = source.to(target.dtype).pin_memory()  # cast on the host: the copy stays asynchronous
                target.copy_(source, non_blocking=True)
        if self.graph is None:
            return compute_properties(self.model, self.inputs, self.forces, self.stress)
        self.graph.replay()
        return self.outputs


class CudaGraphs:
    """Captured evaluations by padded size, least recently used evicted (each holds its activations' memory)."""

    def __init__(
        self, model: torch.nn.Module, cutoff: float, device: torch.device, dtype: torch.dtype,
        max_atoms: int = 1024, max_edges: int = 1 << 16, max_captured: int = 16,
    ):
        """Structures (a batch together) of at most ``max_atoms`` atoms and ``max_edges`` edges are captured."""
        self.model, self.cutoff, self.device, self.dtype = model, cutoff, device, dtype
        self.max_atoms, self.max_edges, self.max_captured = max_atoms, max_edges, max_captured
        self._captured: OrderedDict[tuple, CapturedEvaluation] = OrderedDict()
        self._failed: set[tuple] = set()  # sizes whose capture raised: they run eagerly

    def __call__(self, graph: AtomicGraph, forces: bool, stress: bool) -> dict[str, torch.Tensor] | None:
        """Results trimmed to ``graph``'s atoms and structures, or None where the graph is too large or its
        size could not be captured (the caller then evaluates eagerly)."""
        atoms, edges, structures = graph.species.shape[0], graph.edge_index.shape[1], graph.num_graphs
        if atoms > self.max_atoms or edges > self.max_edges:
            return None
        sizes = padded_sizes(graph)
        key = (*sizes, forces, stress)
        if key in self._failed:
            return None
        padded = pad_graph(replace(graph, targets={}), *sizes, self.cutoff)
        captured = self._captured.pop(key, None)
        if captured is None:
            try:
                captured = CapturedEvaluation(self.model, padded.to(self.device, self.dtype), forces, stress)
            except RuntimeError as err:
                log.warning("could not capture a CUDA graph for %s atoms/edges/structures (%s); evaluating eagerly", sizes, err)
                self._failed.add(key)
                return None
        self._captured[key] = captured
        while len(self._captured) > self.max_captured:
            self._captured.popitem(last=False)
        out = captured(padded)
        return {k: v[:atoms] if k in PER_ATOM else v[:structures] for k, v in out.items()}
