"""Radial basis and smooth cutoff envelope for interatomic distances (Å)."""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/r_c) sin(n π r / r_c) / r for n = 1..num_radial (DimeNet/NequIP)."""

    def __init__(self, cutoff: float, num_radial: int) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.prefactor = math.sqrt(2.0 / cutoff)
        self.register_buffer("frequencies", torch.arange(1, num_radial + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies.to(r.dtype) * r) / r


class PolynomialCutoff(nn.Module):
    """Envelope u(r) that goes to 0 at r_c with vanishing first and second derivatives."""

    def __init__(self, cutoff: float, power: int = 6) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.p = float(power)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p, x = self.p, r / self.cutoff
        envelope = (
            1.0
            - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(p)
            + p * (p + 2.0) * x.pow(p + 1.0)
            - p * (p + 1.0) / 2.0 * x.pow(p + 2.0)
        )
        return envelope * (x < 1.0)
