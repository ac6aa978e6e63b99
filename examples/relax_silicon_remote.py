"""Relax a strained, rattled silicon cell (positions and lattice, using the stress) on a running `mlip serve`.

    mlip serve &                                   # serves every shipped checkpoint, incl. si-zuo2020
    python examples/relax_silicon_remote.py [--model si-zuo2020] [--repeat 2]
"""

from __future__ import annotations

import argparse

import numpy as np
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS
from ase.units import GPa

from mlip import RemoteCalculator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="si-zuo2020", help="model name from /v1/models")
    parser.add_argument("--repeat", type=int, default=2, help="conventional 8-atom cells per direction")
    parser.add_argument("--fmax", type=float, default=0.01, help="convergence: max force (eV/Å) and stress·V/N")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * args.repeat
    strain = np.array([[1.03, 0.01, 0.0], [0.01, 0.98, 0.0], [0.0, 0.0, 1.02]])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(0.05, seed=0)
    with RemoteCalculator(args.url, model=args.model) as calc:
        atoms.calc = calc
        print(f"start: E = {atoms.get_potential_energy() / len(atoms):.4f} eV/atom, "
              f"max |stress| = {np.abs(atoms.get_stress()).max() / GPa:.2f} GPa")
        opt = BFGS(FrechetCellFilter(atoms), logfile="-")
        converged = opt.run(fmax=args.fmax, steps=args.steps)
        a = (atoms.get_volume() / args.repeat**3) ** (1 / 3)
        print(
            f"{'converged' if converged else 'NOT converged'} after {opt.nsteps} steps: "
            f"E = {atoms.get_potential_energy() / len(atoms):.4f} eV/atom, cubic-equivalent a = {a:.4f} Å, "
            f"max |stress| = {np.abs(atoms.get_stress()).max() / GPa:.3f} GPa, cell lengths {atoms.cell.lengths().round(4)} Å"
        )


if __name__ == "__main__":
    main()
