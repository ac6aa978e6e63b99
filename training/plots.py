"""Learning-curve and parity plots (PNG) written next to a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlip.graph import AtomicGraph, batch_graphs  # noqa: E402
from mlip.model import MLIPModel  # noqa: E402
from mlip.properties import compute_properties  # noqa: E402


def plot_learning_curve(metrics_path: Path, out_path: Path) -> None:
    """Training loss and validation energy/force MAE against epoch (log scale)."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.semilogy(epochs, [r["train_loss"] for r in records])
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_err.semilogy(epochs, [r["valid_forces_mae_meV_per_A"] for r in records], label="forces MAE (meV/Å)")
    ax_err.semilogy(epochs, [r["valid_energy_mae_meV"] for r in records], label="energy MAE (meV)")
    if "valid_stress_mae_meV_per_A3" in records[-1]:
        ax_err.semilogy(epochs, [r.get("valid_stress_mae_meV_per_A3", np.nan) for r in records], label="stress MAE (meV/Å³)")
    ax_err.set(xlabel="epoch", title="validation (EMA weights)")
    ax_err.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def predict(model: MLIPModel, graphs: list[AtomicGraph], device, dtype, batch_size: int = 32):
    """Predicted and reference per-atom energies (eV) and force components (eV/Å)."""
    pred_e, ref_e, pred_f, ref_f = [], [], [], []
    for start in range(0, len(graphs), batch_size):
        graph = batch_graphs(graphs[start : start + batch_size]).to(device, dtype)
        out = compute_properties(model, graph, forces=True)
        n = graph.num_atoms.to(torch.float64)
        pred_e.append((out["energy"].detach() / n).cpu())
        ref_e.append((graph.targets["energy"].double() / n).cpu())
        pred_f.append(out["forces"].detach().double().cpu().reshape(-1))
        ref_f.append(graph.targets["forces"].double().cpu().reshape(-1))
    return [torch.cat(x).numpy() for x in (pred_e, ref_e, pred_f, ref_f)]


def parity_figure(pred_e, ref_e, pred_f, ref_f, out_path) -> None:
    """Parity plots of energy per atom (eV) and force components (eV/Å)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, pred, ref, label, unit in (
        (axes[0], pred_e, ref_e, "energy per atom (eV)", "meV/atom"),
        (axes[1], pred_f, ref_f, "force component (eV/Å)", "meV/Å"),
    ):
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.scatter(ref, pred, s=3, alpha=0.5)
        mae = np.mean(np.abs(pred - ref)) * 1e3
        ax.set(xlabel=f"DFT {label}", ylabel=f"model {label}", title=f"MAE {mae:.2f} {unit}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_parity(model: MLIPModel, graphs: list[AtomicGraph], out_path: Path, device, dtype) -> None:
    """Parity plots on held-out graphs."""
    parity_figure(*predict(model, graphs, device, dtype), out_path)
