"""In-process ASE calculator backed by a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .graph import Structure
from .potential import Potential
from .verlet import DEFAULT_SKIN, VerletGraphs


class StructureInputs:
    """For ASE calculators whose results depend on numbers, positions, cell and pbc alone: whether to reuse the
    last results is decided by comparing exactly those four. ASE's own ``check_state`` compares every array
    with tolerances: ~0.1 ms for aspirin, and an MD step calls it three times."""

    atoms: Atoms | None

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        old = self.atoms
        if old is None:
            return list(all_changes)
        pairs = {"numbers": (old.numbers, atoms.numbers), "positions": (old.positions, atoms.positions),
                 "cell": (old.cell.array, atoms.cell.array), "pbc": (old.pbc, atoms.pbc)}  # fmt: skip
        return [name for name, (a, b) in pairs.items() if not np.array_equal(a, b)]


class MLIPCalculator(StructureInputs, Calculator):
    """ASE calculator: energy/free_energy (eV), forces (eV/Å), stress (eV/Å³, periodic), energies (eV)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        checkpoint: str | Path | Potential,
        device: str = "cpu",
        dtype: str = "float64",
        compile: bool = False,
        sha256: str | None = None,
        skin: float = DEFAULT_SKIN,
        kernels: str = "e3nn",
        **kwargs,
    ):
        """``compile=True`` runs the model through torch.compile: faster steps after a slow first call.
        ``sha256`` pins the checkpoint: any other file is refused with a ``ValueError``.
        ``skin`` (Å): the neighbour search is reused until an atom has moved half this far (0: every step).
        ``kernels="cueq"`` runs the equivariant operations on cuEquivariance (``Potential``)."""
        super().__init__(**kwargs)
        self.potential = (
            checkpoint if isinstance(checkpoint, Potential) else Potential.load(checkpoint, device, dtype, compile, sha256, kernels)
        )
        self.neighbors = VerletGraphs(self.potential.species_index, self.potential.cutoff, skin)
        self._structure: Structure | None = None  # the last structure evaluated

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms, last = self.atoms, self._structure
        if (
            last is not None
            and np.array_equal(atoms.numbers, last.numbers)
            and np.array_equal(atoms.cell.array, last.cell)
            and np.array_equal(atoms.pbc, last.pbc)
        ):
            structure = last.moved_to(atoms.positions)  # an MD step: numbers, cell and pbc were validated already
        else:
            structure = Structure.from_atoms(atoms)
        self._structure = structure
        wanted = wanted_properties(properties, structure.has_stress)
        graph = self.neighbors.graph(structure, self.potential.max_edges)
        (result,) = self.potential.evaluate_graphs([graph], wanted)
        self.results = ase_results(result)


def wanted_properties(properties, has_stress: bool) -> list[str]:
    """What to evaluate for an ASE request: everything cheap at once; stress where it is defined."""
    if "stress" in properties and not has_stress:
        raise PropertyNotImplementedError(
            "stress needs a periodic cell of non-zero volume (set atoms.pbc, and a vacuum cell vector along "
            "a non-periodic direction)"
        )
    return ["energy", "forces", "energies"] + (["stress"] if has_stress else [])


def ase_results(result: dict) -> dict:
    """A Potential result as ASE ``Calculator.results`` (float64 arrays, Voigt stress in eV/Å³)."""
    results = {
        "energy": result["energy"],
        "free_energy": result["energy"],
        "forces": np.asarray(result["forces"], dtype=np.float64),
        "energies": np.asarray(result["energies"], dtype=np.float64),
    }
    if "stress" in result:
        results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(result["stress"], dtype=np.float64))
    return results
