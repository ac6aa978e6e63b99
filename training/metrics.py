"""Error metrics between predictions and labels, in meV units (shared by training and `mlip eval`)."""

from __future__ import annotations

import numpy as np


class ErrorAccumulator:
    """Accumulates energy (total and per atom), force and stress errors; reports MAE/RMSE in meV."""

    def __init__(self) -> None:
        self.energy: list[float] = []
        self.energy_per_atom: list[float] = []
        self.forces: list[np.ndarray] = []
        self.stress: list[np.ndarray] = []

    def add(self, pred: dict, ref_energy: float, ref_forces: np.ndarray, ref_stress: np.ndarray | None) -> None:
        n = len(ref_forces)
        self.energy.append(pred["energy"] - ref_energy)
        self.energy_per_atom.append((pred["energy"] - ref_energy) / n)
        self.forces.append((pred["forces"] - ref_forces).reshape(-1))
        if ref_stress is not None and "stress" in pred:
            self.stress.append((pred["stress"] - ref_stress).reshape(-1))

    def merge(self, other: "ErrorAccumulator") -> None:
        for name in ("energy", "energy_per_atom", "forces", "stress"):
            getattr(self, name).extend(getattr(other, name))

    def summary(self) -> dict[str, float | int]:
        def mae_rmse(errors: np.ndarray) -> tuple[float, float]:
            return float(np.mean(np.abs(errors)) * 1e3), float(np.sqrt(np.mean(errors**2)) * 1e3)

        out: dict[str, float | int] = {"n_structures": len(self.energy)}
        out["energy_mae_meV"], out["energy_rmse_meV"] = mae_rmse(np.array(self.energy))
        out["energy_mae_meV_per_atom"], out["energy_rmse_meV_per_atom"] = mae_rmse(np.array(self.energy_per_atom))
        out["forces_mae_meV_per_A"], out["forces_rmse_meV_per_A"] = mae_rmse(np.concatenate(self.forces))
        if self.stress:
            out["stress_mae_meV_per_A3"], out["stress_rmse_meV_per_A3"] = mae_rmse(np.concatenate(self.stress))
        return out
