"""Optional fast equivariant kernels: NVIDIA cuEquivariance in place of e3nn (the ``[cuda]`` extra).

``use_kernels(model, "cueq")`` swaps every interaction's channel-wise tensor product and symmetric
contraction for cuEquivariance's (CUDA kernels with ``cuequivariance-ops-torch-cu12``, a PyTorch
fallback elsewhere). The trained weights are converted, not retrained: tensor-product paths are
matched one to one with their scale, and the product-basis weights are re-expressed in
cuEquivariance's polynomial basis by least squares, which must be exact (to 1e-9) or the swap is
refused. Inference only: a swapped model's state dict is not a checkpoint.
"""

from __future__ import annotations

import math
import warnings

import torch
from e3nn import o3
from torch import nn

from .model import MLIPModel
from .product import SymmetricContraction

KERNELS = ("e3nn", "cueq")
_CONVERSION_TOLERANCE = 1e-9  # relative, float64: anything above means the two bases do not span the same maps


def cueq_available() -> bool:
    """True when ``cuequivariance_torch`` imports (the ``[cuda]`` extra, or a CPU install for testing)."""
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_of(model: MLIPModel) -> str:
    """The kernels ``model`` runs on: "cueq" once ``use_kernels`` swapped it, else "e3nn"."""
    return "cueq" if any(isinstance(m, CueChannelWiseTensorProduct) for m in model.modules()) else "e3nn"


def use_kernels(model: MLIPModel, kernels: str, device: str | torch.device = "cpu") -> MLIPModel:
    """Return ``model`` with its equivariant operations on ``kernels`` ("e3nn": unchanged; "cueq": swapped in place).

    ``device`` is where the model will run: cuEquivariance's CUDA kernels are chosen for a GPU (with
    ``cuequivariance-ops-torch-cu12``), its PyTorch fallback otherwise. The swapped model is on ``device``, float64.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {list(KERNELS)}, got {kernels!r}")
    if kernels == "e3nn" or kernels_of(model) == kernels:
        return model
    if not cueq_available():
        raise ValueError("kernels='cueq' needs cuEquivariance: pip install 'mlip-service[cuda]'")
    device = torch.device(device)
    method, why = _method(device)
    if method == "naive":
        warnings.warn(f"kernels='cueq' runs cuEquivariance's PyTorch fallback ({why}): the same results, 2.5-7x "
                      "slower than e3nn on a CPU and 6-17x on a GPU", stacklevel=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # cuEquivariance's e3nn group builds its Clebsch-Gordan tables in it
    try:
        model.to(device="cpu", dtype=torch.float64)
        for interaction in model.interactions:
            interaction.tensor_product = CueChannelWiseTensorProduct(interaction.tensor_product, method, device)
            interaction.product = CueSymmetricContraction(interaction.product, method, device)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device)


def _require_close(got: torch.Tensor, expected: torch.Tensor, failure: str) -> None:
    """Raise ``ValueError(failure ...)`` unless ``got`` equals ``expected`` to the conversion tolerance (relative)."""
    error = ((got - expected).norm() / expected.norm()).item()
    if error > _CONVERSION_TOLERANCE:
        raise ValueError(f"{failure} by {error:.1e} (relative)")


def _cue_irreps(irreps: o3.Irreps):
    """The same irreps in cuEquivariance, with e3nn's conventions (its O3_e3nn group)."""
    import cuequivariance as cue
    from cuequivariance.group_theory.experimental.e3nn import O3_e3nn

    return cue.Irreps(O3_e3nn, str(irreps))


def _method(device: torch.device) -> tuple[str, str | None]:
    """cuEquivariance's CUDA kernel on a GPU where its ops package imports, else its PyTorch code; and why not."""
    if device.type != "cuda":
        return "naive", f"no CUDA kernels on {device}"
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError as err:  # not installed, or installed with a dependency missing: say which
        return "naive", f"cuequivariance-ops-torch does not import: {type(err).__name__}: {err}"
    return "uniform_1d", None


class CueChannelWiseTensorProduct(nn.Module):
    """cuEquivariance's channel-wise (uvu) tensor product with e3nn ``TensorProduct``'s weight and output layout.

    Each e3nn instruction is matched to the cuEquivariance path that gives a proportional output; the
    per-edge weights are gathered into cuEquivariance's order and scaled, the output put back in
    e3nn's order, so ``forward`` is a drop-in for the e3nn module it replaces. The matching runs on
    the CPU with cuEquivariance's PyTorch code; the module for ``method`` is then checked on ``device``.
    """

    def __init__(self, e3nn_tp: nn.Module, method: str = "naive", device: torch.device = torch.device("cpu")):
        super().__init__()
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        irreps = (_cue_irreps(e3nn_tp.irreps_in1), _cue_irreps(e3nn_tp.irreps_in2),
                  [ir for _, ir in _cue_irreps(e3nn_tp.irreps_out)])

        def build(method: str) -> nn.Module:
            return cuet.ChannelWiseTensorProduct(
                *irreps, layout=cue.mul_ir, shared_weights=False, internal_weights=False, dtype=torch.float64,
                method=method,
            )

        self.tp = build("naive")
        descriptor = cue.descriptors.channelwise_tensor_product(*irreps).polynomial.operations[0][1]
        path_sizes = [math.prod(shape) for shape in descriptor.operands[0].segments]  # weights of each path, in order
        weight_index, weight_scale, output_index = self._match_paths(e3nn_tp, path_sizes)
        self.register_buffer("weight_index", weight_index, persistent=False)
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.register_buffer("output_index", output_index, persistent=False)
        if method != "naive":
            self.tp = build(method)
        self._check_against(e3nn_tp, device)

    def _match_paths(
        self, e3nn_tp: nn.Module, path_sizes: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weight gather (cue weight j <- e3nn weight), its scale, and the output gather (e3nn slot <- cue slot)."""
        generator = torch.Generator().manual_seed(0)
        x1 = torch.randn(4, e3nn_tp.irreps_in1.dim, generator=generator, dtype=torch.float64)
        x2 = torch.randn(4, e3nn_tp.irreps_in2.dim, generator=generator, dtype=torch.float64)

        def one_path(module: nn.Module, numel: int, start: int, stop: int) -> torch.Tensor:
            weights = torch.zeros(4, numel, dtype=torch.float64)
            weights[:, start:stop] = 1.0
            return module(x1, x2, weights)

        cue_paths = []  # (weight slice, output slice, output) per cuEquivariance path
        cue_slices = _cue_irreps(self.tp.irreps_out).slices()
        start = 0
        for size in path_sizes:
            out = one_path(self.tp, self.tp.weight_numel, start, start + size)
            nonzero = [s for s in cue_slices if out[:, s].abs().max() > 0]
            cue_paths.append((slice(start, start + size), nonzero, out))
            start += size

        weight_index = torch.zeros(self.tp.weight_numel, dtype=torch.int64)
        weight_scale = torch.zeros(self.tp.weight_numel, dtype=torch.float64)
        output_index = torch.zeros(e3nn_tp.irreps_out.dim, dtype=torch.int64)
        e3nn_slices = e3nn_tp.irreps_out.slices()
        used = set()
        start = 0
        for instruction in e3nn_tp.instructions:
            size = instruction.path_shape[0] * instruction.path_shape[1]
            reference = one_path(e3nn_tp, e3nn_tp.weight_numel, start, start + size)[:, e3nn_slices[instruction.i_out]]
            for p, (weights, outputs, out) in enumerate(cue_paths):
                if p in used or len(outputs) != 1 or outputs[0].stop - outputs[0].start != reference.shape[1]:
                    continue
                candidate = out[:, outputs[0]]
                scale = (reference * candidate).sum() / (candidate * candidate).sum()
                if torch.allclose(scale * candidate, reference, rtol=1e-10, atol=1e-12):
                    used.add(p)
                    weight_index[weights] = torch.arange(start, start + size)
                    weight_scale[weights] = scale  # the output is linear in each path's weights
                    output_index[e3nn_slices[instruction.i_out]] = torch.arange(outputs[0].start, outputs[0].stop)
                    break
            else:
                raise ValueError(f"no cuEquivariance path matches e3nn instruction {instruction}")
            start += size
        return weight_index, weight_scale, output_index

    def _check_against(self, e3nn_tp: nn.Module, device: torch.device = torch.device("cpu")) -> None:
        """Raise ``ValueError`` unless this module equals ``e3nn_tp`` (moved to ``device``) on random inputs."""
        generator = torch.Generator().manual_seed(1)
        x1 = torch.randn(8, e3nn_tp.irreps_in1.dim, generator=generator, dtype=torch.float64).to(device)
        x2 = torch.randn(8, e3nn_tp.irreps_in2.dim, generator=generator, dtype=torch.float64).to(device)
        weights = torch.randn(8, e3nn_tp.weight_numel, generator=generator, dtype=torch.float64).to(device)
        expected, got = e3nn_tp.to(device)(x1, x2, weights), self.to(device)(x1, x2, weights)
        _require_close(got, expected, "cuEquivariance tensor product differs from e3nn's")

    def component_major(self, x: torch.Tensor) -> torch.Tensor:
        """Node features as ``messages`` takes them (cuEquivariance takes e3nn's layout)."""
        return x

    def messages(self, x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Edge messages in cuEquivariance's output order: sum them over edges, then ``to_e3nn_layout``."""
        return self.tp(x1, x2, weights.index_select(1, self.weight_index) * self.weight_scale.to(weights.dtype))

    def to_e3nn_layout(self, messages: torch.Tensor) -> torch.Tensor:
        return messages.index_select(-1, self.output_index)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.to_e3nn_layout(self.messages(x1, x2, weights))


class CueSymmetricContraction(nn.Module):
    """cuEquivariance's symmetric contraction carrying the weights of an ``mlip.product.SymmetricContraction``.

    Both compute, per channel, species-weighted sums of the equivariant polynomials of degree 1..ν;
    they differ only in the basis of those polynomials. The basis change T (cue basis -> ours) is fitted
    on random inputs of one channel (on the CPU) and must reproduce ours exactly; the converted module
    is checked against ours on ``device``.
    """

    def __init__(
        self, product: SymmetricContraction, method: str = "naive", device: torch.device = torch.device("cpu")
    ):
        super().__init__()
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        basis_change = self._basis_change(product)  # (J cue weights, K ours)
        ours = torch.cat([getattr(product, f"weights_{d}") for d in range(1, product.correlation + 1)], dim=1)
        self.contraction = cuet.SymmetricContraction(
            _cue_irreps(product.irreps_in), _cue_irreps(product.irreps_out), product.correlation,
            product.weights_1.shape[0], layout=cue.mul_ir, dtype=torch.float64, method=method,
        )
        with torch.no_grad():
            self.contraction.weight.copy_(torch.einsum("jk,sku->sju", basis_change, ours.detach()))
        self._check_against(product, device)

    def _basis_change(self, product: SymmetricContraction) -> torch.Tensor:
        """T with cue(x; T w) = ours(x; w) for every weight vector w of one channel and one species."""
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        irreps_in, irreps_out = (o3.Irreps([(1, ir) for _, ir in irreps]) for irreps in
                                 (product.irreps_in, product.irreps_out))  # one channel of each
        ours = SymmetricContraction(irreps_in, irreps_out, product.correlation, 1)
        theirs = cuet.SymmetricContraction(
            _cue_irreps(irreps_in), _cue_irreps(irreps_out), product.correlation, 1,
            layout=cue.mul_ir, dtype=torch.float64, method="naive",
        )
        samples = torch.randn(8 * theirs.weight.shape[1] + 8, ours.irreps_in.dim,
                              generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        species = torch.zeros(len(samples), dtype=torch.int64)

        def responses(module: nn.Module, parameters: list[nn.Parameter]) -> torch.Tensor:
            """Output (flattened over samples) for each unit weight vector: one column per weight."""
            columns = []
            with torch.no_grad():
                for parameter in parameters:
                    for k in range(parameter.shape[1]):
                        for p in parameters:
                            p.zero_()
                        parameter[0, k, 0] = 1.0
                        columns.append(module(samples, species).reshape(-1))
            return torch.stack(columns, dim=1)

        phi_ours = responses(ours, [getattr(ours, f"weights_{d}") for d in range(1, product.correlation + 1)])
        phi_cue = responses(theirs, [theirs.weight])
        basis_change = torch.linalg.lstsq(phi_cue, phi_ours).solution
        _require_close(phi_cue @ basis_change, phi_ours, "cuEquivariance's product basis does not span ours: off")
        return basis_change

    def _check_against(self, product: SymmetricContraction, device: torch.device = torch.device("cpu")) -> None:
        """Raise ``ValueError`` unless this module equals ``product`` (moved to ``device``) on random inputs."""
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(16, product.irreps_in.dim, generator=generator, dtype=torch.float64).to(device)
        species = torch.randint(0, product.weights_1.shape[0], (16,), generator=generator).to(device)
        with torch.no_grad():
            expected, got = product.to(device)(x, species), self.to(device)(x, species)
        _require_close(got, expected, "cuEquivariance symmetric contraction differs from ours")

    def forward(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        return self.contraction(features, species)
