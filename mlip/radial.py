"""Radial basis and smooth cutoff envelope for interatomic distances (Å)."""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/r_c) sin(ω_n r) / r, ω_n initialised to n π / r_c (n = 1..num_radial) and trained (NequIP/MACE)."""

    def __init__(self, cutoff: float, num_radial: int) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.prefactor = math.sqrt(2.0 / cutoff)
        self.frequencies = nn.Parameter(torch.arange(1, num_radial + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies.to(r.dtype) * r) / r


class PolynomialCutoff(nn.Module):
    """Envelope u(r) that goes to 0 at r_c with vanishing first and second derivatives."""

    def __init__(self, cutoff: float, power: int = 6) -> None:
        super().__init__()
        self.cutoff = cutoff
        p = self.power = int(power)  # integer exponents keep the envelope traceable by torch.compile
        self.c0, self.c1, self.c2 = (p + 1) * (p + 2) / 2, p * (p + 2), p * (p + 1) / 2

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x, p = r / self.cutoff, self.power
        envelope = 1.0 - self.c0 * x.pow(p) + self.c1 * x.pow(p + 1) - self.c2 * x.pow(p + 2)
        return envelope * (x < 1.0)
