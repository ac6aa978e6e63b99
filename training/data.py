"""Extended-XYZ DFT data -> labelled structures and graphs (energy eV, forces eV/Å, stress eV/Å³)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read
from ase.stress import voigt_6_to_full_3x3_stress

from mlip.graph import AtomicGraph, SpeciesIndex, Structure, build_graph


@dataclass
class LabelKeys:
    """Where the labels live: atoms.info / atoms.arrays / the attached SinglePointCalculator."""

    energy: str = "energy"
    forces: str = "forces"
    stress: str | None = "stress"  # 3x3 or Voigt-6, eV/Å³, ASE sign
    virial: str | None = None  # 3x3 or 6, eV; stress = -virial / volume


@dataclass
class Sample:
    """One labelled configuration; ``stress`` is None where the data has none."""

    structure: Structure
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    config_type: str
    index: int

    @property
    def num_atoms(self) -> int:
        return len(self.structure.numbers)

    def graph(self, species_index: SpeciesIndex, cutoff: float) -> AtomicGraph:
        targets = {
            "energy": np.float64(self.energy),
            "forces": self.forces,
            "stress": self.stress if self.stress is not None else np.zeros((3, 3)),
            "stress_weight": np.float64(self.stress is not None),
        }
        return build_graph(self.structure, species_index, cutoff, targets)


def _lookup(atoms: Atoms, key: str):
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return atoms.calc.results[key]
    return None


def _as_3x3(value, what: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    if value.size == 9:
        return value.reshape(3, 3)
    if value.size == 6:
        return voigt_6_to_full_3x3_stress(value)
    raise ValueError(f"{what} must have 6 (Voigt) or 9 (3x3) values, got {value.size}")


def sample_from_atoms(atoms: Atoms, keys: LabelKeys, where: str) -> Sample:
    """Labels of one configuration; raises ``ValueError`` naming the file, index and key."""
    energy = _lookup(atoms, keys.energy)
    if energy is None:
        raise ValueError(f"{where}: no energy under key {keys.energy!r}")
    energy = float(np.asarray(energy).reshape(()))
    forces = _lookup(atoms, keys.forces)
    if forces is None:
        raise ValueError(f"{where}: no forces under key {keys.forces!r}")
    forces = np.asarray(forces, dtype=np.float64)
    if forces.shape != (len(atoms), 3):
        raise ValueError(f"{where}: forces {keys.forces!r} have shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = None
    if keys.stress and _lookup(atoms, keys.stress) is not None:
        stress = _as_3x3(_lookup(atoms, keys.stress), f"{where}: stress {keys.stress!r}")
    elif keys.virial and _lookup(atoms, keys.virial) is not None:
        stress = -_as_3x3(_lookup(atoms, keys.virial), f"{where}: virial {keys.virial!r}") / atoms.get_volume()
    for name, value in (("energy", energy), ("forces", forces), ("stress", stress)):
        if value is not None and not np.isfinite(value).all():
            raise ValueError(f"{where}: {name} label contains NaN or inf")
    try:
        structure = Structure.from_atoms(atoms)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return Sample(structure, energy, forces, stress, str(atoms.info.get("config_type", "default")), 0)


def read_samples(path: str | Path, keys: LabelKeys) -> list[Sample]:
    """All configurations of an extended-XYZ file, labelled and validated."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    samples = []
    for i, atoms in enumerate(read(path, ":")):
        sample = sample_from_atoms(atoms, keys, f"{path}[{i}]")
        sample.index = i
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path} holds no configurations")
    return samples


def is_isolated_atom(sample: Sample) -> bool:
    """Single non-periodic atom, or config_type 'IsolatedAtom' (MACE convention): an E0 reference."""
    return sample.config_type.lower() == "isolatedatom" or (sample.num_atoms == 1 and not sample.structure.pbc.any())


def split_samples(
    samples: list[Sample], valid_fraction: float, valid_count: int | None, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded random train/validation split (count wins over fraction)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_valid = valid_count if valid_count is not None else int(round(valid_fraction * len(samples)))
    if not 0 < n_valid < len(samples):
        raise ValueError(f"validation split of {n_valid} out of {len(samples)} configurations is not possible")
    valid = sorted(order[:n_valid].tolist())
    train = sorted(order[n_valid:].tolist())
    return [samples[i] for i in train], [samples[i] for i in valid]
