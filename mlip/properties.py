"""Energy -> forces and stress by automatic differentiation (energy-conserving by construction)."""

from __future__ import annotations

import torch

from .graph import AtomicGraph, cell_volumes, stress_defined


def compute_properties(
    model: torch.nn.Module,  # MLIPModel, or a compiled / DDP-wrapped one
    graph: AtomicGraph,
    forces: bool = True,
    stress: bool = False,
    training: bool = False,
) -> dict[str, torch.Tensor]:
    """Energies (eV), forces F = -dE/dx (eV/Å) and stress (1/V) dE/dε (eV/Å³, ASE sign).

    Stress uses a symmetric strain ε applied to positions and cell; structures without one
    (``stress_defined``: no periodic direction, or a cell of zero volume) get a zero stress.
    ``training`` keeps the graph so force/stress losses can backpropagate.
    """
    positions, cell = graph.positions, graph.cell
    inputs = []
    if forces:
        positions = positions.detach().requires_grad_(True)
        inputs.append(positions)
    if stress:
        strain = torch.zeros_like(cell, requires_grad=True)
        inputs.append(strain)
        symmetric = 0.5 * (strain + strain.transpose(1, 2))
        positions = positions + torch.einsum("ni,nij->nj", positions, symmetric[graph.batch])
        cell = cell + torch.bmm(cell, symmetric)

    receiver, sender = graph.edge_index
    edge_cell = cell[graph.batch[receiver]]
    edge_vectors = positions[sender] - positions[receiver] + torch.einsum("ei,eij->ej", graph.edge_shift, edge_cell)

    node_energy = model(graph.species, edge_vectors, graph.edge_index)
    # sized like num_atoms, not by a Python int: a symbolic trace (training/compiled.py) keeps the batch size free
    energy = torch.zeros_like(graph.num_atoms, dtype=torch.float64).index_add(0, graph.batch, node_energy)
    results = {"energy": energy, "energies": node_energy}
    if inputs:
        grads = torch.autograd.grad(
            energy.sum(), inputs, create_graph=training, retain_graph=training, allow_unused=True
        )
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        if forces:
            results["forces"] = -grads[0]
        if stress:
            volume = cell_volumes(graph.cell)
            defined = stress_defined(graph.cell, graph.pbc)
            safe_volume = torch.where(defined, volume, torch.ones_like(volume))
            results["stress"] = grads[-1] / safe_volume[:, None, None] * defined[:, None, None]
    return results
