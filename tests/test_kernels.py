"""kernels="cueq": cuEquivariance's tensor product and symmetric contraction give the e3nn model's results."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mlip import MLIPModel, Potential, Structure
from mlip.kernels import CueChannelWiseTensorProduct, _method, cueq_available, use_kernels

from .conftest import make_config, needs_cuda

needs_cueq = pytest.mark.skipif(not cueq_available(), reason="cuequivariance-torch is not installed")

# Small widths: on the CPU, cuEquivariance builds its PyTorch fallback as large FX graphs (seconds per
# interaction, minutes for parity=True, whose many irreps make the product basis large).
DEFAULT = dict(num_channels=4, l_max=1, sh_l_max=2, correlation=3, num_layers=2)
OTHER_CONFIGS = {
    "l2-sh3-three-layers": dict(num_channels=4, l_max=2, sh_l_max=3, correlation=2, num_layers=3),
    "parity": pytest.param(dict(DEFAULT, parity=True), marks=pytest.mark.slow),
}


def random_model(**overrides) -> MLIPModel:
    torch.manual_seed(0)
    return MLIPModel(make_config(**overrides))


@pytest.fixture(scope="module")
def default_pair() -> tuple[Potential, Potential]:
    """The same random model on e3nn and on cuEquivariance, float64 (one conversion for the module)."""
    reference = random_model(**DEFAULT)
    e3nn = Potential(copy.deepcopy(reference))
    with pytest.warns(UserWarning, match="PyTorch fallback"):
        cueq = Potential(reference, kernels="cueq")  # on the CPU: the user is told that it is slow
    return e3nn, cueq


def evaluate(potential: Potential, atoms) -> dict[str, np.ndarray]:
    properties = ("energy", "forces", "stress", "energies") if atoms.pbc.any() else ("energy", "forces", "energies")
    return potential.evaluate([Structure.from_atoms(atoms)], properties)[0]


def assert_same_results(e3nn: Potential, cueq: Potential, structures: list, tolerance: float) -> None:
    assert e3nn.kernels == "e3nn" and cueq.kernels == "cueq"
    layers = e3nn.config.num_layers
    assert sum(isinstance(m, CueChannelWiseTensorProduct) for m in cueq.model.modules()) == layers
    for atoms in structures:
        expected, got = evaluate(e3nn, atoms), evaluate(cueq, atoms)
        assert np.abs(expected["forces"]).max() > 1e-3  # a model that computes something
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=tolerance, atol=tolerance, err_msg=key)


def test_unknown_kernels_are_refused(model):
    with pytest.raises(ValueError, match=r"kernels must be one of \['e3nn', 'cueq'\]"):
        use_kernels(model, "triton")


def test_cueq_without_cuequivariance_names_the_install(model, monkeypatch):
    monkeypatch.setattr("mlip.kernels.cueq_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'mlip-service\[cuda\]'"):
        Potential(copy.deepcopy(model), kernels="cueq")


@needs_cueq
def test_cueq_model_equals_e3nn_model(default_pair, molecule_atoms, crystal_atoms):
    assert_same_results(*default_pair, [molecule_atoms, crystal_atoms], tolerance=1e-10)


@needs_cueq
@pytest.mark.filterwarnings("ignore:kernels='cueq' runs cuEquivariance's PyTorch fallback")
@pytest.mark.parametrize("config", OTHER_CONFIGS.values(), ids=OTHER_CONFIGS)
def test_cueq_equals_e3nn_for_other_architectures(config, molecule_atoms, crystal_atoms):
    reference = random_model(**config)
    e3nn, cueq = Potential(copy.deepcopy(reference)), Potential(reference, kernels="cueq")
    assert_same_results(e3nn, cueq, [molecule_atoms, crystal_atoms], tolerance=1e-10)


@needs_cueq
def test_swapped_model_runs_in_float32(default_pair, molecule_atoms):
    e3nn, cueq = default_pair
    cueq32 = Potential(copy.deepcopy(cueq.model), dtype="float32")  # a swapped model keeps its kernels
    assert_same_results(e3nn, cueq32, [molecule_atoms], tolerance=1e-4)


@needs_cueq
def test_a_wrong_conversion_is_refused(default_pair):
    """The self-checks guard the conversions: one mis-scaled path or weight must stop the swap."""
    reference, swapped = (p.model for p in default_pair)
    e3nn_tp, cue_tp = reference.interactions[0].tensor_product, copy.deepcopy(swapped.interactions[0].tensor_product)
    cue_tp._check_against(e3nn_tp)
    cue_tp.weight_scale[0] *= 1.01
    with pytest.raises(ValueError, match="differs from e3nn"):
        cue_tp._check_against(e3nn_tp)
    product, cue_product = reference.interactions[0].product, copy.deepcopy(swapped.interactions[0].product)
    cue_product._check_against(product)
    with torch.no_grad():
        cue_product.contraction.weight[0, -1] += 0.01  # the highest-degree polynomial of one species
    with pytest.raises(ValueError, match="differs from ours"):
        cue_product._check_against(product)


@needs_cueq
@needs_cuda
def test_cueq_on_cuda_equals_e3nn(molecule_atoms):
    """On a GPU this must run cuEquivariance's CUDA kernels (cuequivariance-ops-torch-cu12/-cu13), not its fallback."""
    method, why = _method(torch.device("cuda"))
    assert method != "naive", why
    reference = random_model(**DEFAULT)
    e3nn = Potential(copy.deepcopy(reference), device="cuda", dtype="float64")
    cueq = Potential(reference, device="cuda", dtype="float64", kernels="cueq")
    assert_same_results(e3nn, cueq, [molecule_atoms], tolerance=1e-9)
