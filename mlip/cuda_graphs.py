"""Energy, forces and stress of small structures replayed from captured CUDA graphs.

A small molecule's evaluation is a few thousand short kernels, and on a GPU launching them costs
more than running them. Each padded size (``mlip.padding``) seen twice is captured, forward and
backward together, as a CUDA graph that reads its inputs from fixed buffers; later structures of that
size are copied into the buffers and the graph replayed as a single launch. Larger structures, sizes
seen once (screening), and any size whose capture fails run eagerly. All captures share one memory
pool: replays never overlap and each one's outputs are read before the next, so the pool holds one
size's activations, not one per size. On a CPU the same buffers are used without capture (what the
CPU tests check: padding, buffer reuse and trimming).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import fields

import torch

from .graph import AtomicGraph
from .padding import pad_graph, padded_sizes
from .properties import compute_properties

log = logging.getLogger("mlip")
WARMUP_CALLS = 3  # eager calls on a side stream before capture (cuBLAS handles, autograd buffers)
CAPTURE_AFTER = 2  # a size is captured on its second evaluation: one-off sizes never pay for a capture
PER_ATOM = ("forces", "energies")


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device (streams and captures follow it); nothing on a CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class CapturedEvaluation:
    """``compute_properties`` for one padded size: fixed input buffers, one CUDA graph, fixed outputs."""

    def __init__(self, model: torch.nn.Module, example: AtomicGraph, forces: bool, stress: bool, pool=None):
        """``example``: the padded inputs, already on the device (kept as the buffers); ``pool``: a shared
        ``torch.cuda.graph_pool_handle()``."""
        self.model, self.forces, self.stress = model, forces, stress
        self.inputs = example
        self.device = example.positions.device
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.device.type != "cuda":
            return
        with on_device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    compute_properties(model, example, forces, stress)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # a capture stream on this device (torch's default one lives on whichever device came first);
            # thread_local: the server's other threads may touch CUDA meanwhile without invalidating it
            with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(self.device), capture_error_mode="thread_local"):
                self.outputs = compute_properties(model, example, forces, stress)
        self.graph = graph

    def __call__(self, graph: AtomicGraph) -> dict[str, torch.Tensor]:
        """Results for ``graph`` (same padded sizes; host or device); valid until the next call."""
        with on_device(self.device):
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
    """Captured evaluations by padded size, least recently used evicted. Not thread-safe: one caller at a time
    (the server's worker per device), and each result is valid until the next call."""

    def __init__(
        self, model: torch.nn.Module, cutoff: float, device: torch.device, dtype: torch.dtype,
        max_atoms: int = 1024, max_edges: int = 1 << 16, max_captured: int = 16,
    ):
        """Structures (a batch together) of at most ``max_atoms`` atoms and ``max_edges`` edges are captured."""
        self.model, self.cutoff, self.device, self.dtype = model, cutoff, device, dtype
        self.max_atoms, self.max_edges, self.max_captured = max_atoms, max_edges, max_captured
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._captured: OrderedDict[tuple, CapturedEvaluation] = OrderedDict()
        self._seen: Counter[tuple] = Counter()  # evaluations per size not captured yet
        self._failed: set[tuple] = set()  # sizes whose capture raised: they run eagerly

    def __call__(self, graph: AtomicGraph, forces: bool, stress: bool) -> dict[str, torch.Tensor] | None:
        """Results trimmed to ``graph``'s atoms and structures, or None where the caller evaluates eagerly:
        the graph is too large, its size is new or could not be captured."""
        atoms, edges, structures = graph.species.shape[0], graph.edge_index.shape[1], graph.num_graphs
        if atoms > self.max_atoms or edges > self.max_edges:
            return None
        sizes = padded_sizes(graph)
        key = (*sizes, forces, stress)
        captured = self._captured.pop(key, None)
        if captured is None:
            self._seen[key] += 1
            if key in self._failed or self._seen[key] < CAPTURE_AFTER:
                return None
        padded = pad_graph(graph, *sizes, self.cutoff)
        if captured is None and (captured := self._capture(key, padded)) is None:
            return None
        self._captured[key] = captured
        while len(self._captured) > self.max_captured:
            self._captured.popitem(last=False)
        out = captured(padded)
        return {k: v[:atoms] if k in PER_ATOM else v[:structures] for k, v in out.items()}

    def _capture(self, key: tuple, padded: AtomicGraph) -> CapturedEvaluation | None:
        """Capture one size; None (eager this time) if it fails. Out of memory is tried again later with the
        least recently used capture released; any other failure marks the size eager for good."""
        try:
            captured = CapturedEvaluation(self.model, padded.to(self.device, self.dtype), key[3], key[4], self._pool)
        except torch.cuda.OutOfMemoryError:
            if self._captured:
                self._captured.popitem(last=False)
            torch.cuda.empty_cache()
            return None
        except Exception as err:  # an operation that cannot be captured: the eager path still works
            log.warning("could not capture a CUDA graph for %s atoms/edges/structures (%s); evaluating eagerly", key[:3], err)
            self._failed.add(key)
            return None
        del self._seen[key]
        return captured
