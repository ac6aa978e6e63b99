"""In-process ASE calculator backed by a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .ase_properties import StructureInputs, ase_results, wanted_properties
from .graph import Structure
from .potential import Potential
from .verlet import DEFAULT_SKIN, VerletGraphs


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
        cuda_graphs: bool = False,
        **kwargs,
    ):
        """``compile=True`` runs the model through torch.compile: faster steps after a slow first call.
        ``sha256`` pins the checkpoint: any other file is refused with a ``ValueError``.
        ``skin`` (Å): the neighbour search is reused until an atom has moved half this far (0: every step).
        ``kernels="cueq"`` runs the equivariant operations on cuEquivariance, ``cuda_graphs=True`` replays captured
        CUDA graphs on a GPU (``Potential``)."""
        super().__init__(**kwargs)
        self.potential = (
            checkpoint if isinstance(checkpoint, Potential)
            else Potential.load(checkpoint, device, dtype, compile, sha256, kernels, cuda_graphs)
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
