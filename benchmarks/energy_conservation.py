"""Energy conservation: NVE velocity Verlet on aspirin with a trained checkpoint, float64 and float32.

Reports the drift of the total energy (slope of a linear fit against time, meV/atom/ps) and its
fluctuation (standard deviation, meV/atom), and plots total energy against time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import units

from common import (
    aspirin_frames,
    machine_info,
    markdown_table,
    md_parser,
    require_checkpoint,
    set_threads,
    settings_of,
    start_md,
    write_json,
)


def run_nve(checkpoint: Path, atoms, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """One NVE trajectory; energies every ``--log-every`` steps (eV) and the wall time per step."""
    from mlip import MLIPCalculator

    dyn = start_md(atoms, MLIPCalculator(checkpoint, device="cpu", dtype=dtype), args.timestep_fs,
                   args.temperature_K, args.seed)  # fmt: skip
    md_atoms = dyn.atoms
    log: dict[str, list[float]] = {"time_ps": [], "epot_eV": [], "ekin_eV": [], "temperature_K": []}

    def record() -> None:
        log["time_ps"].append(dyn.get_time() / (1000 * units.fs))
        log["epot_eV"].append(md_atoms.get_potential_energy())
        log["ekin_eV"].append(md_atoms.get_kinetic_energy())
        log["temperature_K"].append(md_atoms.get_temperature())

    dyn.attach(record, interval=args.log_every)
    start = time.perf_counter()
    error = None
    try:
        dyn.run(args.steps)
    except ValueError as err:  # e.g. atoms overlapping: the trajectory blew up
        error = f"stopped at step {dyn.nsteps}: {err}"
    wall_s = time.perf_counter() - start
    return {"dtype": dtype, "steps_run": dyn.nsteps, "error": error, "wall_s": wall_s,
            "ms_per_step": wall_s * 1e3 / max(dyn.nsteps, 1), **log}  # fmt: skip


def drift_stats(run: dict[str, Any], n_atoms: int) -> dict[str, float]:
    """Drift (meV/atom/ps, linear fit), fluctuation (std, meV/atom) and largest excursion of E_total."""
    t = np.asarray(run["time_ps"])
    etot_meV_atom = (np.asarray(run["epot_eV"]) + np.asarray(run["ekin_eV"])) * 1e3 / n_atoms
    finite = np.isfinite(etot_meV_atom)
    t, e = t[finite], etot_meV_atom[finite]
    slope = float(np.polyfit(t, e, 1)[0]) if len(t) >= 2 else float("nan")
    return {
        "simulated_ps": float(t[-1] - t[0]) if len(t) else 0.0,
        "drift_meV_per_atom_per_ps": slope,
        "std_meV_per_atom": float(e.std()),
        "max_excursion_meV_per_atom": float(np.abs(e - e[0]).max()),
        "mean_temperature_K": float(np.mean(run["temperature_K"])),
    }


def plot(runs: list[dict[str, Any]], n_atoms: int, title: str, path: Path) -> None:
    """Total energy relative to its start (meV/atom) against time, one line per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        etot = (np.asarray(run["epot_eV"]) + np.asarray(run["ekin_eV"])) * 1e3 / n_atoms
        label = f"{run['dtype']}: drift {run['drift_meV_per_atom_per_ps']:.3g} meV/atom/ps"
        ax.plot(run["time_ps"], etot - etot[0], label=label, lw=0.8)
    ax.set(xlabel="time (ps)", ylabel="E_total − E_total(0) (meV/atom)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = md_parser(__doc__.splitlines()[0], "energy_conservation")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float64", "float32"])
    parser.add_argument("--steps", type=int, default=20000, help="MD steps (20000 x 0.5 fs = 10 ps)")
    parser.add_argument("--temperature-K", type=float, default=300.0, help="initial Maxwell-Boltzmann temperature")
    parser.add_argument("--log-every", type=int, default=10, help="record energies every N steps")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    checkpoint = require_checkpoint(args.checkpoint)
    set_threads(args.threads)
    info = machine_info(args.threads)
    (atoms,) = aspirin_frames(args.data, 1)
    runs = []
    for dtype in args.dtypes:
        print(f"# NVE {dtype}: {args.steps} steps of {args.timestep_fs} fs", flush=True)
        run = run_nve(checkpoint, atoms, dtype, args)
        runs.append({**run, **drift_stats(run, len(atoms))})
    settings = settings_of(args)
    write_json(args.out, {"benchmark": "energy_conservation", "machine": info, "settings": settings, "runs": runs})
    plot(runs, len(atoms), f"aspirin NVE, {args.timestep_fs} fs, {checkpoint.name} ({info['commit']})",
         args.out.with_suffix(".png"))  # fmt: skip
    headers = ["dtype", "steps", "ps", "drift meV/atom/ps", "std meV/atom", "max abs ΔE meV/atom", "T mean K", "ms/step", "note"]
    rows = [[r["dtype"], r["steps_run"], r["simulated_ps"], r["drift_meV_per_atom_per_ps"], r["std_meV_per_atom"],
             r["max_excursion_meV_per_atom"], r["mean_temperature_K"], r["ms_per_step"], r["error"]] for r in runs]  # fmt: skip
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
