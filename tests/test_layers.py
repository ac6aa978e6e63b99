"""The model's lean layers equal the e3nn modules whose parameters they keep: same state dict, same values and gradients."""

from __future__ import annotations

import pytest
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3

from mlip.linear import Linear, SpeciesLinear
from mlip.mlp import FullyConnectedNet

# the model's shapes (32 channels scaled down), unsimplified inputs, outputs no path reaches, odd parities
LINEAR_CASES = [
    ("4x0e+4x1o", "4x0e+4x1o"),
    ("8x0e+12x1o+8x2e", "4x0e+4x1o+4x2e"),
    ("4x0e+4x1o", "1x0e"),
    ("3x0e+2x1o+4x0e+1x2e", "5x0e+2x1o+3x1e"),
]


def double(build):
    """e3nn keeps its constants in the default dtype: build both sides in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return build()
    finally:
        torch.set_default_dtype(previous)


def assert_same_function(ours, theirs, inputs, ours_inputs=None):
    """Values and input gradients equal to float64 round-off (relative to their size)."""
    ours_inputs = inputs if ours_inputs is None else ours_inputs
    expected, got = theirs(*inputs), ours(*ours_inputs)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * expected.abs().max().item())
    cotangent = torch.randn_like(expected)
    (g_theirs,) = torch.autograd.grad(expected, inputs[:1], cotangent)
    (g_ours,) = torch.autograd.grad(got, ours_inputs[:1], cotangent)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12 * g_theirs.abs().max().item())


@pytest.mark.parametrize("irreps", LINEAR_CASES, ids=[f"{a}->{b}" for a, b in LINEAR_CASES])
def test_linear_equals_e3nn_linear(irreps):
    torch.manual_seed(0)
    theirs = double(lambda: o3.Linear(*irreps))
    ours = double(lambda: Linear(*irreps))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, theirs.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    assert_same_function(ours, theirs, [x])


@pytest.mark.parametrize("irreps", LINEAR_CASES[:2] + LINEAR_CASES[3:], ids=["model-hidden", "model-message", "mixed"])
def test_species_linear_equals_e3nn_tensor_product_with_one_hot_species(irreps):
    num_species = 3
    torch.manual_seed(0)
    theirs = double(lambda: o3.FullyConnectedTensorProduct(irreps[0], f"{num_species}x0e", irreps[1]))
    ours = double(lambda: SpeciesLinear(*irreps, num_species))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, theirs.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    species = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1])
    one_hot = torch.nn.functional.one_hot(species, num_species).double()
    assert_same_function(ours, theirs, [x, one_hot], [x, species])


@pytest.mark.parametrize("options", [{}, {"variance_in": 2, "variance_out": 3}, {"out_act": True}], ids=["model", "variances", "out-act"])
def test_mlp_equals_e3nn_fully_connected_net(options):
    widths = [24, 16, 16, 16, 10]
    torch.manual_seed(0)
    theirs = double(lambda: e3nn_nn.FullyConnectedNet(widths, torch.nn.functional.silu, **options))
    ours = double(lambda: FullyConnectedNet(widths, torch.nn.functional.silu, **options))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(11, widths[0], dtype=torch.float64, requires_grad=True)
    assert_same_function(ours, theirs, [x])
