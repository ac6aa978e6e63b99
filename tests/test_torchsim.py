"""The torch-sim model interface: agreement with the ASE calculator, torch-sim's validator, batched runs.

torch-sim 0.3.0 has one pbc flag per batch (``atoms_to_state`` refuses to mix), so a molecule shares a
batch with a crystal inside a periodic vacuum box, and non-periodic molecules are batched on their own.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

ts = pytest.importorskip("torch_sim")

import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402
from torch_sim.models.interface import validate_model_outputs  # noqa: E402

import mlip  # noqa: E402
from mlip import MLIPCalculator, MLIPModel, Potential, save_checkpoint  # noqa: E402
from mlip.torchsim import TorchSimModel  # noqa: E402

from .conftest import make_config  # noqa: E402

CPU, F64 = torch.device("cpu"), torch.float64
SHEAR = np.array([[1.0, 0.08, 0.0], [0.0, 1.0, -0.05], [0.06, 0.0, 1.0]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def ts_model(checkpoint) -> TorchSimModel:
    return TorchSimModel(checkpoint, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def calc(checkpoint) -> MLIPCalculator:
    return MLIPCalculator(checkpoint)


def acetaldehyde(seed: int, box: np.ndarray | None = None) -> Atoms:
    atoms = molecule("CH3CHO")
    atoms.rattle(0.05, seed=seed)
    if box is not None:  # a vacuum box, periodic: torch-sim 0.3.0 has one pbc flag per batch
        atoms.set_cell(box)
        atoms.center()
        atoms.pbc = True
    return atoms


def sheared_crystal(seed: int) -> Atoms:
    """Rattled Cu/Al fcc cell with a non-orthogonal (triclinic) cell."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[1] = 13
    atoms.set_cell(atoms.cell.array @ SHEAR, scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


def assert_matches_calculator(out: dict, systems: list[Atoms], calc: MLIPCalculator, periodic: bool) -> None:
    forces = torch.split(out["forces"], [len(a) for a in systems])
    for b, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = calc
        assert out["energy"][b].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(forces[b].numpy(), atoms.get_forces(), atol=1e-8)
        stress = atoms.get_stress(voigt=False) if periodic else np.zeros((3, 3))
        np.testing.assert_allclose(out["stress"][b].numpy(), stress, atol=1e-8)


def test_periodic_batch_matches_calculator(ts_model, calc):
    """A molecule in a triclinic vacuum box and a sheared crystal: the cell convention and stress sign."""
    systems = [acetaldehyde(1, box=np.diag([9.0, 10.0, 11.0]) @ SHEAR), sheared_crystal(2)]
    state = ts.io.atoms_to_state(systems, CPU, F64)
    assert not torch.allclose(state.cell, state.row_vector_cell)  # cell really is non-symmetric
    out = ts_model(state)
    assert out["energy"].shape == (2,) and out["forces"].shape == (11, 3) and out["stress"].shape == (2, 3, 3)
    assert all(v.dtype == F64 for v in out.values())
    shear = out["stress"] - torch.diag_embed(out["stress"].diagonal(dim1=1, dim2=2))
    assert shear.abs().amax(dim=(1, 2)).min() > 1e-4  # both systems under shear stress: a sensitive check
    assert_matches_calculator(out, systems, calc, periodic=True)


def test_a_batch_beyond_the_edge_limit_runs_in_parts_with_the_same_results(ts_model, calc, monkeypatch):
    systems = [acetaldehyde(1, box=np.diag([9.0, 10.0, 11.0]) @ SHEAR), sheared_crystal(2), sheared_crystal(3)]
    state = ts.io.atoms_to_state(systems, CPU, F64)
    whole = ts_model(state)
    graphs = [ts_model.potential.graph(mlip.Structure.from_atoms(a)) for a in systems]
    monkeypatch.setattr(ts_model.potential, "max_edges", 2 * max(g.edge_index.shape[1] for g in graphs))
    assert len(ts_model.potential.edge_batches(graphs)) > 1
    parts = ts_model(state)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=1e-10)
    assert_matches_calculator(parts, systems, calc, periodic=True)


def test_molecules_batch_matches_calculator(ts_model, calc):
    """Non-periodic systems: energies and forces; stress is zeros (undefined), as torch-sim's MACE wrapper."""
    systems = [acetaldehyde(1), molecule("CH3NO2")]  # same size: torch-sim then accepts either block order
    state = ts.io.atoms_to_state(systems, CPU, F64)
    assert state.pbc is False or not torch.as_tensor(state.pbc).any()
    out = ts_model(state)
    assert_matches_calculator(out, systems, calc, periodic=False)
    # the same systems as a dict, atom blocks in reverse order: system_idx [1 ... 1, 0 ... 0]
    n0 = len(systems[0])
    order = torch.cat([torch.arange(n0, state.n_atoms), torch.arange(n0)])
    swapped = {
        "positions": state.positions[order],
        "cell": state.cell,
        "pbc": state.pbc,
        "atomic_numbers": state.atomic_numbers[order],
        "system_idx": state.system_idx[order],
    }
    out2 = ts_model(swapped)
    torch.testing.assert_close(out2["energy"], out["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out2["forces"], out["forces"][order], rtol=0, atol=1e-10)


def test_torch_sim_validator():
    """torch-sim's own interface check (Si diamond + Fe fcc, batched vs one by one)."""
    torch.manual_seed(3)
    potential = Potential(MLIPModel(make_config(species=[14, 26], e0s={14: -5.0, 26: -8.0}, l_max=1, num_layers=1)))
    model = TorchSimModel(potential)
    assert (model.device, model.dtype, model.compute_forces, model.compute_stress) == (CPU, F64, True, True)
    validate_model_outputs(model, CPU, F64)
    with pytest.raises(ValueError, match="dtype"):
        TorchSimModel(potential, dtype=torch.float32)


def test_batched_relaxation_and_md(ts_model):
    """torch-sim drives the model: FIRE lowers every system's energy; a cell relaxation (which follows
    the stress) lowers the energy of a strained one-atom cell whose forces vanish by symmetry; NVT runs."""
    systems = [sheared_crystal(4), sheared_crystal(5)]
    start = ts_model(ts.io.atoms_to_state(systems, CPU, F64))["energy"]
    never = lambda state, last_energy: torch.zeros(state.n_systems, dtype=torch.bool)  # noqa: E731
    relaxed = ts.optimize(systems, ts_model, optimizer=ts.optimizers.fire, convergence_fn=never, max_steps=6)
    assert torch.isfinite(relaxed.energy).all() and (relaxed.energy < start - 1e-6).all()

    cells = [bulk("Cu", "fcc", a=a) for a in (3.3, 4.0)]  # two volumes
    start = ts_model(ts.io.atoms_to_state(cells, CPU, F64))
    assert start["forces"].abs().max() < 1e-10 and start["stress"].abs().max() > 1e-3
    relaxed = ts.optimize(cells, ts_model, optimizer=ts.frechet_cell_fire, convergence_fn=never, max_steps=6)
    assert (relaxed.energy < start["energy"] - 1e-4).all()

    final = ts.integrate(
        systems, ts_model, integrator=ts.nvt_langevin, n_steps=3, temperature=300.0, timestep=0.001, seed=0
    )
    assert final.n_systems == 2 and torch.isfinite(final.positions).all() and torch.isfinite(final.energy).all()


def test_import_mlip_does_not_import_torch_sim():
    code = "import sys, mlip; assert 'torch_sim' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
