"""Aspirin NVE molecular dynamics against a running `mlip serve`; prints energy drift and steps/s.

    mlip serve &                                   # checkpoints/aspirin-rmd17.safetensors on 127.0.0.1:8000
    python examples/md_aspirin_remote.py [STRUCTURE.xyz] [--steps 1000] [--transport ws|http]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import read
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from mlip import RemoteCalculator

DEFAULT_STRUCTURE = Path(__file__).with_name("aspirin.xyz")


def read_structure(path: Path) -> Atoms:
    """The first frame of an (extended) XYZ file; exits with a message if it is missing."""
    if not Path(path).is_file():
        raise SystemExit(f"structure not found: {path} (pass the path of an aspirin .xyz file)")
    return read(path, index=0)


def run_md(atoms: Atoms, calc, steps: int, timestep_fs: float, temperature_K: float = 300.0) -> dict[str, float]:
    """NVE velocity Verlet from Maxwell-Boltzmann velocities; total-energy drift (eV) and speed."""
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep_fs * units.fs)
    start_energy = atoms.get_total_energy()
    totals: list[float] = []
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    elapsed = time.perf_counter() - start
    deviation = np.abs(np.array(totals) - start_energy)
    return {
        "atoms": len(atoms),
        "steps": steps,
        "simulated_fs": steps * timestep_fs,
        "steps_per_s": steps / elapsed,
        "ms_per_step": 1000 * elapsed / steps,
        "drift_meV_per_atom": 1000 * (totals[-1] - start_energy) / len(atoms),
        "max_deviation_meV": 1000 * float(deviation.max()),
        "final_temperature_K": atoms.get_temperature(),
    }


def print_report(report: dict[str, float]) -> None:
    print(
        f"{report['steps']} steps ({report['simulated_fs']:.0f} fs) of {report['atoms']} atoms: "
        f"{report['steps_per_s']:.1f} steps/s ({report['ms_per_step']:.1f} ms/step)\n"
        f"total-energy drift {report['drift_meV_per_atom']:+.3f} meV/atom, "
        f"max |E - E0| {report['max_deviation_meV']:.2f} meV, final T {report['final_temperature_K']:.0f} K"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structure", nargs="?", type=Path, default=DEFAULT_STRUCTURE)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model name from /v1/models (default: the server's default)")
    parser.add_argument("--transport", choices=["ws", "http"], default="ws")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--temperature-K", type=float, default=300.0)
    args = parser.parse_args(argv)
    atoms = read_structure(args.structure)
    with RemoteCalculator(args.url, model=args.model, transport=args.transport) as calc:
        report = run_md(atoms, calc, args.steps, args.timestep_fs, args.temperature_K)
        print(f"model {calc.server_model['name']} ({calc.server_model['sha256'][:12]}) at {args.url} over {args.transport}")
    print_report(report)


if __name__ == "__main__":
    main()
