"""Scaling: ms per energy+forces evaluation and peak memory against the number of atoms.

Periodic fcc Cu or diamond Si supercells, each size in a fresh worker process (so its peak RSS is
its own). Sizes grow until ``--max-atoms``, or stop early once one evaluation takes longer than
``--max-eval-s`` or the memory predicted for the next size passes ``--max-rss-gb``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable

from ase.io import write

from common import (
    MACE_PYTHON,
    Worker,
    crystal,
    default_out,
    loglog_slope,
    machine_info,
    markdown_table,
    summarize_ms,
    write_json,
)
from model_worker import MODELS, worker_command

ATOMS_PER_CELL = {"Cu": 4, "Si": 8}
LARGE_ATOMS = 1000  # slopes are also fitted on sizes >= this, where fixed per-call overhead is negligible


def repeats_for(element: str, target_atoms: int) -> tuple[int, int, int]:
    """Near-cubic repeat of the conventional cell with about ``target_atoms`` atoms (>= 1 per axis)."""
    cells = max(1, round(target_atoms / ATOMS_PER_CELL[element]))
    n = max(1, round(cells ** (1 / 3)))
    m = max(1, round((cells / n) ** 0.5))
    return (n, m, max(1, round(cells / (n * m))))


def measure_size(element: str, target: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One supercell in one fresh worker: timing summary and peak memory."""
    repeat = repeats_for(element, target)
    structures = tmp / f"{element}_{target}.extxyz"
    write(structures, crystal(element, repeat), format="extxyz")
    argv = worker_command(args.model, structures, args.dtype, args, warmup=1)
    worker = Worker(argv, args.threads, f"{args.model}/{element}/{target}")
    try:
        times_ms = worker.run(args.max_reps, args.round_s)
        peak = worker.close()
    finally:
        worker.kill()
    stats = summarize_ms(times_ms)
    return {
        "repeat": repeat, **worker.ready, **stats, **peak,
        "eval_rss_mb": peak["peak_rss_mb"] - worker.ready["rss_before_eval_mb"],
        "us_per_atom": stats["median_ms"] * 1e3 / worker.ready["n_atoms"],
    }  # fmt: skip


def next_rss_gb(results: list[dict[str, Any]], atoms: int) -> float:
    """Peak memory predicted for ``atoms`` by scaling the last size's evaluation memory linearly."""
    last = results[-1]
    return (last["rss_before_eval_mb"] + last["eval_rss_mb"] * atoms / last["n_atoms"]) / 1024


def sweep(args: argparse.Namespace, save: Callable[[list[dict[str, Any]], str], None]) -> tuple[list[dict[str, Any]], str]:
    """Measure growing sizes, calling ``save`` after each; returns the results and why the sweep stopped."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlip-scaling-") as tmp:
        for target in args.sizes:
            if target > args.max_atoms:
                return results, f"--max-atoms {args.max_atoms}"
            if results and next_rss_gb(results, target) > args.max_rss_gb:
                return results, f"predicted peak memory above --max-rss-gb {args.max_rss_gb} at ~{target} atoms"
            print(f"# {args.element} ~{target} atoms", flush=True)
            results.append(measure_size(args.element, target, args, Path(tmp)))
            save(results, "running")
            if results[-1]["min_ms"] > args.max_eval_s * 1e3:
                return results, f"one evaluation took longer than --max-eval-s {args.max_eval_s}"
    return results, "all sizes measured"


def slopes(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """log-log slopes of time and evaluation memory against atoms (all sizes, and large ones only)."""
    def fit(rows: list[dict[str, Any]], key: str) -> float | None:
        return loglog_slope([r["n_atoms"] for r in rows], [r[key] for r in rows]) if len(rows) >= 2 else None

    large = [r for r in results if r["n_atoms"] >= LARGE_ATOMS]
    return {
        "time_all": fit(results, "median_ms"), "time_large": fit(large, "median_ms"),
        "eval_rss_large": fit(large, "eval_rss_mb"),
    }  # fmt: skip


def plot(results: list[dict[str, Any]], fitted: dict[str, float | None], title: str, path: Path) -> None:
    """Two log-log panels: ms/evaluation and peak RSS against atoms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atoms = [r["n_atoms"] for r in results]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    last = results[-1]
    slope = fitted["time_large"] or fitted["time_all"] or float("nan")
    ax_t.loglog(atoms, [r["median_ms"] for r in results], "o-", label=f"measured (log-log slope {slope:.2f})")
    ax_t.loglog(atoms, [last["median_ms"] * n / last["n_atoms"] for n in atoms], "k:", label="linear (slope 1)")
    ax_t.set(xlabel="atoms", ylabel="ms / evaluation (energy + forces)")
    ax_m.loglog(atoms, [r["peak_rss_mb"] for r in results], "o-", label="peak RSS")
    ax_m.loglog(atoms, [max(r["eval_rss_mb"], 1e-1) for r in results], "s--", label="evaluation RSS (peak − setup)")
    ax_m.set(xlabel="atoms", ylabel="MB")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--element", choices=sorted(ATOMS_PER_CELL), default="Cu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000, 10000, 30000],
                        help="target atom counts (rounded to whole conventional cells)")
    parser.add_argument("--model", choices=MODELS, default="ours")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-atoms", type=int, default=30000, help="cap on this shared 24 GB machine")
    parser.add_argument("--max-rss-gb", type=float, default=12.0)
    parser.add_argument("--max-eval-s", type=float, default=60.0)
    parser.add_argument("--round-s", type=float, default=5.0, help="timing budget per size (>= 1 evaluation)")
    parser.add_argument("--max-reps", type=int, default=50)
    parser.add_argument("--mace-python", type=Path, default=MACE_PYTHON)
    parser.add_argument("--out", type=Path, default=default_out("scaling"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = machine_info(args.threads)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    def save(results: list[dict[str, Any]], stopped: str) -> None:
        write_json(args.out, {"benchmark": "scaling", "machine": info, "settings": settings,
                              "stopped": stopped, "slopes": slopes(results), "results": results})  # fmt: skip

    results, stopped = sweep(args, save)
    save(results, stopped)
    fitted = slopes(results)
    title = f"{args.model}, {args.element} supercells, {args.dtype}, {args.threads} threads ({info['commit']})"
    plot(results, fitted, title, args.out.with_suffix(".png"))
    headers = ["atoms", "edges", "repeat", "ms/eval (median)", "µs/atom", "peak RSS MB", "eval RSS MB"]
    rows = [[r["n_atoms"], r["n_edges"], "x".join(map(str, r["repeat"])), r["median_ms"], r["us_per_atom"],
             r["peak_rss_mb"], r["eval_rss_mb"]] for r in results]  # fmt: skip
    print(markdown_table(headers, rows))
    print(f"\nlog-log slope of time: {fitted['time_all']} (all), {fitted['time_large']} (≥{LARGE_ATOMS} atoms); "
          f"evaluation memory slope (≥{LARGE_ATOMS}): {fitted['eval_rss_large']}; stopped: {stopped}")  # fmt: skip


if __name__ == "__main__":
    main()
