"""The compiled training step (training/compiled.py) computes what the eager one does, for any batch shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from mlip import MLIPModel, Potential, Structure
from mlip.graph import AtomicGraph, batch_graphs
from mlip.properties import compute_properties
from mlip.training.compiled import CompiledProperties
from mlip.training.trainer import Trainer

from .conftest import make_config
from .emt_data import emt_crystals, write_xyz
from .test_training import make_config as train_config
from .test_training import read_log


def structures(*names: str) -> list[Structure]:
    """Rattled molecules and fcc supercells, each of its own size."""
    made = []
    for k, name in enumerate(names):
        atoms = bulk(name, "fcc", a=3.8) * (2, 1, k + 1) if name in ("Cu", "Al") else molecule(name)
        atoms.rattle(0.05, seed=k)
        made.append(Structure.from_atoms(atoms))
    return made


def loss_and_grads(properties, model: MLIPModel, graph: AtomicGraph) -> tuple[dict, list[torch.Tensor]]:
    """The results and the parameter gradients of a loss on energy, forces and stress."""
    out = properties(graph)
    loss = out["energy"].square().sum() + out["forces"].square().sum() + out["stress"].square().sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: v.detach() for k, v in out.items()}, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_properties_match_eager_on_batches_of_other_shapes(backend):
    torch.manual_seed(0)
    model = MLIPModel(make_config(num_layers=2, l_max=1))
    potential = Potential(model)
    model.requires_grad_(True)
    compiled = CompiledProperties(model, stress=True, backend=backend)

    def eager(graph):
        return compute_properties(model, graph, forces=True, stress=True, training=True)

    # traced on 3 structures (as many as Cartesian components), then run on 2 and 4 of other sizes
    batches = [("CH3CONH2", "Cu", "H2O"), ("Al", "CH4"), ("C6H6", "Cu", "Al", "NH3")]
    for names in batches:
        graph = batch_graphs([potential.graph(s) for s in structures(*names)])
        expected, expected_grads = loss_and_grads(eager, model, graph)
        got, grads = loss_and_grads(compiled, model, graph)
        for key in ("energy", "energies", "forces", "stress"):
            np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=1e-9, atol=1e-10, err_msg=key)
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-8, atol=1e-10)


def test_compiled_training_follows_the_eager_run(tmp_path):
    """``compile: true`` trains the same model: the same losses and validation errors epoch by epoch."""
    data = write_xyz(tmp_path / "emt.xyz", emt_crystals(16))
    logs = {}
    for compile in (False, True):
        (tmp_path / str(compile)).mkdir()
        # the eager backend runs the trace without code generation
        config = train_config(tmp_path / str(compile), data, max_epochs=3, compile=compile, compile_backend="eager")
        Trainer(config).run()
        logs[compile] = read_log(config)
    for eager, compiled in zip(logs[False], logs[True]):
        for key in ("train_loss", "valid_energy_mae_meV", "valid_forces_mae_meV_per_A"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-7), key
