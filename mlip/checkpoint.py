"""Safe checkpoint format: safetensors weights + JSON config/metadata + a verified SHA-256.

Loading never unpickles anything. The header (format, config, metadata) is checked field by field
before any tensor is read or any model is allocated. The SHA-256 covers every tensor (name, dtype,
shape, bytes), the model config and the metadata: it detects corruption and accidental edits. It is
stored in the file itself, so it is not a signature: whoever can rewrite the file can rewrite the
hash. To trust a file, pin the hash you expect (``Checkpoint(path, expected_sha256=...)``,
``MLIPCalculator(..., sha256=...)``, ``mlip serve --checkpoint-sha256``).
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


def _shipped_dir() -> Path:
    """The shipped potentials: ``mlip/checkpoints`` when installed from a wheel, ``checkpoints/`` in a source tree."""
    installed = Path(__file__).resolve().parent / "checkpoints"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "checkpoints"


SHIPPED_DIR = _shipped_dir()
DEFAULT_CHECKPOINT = SHIPPED_DIR / "aspirin-rmd17.safetensors"


def shipped_checkpoints() -> dict[str, Path]:
    """The potentials that come with the package: name (file stem) -> file."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.safetensors"))}


def find_checkpoint(path_or_name: str | Path) -> Path:
    """A checkpoint file, or the name of a shipped potential (e.g. ``aspirin-rmd17``); ``ValueError`` if neither."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = shipped_checkpoints()
    if str(path_or_name) in shipped:
        return shipped[str(path_or_name)]
    raise ValueError(f"checkpoint not found: {path} (not a file, nor a shipped potential: {', '.join(shipped) or 'none'})")


def weights_sha256(tensors: dict[str, torch.Tensor], config_json: str, metadata_json: str) -> str:
    """SHA-256 over the canonical bytes of all tensors, the config that builds the model and the metadata."""
    digest = hashlib.sha256(config_json.encode())
    digest.update(b"|metadata|" + metadata_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: MLIPModel, metadata: dict | None = None) -> str:
    """Write ``model`` to ``path`` with training ``metadata`` (JSON-serialisable); returns the SHA-256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config_json = json.dumps(model.config.to_dict(), sort_keys=True)
    metadata_json = json.dumps(metadata or {}, sort_keys=True)
    sha256 = weights_sha256(tensors, config_json, metadata_json)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    header = {
        "format": FORMAT,
        "config": config_json,
        "metadata": metadata_json,
        "code_version": __version__,
        "dtype": dtype,
        "sha256": sha256,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return sha256


class Checkpoint:
    """A loaded, verified checkpoint: config, weights and metadata (nothing executed)."""

    def __init__(self, path: str | Path, expected_sha256: str | None = None):
        """``path``: a file, or the name of a shipped potential (``find_checkpoint``)."""
        self.path = find_checkpoint(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                header = f.metadata() or {}
                self._check_header(header)
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for every malformed file
            raise ValueError(f"{self.path} is not a readable checkpoint (truncated or corrupted?): {err}") from err
        self.sha256 = weights_sha256(self.tensors, header["config"], header["metadata"])
        if self.sha256 != header["sha256"]:
            raise ValueError(f"{self.path} failed its SHA-256 check: weights, config or metadata were modified")
        if expected_sha256 is not None and self.sha256 != expected_sha256.strip().lower():
            raise ValueError(f"{self.path} has SHA-256 {self.sha256}, not the expected {expected_sha256}")
        self.code_version = header.get("code_version", "unknown")
        self.dtype = header.get("dtype", "float64")

    def _check_header(self, header: dict[str, str]) -> None:
        """Every header field present and well-formed, the config within bounds: ``ValueError`` naming it."""
        if header.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not an mlip checkpoint (format {header.get('format')!r})")
        parsed = {}
        for key in ("config", "metadata"):
            try:
                parsed[key] = json.loads(header[key])
            except KeyError:
                raise ValueError(f"{self.path}: header field '{key}' is missing") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: header field '{key}' is not valid JSON: {err}") from None
            if not isinstance(parsed[key], dict):
                raise ValueError(f"{self.path}: header field '{key}' must be a JSON object")
        if not isinstance(header.get("sha256"), str):
            raise ValueError(f"{self.path}: header field 'sha256' is missing")
        try:
            self.config = ModelConfig.from_dict(parsed["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: header field 'config': {err}") from None
        self.metadata = parsed["metadata"]

    def build_model(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> MLIPModel:
        """Instantiate the model (float64) and load the verified weights into it, then cast."""
        model = MLIPModel(self.config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in self.tensors.items()}
        if expected != found:
            bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))[0]
            raise ValueError(
                f"{self.path}: tensor '{bad}' has shape {found.get(bad, 'missing')}, the config builds {expected.get(bad, 'nothing')}"
            )
        # Buffers are constants the code derives from the config (e3nn's Clebsch-Gordan tables and output masks). A
        # float32-trained checkpoint holds them rounded to float32: they come from this float64 build, not the file.
        constants = {name: buffer for name, buffer in model.named_buffers() if name in expected}
        model.load_state_dict({**self.tensors, **constants}, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def card_path(self) -> Path:
        """Markdown model card stored beside the checkpoint (``NAME.md``)."""
        return self.path.with_suffix(".md")


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> Checkpoint:
    return Checkpoint(path, expected_sha256)
