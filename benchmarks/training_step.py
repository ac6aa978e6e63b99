"""Cost of one training step against batch size and threads: what a smaller batch costs per sample.

Runs the trainer's own epoch loop (`Trainer.train_epoch`: collate, energy + forces with a graph for
the force loss, double backward, clipping, AdamW, EMA) on the first configurations of a training
config's data, and fits ms/step = fixed + per_sample × batch per thread count. The fixed part is the
per-step overhead (operator dispatch, optimiser, EMA) that a small batch pays more often. ``--compile``
times the compiled step (``compile: true``, training/compiled.py) side by side with the eager one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import REPO_ROOT, default_out, machine_info, markdown_table, set_threads, write_json

DEFAULT_CONFIG = REPO_ROOT / "training" / "configs" / "aspirin-rmd17.yaml"


def step_ms(trainer, graphs: list, batch_size: int, steps: int) -> float:
    """Mean ms per optimiser step of one epoch of ``steps`` steps at ``batch_size`` (after a warm-up epoch)."""
    trainer.config.batch_size = batch_size
    trainer.train_graphs = graphs[: 2 * batch_size]
    trainer.train_epoch()
    trainer.train_graphs = graphs[: steps * batch_size]
    start = time.perf_counter()
    trainer.train_epoch()
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (its data and model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per batch size")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="default: the config's")
    parser.add_argument("--compile", action="store_true", help="also time the compiled step (minutes of compilation first)")
    parser.add_argument("--out", default=str(default_out("training_step")))
    args = parser.parse_args()

    from mlip.training.config import TrainConfig
    from mlip.training.trainer import Trainer

    # train_epoch writes nothing: the output path is never created; one validation config keeps the split cheap
    overrides = {"output": "/tmp/mlip-training-step/model.safetensors", "valid_count": 1}
    if args.dtype:
        overrides["dtype"] = args.dtype
    trainers = {"eager": Trainer(TrainConfig.from_yaml(args.config, {**overrides, "compile": False}))}
    if args.compile:
        trainers["compiled"] = Trainer(TrainConfig.from_yaml(args.config, {**overrides, "compile": True}))
    graphs = {step: trainer.train_graphs for step, trainer in trainers.items()}  # step_ms truncates train_graphs
    rows, fits = [], {}
    for threads in args.threads:
        set_threads(threads)
        for step, trainer in trainers.items():
            times = [step_ms(trainer, graphs[step], b, args.steps) for b in args.batch_sizes]
            if len(times) > 1:
                per_sample, fixed = np.polyfit(args.batch_sizes, times, 1)
                fits[f"{step}, {threads} threads"] = {"fixed_ms_per_step": fixed, "ms_per_sample": per_sample}
            for b, ms in zip(args.batch_sizes, times):
                rows.append({"step": step, "threads": threads, "batch_size": b, "ms_per_step": ms, "ms_per_sample": ms / b})
    print(markdown_table(["step", "threads", "batch", "ms/step", "ms/sample"], [list(r.values()) for r in rows]))
    if fits:
        print(markdown_table(["step", "fixed ms/step", "ms per sample"],
                             [[k, f["fixed_ms_per_step"], f["ms_per_sample"]] for k, f in fits.items()]))
    write_json(args.out, {"machine": machine_info(max(args.threads)), "config": str(args.config),
                          "dtype": trainers["eager"].config.dtype, "steps": args.steps, "rows": rows, "fit": fits})


if __name__ == "__main__":
    main()
