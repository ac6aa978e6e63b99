"""Batched simulations with torch-sim: relax several strained silicon cells of different sizes at once
(positions and cell, FIRE), then run a short batched NVT Langevin MD of all of them, in one batch.

Needs `pip install torch-sim-atomistic`. Uses the shipped `si-zuo2020` potential on the first GPU if
there is one, else the CPU (about 20 s on two CPU cores with the defaults).

    python examples/torchsim_batch.py [--relax-steps 20] [--md-steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch_sim as ts
from ase.build import bulk

from mlip.torchsim import TorchSimModel

GPA = 160.21766208  # eV/Å³ -> GPa


def silicon_cells(seed: int = 0) -> list:
    """Diamond Si supercells of 8 to 32 atoms, each strained by a different amount and rattled."""
    cells = []
    for k, (repeat, scale) in enumerate([((1, 1, 1), 0.98), ((2, 1, 1), 1.02), ((2, 2, 1), 0.99)]):
        atoms = bulk("Si", "diamond", a=5.43 * scale, cubic=True) * repeat
        atoms.rattle(0.05, seed=seed + k)
        cells.append(atoms)
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relax-steps", type=int, default=20)
    parser.add_argument("--md-steps", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--timestep-fs", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu or cuda")
    args = parser.parse_args(argv)

    model = TorchSimModel("si-zuo2020", device=args.device, dtype=torch.float64)
    systems = silicon_cells()
    state = ts.io.atoms_to_state(systems, model.device, model.dtype)
    print(f"si-zuo2020 on {model.device}: {len(systems)} systems, {state.n_atoms} atoms in one batch")

    warnings.filterwarnings("ignore", "Optimize has reached max steps")  # expected: a short demo relaxation
    start = time.perf_counter()
    before = model(state)
    relaxed = ts.optimize(
        state,
        model,
        optimizer=ts.frechet_cell_fire,  # atoms and cell; forces eV/Å, stress eV/Å³
        convergence_fn=ts.generate_force_convergence_fn(force_tol=0.05),
        max_steps=args.relax_steps,
    )
    after = model(relaxed)
    relax_s = time.perf_counter() - start

    start = time.perf_counter()
    md = ts.integrate(
        relaxed,
        model,
        integrator=ts.nvt_langevin,
        n_steps=args.md_steps,
        temperature=args.temperature,
        timestep=args.timestep_fs * 1e-3,  # ps (torch-sim's metal units)
        seed=0,
    )
    md_s = time.perf_counter() - start
    temperature = ts.quantities.calc_temperature(masses=md.masses, momenta=md.momenta, system_idx=md.system_idx)

    counts = state.n_atoms_per_system.tolist()
    print(" atoms  E/atom start  E/atom relaxed  pressure start -> relaxed   Epot/atom after MD   T after MD")
    for b, n in enumerate(counts):
        p0, p1 = (-out["stress"][b].trace().item() / 3 * GPA for out in (before, after))
        print(
            f"{n:6d}  {before['energy'][b].item() / n:12.4f}  {after['energy'][b].item() / n:14.4f}"
            f"  {p0:8.2f} -> {p1:6.2f} GPa  {md.energy[b].item() / n:18.4f}  {temperature[b].item():8.0f} K"
        )
    print(f"relaxation: {relax_s:.1f} s (at most {args.relax_steps} FIRE steps); "
          f"NVT: {args.md_steps} steps in {md_s:.1f} s ({args.md_steps / md_s:.1f} batched steps/s)")


if __name__ == "__main__":
    main()
