"""What the ASE calculators (in-process and remote) share: when to recompute, what to compute, results in ASE's form.

numpy and ASE only: ``RemoteCalculator`` imports no torch.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress


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
