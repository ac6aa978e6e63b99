"""Safe checkpoint format: safetensors weights + JSON config/metadata + a verified SHA-256.

Loading never unpickles anything. The SHA-256 covers every tensor (name, dtype, shape, bytes) and
the model config, so a tampered, truncated or mismatched file is refused with a ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import ModelConfig
from .model import MLIPModel

FORMAT = "mlip-checkpoint/1"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINT = SHIPPED_DIR / "aspirin-rmd17.safetensors"


def weights_sha256(tensors: dict[str, torch.Tensor], config_json: str) -> str:
    """SHA-256 over the canonical bytes of all tensors and the config that builds the model."""
    digest = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: MLIPModel, metadata: dict | None = None) -> str:
    """Write ``model`` to ``path`` with training ``metadata`` (JSON-serialisable); returns the SHA-256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config_json = json.dumps(model.config.to_dict(), sort_keys=True)
    sha256 = weights_sha256(tensors, config_json)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    header = {
        "format": FORMAT,
        "config": config_json,
        "metadata": json.dumps(metadata or {}, sort_keys=True),
        "code_version": __version__,
        "dtype": dtype,
        "sha256": sha256,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return sha256


class Checkpoint:
    """A loaded, verified checkpoint: config, weights and metadata (nothing executed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"checkpoint not found: {self.path}")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                header = f.metadata() or {}
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for every malformed file
            raise ValueError(f"{self.path} is not a readable checkpoint (truncated or corrupted?): {err}") from err
        if header.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not an mlip checkpoint (format {header.get('format')!r})")
        self.sha256 = weights_sha256(self.tensors, header["config"])
        if self.sha256 != header.get("sha256"):
            raise ValueError(f"{self.path} failed its SHA-256 check: weights or config were modified")
        self.config = ModelConfig.from_dict(json.loads(header["config"]))
        self.metadata = json.loads(header["metadata"])
        self.code_version = header.get("code_version", "unknown")
        self.dtype = header.get("dtype", "float64")

    def build_model(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> MLIPModel:
        """Instantiate the model (float64) and load the verified weights into it, then cast."""
        model = MLIPModel(self.config)
        model.load_state_dict(self.tensors, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def card_path(self) -> Path:
        """Markdown model card stored beside the checkpoint (``NAME.md``)."""
        return self.path.with_suffix(".md")


def load_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(path)
