"""Small labelled data sets made with ASE's EMT calculator (no external files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write


def emt_crystals(n: int, seed: int = 0) -> list:
    """Rattled, randomly strained Cu/Al fcc cells (4 atoms) with EMT energy, forces and stress."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 13
        strain = np.eye(3) + rng.normal(scale=0.02, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info["config_type"] = "strained" if k % 2 else "rattled"
        frames.append(atoms)
    return frames


def write_xyz(path: Path, frames: list) -> Path:
    write(path, frames, format="extxyz")
    return path
