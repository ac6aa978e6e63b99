"""E(3)-equivariant message-passing potential with implicit steerable kernels.

Each interaction convolves neighbour features with spherical harmonics Y(r̂_ij) through a
channel-wise (uvu) tensor product. The weights of every tensor-product path are produced per
edge by an MLP - the implicit kernel (Zhdanov, Hoffmann & Cesa, "Implicit Convolutional Kernels
for Steerable CNNs") - conditioned on the distance *and* on edge attributes (sender and
receiver species), and damped by a smooth envelope so energies and forces vanish at r_c.
"""

from __future__ import annotations

import math

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

from .config import ModelConfig
from .radial import BesselBasis, PolynomialCutoff


def hidden_irreps(config: ModelConfig) -> o3.Irreps:
    """Hidden feature irreps: num_channels copies of each l <= l_max (both parities if parity)."""
    irreps = []
    for l in range(config.l_max + 1):
        natural = (-1) ** l
        parities = (natural, -natural) if config.parity else (natural,)
        irreps += [(config.num_channels, (l, p)) for p in parities]
    return o3.Irreps(irreps)


def _gate(irreps_target: o3.Irreps) -> e3nn_nn.Gate:
    """Gate nonlinearity: SiLU/tanh on scalars, sigmoid-gated tensors of order l > 0."""
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir.l > 0])
    acts = [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
    gates = o3.Irreps([(gated.num_irreps, "0e")]) if gated.num_irreps else o3.Irreps("")
    return e3nn_nn.Gate(scalars, acts, gates, [torch.sigmoid] * len(gates), gated)


ScalarPath = tuple[slice, int, int, slice, int, float]


def scalar_paths(tp: o3.TensorProduct) -> list[ScalarPath] | None:
    """For a uvu product whose outputs are all scalars: per output (input slice, mul, 2l+1, Y slice,
    weight offset, constant); None otherwise. Each such path is a channel-wise dot product x_u · Y."""
    if any(ir.l != 0 for _, ir in tp.irreps_out):
        return None
    in1, in2 = tp.irreps_in1.slices(), tp.irreps_in2.slices()
    paths, offset = {}, 0
    for ins in tp.instructions:  # e3nn lays the per-edge weights out in instruction order
        mul, ir = tp.irreps_in1[ins.i_in1]
        paths[ins.i_out] = (in1[ins.i_in1], mul, ir.dim, in2[ins.i_in2], offset, ins.path_weight / math.sqrt(ir.dim))
        offset += mul
    return [paths[k] for k in range(len(tp.irreps_out))]


def scalar_messages(
    paths: list[ScalarPath], features: torch.Tensor, sender: torch.Tensor, edge_sh: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The e3nn tensor product for ``scalar_paths``, gathering each irrep separately so that no
    (edges × all irreps) tensor is built, sliced and zero-filled in the backward pass (~2x on large cells)."""
    out = []
    for in1, mul, dim, in2, offset, constant in paths:
        x = features[:, in1].reshape(-1, mul, dim)[sender]  # (E, mul, 2l+1)
        dot = torch.bmm(x, edge_sh[:, in2].unsqueeze(-1)).squeeze(-1)  # (E, mul)
        out.append(dot * (constant * weights[:, offset : offset + mul]))
    return torch.cat(out, dim=1)


class Interaction(nn.Module):
    """One equivariant convolution + gate, with self-connection and residual where requested.

    Every map is bias-free and every activation has f(0) = 0, so an atom whose neighbourhood is
    empty keeps zero features when the first interaction has no self-connection.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        config: ModelConfig,
        self_connection: bool = True,
    ):
        super().__init__()
        self.irreps_in, self.irreps_out = irreps_in, irreps_out
        self.gate = _gate(irreps_out)
        wanted = {ir for _, ir in self.gate.irreps_in}

        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in wanted:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid, permutation, _ = o3.Irreps(mid).sort()
        instructions = [(i, j, permutation[k], mode, w) for i, j, k, mode, w in instructions]

        self.linear_up = o3.Linear(irreps_in, irreps_in)
        self.tensor_product = o3.TensorProduct(
            irreps_in, irreps_sh, irreps_mid, instructions, shared_weights=False, internal_weights=False
        )
        kernel_in = config.num_radial + 2 * config.species_embed_dim
        widths = [kernel_in] + [config.kernel_hidden] * config.kernel_layers + [self.tensor_product.weight_numel]
        self.kernel = e3nn_nn.FullyConnectedNet(widths, torch.nn.functional.silu)
        self.linear_down = o3.Linear(irreps_mid.simplify(), self.gate.irreps_in)
        self.self_connection = o3.Linear(irreps_in, self.gate.irreps_in) if self_connection else None
        self.inv_avg_num_neighbors = 1.0 / config.avg_num_neighbors
        self.residual = self_connection and irreps_in == irreps_out
        self.scalar_paths = scalar_paths(self.tensor_product)  # the last interaction: scalar outputs only

    def forward(
        self,
        features: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_attr: torch.Tensor,
        edge_envelope: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        receiver, sender = edge_index
        weights = self.kernel(edge_attr) * edge_envelope.unsqueeze(-1)
        if self.scalar_paths is not None:
            messages = scalar_messages(self.scalar_paths, self.linear_up(features), sender, edge_sh, weights)
        else:
            messages = self.tensor_product(self.linear_up(features)[sender], edge_sh, weights)
        aggregated = torch.zeros(
            features.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device
        ).index_add(0, receiver, messages)
        update = self.linear_down(aggregated * self.inv_avg_num_neighbors)
        if self.self_connection is not None:
            update = update + self.self_connection(features)
        out = self.gate(update)
        return out + features if self.residual else out


class MLIPModel(nn.Module):
    """Per-atom energies (eV, float64) from species and edge vectors; forces/stress come from autograd.

    E_i = E0[z_i] + scale * (sum of layer readouts) + shift. The first interaction sees the centre
    species only through the implicit kernel, so an atom without neighbours has E_i = E0 + shift.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        num_species = len(config.species)
        hidden = hidden_irreps(config)
        irreps_sh = o3.Irreps.spherical_harmonics(config.l_max)
        self.spherical_harmonics = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        self.radial_basis = BesselBasis(config.cutoff, config.num_radial)
        self.envelope = PolynomialCutoff(config.cutoff, config.cutoff_power)
        self.node_embedding = nn.Embedding(num_species, config.num_channels)
        self.kernel_embedding = nn.Embedding(num_species, config.species_embed_dim)

        irreps = [o3.Irreps(f"{config.num_channels}x0e")] + [hidden] * config.num_layers
        irreps[-1] = o3.Irreps(f"{config.num_channels}x0e")  # only scalars feed the final readout
        self.interactions = nn.ModuleList(
            Interaction(irreps[k], irreps[k + 1], irreps_sh, config, self_connection=k > 0)
            for k in range(config.num_layers)
        )
        self.readouts = nn.ModuleList(o3.Linear(irreps[k + 1], "1x0e") for k in range(config.num_layers - 1))
        self.final_readout = e3nn_nn.FullyConnectedNet(
            [config.num_channels, config.readout_hidden, 1], torch.nn.functional.silu
        )
        # E0s stay float64 (outside the state dict) so totals of ~1e4 eV keep meV precision in float32 mode
        self.e0_table = torch.tensor([config.e0s.get(z, 0.0) for z in config.species], dtype=torch.float64)

    def forward(self, species: torch.Tensor, edge_vectors: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Energy of each atom in eV; ``species`` indexes ``config.species``; edges are (receiver, sender)."""
        lengths = torch.linalg.vector_norm(edge_vectors, dim=-1)
        edge_sh = self.spherical_harmonics(edge_vectors)
        receiver, sender = edge_index
        embed = self.kernel_embedding(species)
        edge_attr = torch.cat([self.radial_basis(lengths), embed[sender], embed[receiver]], dim=-1)
        edge_envelope = self.envelope(lengths)

        features = self.node_embedding(species)
        outputs = []
        for k, interaction in enumerate(self.interactions):
            features = interaction(features, edge_sh, edge_attr, edge_envelope, edge_index)
            if k < len(self.readouts):
                outputs.append(self.readouts[k](features))
        outputs.append(self.final_readout(features))
        atomic = torch.stack(outputs, dim=0).sum(dim=0).squeeze(-1)
        interaction = self.config.scale * atomic + self.config.shift
        return interaction.to(torch.float64) + self.e0_table.to(species.device)[species]
