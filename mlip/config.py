"""Model hyperparameters: one dataclass that fully defines an architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


# Upper bounds that keep a config (from a file or a request) from allocating absurd models.
SIZE_LIMITS = {
    "num_channels": 1024, "num_layers": 8, "num_radial": 64, "species_embed_dim": 256,
    "kernel_hidden": 1024, "kernel_layers": 8, "readout_hidden": 1024, "correlation": 4, "cutoff": 20.0,
}


@dataclass
class ModelConfig:
    """Hyperparameters of the equivariant potential.

    Lengths are in Å, energies in eV. ``species`` are atomic numbers, sorted;
    the model accepts only these elements.
    """

    species: list[int]
    cutoff: float = 5.0  # Å, radial cutoff of every interaction
    num_channels: int = 64  # multiplicity of every irrep in the hidden features
    l_max: int = 1  # highest order l of the features passed between interactions
    sh_l_max: int = 2  # highest order of the edge spherical harmonics and of the atomic basis A
    correlation: int = 3  # body order ν of the product basis: features up to (ν+1)-body per layer
    num_layers: int = 2  # message-passing interactions (the last one outputs scalars only)
    num_radial: int = 8  # Bessel radial basis functions (trainable frequencies)
    cutoff_power: int = 6  # polynomial envelope exponent (smoothness at the cutoff)
    species_embed_dim: int = 8  # species embedding seen by the implicit kernel MLP
    kernel_hidden: int = 64  # width of the implicit kernel MLP
    kernel_layers: int = 3  # hidden layers of the implicit kernel MLP
    readout_hidden: int = 16  # width of the final per-atom energy MLP
    parity: bool = False  # True: hidden features carry both parities per l (NequIP "parity: true")
    avg_num_neighbors: float = 10.0  # message normalisation, set from training data
    e0s: dict[int, float] = field(default_factory=dict)  # eV per isolated atom, by Z
    scale: float = 1.0  # eV, multiplies the network's per-atom output
    shift: float = 0.0  # eV, added to every atom's energy after scaling

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"ModelConfig.{f.name} must be true or false, got {value!r}")
            if type(default) is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"ModelConfig.{f.name} must be an integer, got {value!r}")
            if type(default) is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"ModelConfig.{f.name} must be a number, got {value!r}")
        for name, largest in SIZE_LIMITS.items():
            if getattr(self, name) > largest:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)} is beyond the supported {largest}")
        if not isinstance(self.species, list) or not isinstance(self.e0s, dict):
            raise ValueError("ModelConfig.species must be a list and e0s a mapping")
        self.species = sorted(int(z) for z in self.species)
        self.e0s = {int(z): float(e) for z, e in self.e0s.items()}
        if not self.species:
            raise ValueError("ModelConfig.species must name at least one element")
        if len(set(self.species)) != len(self.species):
            raise ValueError(f"ModelConfig.species has duplicates: {self.species}")
        if any(z < 1 or z > 118 for z in self.species):
            raise ValueError(f"ModelConfig.species must be atomic numbers 1..118, got {self.species}")
        if self.cutoff <= 0:
            raise ValueError(f"ModelConfig.cutoff must be positive (Å), got {self.cutoff}")
        if self.num_layers < 1 or self.num_channels < 1 or self.correlation < 1:
            raise ValueError("ModelConfig needs num_layers >= 1, num_channels >= 1, correlation >= 1")
        if not 0 <= self.l_max <= self.sh_l_max <= 6:
            raise ValueError(f"ModelConfig needs 0 <= l_max <= sh_l_max <= 6, got {self.l_max} and {self.sh_l_max}")
        if self.correlation < 2 and (self.num_layers < 2 or self.l_max < 1):
            raise ValueError(
                "this model would see distances only, never angles: use correlation >= 2, "
                "or num_layers >= 2 with l_max >= 1"
            )
        unknown = set(self.e0s) - set(self.species)
        if unknown:
            raise ValueError(f"ModelConfig.e0s names elements not in species: {sorted(unknown)}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["e0s"] = {str(z): e for z, e in self.e0s.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
