"""Markdown model card written beside a trained checkpoint (NAME.md)."""

from __future__ import annotations

import json
from pathlib import Path

from ase.data import chemical_symbols

from mlip.config import ModelConfig


def _metric_rows(summary: dict) -> str:
    names = {
        "energy_mae_meV": "energy MAE (meV)",
        "energy_rmse_meV": "energy RMSE (meV)",
        "energy_mae_meV_per_atom": "energy MAE (meV/atom)",
        "energy_rmse_meV_per_atom": "energy RMSE (meV/atom)",
        "forces_mae_meV_per_A": "forces MAE (meV/Å)",
        "forces_rmse_meV_per_A": "forces RMSE (meV/Å)",
        "stress_mae_meV_per_A3": "stress MAE (meV/Å³)",
        "stress_rmse_meV_per_A3": "stress RMSE (meV/Å³)",
    }
    return "\n".join(f"| {label} | {summary[key]:.3f} |" for key, label in names.items() if key in summary)


def _stage_two(c: dict) -> str:
    if c.get("stage_two_energy_weight") is None:
        return "- no stage two"
    return (
        f"- stage two (last {c['stage_two_fraction']:.0%} of the budget): energy weight {c['stage_two_energy_weight']},"
        f" learning rate capped at {c['stage_two_lr']}; the checkpoint is the best EMA model of stage two"
    )


def _batch(t: dict) -> str:
    """Structures per optimiser step; under torchrun, per process times processes."""
    per_process, world = t["config"]["batch_size"], t["world_size"]
    return f"{per_process * world} ({per_process} per process × {world} processes)" if world > 1 else str(per_process)


def write_model_card(checkpoint: Path, config: ModelConfig, metadata: dict, limits: str = "") -> Path:
    """Data, split, hyperparameters, wall time and hardware, validation metrics, limits of use."""
    t, v = metadata["training"], metadata["validation"]
    by_type = metadata.get("validation_by_config_type", {})
    elements = ", ".join(chemical_symbols[z] for z in config.species)
    hyper = {k: val for k, val in config.to_dict().items() if k not in ("species", "e0s")}
    lines = [
        f"# Model card: {checkpoint.stem}",
        "",
        t["config"].get("description", "").strip(),
        "",
        "## Data",
        f"- training file: `{t['train_file']}` ({t['n_train']} configurations for training)",
        f"- validation: {t['n_valid']} configurations, {t['split']}"
        + (f" (`{t['valid_file']}`)" if t.get("valid_file") else ""),
        f"- elements: {elements}; E0s from {t['e0s']}",
        f"- labels: energy `{t['config']['energy_key']}`, forces `{t['config']['forces_key']}`"
        + (f", stress `{t['config']['stress_key']}`" if "stress_mae_meV_per_A3" in v else ""),
        "",
        "## Training",
        f"- wall time: {t['wall_time_s'] / 60:.1f} min on {t['hardware']} (world size {t['world_size']}), {t['epochs']} epochs, best epoch {t['best_epoch']}",
        *([f"- fine-tuned from `{t['init_from']['path']}` (SHA-256 {t['init_from']['sha256'][:16]}…)"] if t.get("init_from") else []),
        f"- dtype {t['dtype']}{', compiled training step' if t['config'].get('compile') else ''},"
        f" torch {t['torch_version']}, mlip {t['mlip_version']}",
        f"- loss weights: energy {t['config']['energy_weight']}, forces {t['config']['forces_weight']}, stress {t['config']['stress_weight']};"
        f" AdamW{' (AMSGrad)' if t['config'].get('amsgrad') else ''} lr {t['config']['lr']}, {t['config']['scheduler']} schedule,"
        f" EMA {t['config']['ema_decay']}, batch {_batch(t)}",
        _stage_two(t["config"]),
        "- hyperparameters:",
        "",
        "```json",
        json.dumps(hyper, indent=2),
        "```",
        "",
        "## Validation metrics (EMA weights, held-out split)",
        "",
        "| metric | value |",
        "|---|---|",
        _metric_rows(v),
    ]
    if len(by_type) > 1:
        lines += ["", "### By config_type", ""]
        for name, summary in sorted(by_type.items()):
            lines += [f"**{name}** ({summary['n_structures']} structures)", "", "| metric | value |", "|---|---|", _metric_rows(summary), ""]
    lines += [
        "",
        "## Limits of use",
        limits
        or (
            f"Trained only on {elements} configurations like those in the training file; energies and forces outside that"
            " chemical and configurational space (other elements, phases, temperatures, bond breaking) are extrapolation."
            f" Interactions beyond {config.cutoff} Å are not modelled."
        ),
        "",
        f"Reproduce: `{t['config']['command'] or 'mlip train CONFIG.yaml'}`",
    ]
    path = checkpoint.with_suffix(".md")
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
