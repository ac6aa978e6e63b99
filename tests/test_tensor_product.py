"""The dense channel-wise tensor product equals e3nn's per-path code; repeated evaluations reuse host memory."""

from __future__ import annotations

import copy
import platform
import resource

import pytest
import torch
from ase.build import bulk
from e3nn import o3

from mlip import MLIPModel, Potential, Structure
from mlip.model import channel_irreps
from mlip.host_memory import retain_freed_host_memory
from mlip.tensor_product import ChannelWiseTensorProduct, use_e3nn_pathwise

from .conftest import assert_reproduced, make_config

# (l_max, sh_l_max, parity): the default model's orders, higher orders, and both parities
ORDERS = [(0, 2, False), (1, 2, False), (2, 3, False), (1, 3, True)]


def products(l_max: int, sh_l_max: int, parity: bool) -> list[ChannelWiseTensorProduct]:
    """The model's two kinds: scalar features (first interaction) and features up to ``l_max`` in."""
    sh, targets = o3.Irreps.spherical_harmonics(sh_l_max), [ir for _, ir in channel_irreps(1, sh_l_max, parity)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn's own per-path code keeps its constants in this dtype
    try:
        return [ChannelWiseTensorProduct(irreps, sh, targets) for irreps in (o3.Irreps("5x0e"), channel_irreps(5, l_max, parity))]
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("orders", ORDERS, ids=[f"l{l}-sh{s}{'-parity' if p else ''}" for l, s, p in ORDERS])
def test_dense_product_equals_e3nn_per_path(orders):
    """Values and gradients (features, harmonics, weights) equal e3nn's own evaluation to float64 round-off."""
    for tp in products(*orders):
        generator = torch.Generator().manual_seed(1)
        inputs = [torch.randn(13, n, generator=generator, dtype=torch.float64, requires_grad=True)
                  for n in (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)]
        ours, theirs = tp(*inputs), o3.TensorProduct.forward(tp, *inputs)
        assert theirs.abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12 * theirs.abs().max().item())
        cotangent = torch.randn(ours.shape, generator=generator, dtype=torch.float64)
        for g_ours, g_theirs in zip(torch.autograd.grad(ours, inputs, cotangent),
                                    torch.autograd.grad(theirs, inputs, cotangent)):
            torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12 * g_theirs.abs().max().item())


def test_dense_product_keeps_e3nn_state_dict_and_refuses_other_layouts():
    """Checkpoints written with e3nn's TensorProduct load unchanged; shapes it cannot fuse are refused."""
    tp = products(1, 2, False)[1]
    instructions = [(i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight) for i in tp.instructions]
    reference = o3.TensorProduct(tp.irreps_in1, tp.irreps_in2, tp.irreps_out, instructions,
                                 shared_weights=False, internal_weights=False)
    assert tp.state_dict().keys() == reference.state_dict().keys()
    with pytest.raises(ValueError, match="one multiplicity"):
        ChannelWiseTensorProduct("4x0e+2x1o", "1x0e+1x1o", [o3.Irrep("0e")])


def test_model_equals_e3nn_per_path(molecule_atoms, crystal_atoms):
    """Whole model (message layout, aggregation, reordering): energy, forces and stress to 1e-10 in float64."""
    torch.manual_seed(0)
    model = MLIPModel(make_config())
    dense, pathwise = Potential(model), Potential(use_e3nn_pathwise(copy.deepcopy(model)))
    for atoms in (molecule_atoms, crystal_atoms):
        structure = Structure.from_atoms(atoms)
        properties = ("energy", "forces", "stress") if atoms.pbc.any() else ("energy", "forces")
        (a,), (b,) = dense.evaluate([structure], properties), pathwise.evaluate([structure], properties)
        for name in properties:
            torch.testing.assert_close(torch.as_tensor(a[name]), torch.as_tensor(b[name]), rtol=1e-10, atol=1e-10)


def test_float32_round_trip_keeps_float64_constants(molecule_atoms):
    """Clebsch-Gordan and product-basis tables come back from their float64 masters after .float().double().

    The weights themselves are rounded by the trip, so the reference gets the same rounded weights.
    """
    torch.manual_seed(0)
    model = MLIPModel(make_config())
    round_trip = copy.deepcopy(model).float().double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.float().double())
    structure = Structure.from_atoms(molecule_atoms)
    (a,), (b,) = (Potential(m).evaluate([structure]) for m in (model, round_trip))
    assert_reproduced(a["energy"], b["energy"])
    assert_reproduced(a["forces"], b["forces"])


def test_repeated_evaluation_reuses_host_memory():
    """After the first evaluation of a large cell the next ones page-fault (almost) nothing.

    Without retained memory each evaluation maps its ~100 MB of activations afresh: ~25 000 faults.
    """
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("retained host memory is a glibc setting")
    assert retain_freed_host_memory()
    torch.manual_seed(0)
    potential = Potential(MLIPModel(make_config(num_layers=2)))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=0)
    graph = potential.graph(Structure.from_atoms(atoms))
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        potential.evaluate_graphs([graph], ("energy", "forces", "stress"))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert faults[-1] < 2000, faults
