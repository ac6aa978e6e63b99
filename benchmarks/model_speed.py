"""Model speed, ours vs MACE: energy + forces per evaluation, measured interleaved in one run.

Each (case, dtype) starts one fresh worker process per model (ours in this venv, ScaleShiftMACE in
benchmarks/.venv-mace), then runs rounds in which every worker in turn evaluates for ``--round-s``
seconds; the model order rotates every round. Ratios are taken round by round, so load from other
processes on a shared machine inflates both sides alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ase.io import write

from common import (
    CASES,
    DEFAULT_DATA,
    MACE_PYTHON,
    Worker,
    case_frames,
    default_out,
    machine_info,
    markdown_table,
    summarize_ms,
    write_json,
)
from model_worker import MODELS, STAGES, worker_command

def run_rounds(workers: dict[str, Worker], rounds: int, max_reps: int, round_s: float) -> dict[str, list]:
    """ABAB...: each round gives every worker ``round_s`` seconds in turn; returns times per round."""
    times: dict[str, list] = {name: [] for name in workers}
    names = list(workers)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(workers[name].run(max_reps, round_s))
    return times


def round_ratios(ours: list[list[float]], other: list[list[float]], stat=np.median) -> list[float]:
    """Our time / the other model's time (``stat`` of each round's calls), round by round."""
    return [float(stat(a) / stat(b)) for a, b in zip(ours, other)]


def measure_group(case: str, dtype: str, structures: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """All models on one case and dtype, interleaved; one result dict per model."""
    workers: dict[str, Worker] = {}
    try:
        for model in args.models:
            argv = worker_command(model, structures, dtype, args, args.warmup)
            workers[model] = Worker(argv, args.threads, f"{model}/{case}/{dtype}", args.host_memory == "retained")
        times = run_rounds(workers, args.rounds, args.max_reps, args.round_s)
        peaks = {name: w.close() for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()
    results = []
    for model, w in workers.items():
        flat = [t for round_times in times[model] for t in round_times]
        stats = summarize_ms(flat)
        entry = {
            "case": case, "dtype": dtype, "model": model, **w.ready, **stats,
            "atom_evals_per_s": w.ready["n_atoms"] / (stats["median_ms"] / 1e3),
            **peaks[model],
            "eval_rss_mb": peaks[model]["peak_rss_mb"] - w.ready["rss_before_eval_mb"],
            "round_median_ms": [float(np.median(t)) for t in times[model]],
        }  # fmt: skip
        if "ours" in times and model != "ours":
            ratios = round_ratios(times["ours"], times[model])
            best = min(min(t) for t in times["ours"]) / min(min(t) for t in times[model])
            entry.update(ours_over_model=float(np.median(ratios)), ours_over_model_rounds=ratios,
                         ours_over_model_min=float(best))  # fmt: skip
        results.append(entry)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of every model, case and dtype."""
    headers = [
        "case", "dtype", "model", "atoms", "edges", "ms/eval (median)", "p10–p90 ms",
        "atom·evals/s", "peak RSS MB", "eval RSS MB", "ours/model time", "ours/model (min)", "speed-up of ours",
    ]  # fmt: skip
    rows = []
    for r in results:
        ratio = r.get("ours_over_model")
        rows.append([
            r["case"], r["dtype"], r["model"], r["n_atoms"], r["n_edges"], r["median_ms"],
            f"{r['p10_ms']:.3g}–{r['p90_ms']:.3g}", r["atom_evals_per_s"], r["peak_rss_mb"], r["eval_rss_mb"],
            ratio, r.get("ours_over_model_min"), None if ratio is None else f"{1 / ratio:.2f}×",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="rMD17 aspirin extxyz")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["aspirin", "cu1008", "aspirin32"],
                        help="cu10976 (10 976 atoms) is opt-in: meant for GPUs")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["ours", "mace-small", "mace-medium"],
                        help="ours-compiled (torch.compile, minutes of warm-up) is opt-in")
    parser.add_argument("--stage", choices=STAGES, default="model",
                        help="model: prebuilt graph -> energy+forces; full: neighbour list and batching included")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--host-memory", choices=("retained", "returned"), default="retained",
                        help="retained: every worker keeps freed memory for reuse (mlip.host_memory); "
                             "returned: glibc's defaults for every worker")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case and dtype")
    parser.add_argument("--round-s", type=float, default=3.0, help="seconds each model runs per round (>= 1 eval)")
    parser.add_argument("--max-reps", type=int, default=200, help="evaluations per model per round at most")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mace-python", type=Path, default=MACE_PYTHON)
    parser.add_argument("--out", type=Path, default=default_out("model_speed"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = machine_info(args.threads)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlip-bench-") as tmp:
        files = {case: Path(tmp) / f"{case}.extxyz" for case in args.cases}
        for case, path in files.items():
            write(path, case_frames(case, args.data), format="extxyz")
        for case, path in files.items():
            for dtype in args.dtypes:
                print(f"# {case} {dtype}: {', '.join(args.models)}", flush=True)
                results += measure_group(case, dtype, path, args)
                write_json(args.out, {"benchmark": "model_speed", "machine": info, "settings": settings,
                                      "cases": CASES, "results": results})  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
