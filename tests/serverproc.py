"""Helpers for server tests: random-weight checkpoints, a `mlip serve` subprocess, one torch thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlip import MLIPModel, ModelConfig, save_checkpoint
from .launcher import ServerProcess as _ServerProcess
from .launcher import free_port

__all__ = ["ServerProcess", "free_port", "make_checkpoint", "one_torch_thread"]
SERVER_SPECIES = [1, 6, 7, 8, 13, 29]


def make_checkpoint(path: Path, seed: int = 0, **config) -> Path:
    """A small random-weight model saved at ``path`` (fast enough for many test steps)."""
    torch.manual_seed(seed)
    settings = dict(species=SERVER_SPECIES, cutoff=4.0, num_channels=8, num_layers=2)
    save_checkpoint(path, MLIPModel(ModelConfig(**{**settings, **config})))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Servers and tests share two busy cores: one torch thread each avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ServerProcess(_ServerProcess):
    """The test server: quiet logs and one torch thread."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None, env: dict[str, str] | None = None):
        super().__init__(args, log_path, port, {"MLIP_LOG_LEVEL": "warning", "MLIP_TORCH_THREADS": "1", **(env or {})})
