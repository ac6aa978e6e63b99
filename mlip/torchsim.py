"""torch-sim interface: run batched MD and relaxations of many systems at once with an mlip potential.

``TorchSimModel`` wraps a ``Potential`` as a ``torch_sim.models.interface.ModelInterface`` (like
torch-sim's own ``MaceModel``), so ``torch_sim.integrate``, ``torch_sim.optimize`` and
``torch_sim.static`` can drive it. Needs the optional extra ``pip install torch-sim-atomistic``;
``import mlip`` does not import this module.

Units are torch-sim's metal units: positions and cell in Å, energy in eV, forces in eV/Å,
stress in eV/Å³ with ASE's sign ((1/V) dE/dε: negative under compression).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState
from torch_sim.typing import StateDict

from .graph import Structure, batch_graphs
from .potential import Potential, resolve_device, resolve_dtype
from .properties import compute_properties

__all__ = ["TorchSimModel"]


class TorchSimModel(ModelInterface):
    """An mlip potential as a torch-sim model: energy (n_systems,) eV, forces (n_atoms, 3) eV/Å,
    stress (n_systems, 3, 3) eV/Å³.

    Each call rebuilds the neighbour lists on the CPU with mlip's own graph code (the same
    validation and results as ``MLIPCalculator``) and evaluates all systems in one batched pass
    on ``device``. Systems without a stress (non-periodic, or a cell of zero volume) get zeros,
    as torch-sim's MACE wrapper returns.
    """

    def __init__(
        self,
        model: str | Path | Potential,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compute_forces: bool = True,
        compute_stress: bool = True,
        compile: bool = False,
        sha256: str | None = None,
        kernels: str = "e3nn",
    ) -> None:
        """``model``: a checkpoint file, a shipped potential's name (e.g. ``"si-zuo2020"``) or a loaded
        ``Potential`` (then ``device`` and ``dtype`` default to, and must match, its own).
        Otherwise ``device`` defaults to the first GPU if there is one, and ``dtype`` to float64.
        ``compile``, ``sha256`` and ``kernels`` are passed to ``Potential.load``.
        """
        super().__init__()
        if isinstance(model, Potential):  # a Potential is not moved: its model may be compiled, or shared
            if device is not None and resolve_device(device) != model.device:
                raise ValueError(f"device={device} requested, but the Potential given is on {model.device}")
            if dtype is not None and resolve_dtype(dtype) != model.dtype:
                raise ValueError(f"dtype={dtype} requested, but the Potential given uses {model.dtype}")
            self.potential = model
        else:
            self.potential = Potential.load(model, device or "auto", dtype or "float64", compile, sha256, kernels)
        self._device = self.potential.device
        self._dtype = self.potential.dtype
        self._compute_forces = compute_forces
        self._compute_stress = compute_stress
        self._memory_scales_with = "n_atoms_x_density"  # radial cutoff: edges grow with density

    def forward(self, state: SimState | StateDict, **kwargs) -> dict[str, torch.Tensor]:
        """Energy, forces and stress of every system in ``state`` (tensors in ``self.dtype`` on ``self.device``).

        ``state``: a ``SimState``, or a dict of its fields (positions, cell, pbc, atomic_numbers,
        system_idx). ``state.cell`` holds torch-sim's column vectors; mlip's graphs take rows
        (``state.row_vector_cell``), like ASE. Raises ``ValueError`` for unsupported elements or invalid
        geometries (overlapping atoms, ...), naming the problem.
        """
        if isinstance(state, dict):
            state = SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        positions = state.positions.detach().to("cpu", torch.float64).numpy()
        cells = state.row_vector_cell.detach().to("cpu", torch.float64).numpy()
        numbers = state.atomic_numbers.detach().cpu().numpy()
        system_idx = state.system_idx.detach().cpu()
        # one flag in torch-sim 0.3.0; per axis, or per system and axis, broadcast the same way
        pbc = np.broadcast_to(np.asarray(torch.as_tensor(state.pbc).cpu(), dtype=bool), (len(cells), 3))
        graphs = []
        for b in range(len(cells)):
            atoms = (system_idx == b).numpy()
            structure = Structure.from_arrays(numbers[atoms], positions[atoms], cells[b], pbc[b])
            graphs.append(self.potential.graph(structure))
        parts = []
        for batch in self.potential.edge_batches(graphs):  # at most Potential.max_edges edges per forward pass
            graph = batch_graphs(batch).to(self.device, self.dtype)
            with torch.enable_grad():  # forces and stress are autograd derivatives of the energy
                parts.append(compute_properties(
                    self.potential.energy_model, graph, forces=self.compute_forces, stress=self.compute_stress
                ))
        out = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        # energies are float64 inside mlip; torch-sim expects every output in the model's dtype
        results = {"energy": out["energy"].detach().to(self.dtype)}
        if self.compute_forces:
            forces = torch.empty_like(out["forces"])
            forces[torch.argsort(system_idx, stable=True).to(self.device)] = out["forces"].detach()
            results["forces"] = forces  # back in the state's atom order
        if self.compute_stress:
            results["stress"] = out["stress"].detach().to(self.dtype)
        return results
