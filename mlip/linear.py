"""e3nn's equivariant linear layer, evaluated with one matrix product per path instead of its generated einsums."""

from __future__ import annotations

from typing import Iterable

import torch
from e3nn import o3


class Linear(o3.Linear):
    """``o3.Linear(irreps_in, irreps_out)``: the same instructions, weights, state dict and function.

    e3nn's generated code reshapes, permutes and copies every block around an einsum, dozens of small
    ops per call forward and backward; here a scalar block is one matrix product, a block of higher l
    one batched product with the block's (u, m) layout as it is, and the path normalisation multiplies the (small)
    weight block, not the activations.
    """

    def __init__(self, irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str):
        super().__init__(irreps_in, irreps_out, internal_weights=True, shared_weights=True, biases=False)
        in_slices, offset = self.irreps_in.slices(), 0
        self.paths = []  # (input start, mul_in, component dim, output index, weight offset, mul_out, path weight)
        for ins in self.instructions:
            mul_in, mul_out = ins.path_shape
            dim = self.irreps_in[ins.i_in].ir.dim
            self.paths.append((in_slices[ins.i_in].start, mul_in, dim, ins.i_out, offset, mul_out, ins.path_weight))
            offset += mul_in * mul_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, irreps_in.dim) -> (N, irreps_out.dim), e3nn's layout on both sides."""
        outputs = []
        for start, mul_in, dim, i_out, offset, mul_out, path_weight in self.paths:
            weight = self.weight[offset : offset + mul_in * mul_out].view(mul_in, mul_out) * path_weight
            outputs.append((i_out, _map_block(features, start, mul_in, dim, weight)))
        return _by_output(outputs, self.irreps_out, features)


class SpeciesLinear(o3.FullyConnectedTensorProduct):
    """A linear map whose weights depend on the atom's species: e3nn's ``FullyConnectedTensorProduct(irreps_in,
    "S x 0e", irreps_out)`` applied to the one-hot species, with the same weights and state dict.

    Called with species indices instead of one-hot vectors: every block is mapped for all S species in
    one matrix product and each atom's own species picked out, instead of e3nn's per-path code.
    """

    def __init__(self, irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str, num_species: int):
        super().__init__(irreps_in, o3.Irreps(f"{num_species}x0e"), irreps_out)
        in_slices, offset = self.irreps_in1.slices(), 0
        self.num_species = num_species
        self.paths = []  # (input start, mul_in, component dim, output index, weight offset, mul_out, scale)
        for ins in self.instructions:
            mul_in, _, mul_out = ins.path_shape
            ir = self.irreps_in1[ins.i_in1].ir
            scale = ins.path_weight * o3.wigner_3j(ir.l, 0, ir.l, dtype=torch.float64)[0, 0, 0].item()  # l x 0e -> l
            self.paths.append((in_slices[ins.i_in1].start, mul_in, ir.dim, ins.i_out, offset, mul_out, scale))
            offset += mul_in * num_species * mul_out

    def forward(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """(N, irreps_in.dim) features, (N,) species indices -> (N, irreps_out.dim)."""
        n, s = features.shape[0], self.num_species
        outputs = []
        for start, mul_in, dim, i_out, offset, mul_out, scale in self.paths:
            weight = self.weight[offset : offset + mul_in * s * mul_out].view(mul_in, s * mul_out) * scale
            every_species = _map_block(features, start, mul_in, dim, weight).view(n, s, mul_out * dim)  # (N, S, w·m)
            own = every_species.gather(1, species.view(n, 1, 1).expand(n, 1, mul_out * dim)).view(n, mul_out * dim)
            outputs.append((i_out, own))
        return _by_output(outputs, self.irreps_out, features)


def _map_block(features: torch.Tensor, start: int, mul_in: int, dim: int, weight: torch.Tensor) -> torch.Tensor:
    """The (u, m) block of ``features`` at ``start`` times ``weight`` (u, w): (N, w·m), e3nn's layout.

    A scalar block is one matrix product; otherwise Wᵀ (w, u) @ (N, u, m) -> (N, w, m) without copies
    (transposing the block instead was 3-5x slower).
    """
    block = features.narrow(1, start, mul_in * dim)
    if dim == 1:
        return block @ weight
    return (weight.T @ block.reshape(features.shape[0], mul_in, dim)).reshape(features.shape[0], -1)


def _by_output(outputs: Iterable[tuple[int, torch.Tensor]], irreps_out: o3.Irreps, features: torch.Tensor) -> torch.Tensor:
    """Paths' (output index, (N, dim)) results summed per output irrep (zeros where none reaches it), concatenated."""
    sums: list[torch.Tensor | None] = [None] * len(irreps_out)
    for i_out, out in outputs:
        sums[i_out] = out if sums[i_out] is None else sums[i_out] + out
    blocks = [features.new_zeros(features.shape[0], mul_ir.dim) if out is None else out for out, mul_ir in zip(sums, irreps_out)]
    return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
