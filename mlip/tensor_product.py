"""Channel-wise (uvu) tensor product of node features with edge spherical harmonics, as one dense contraction.

e3nn's ``TensorProduct`` runs every path as its own block of code, dozens of small tensor ops per
call forward and backward, which dominate the latency of small molecules. Here every path's
Clebsch-Gordan block (scaled by e3nn's path weight) is written into one dense tensor C[j, k, i]
(j: harmonic component, i: component of one feature channel, k: output component of any path):

    Z[e, k, i] = Σ_j Y[e, j] C[j, k, i]                    one matrix product
    M[e, k, u] = Σ_i Z[e, k, i] x[e, i, u] · w[e, path(k), u]   one batched matrix product, one multiply

Features are taken component-major (i, u), so the per-path weights, stored (path, u) by e3nn, are
gathered onto their components without a transpose, and with scalar inputs (one component, the first
interaction) the batched product is a broadcast multiply. M stays in this (k, u) layout while it is
summed over edges; only the per-atom sums are gathered into e3nn's layout. The module subclasses
e3nn's, so its instructions, weight layout, output layout and state dict are e3nn's and trained
checkpoints load unchanged.
"""

from __future__ import annotations

import functools

import torch
from e3nn import o3

from .constants import Float64Constants


class ChannelWiseTensorProduct(Float64Constants, o3.TensorProduct):
    """e3nn ``TensorProduct`` with channel-wise ("uvu") paths and per-edge weights, evaluated as a dense contraction.

    ``irreps_in1`` must hold the same multiplicity of every irrep (``mul_ir`` layout, one channel u
    per copy) and ``irreps_in2`` one copy of each (the spherical harmonics).
    """

    def __init__(self, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, targets: list[o3.Irrep]):
        """Every path from ``irreps_in1`` x ``irreps_in2`` to an irrep in ``targets``, one output block each (sorted)."""
        irreps_in1, irreps_in2 = o3.Irreps(irreps_in1), o3.Irreps(irreps_in2)
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in1):
            for j, (_, ir_sh) in enumerate(irreps_in2):
                for ir_out in ir_in * ir_sh:
                    if ir_out in targets:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_out, permutation, _ = o3.Irreps(mid).sort()
        instructions = [(i, j, permutation[k], mode, w) for i, j, k, mode, w in instructions]
        super().__init__(irreps_in1, irreps_in2, irreps_out, instructions, shared_weights=False, internal_weights=False)
        muls = {mul for mul, _ in self.irreps_in1}
        if len(muls) != 1 or any(mul != 1 for mul, _ in self.irreps_in2):
            raise ValueError(f"channel-wise product needs one multiplicity in {self.irreps_in1} and 1 in {self.irreps_in2}")
        channels = self.channels = muls.pop()
        dims1, dims2 = [ir.dim for _, ir in self.irreps_in1], [ir.dim for _, ir in self.irreps_in2]
        start1 = [sum(dims1[:k]) for k in range(len(dims1))]  # offset of irrep k within one channel
        start2 = [sum(dims2[:k]) for k in range(len(dims2))]
        out_slices = self.irreps_out.slices()

        self.num_k = sum(ir.dim for _, ir in self.irreps_out)  # output components of one channel
        dense = torch.zeros(sum(dims2), self.num_k, sum(dims1), dtype=torch.float64)  # (j, k, i)
        path_of_k = torch.empty(self.num_k, dtype=torch.int64)  # the path (weight block) of each output component
        to_e3nn = torch.empty(self.irreps_out.dim, dtype=torch.int64)  # e3nn output slot <- flat (k, u)
        k0 = 0
        for p, ins in enumerate(self.instructions):
            l1, l2 = self.irreps_in1[ins.i_in1].ir.l, self.irreps_in2[ins.i_in2].ir.l
            l_out = self.irreps_out[ins.i_out].ir.l
            dim_out = 2 * l_out + 1
            w3j = o3.wigner_3j(l1, l2, l_out, dtype=torch.float64) * ins.path_weight  # (i, j, m)
            i0, j0 = start1[ins.i_in1], start2[ins.i_in2]
            dense[j0 : j0 + 2 * l2 + 1, k0 : k0 + dim_out, i0 : i0 + 2 * l1 + 1] = w3j.permute(1, 2, 0)
            path_of_k[k0 : k0 + dim_out] = p
            u, m = torch.arange(channels).repeat_interleave(dim_out), torch.arange(dim_out).repeat(channels)
            to_e3nn[out_slices[ins.i_out]] = (k0 + m) * channels + u  # e3nn's block of a path is (u, m), u-major
            k0 += dim_out
        self.register_constant("dense", dense.reshape(sum(dims2), -1))
        self.register_buffer("path_of_k", path_of_k, persistent=False)
        self.register_buffer("to_e3nn", to_e3nn, persistent=False)
        self.feature_dims = dims1  # components of each input irrep in one channel

    def component_major(self, x: torch.Tensor) -> torch.Tensor:
        """(N, irreps_in1.dim) in e3nn's layout -> (N, i, u): each component of every channel together."""
        n, u = x.shape[0], self.channels  # not len(x): a symbolic trace keeps the atom count free
        if len(self.feature_dims) == 1:
            return x.reshape(n, u, self.feature_dims[0]).transpose(1, 2)
        blocks = x.split([u * d for d in self.feature_dims], dim=1)
        return torch.cat([b.reshape(n, u, d).transpose(1, 2) for b, d in zip(blocks, self.feature_dims)], dim=1)

    def messages(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(E, i, u) component-major features, (E, irreps_in2.dim) harmonics, (E, weight_numel) weights -> (E, k·u).

        The result is in this module's own layout; sum it over edges first, then ``to_e3nn_layout``
        (a column gather, cheaper on atoms than on edges).
        """
        edges, components = x.shape[0], x.shape[1]
        coupled = (y @ self.dense).reshape(edges, self.num_k, components)  # (E, k, i)
        # one component per channel (scalar features): the batched product is an outer product
        products = coupled * x if components == 1 else torch.bmm(coupled, x)  # (E, k, u)
        path_weights = weight.reshape(edges, len(self.instructions), self.channels).index_select(1, self.path_of_k)
        return (products * path_weights).reshape(edges, self.num_k * self.channels)

    def to_e3nn_layout(self, messages: torch.Tensor) -> torch.Tensor:
        """(..., k·u) from ``messages`` -> (..., irreps_out.dim) in e3nn's layout."""
        return messages.index_select(-1, self.to_e3nn)

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """e3nn's ``TensorProduct.forward``: (E, irreps_in1.dim), (E, irreps_in2.dim), (E, weight_numel) -> (E, irreps_out.dim)."""
        if weight is None or x.shape[-1] != self.irreps_in1.dim or y.shape[-1] != self.irreps_in2.dim:
            raise ValueError("channel-wise product needs (E, irreps_in1.dim), (E, irreps_in2.dim) and per-edge weights")
        return self.to_e3nn_layout(self.messages(self.component_major(x), y, weight))


def use_e3nn_pathwise(model: torch.nn.Module) -> torch.nn.Module:
    """Evaluate every channel-wise product in ``model`` with e3nn's own per-path code (same weights).

    The reference the dense contraction is tested and benchmarked against.
    """
    for module in model.modules():
        if isinstance(module, ChannelWiseTensorProduct):
            module.component_major = module.to_e3nn_layout = _unchanged
            module.messages = functools.partial(o3.TensorProduct.forward, module)
    return model


def _unchanged(features: torch.Tensor) -> torch.Tensor:
    return features
