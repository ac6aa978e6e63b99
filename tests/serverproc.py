"""Helpers for server tests: random-weight checkpoints and a real `mlip serve` subprocess on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from mlip import MLIPModel, ModelConfig, save_checkpoint

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mlip serve ARGS` on 127.0.0.1:port; ``start`` waits for /health/ready, ``stop`` always reaps it."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.args, self.log_path, self.port = args, log_path, port or free_port()
        self.env = {**os.environ, "MLIP_LOG_LEVEL": "warning", "MLIP_TORCH_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        command = [sys.executable, "-m", "mlip.cli", "serve", *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlip serve exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"mlip serve not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
