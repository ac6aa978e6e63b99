"""Loading, warming up and looking up the served models (one batching worker each, taking turns per device)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from mlip import Potential, Structure
from mlip.potential import resolve_device

from .errors import ApiError
from .metrics import Metrics
from .neighbor_cache import NeighborCache
from .schemas import ModelInfo, ModelRef
from .settings import Settings
from .worker import BatchWorker, DeviceTurns

log = logging.getLogger("mlip.server")
ALL_PROPERTIES = ("energy", "free_energy", "forces", "stress", "energies")


@dataclass
class ServedModel:
    """A loaded potential, its worker and what /v1/models says about it."""

    potential: Potential
    worker: BatchWorker
    summary: str | None
    neighbors: NeighborCache  # HTTP requests' neighbour searches, reused by clients that step through MD

    @cached_property
    def ref(self) -> dict[str, str]:
        """{"name", "sha256"}: which model answered (in every reply; built once)."""
        return ModelRef(name=self.potential.name, sha256=self.potential.sha256).model_dump()

    def info(self, default: bool) -> ModelInfo:
        p = self.potential
        return ModelInfo(
            name=p.name, sha256=p.sha256, species=p.config.species, cutoff=p.cutoff,
            dtype=str(p.dtype).removeprefix("torch."), device=str(p.device), kernels=p.kernels, default=default,
            summary=self.summary, metadata=p.metadata,
        )


def card_summary(checkpoint: Path) -> str | None:
    """First prose paragraph of the model card ``NAME.md`` beside the checkpoint (None if there is none)."""
    card = checkpoint.with_suffix(".md")
    if not card.is_file():
        return None
    for paragraph in card.read_text().split("\n\n"):
        text = " ".join(line.strip() for line in paragraph.splitlines() if not line.lstrip().startswith("#"))
        if text:
            return text[:500]
    return None


def warm_up(potential: Potential) -> None:
    """One forward pass with every property on a small periodic structure (compiles kernels, allocates)."""
    z, r = potential.config.species[0], potential.cutoff
    structure = Structure.from_arrays([z, z], [[0, 0, 0], [r / 2, 0, 0]], np.eye(3) * 2 * r, [True] * 3)
    potential.evaluate([structure], ALL_PROPERTIES)


class ModelRegistry:
    """The served models; ``load`` runs in a background thread so /health/live answers at once."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None
        self.ready = False
        self.error: str | None = None

    def load(self) -> None:
        """Load every checkpoint, warm each up, start its worker; errors are kept for /health/ready."""
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        device_turns: dict[str, DeviceTurns] = {}
        try:
            for path in s.checkpoint_paths():
                pin = s.checkpoint_sha256.get(path.stem)
                potential = Potential.load(
                    path, device=s.device, dtype=s.dtype, compile=s.compile, sha256=pin, kernels=s.kernels,
                    cuda_graphs=s.cuda_graphs and resolve_device(s.device).type == "cuda",
                )
                potential.max_edges = s.max_edges_per_structure  # the operator's limit rules here, not the memory estimate
                warm_up(potential)
                turns = device_turns.setdefault(str(potential.device), DeviceTurns())  # one pass at a time per device
                worker = BatchWorker(
                    potential, self.metrics, s.max_batch_atoms, s.max_wait_ms / 1000, s.max_queue,
                    s.max_edges_per_structure, turns, s.session_wait_s(potential.device),
                )
                worker.start()
                self.models[potential.name] = ServedModel(potential, worker, card_summary(path), NeighborCache(potential, s.neighbor_skin))
                log.info("serving %s (%s) on %s as %s", potential.name, potential.sha256[:12], potential.device, potential.dtype)
            self.default, self.ready = s.default_model_name(list(self.models)), True
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            log.error("loading models failed: %s", self.error)

    def get(self, name: str | None) -> ServedModel:
        """The named (or default) model; 503 while loading, 404 for an unknown name."""
        if not self.ready:
            raise ApiError(503, None, self.error or "models are still loading", {"Retry-After": str(self.settings.retry_after_s)})
        model = self.models.get(name or self.default)
        if model is None:
            raise ApiError(404, "model", f"unknown model {name!r}; served models: {sorted(self.models)}")
        return model

    def stalled_workers(self) -> list[str]:
        """Models whose worker has been inside one batch longer than ``worker_stall_s`` (a hung device)."""
        return [n for n, m in self.models.items() if m.worker.busy_for() > self.settings.worker_stall_s]

    def failing_workers(self) -> list[str]:
        """Models whose last ``max_consecutive_failures`` batches all failed for reasons other than input."""
        return [n for n, m in self.models.items() if m.worker.failing(self.settings.max_consecutive_failures)]

    def close(self) -> None:
        for model in self.models.values():
            model.worker.stop()
