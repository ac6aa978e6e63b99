"""Training configuration: one YAML file, overridable key by key from the command line."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlip.config import ModelConfig

# ModelConfig fields that training derives from the data rather than reading from YAML.
DERIVED_MODEL_KEYS = {"species", "e0s", "scale", "shift", "avg_num_neighbors"}


def parse_duration(value: float | str | None) -> float | None:
    """Seconds from a number or a string like '90s', '45m', '1.5h'."""
    if value is None or isinstance(value, (int, float)):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", str(value))
    if not match:
        raise ValueError(f"max_time must be seconds or like '45m' / '2h', got {value!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass
class TrainConfig:
    """Everything `mlip train` needs. Energies eV, forces eV/Å, stress eV/Å³, times s."""

    train_file: str
    output: str = "runs/model.safetensors"  # checkpoint; logs and plots are written beside it
    valid_file: str | None = None
    valid_fraction: float = 0.05
    valid_count: int | None = None
    seed: int = 0
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str | None = "stress"
    virial_key: str | None = None
    e0s: str | dict = "auto"  # auto | fit | isolated | {Z or symbol: eV} | path to isolated-atom xyz
    model: dict = field(default_factory=dict)  # ModelConfig hyperparameters
    dtype: str = "float64"
    device: str = "auto"
    num_threads: int | None = None
    # torch.compile the training step (energies, forces, stress and their backward; training/compiled.py):
    # a few minutes of compilation on the first batch, then faster steps; also under torchrun
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's; "eager" runs the traced step op by op (checks a trace in seconds)
    batch_size: int = 8
    valid_batch_size: int = 32
    max_epochs: int = 1000
    max_time: float | str | None = None
    lr: float = 1e-2
    weight_decay: float = 5e-7
    amsgrad: bool = True  # AdamW with AMSGrad, as MACE and NequIP train
    ema_decay: float = 0.99
    scheduler: str = "cosine"  # cosine (with linear warm-up) | plateau
    warmup_epochs: int = 5
    min_lr: float = 1e-5
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    patience: int = 100  # early stopping: epochs without validation improvement
    clip_grad: float | None = 10.0
    energy_weight: float = 1.0  # on (ΔE / N)², eV²
    forces_weight: float = 100.0  # on ΔF², (eV/Å)²
    stress_weight: float = 1.0  # on Δσ², (eV/Å³)²
    # stage two (MACE's "SWA" stage): for the last stage_two_fraction of the epoch or time budget,
    # the learning rate is capped at stage_two_lr and the energy weight raised to stage_two_energy_weight
    stage_two_fraction: float = 0.25
    stage_two_energy_weight: float | None = 1000.0  # None: no stage two
    stage_two_lr: float = 1e-3
    resume: bool = False
    # fine-tuning: start from this checkpoint (a file or a shipped name): its architecture, weights, scale and
    # neighbour normalisation; its E0s too unless e0s is set to something other than auto
    init_from: str | None = None
    description: str = ""  # goes into the model card
    command: str = ""  # the command line that ran this training (set by `mlip train`)

    def __post_init__(self) -> None:
        self.max_time = parse_duration(self.max_time)
        if self.scheduler not in ("cosine", "plateau"):
            raise ValueError(f"scheduler must be 'cosine' or 'plateau', got {self.scheduler!r}")
        if not 0.0 <= self.stage_two_fraction < 1.0:
            raise ValueError(f"stage_two_fraction must be in [0, 1), got {self.stage_two_fraction}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        bad = DERIVED_MODEL_KEYS & set(self.model)
        if bad:
            raise ValueError(f"model keys {sorted(bad)} are set from the data, not the config")
        ModelConfig(species=[1], **self.model)  # validates names and values early

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        data.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
