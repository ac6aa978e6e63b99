"""`mlip eval`: batched errors of a checkpoint on an extended-XYZ file (any size)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, help="extended-XYZ file with reference labels")
    parser.add_argument("--energy-key", default="energy")
    parser.add_argument("--forces-key", default="forces")
    parser.add_argument("--stress-key", default="stress")
    parser.add_argument("--batch-size", type=int, default=32, help="structures per forward pass")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    parser.add_argument("--plot", help="write a parity plot (PNG) to this path")


def evaluate_file(potential, samples, batch_size: int) -> tuple[dict, list[dict]]:
    """Errors over all samples and by config_type; also the predictions, in file order."""
    from .metrics import ErrorAccumulator

    errors: dict[str, ErrorAccumulator] = {"all": ErrorAccumulator()}
    predictions = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        properties = ["energy", "forces"] + (["stress"] if any(s.stress is not None for s in chunk) else [])
        for sample, pred in zip(chunk, potential.evaluate([s.structure for s in chunk], properties)):
            predictions.append(pred)
            for key in ("all", sample.config_type):
                errors.setdefault(key, ErrorAccumulator()).add(pred, sample.energy, sample.forces, sample.stress)
    return {k: v.summary() for k, v in errors.items()}, predictions


def print_table(summaries: dict[str, dict]) -> None:
    columns = [
        ("energy_mae_meV", "E MAE meV"),
        ("energy_rmse_meV", "E RMSE meV"),
        ("energy_mae_meV_per_atom", "E MAE meV/at"),
        ("forces_mae_meV_per_A", "F MAE meV/Å"),
        ("forces_rmse_meV_per_A", "F RMSE meV/Å"),
        ("stress_mae_meV_per_A3", "S MAE meV/Å³"),
    ]
    print(f"{'subset':<16}{'n':>6}" + "".join(f"{label:>15}" for _, label in columns))
    for name, s in sorted(summaries.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        cells = "".join(f"{s[k]:>15.3f}" if k in s else f"{'-':>15}" for k, _ in columns)
        print(f"{name:<16}{s['n_structures']:>6}{cells}")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from mlip import Potential

    from .data import LabelKeys, read_samples

    potential = Potential.load(args.checkpoint, device=args.device, dtype=args.dtype)
    samples = read_samples(args.data, LabelKeys(args.energy_key, args.forces_key, args.stress_key))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    summaries, predictions = evaluate_file(potential, samples, args.batch_size)
    if args.plot:
        from .plots import parity_figure

        parity_figure(
            np.array([p["energy"] / len(p["forces"]) for p in predictions]),
            np.array([s.energy / s.num_atoms for s in samples]),
            np.concatenate([p["forces"].reshape(-1) for p in predictions]),
            np.concatenate([s.forces.reshape(-1) for s in samples]),
            args.plot,
        )
    if args.json:
        by_type = {k: v for k, v in summaries.items() if k != "all"}
        print(json.dumps({**summaries["all"], "by_config_type": by_type if len(by_type) > 1 else {}}))
    else:
        print_table(summaries)
    return 0
