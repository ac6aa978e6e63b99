"""Server settings: command-line flags override ``MLIP_*`` environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlip.checkpoint import DEFAULT_CHECKPOINT, SHIPPED_DIR, find_checkpoint
from mlip.kernels import KERNELS
from mlip.verlet import DEFAULT_SKIN

if TYPE_CHECKING:
    import torch


# A GPU's forward pass costs about the same for 1 or 16 small molecules (launch-bound), so merging MD sessions
# into one batch pays; on a CPU the cost grows with the batch and waiting only adds latency (measured there).
GPU_SESSION_WAIT_MS = 3.0


class Settings(BaseSettings):
    """Every field can be set as ``MLIP_<FIELD>`` (e.g. ``MLIP_MAX_BATCH_ATOMS=8192``)."""

    model_config = SettingsConfigDict(env_prefix="MLIP_", extra="ignore")

    checkpoint: Path | None = Field(None, description="serve this one checkpoint, a file or a shipped name (default: every shipped one)")
    models: Path | None = Field(None, description="serve every *.safetensors in this directory")
    default_model: str | None = Field(
        None, description=f"model used when a request names none (default: {DEFAULT_CHECKPOINT.stem} if served, else the first)"
    )
    host: str = Field("127.0.0.1", description="bind address (loopback unless told otherwise)")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["float32", "float64"] = "float64"
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    compile: bool = Field(False, description="torch.compile the model: lower latency, slower start-up")
    kernels: Literal[KERNELS] = Field(
        "e3nn", description="equivariant kernels: e3nn, or cueq (cuEquivariance, the [cuda] extra; CUDA kernels on GPUs)"
    )
    cuda_graphs: bool = Field(
        False, description="on a CUDA device, replay captured CUDA graphs for batches of up to 1024 atoms (ignored on a CPU)"
    )

    max_batch_atoms: int = Field(4096, ge=1, description="atom budget of one micro-batch")
    max_wait_ms: float = Field(0.0, ge=0, description="extra wait (ms) to gather a larger batch; 0 = none")
    session_wait_ms: float | None = Field(
        None, ge=0, le=1000,
        description="wait (ms) for open WebSocket sessions' next steps to join a batch (at most half the last batch's "
        f"time); default {GPU_SESSION_WAIT_MS} on a GPU, 0 on a CPU",
    )
    max_queue: int = Field(1024, ge=1, description="structures waiting per model before 503")
    max_atoms_per_structure: int = Field(4096, ge=1)
    max_atoms_per_request: int = Field(65536, ge=1)
    max_structures_per_request: int = Field(1024, ge=1)
    worker_stall_s: float = Field(300.0, gt=0, description="a worker busy this long on one batch fails /health/live")
    max_consecutive_failures: int = Field(
        3, ge=1, description="device failures in a row after which /health/ready fails so the orchestrator replaces us"
    )
    max_edges_per_structure: int = Field(
        120_000, ge=1, description="neighbour pairs of one structure (estimated before the neighbour search) and of one batch"
    )
    neighbor_skin: float = Field(
        DEFAULT_SKIN, ge=0, le=2.0, description="Å; a WebSocket session, or a structure sent again over HTTP, reuses its neighbour search until an atom moves half this far"
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest request body or WebSocket frame")
    request_timeout_s: float = Field(120.0, gt=0, description="longest wait for a result before 504")
    retry_after_s: int = Field(1, ge=0, description="Retry-After (s) sent with 503 answers")

    checkpoint_sha256: dict[str, str] = Field(
        default_factory=dict,
        description='expected SHA-256 per model name (JSON, e.g. {"aspirin-rmd17": "ab12..."}): other files are refused',
    )
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer <key>'")
    api_keys_file: Path | None = Field(None, description="file with one accepted API key per line")
    log_level: str = "info"

    @model_validator(mode="after")
    def _one_model_source(self) -> "Settings":
        if self.checkpoint is not None and self.models is not None:
            raise ValueError("give either checkpoint or models (a directory), not both")
        return self

    def checkpoint_paths(self) -> list[Path]:
        """The checkpoint files to serve; ``ValueError`` if there are none."""
        if self.checkpoint is not None:
            return [find_checkpoint(self.checkpoint)]
        directory = self.models or SHIPPED_DIR
        if not directory.is_dir():
            raise ValueError(f"models directory not found: {directory}")
        paths = sorted(directory.glob("*.safetensors"))
        if not paths:
            raise ValueError(f"no *.safetensors checkpoints in {directory} (pass --checkpoint FILE or --models DIR)")
        return paths

    def default_model_name(self, served: list[str]) -> str:
        """The model a request without a name gets: ``default_model``, else the shipped default, else the first."""
        if self.default_model is not None:
            if self.default_model not in served:
                raise ValueError(f"default model {self.default_model!r} is not among the served models {sorted(served)}")
            return self.default_model
        return DEFAULT_CHECKPOINT.stem if DEFAULT_CHECKPOINT.stem in served else served[0]

    def session_wait_s(self, device: torch.device) -> float:
        """Seconds a worker on ``device`` waits for open sessions' steps (``session_wait_ms``, else by device)."""
        if self.session_wait_ms is not None:
            return self.session_wait_ms / 1000
        return GPU_SESSION_WAIT_MS / 1000 if device.type == "cuda" else 0.0

    def api_keys(self) -> list[str]:
        """Accepted API keys (none set: authentication off). A key or keys file that is set but empty is an
        error, never a silent 'no authentication' (an unset shell variable in ``docker run -e`` does that)."""
        keys = []
        if self.api_key is not None:
            key = self.api_key.get_secret_value().strip()
            if not key:
                raise ValueError("MLIP_API_KEY is set but empty: set a key, or unset it to serve without authentication")
            keys.append(key)
        if self.api_keys_file is not None:
            if not self.api_keys_file.is_file():
                raise ValueError(f"API keys file not found: {self.api_keys_file}")
            from_file = [line.strip() for line in self.api_keys_file.read_text().splitlines() if line.strip()]
            if not from_file:
                raise ValueError(f"API keys file {self.api_keys_file} holds no key")
            keys += from_file
        return keys
