"""In-process latency against earlier commits: the shipped aspirin potential, energy + forces, eager path.

Each commit is checked out into a temporary git worktree and evaluated by its own worker process
(that commit's ``mlip``, this venv's libraries, the same checkpoint and structure, the same
threads); rounds are interleaved so the machine's drift hits every commit alike. The working tree
is the last column; speed-ups are medians of per-round ratios against the first commit. Results
must agree: energies and forces of every commit are compared with the working tree's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import (
    DEFAULT_CHECKPOINT, DEFAULT_DATA, REPO_ROOT, Worker, claim_stdout, default_out, machine_info, markdown_table,
    set_threads, worker_loop, write_json,
)

# the eager path when the hot-path issue (12) was filed: the many-body model, before any of its changes
ISSUE_12_BASELINE = "95b847e"
WORKING_TREE = "working tree"


def worker(source: Path, dtype: str, threads: int) -> None:
    """Serve timing requests for ``source``'s mlip (a worktree, or the repository itself)."""
    out = claim_stdout()
    set_threads(threads)
    sys.path.insert(0, str(source))
    import ase.io
    import mlip
    from mlip import Potential, Structure

    if not Path(mlip.__file__).resolve().is_relative_to(source.resolve()):
        raise SystemExit(f"imported {mlip.__file__}, not the mlip of {source}")
    potential = Potential.load(DEFAULT_CHECKPOINT, dtype=dtype)
    graph = potential.graph(Structure.from_atoms(ase.io.read(DEFAULT_DATA, 0)))
    result = potential.evaluate_graphs([graph], ("energy", "forces"))[0]
    ready = {"energy_eV": result["energy"], "forces_eV_per_A": np.asarray(result["forces"]).tolist()}
    worker_loop(lambda: potential.evaluate_graphs([graph], ("energy", "forces")), ready, out)


def checkout(commit: str, into: Path) -> Path:
    """A detached worktree of ``commit`` under ``into``."""
    path = into / commit
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", nargs="+", default=[ISSUE_12_BASELINE], help="earlier commits to compare")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=30, help="evaluations per worker per round")
    parser.add_argument("--out", type=Path, default=default_out("latency_history"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.dtype, args.threads[0])

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        sources = {commit: checkout(commit, Path(scratch)) for commit in args.commits}
        sources[WORKING_TREE] = REPO_ROOT
        try:
            for threads in args.threads:
                for dtype in args.dtypes:
                    results += compare(sources, dtype, threads, args.rounds, args.reps)
        finally:
            for path in sources.values():
                if path != REPO_ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO_ROOT, check=False)
    rows = [(r["threads"], r["dtype"], r["source"], f"{r['median_ms']:.2f}", f"{r['speedup_vs_first']:.2f}×",
             f"{r['energy_diff_eV']:.1e}", f"{r['max_force_diff_eV_per_A']:.1e}") for r in results]
    print(markdown_table(["threads", "dtype", "code", "ms/eval (median)", "speed-up vs first",
                          "ΔE vs working tree (eV)", "max ΔF (eV/Å)"], rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "dtype", "out")}
    write_json(args.out, {"benchmark": "latency_history", "machine": machine_info(max(args.threads)),
                          "settings": {**settings, "checkpoint": str(DEFAULT_CHECKPOINT), "data": str(DEFAULT_DATA)},
                          "results": results})


def compare(sources: dict[str, Path], dtype: str, threads: int, rounds: int, reps: int) -> list[dict]:
    """Interleaved rounds of every source at one dtype and thread count."""
    workers = {}
    try:
        for name, path in sources.items():
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), "--dtype", dtype,
                    "--threads", str(threads)]
            workers[name] = Worker(argv, threads, f"{name}/{dtype}/t{threads}")
        times = {name: [] for name in workers}
        for _ in range(rounds):
            for name, w in workers.items():
                times[name].append(float(np.median(w.run(reps, float("inf")))))
        for w in workers.values():
            w.close()
    finally:
        for w in workers.values():
            w.kill()
    first, reference = times[next(iter(times))], workers[WORKING_TREE].ready
    return [{
        "threads": threads, "dtype": dtype, "source": name, "median_ms": float(np.median(t)), "round_median_ms": t,
        "speedup_vs_first": float(np.median([a / b for a, b in zip(first, t)])),
        "energy_eV": w.ready["energy_eV"],
        "energy_diff_eV": abs(w.ready["energy_eV"] - reference["energy_eV"]),
        "max_force_diff_eV_per_A": float(np.abs(np.subtract(w.ready["forces_eV_per_A"], reference["forces_eV_per_A"])).max()),
    } for (name, t), w in zip(times.items(), workers.values())]


if __name__ == "__main__":
    main()
