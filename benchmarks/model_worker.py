"""Benchmark worker: one model (ours or MACE) on one structure file, timed on request from a driver.

Runs in the project venv for ``--model ours`` and in the MACE venv for ``--model mace-*`` (mace is
imported only there: ``import mace`` changes torch.load's defaults for the whole process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ase.io import read

from common import SPECIES, claim_stdout, peak_rss_mb, set_threads, worker_loop

# ours: the default ModelConfig (64 channels); ours-32: the shipped checkpoints' size (equal_budget.py trains it)
OURS_CONFIG = {"ours": {}, "ours-32": {"num_channels": 32}}
# Potential options, by preset suffix; -pathwise: e3nn's per-path tensor-product code (the eager path before
# mlip.tensor_product's single contraction, for side-by-side timing); -cudagraphs: replayed CUDA graphs (GPU only)
OURS_VARIANTS = {"-compiled": {"compile": True}, "-cueq": {"kernels": "cueq"}, "-pathwise": {}, "-cudagraphs": {"cuda_graphs": True}}
MODELS = (
    *(size + suffix for size in OURS_CONFIG for suffix in ("", *OURS_VARIANTS)), "mace-small", "mace-L1-64", "mace-medium"
)
# mace-L1-64 is the MACE that benchmarks/equal_budget.py trains (64 channels, max_L 1)
MACE_HIDDEN_IRREPS = {"mace-small": "64x0e", "mace-L1-64": "64x0e+64x1o", "mace-medium": "128x0e+128x1o"}
STAGES = ("model", "full")  # model: prebuilt graph -> energy+forces; full: also neighbour list + batching
CUTOFF_A = 5.0

Evaluator = Callable[[], Any]
Built = tuple[Evaluator, dict[str, Any], torch.nn.Module]  # evaluate(), its info, the torch module inside


def ours_evaluator(frames: list, preset: str, dtype: str, stage: str, device: str) -> Built:
    """Our ModelConfig of ``preset`` (random weights) behind mlip.Potential; energy + forces as numpy."""
    from mlip import MLIPModel, ModelConfig, Potential, Structure, batch_graphs
    from mlip.tensor_product import use_e3nn_pathwise

    size, options = preset, {}
    for suffix, option in OURS_VARIANTS.items():
        if preset.endswith(suffix):
            size, options = preset.removesuffix(suffix), option
    model = MLIPModel(ModelConfig(species=SPECIES, cutoff=CUTOFF_A, **OURS_CONFIG[size]))
    if preset.endswith("-pathwise"):
        use_e3nn_pathwise(model)
    potential = Potential(model, device=device, dtype=dtype, **options)

    def build():
        return batch_graphs([potential.graph(Structure.from_atoms(a)) for a in frames])

    graph = build()
    info = {"n_params": sum(p.numel() for p in potential.model.parameters()), "n_edges": graph.edge_index.shape[1]}
    if stage == "model":
        return lambda: potential.evaluate_graphs([graph], ("energy", "forces")), info, potential.model
    return lambda: potential.evaluate_graphs([build()], ("energy", "forces")), info, potential.model


def mace_model(preset: str, dtype: torch.dtype) -> torch.nn.Module:
    """Randomly initialised ScaleShiftMACE: max_ell 3, correlation 3, 2 interactions, r_max 5 Å."""
    import mace  # noqa: F401  (first: makes mace's pinned e3nn importable on new torch)
    from e3nn import o3
    from mace import modules
    from mace.tools import utils

    z_table = utils.AtomicNumberTable(SPECIES)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=CUTOFF_A,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=3,
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=2,
        num_elements=len(SPECIES),
        hidden_irreps=o3.Irreps(MACE_HIDDEN_IRREPS[preset]),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(SPECIES)),
        avg_num_neighbors=10.0,
        atomic_numbers=z_table.zs,
        correlation=3,
        gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def mace_evaluator(frames: list, preset: str, dtype: str, stage: str, device: str) -> Built:
    """ScaleShiftMACE as MACECalculator runs it: AtomicData -> Batch -> model(compute_force=True)."""
    from mace import data
    from mace.tools import torch_geometric, torch_tools, utils

    torch_tools.set_default_dtype(dtype)
    model = mace_model(preset, getattr(torch, dtype)).to(device)
    z_table = utils.AtomicNumberTable(SPECIES)

    def build():
        graphs = [data.AtomicData.from_config(data.config_from_atoms(a), z_table=z_table, cutoff=CUTOFF_A) for a in frames]
        return torch_geometric.Batch.from_data_list(graphs).to(device)

    def run(batch) -> tuple[np.ndarray, np.ndarray]:
        out = model(batch.to_dict(), compute_force=True)
        return out["energy"].detach().cpu().numpy(), out["forces"].detach().cpu().numpy()

    batch = build()
    info = {"n_params": sum(p.numel() for p in model.parameters()), "n_edges": int(batch["edge_index"].shape[1])}
    if stage == "model":
        return lambda: run(batch), info, model
    return lambda: run(build()), info, model


def make_evaluator(model: str, frames: list, dtype: str, stage: str, device: str = "cpu", seed: int = 0) -> Built:
    """Build ``model`` (random weights from ``seed``) and a no-argument energy+forces call on ``frames``."""
    torch.manual_seed(seed)
    if model.startswith("ours"):
        evaluate, info, module = ours_evaluator(frames, model, dtype, stage, device)
    else:
        evaluate, info, module = mace_evaluator(frames, model, dtype, stage, device)
    return evaluate, {**info, "n_atoms": sum(len(a) for a in frames), "n_structures": len(frames)}, module


def worker_command(model: str, structures: Path, dtype: str, args: argparse.Namespace, warmup: int) -> list[str]:
    """argv that starts this worker (our model in this interpreter, MACE in ``args.mace_python``).

    ``args`` supplies the driver's device, threads, mace_python and (optionally) stage.
    """
    python = sys.executable if model.startswith("ours") else str(args.mace_python)
    if not Path(python).exists():
        raise SystemExit(f"MACE venv not found at {python}: see benchmarks/README.md (or pass --mace-python)")
    return [
        python, str(Path(__file__).resolve()), "--model", model, "--structures", str(structures),
        "--dtype", dtype, "--stage", getattr(args, "stage", "model"), "--device", args.device,
        "--threads", str(args.threads), "--warmup", str(warmup),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--structures", required=True, help="extxyz file; all frames form one batch")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--stage", choices=STAGES, default="model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed evaluations before answering")
    args = parser.parse_args()

    out = claim_stdout()
    set_threads(args.threads)
    evaluate, info, _ = make_evaluator(args.model, read(args.structures, index=":"), args.dtype, args.stage, args.device)
    info["rss_before_eval_mb"] = peak_rss_mb()
    for _ in range(args.warmup):
        evaluate()
    worker_loop(evaluate, info, out)


if __name__ == "__main__":
    main()
