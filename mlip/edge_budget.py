"""How many edges one structure may have before its activations would exhaust the machine's memory.

A forward and backward pass keeps per-edge activations; on a CPU a structure too large for the RAM
does not raise, the kernel's OOM killer ends the whole process (or swapping freezes it). So the
in-process default limit is derived from the memory there is and the model's width, and a structure
above it is a ``ValueError`` before anything is allocated.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .graph import DEFAULT_MAX_EDGES

# Activations per edge and feature channel for energy + forces (+ stress), float64; float32 takes half.
# Measured with benchmarks/edge_memory.py (1-thread CPU, 44 000 edges): 34.7 kB/edge at 32 channels
# (1.08 kB/channel), 86.7 kB/edge at 64 (1.36 kB/channel); rounded up because the cost grows a little
# faster than the width.
EDGE_BYTES_PER_CHANNEL_FLOAT64 = 1500
MEMORY_FRACTION = 0.5  # of the memory available when the model is loaded: room for a batch, the heap, the rest


def bytes_per_edge(config: ModelConfig, dtype: torch.dtype) -> int:
    """Estimated activation memory (bytes) one edge costs in an energy + forces evaluation."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return EDGE_BYTES_PER_CHANNEL_FLOAT64 * config.num_channels * itemsize // 8


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new evaluation can use: a GPU's total memory; on a CPU, the host's available memory,
    bounded by the container's (cgroup) limit. None where it cannot be read (not Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return min(available, _cgroup_headroom_bytes() or available)


def _cgroup_headroom_bytes() -> int | None:
    """The cgroup v2 memory limit minus current use, or None without such a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - current, 0)


def default_edge_limit(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Edges per structure whose activations fit in ``MEMORY_FRACTION`` of the available memory."""
    available = available_memory_bytes(device)
    if available is None:
        return DEFAULT_MAX_EDGES
    fitting = int(MEMORY_FRACTION * available / bytes_per_edge(config, dtype))
    return min(fitting, DEFAULT_MAX_EDGES)
