"""Accuracy against cost, ours vs MACE: validation MAE (equal_budget.py) beside ms per evaluation (model_speed.py).

Both inputs are measured by their own scripts; this joins them by model size. ``equal_budget.py``
records the ``model_speed.py`` preset of every model it trains (``--ours-size``, ``--mace-size``;
rows from before that option are the defaults ``ours-32`` and ``mace-L1-64``); ``model_speed.py``
times the same architectures (random weights: the cost does not depend on them).

    python benchmarks/model_speed.py --models ours-32 mace-small --cases aspirin cu1008 \\
        --out benchmarks/results/model_speed_pareto_small.json
    python benchmarks/model_speed.py --models ours mace-L1-64 --cases aspirin cu1008 \\
        --out benchmarks/results/model_speed_pareto.json
    python benchmarks/pareto.py --accuracy benchmarks/results/equal_budget.json \\
        benchmarks/results/equal_budget_ours64_mace_small.json benchmarks/results/equal_budget_ours32_mace_small.json \\
        benchmarks/results/equal_budget_dense_ours32_mace_small.json \\
        --speed benchmarks/results/model_speed_pareto_small.json benchmarks/results/model_speed_pareto.json

Timing the sizes in pairs (each beside its MACE counterpart) keeps every worker's retained memory
within the machine's RAM: four 1008-atom workers at once held 20 of 24 GB and slowed each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import BENCH_DIR, markdown_table, write_json
from equal_budget import size_of


def pareto_rows(accuracy: list[dict[str, Any]], speed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trained model and budget: its validation errors and its ms per evaluation per case and dtype."""
    timings = {(r["model"], r["case"], r["dtype"]): r["median_ms"]
               for payload in speed for r in payload["results"] if "median_ms" in r}  # a later file wins
    cases = sorted({(case, dtype) for _, case, dtype in timings})
    rows = []
    for payload, run in ((p, r) for p in accuracy for r in p["results"]):
        if "validation" not in run:
            continue
        preset = size_of(run)
        rows.append({
            "dataset": run["dataset"], "model": run["model"], "speed_preset": preset, "budget_min": run["budget_min"],
            "trained": f"{payload['machine']['date_utc'][:10]} {payload['machine']['cpu']}",  # runs differ: compare within one
            "num_parameters": run.get("num_parameters"),
            "energy_mae_meV": run["validation"]["energy_mae_meV"],
            "forces_mae_meV_per_A": run["validation"]["forces_mae_meV_per_A"],
            "ms_per_eval": {f"{case}/{dtype}": timings.get((preset, case, dtype)) for case, dtype in cases},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", type=Path, nargs="+", default=[BENCH_DIR / "results" / "equal_budget.json"],
                        help="equal_budget.py JSON files")
    parser.add_argument("--speed", type=Path, nargs="+", help="model_speed.py JSON files",
                        default=[BENCH_DIR / "results" / f"model_speed_pareto{s}.json" for s in ("_small", "")])
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "pareto.json")
    args = parser.parse_args()
    rows = pareto_rows(*([json.loads(p.read_text()) for p in paths] for paths in (args.accuracy, args.speed)))
    columns = sorted({k for r in rows for k in r["ms_per_eval"]})
    print(markdown_table(
        ["data", "model", "trained", "budget min", "params", "E MAE meV", "F MAE meV/Å", *(f"ms {c}" for c in columns)],
        [[r["dataset"], f"{r['model']} ({r['speed_preset']})", r["trained"], r["budget_min"], r["num_parameters"],
          r["energy_mae_meV"], r["forces_mae_meV_per_A"], *(r["ms_per_eval"][c] for c in columns)] for r in rows],
    ))
    write_json(args.out, {"accuracy": [str(p) for p in args.accuracy], "speed": [str(p) for p in args.speed], "rows": rows})


if __name__ == "__main__":
    main()
