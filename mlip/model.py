"""E(3)-equivariant many-body message-passing potential with implicit steerable kernels.

Each interaction (MACE-style, Batatia et al. 2022) does three things:
1. two-body messages: neighbour features ⊗ spherical harmonics Y(r̂_ij) through a channel-wise (uvu)
   tensor product whose path weights come per edge from an MLP - the implicit kernel (Zhdanov,
   Hoffmann & Cesa) - conditioned on the distance and on the sender and receiver species, and damped
   by a smooth envelope so energies and forces vanish at r_c;
2. aggregation over neighbours into the atomic basis A_i (irreps up to ``sh_l_max``);
3. a species-weighted symmetric contraction of A_i with itself up to ``correlation`` ν
   (``mlip.product``), giving (ν+1)-body features, plus a species-dependent self-connection.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from .config import ModelConfig
from .linear import Linear, SpeciesLinear
from .mlp import FullyConnectedNet
from .product import SymmetricContraction
from .radial import BesselBasis, PolynomialCutoff
from .tensor_product import ChannelWiseTensorProduct


def channel_irreps(channels: int, l_max: int, parity: bool) -> o3.Irreps:
    """``channels`` copies of each l <= l_max, natural parity (both parities if ``parity``)."""
    irreps = []
    for l in range(l_max + 1):
        natural = (-1) ** l
        irreps += [(channels, (l, p)) for p in ((natural, -natural) if parity else (natural,))]
    return o3.Irreps(irreps)


class Interaction(nn.Module):
    """Implicit-kernel convolution -> atomic basis A -> symmetric contraction (+ species self-connection).

    Every map is bias-free and the product has no constant term, so an atom without neighbours keeps
    zero features when the interaction has no self-connection (the first one).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        config: ModelConfig,
        self_connection: bool,
    ):
        super().__init__()
        num_species = len(config.species)
        self.irreps_in, self.irreps_out = irreps_in, irreps_out
        irreps_a = channel_irreps(config.num_channels, config.sh_l_max, config.parity)
        self.linear_up = Linear(irreps_in, irreps_in)
        self.tensor_product = ChannelWiseTensorProduct(irreps_in, irreps_sh, [ir for _, ir in irreps_a])
        kernel_in = config.num_radial + 2 * config.species_embed_dim
        widths = [kernel_in] + [config.kernel_hidden] * config.kernel_layers + [self.tensor_product.weight_numel]
        self.kernel = FullyConnectedNet(widths, torch.nn.functional.silu)
        self.linear_message = Linear(self.tensor_product.irreps_out.simplify(), irreps_a)
        self.product = SymmetricContraction(irreps_a, irreps_out, config.correlation, num_species)
        self.linear_out = Linear(irreps_out, irreps_out)
        self.self_connection = SpeciesLinear(irreps_in, irreps_out, num_species) if self_connection else None
        self.inv_avg_num_neighbors = 1.0 / config.avg_num_neighbors

    def forward(
        self,
        features: torch.Tensor,
        species: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_attr: torch.Tensor,
        edge_envelope: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        receiver, sender = edge_index
        weights = self.kernel(edge_attr) * edge_envelope.unsqueeze(-1)
        tp = self.tensor_product
        messages = tp.messages(tp.component_major(self.linear_up(features))[sender], edge_sh, weights)
        aggregated = torch.zeros(
            features.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device
        ).index_add(0, receiver, messages)
        atomic_basis = self.linear_message(tp.to_e3nn_layout(aggregated) * self.inv_avg_num_neighbors)
        out = self.linear_out(self.product(atomic_basis, species))
        if self.self_connection is not None:
            out = out + self.self_connection(features, species)
        return out


class MLIPModel(nn.Module):
    """Per-atom energies (eV, float64) from species and edge vectors; forces/stress come from autograd.

    E_i = E0[z_i] + scale * (sum of layer readouts) + shift. The first interaction has no
    self-connection, so an atom without neighbours has E_i = E0 + shift exactly.

    It is built in float64 whatever torch's default dtype, because e3nn stores its Clebsch-Gordan
    constants in the construction dtype: a float32 build would break equivariance at 1e-9 in float64.
    """

    def __init__(self, config: ModelConfig):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            self._build(config)
        finally:
            torch.set_default_dtype(previous)

    def _build(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        num_species = len(config.species)
        hidden = channel_irreps(config.num_channels, config.l_max, config.parity)
        scalars = o3.Irreps(f"{config.num_channels}x0e")
        irreps_sh = o3.Irreps.spherical_harmonics(config.sh_l_max)
        self.spherical_harmonics = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        self.radial_basis = BesselBasis(config.cutoff, config.num_radial)
        self.envelope = PolynomialCutoff(config.cutoff, config.cutoff_power)
        self.node_embedding = nn.Embedding(num_species, config.num_channels)
        self.kernel_embedding = nn.Embedding(num_species, config.species_embed_dim)

        # the last interaction outputs scalars: its product basis turns A's l > 0 parts into invariants
        irreps = [scalars] + [hidden] * (config.num_layers - 1) + [scalars]
        self.interactions = nn.ModuleList(
            Interaction(irreps[k], irreps[k + 1], irreps_sh, config, self_connection=k > 0)
            for k in range(config.num_layers)
        )
        self.readouts = nn.ModuleList(Linear(irreps[k + 1], "1x0e") for k in range(config.num_layers - 1))
        self.final_readout = FullyConnectedNet(
            [config.num_channels, config.readout_hidden, 1], torch.nn.functional.silu
        )
        # E0s stay float64 whatever the model dtype, so totals of ~1e4 eV keep sub-meV precision in float32
        self._e0_master = torch.tensor([config.e0s.get(z, 0.0) for z in config.species], dtype=torch.float64)
        self.register_buffer("e0_table", self._e0_master.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._buffers["e0_table"] = self._e0_master.to(fn(self._e0_master).device)
        return self

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
            features = interaction(features, species, edge_sh, edge_attr, edge_envelope, edge_index)
            if k < len(self.readouts):
                outputs.append(self.readouts[k](features))
        outputs.append(self.final_readout(features))
        atomic = torch.stack(outputs, dim=0).sum(dim=0).squeeze(-1)
        interaction = self.config.scale * atomic + self.config.shift
        return interaction.to(torch.float64) + self.e0_table[species]
