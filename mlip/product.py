"""Many-body product basis: a species-weighted symmetric contraction of equivariant features.

For each channel u of an atom's aggregated features A_u (one copy of every irrep in ``irreps_in``),
the block forms all equivariant polynomials of degree 1..ν in A_u (MACE eqs. 10-12: the A-basis
products B = Σ U · A ⊗ ... ⊗ A) and mixes them with weights that depend on the atom's species.

The generalised Clebsch-Gordan tensors U are built here from e3nn's Wigner 3j symbols, then
symmetrised over the ν input slots and reduced to an orthonormal basis (Gram-Schmidt in a fixed
order, so the basis, and with it the meaning of trained weights, is the same on every machine), so
no weight multiplies a redundant or vanishing coupling path. Because A ⊗ ... ⊗ A is symmetric, the
contraction is evaluated on the distinct monomials A_i A_j A_k (i ≤ j ≤ k), each degree's from the previous
one's times one component, with one matrix product per degree (or, for few outputs, with the last
factor contracted densely so the highest degree's monomials are never formed), instead of MACE's
dense (2l+1)^ν einsums or cuequivariance's per-path fallback (7x slower on the CPU here).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from functools import lru_cache

import torch
from e3nn import o3
from torch import nn

from .constants import Float64Constants


def _couplings(ls: tuple[tuple[int, int], ...], degree: int) -> list[tuple[o3.Irrep, torch.Tensor]]:
    """All ways of coupling ``degree`` copies of the irreps ``ls`` (l, parity) to one irrep.

    Each entry is (irrep_out, C) with C of shape (2l_out+1, D, ..., D), D = Σ (2l+1): the tensor
    that maps x ⊗ ... ⊗ x (x in the direct sum of ``ls``) to one copy of irrep_out.
    """
    offsets = list(itertools.accumulate([2 * l + 1 for l, _ in ls], initial=0))
    dim = offsets[-1]
    if degree == 1:
        out = []
        for k, (l, p) in enumerate(ls):
            c = torch.zeros(2 * l + 1, dim, dtype=torch.float64)
            c[:, offsets[k] : offsets[k + 1]] = torch.eye(2 * l + 1, dtype=torch.float64)
            out.append((o3.Irrep(l, p), c))
        return out
    out = []
    for ir_left, c_left in _couplings(ls, degree - 1):
        for k, (l, p) in enumerate(ls):
            for ir_out in ir_left * o3.Irrep(l, p):
                w3j = o3.wigner_3j(ir_out.l, ir_left.l, l, dtype=torch.float64) * math.sqrt(ir_out.dim)
                # (out, left, right) x (left, D^(n-1)) -> (out, D^(n-1), right)
                coupled = torch.einsum("olr,l...->o...r", w3j, c_left)
                c = torch.zeros(*coupled.shape[:-1], dim, dtype=torch.float64)
                c[..., offsets[k] : offsets[k + 1]] = coupled
                out.append((ir_out, c))
    return out


def _monomials(dim: int, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tuples i1 <= ... <= iν over ``dim`` components, and how many ordered tuples each stands for."""
    combos = list(itertools.combinations_with_replacement(range(dim), degree))
    counts = [math.factorial(degree) / math.prod(map(math.factorial, Counter(t).values())) for t in combos]
    return torch.tensor(combos, dtype=torch.int64).reshape(-1, degree), torch.tensor(counts, dtype=torch.float64)


def _orthonormal_span(columns: torch.Tensor, tolerance: float = 1e-9) -> torch.Tensor:
    """Orthonormal basis of the columns' span by Gram-Schmidt in column order (twice, for stability).

    Unlike an SVD, which may rotate freely inside degenerate singular subspaces (it did, between one
    and two LAPACK threads), the result depends only on the columns: trained weights mean the same
    thing on every machine. Residuals below ``tolerance`` × the largest column norm are redundant
    (symmetrisation leaves some columns zero up to round-off: those must not be normalised up).
    """
    scale = columns.norm(dim=0).max().item() if columns.numel() else 0.0
    basis = columns.new_zeros(columns.shape[0], 0)
    for column in columns.T:
        residual = column - basis @ (basis.T @ column)
        residual = residual - basis @ (basis.T @ residual)
        norm = residual.norm()
        if norm > tolerance * scale:
            basis = torch.cat([basis, (residual / norm)[:, None]], dim=1)
    return basis


@lru_cache(maxsize=None)
def symmetric_basis(irreps_in: str, ir_out: str, degree: int) -> torch.Tensor:
    """Orthonormal basis of the equivariant degree-ν polynomials from one channel of ``irreps_in`` to ``ir_out``.

    Returns B of shape (num_monomials, 2l_out+1, K): output_m = Σ_P B[P, m, k] Π_{i in P} x_i for
    the k-th basis polynomial, P running over the monomials of ``_monomials``. K = 0 when none exist.
    Each basis tensor, written out over all ordered index tuples, has Frobenius norm sqrt(2l_out+1).
    """
    ls = tuple((ir.l, ir.p) for _, ir in o3.Irreps(irreps_in))
    target = o3.Irrep(ir_out)
    dim = sum(2 * l + 1 for l, _ in ls)
    raw = [c for ir, c in _couplings(ls, degree) if ir == target]
    index, counts = _monomials(dim, degree)
    if not raw:
        return torch.zeros(len(index), target.dim, 0, dtype=torch.float64)
    tensors = torch.stack(raw, dim=-1)  # (M, D, ..., D, K_raw)
    permutations = list(itertools.permutations(range(1, degree + 1)))
    symmetric = sum(tensors.permute(0, *p, degree + 1) for p in permutations) / len(permutations)
    flat = symmetric.reshape(-1, symmetric.shape[-1])  # (M * D^ν, K_raw)
    basis = _orthonormal_span(flat).reshape(*symmetric.shape[:-1], -1) * math.sqrt(target.dim)  # (M, D, ..., D, K)
    picked = basis[(slice(None), *index.T)]  # (M, P, K): one representative ordered tuple per monomial
    return (picked * counts[None, :, None]).permute(1, 0, 2).contiguous()


class SymmetricContraction(Float64Constants):
    """Per channel, Σ_ν Σ_k W_ν[species, k, u] B_ν,k(A_u): species-dependent products of A up to degree ν.

    ``irreps_in`` must be ``mul`` copies of each of its irreps (e3nn ``mul_ir`` layout, e.g.
    "64x0e+64x1o+64x2e"); ``irreps_out`` likewise with the same ``mul``.

    Two evaluation orders, the same function. With few outputs (scalars only, the last interaction)
    the last factor of every monomial is contracted densely: out_q = Σ_c x_c (Σ_a T[q, c, a] z_a) with
    z the monomials of degree < ν, so the ν-th degree's monomials are never formed. Otherwise, when
    that would take more rows than there are monomials of degree ν, the monomials are formed and
    projected (``contracts_last_factor`` says which).
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_species: int):
        super().__init__()
        muls = {mul for mul, _ in irreps_in} | {mul for mul, _ in irreps_out}
        if len(muls) != 1:
            raise ValueError(f"symmetric contraction needs one multiplicity throughout, got {irreps_in} -> {irreps_out}")
        if correlation < 1:
            raise ValueError(f"correlation order must be >= 1, got {correlation}")
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.channels, self.correlation = muls.pop(), correlation
        one_channel = str(o3.Irreps([(1, ir) for _, ir in self.irreps_in]))
        self.dims_in = [ir.dim for _, ir in self.irreps_in]
        self.dims_out = [ir.dim for _, ir in self.irreps_out]
        dim = sum(self.dims_in)
        degrees = range(1, correlation + 1)
        # bases[ν-1][o]: (monomials of degree ν, 2l_o+1, K) for output irrep o
        bases = [[symmetric_basis(one_channel, str(ir), degree) for _, ir in self.irreps_out] for degree in degrees]
        self.num_basis = [[b.shape[-1] for b in row] for row in bases]  # [degree][output irrep] -> K
        if all(sum(k) == 0 for k in self.num_basis):
            raise ValueError(f"no equivariant product maps {self.irreps_in} to {self.irreps_out}")
        for degree in degrees:
            total = sum(self.num_basis[degree - 1])
            self.register_parameter(
                f"weights_{degree}", nn.Parameter(torch.randn(num_species, total, self.channels) / math.sqrt(max(total, 1)))
            )
        # the weights of all degrees, ordered (output irrep, degree, k): one gather per call
        offsets = list(itertools.accumulate([sum(row) for row in self.num_basis], initial=0))
        order = [offsets[d] + sum(self.num_basis[d][:o]) + k
                 for o in range(len(self.dims_out)) for d in range(correlation) for k in range(self.num_basis[d][o])]
        self.register_buffer("weight_order", torch.tensor(order, dtype=torch.int64), persistent=False)
        self.basis_per_output = [sum(row[o] for row in self.num_basis) for o in range(len(self.dims_out))]

        rows = sum(m * k for m, k in zip(self.dims_out, self.basis_per_output))
        self.contracts_last_factor = rows * dim < len(_monomials(dim, correlation)[0])
        highest_formed = correlation - 1 if self.contracts_last_factor else correlation
        for degree in range(2, highest_formed + 1):
            # monomial i1..iν = (monomial i1..iν-1 of the previous degree) * x_iν: one product per degree
            index = _monomials(dim, degree)[0]
            previous = {tuple(t): k for k, t in enumerate(_monomials(dim, degree - 1)[0].tolist())}
            parents = torch.tensor([previous[tuple(t)] for t in index[:, :-1].tolist()], dtype=torch.int64)
            self.register_buffer(f"parents_{degree}", parents, persistent=False)
            self.register_buffer(f"lasts_{degree}", index[:, -1].contiguous(), persistent=False)
        if self.contracts_last_factor:
            self.register_constant("contraction", self._last_factor_contraction(bases, dim))
        else:
            for degree in degrees:  # (Σ_o M·K, P): one matrix product per degree serves every output irrep
                stacked = torch.cat([b.reshape(b.shape[0], -1) for b in bases[degree - 1]], dim=1).T.contiguous()
                self.register_constant(f"basis_{degree}", stacked)

    def _last_factor_contraction(self, bases: list[list[torch.Tensor]], dim: int) -> torch.Tensor:
        """T[(o, m, ν, k), c, a]: the basis with each monomial split into its last component c and the rest a.

        Columns a run over the constant 1 and the monomials of degrees 1..ν-1, in that order.
        """
        rest = {(): 0}
        for degree in range(1, self.correlation):
            for t in _monomials(dim, degree)[0].tolist():
                rest[tuple(t)] = len(rest)
        blocks = []
        for o, m_o in enumerate(self.dims_out):
            for m in range(m_o):
                for degree in range(1, self.correlation + 1):
                    basis = bases[degree - 1][o]  # (P, M, K)
                    block = torch.zeros(basis.shape[-1], dim, len(rest), dtype=torch.float64)
                    for p, t in enumerate(_monomials(dim, degree)[0].tolist()):
                        block[:, t[-1], rest[tuple(t[:-1])]] = basis[p, m]
                    blocks.append(block)
        return torch.cat(blocks).reshape(-1, len(rest))

    def _contract_last_factor(self, x: torch.Tensor, monomials: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per output irrep, one (M, K over all degrees, N·u) block: Σ_c x_c (T_c · [1, monomials of degree < ν])."""
        rest = torch.cat([x.new_ones(1, x.shape[1])] + monomials, dim=0)
        projected = ((self.contraction.to(x.dtype) @ rest).reshape(-1, len(x), x.shape[1]) * x).sum(1)
        sizes = [m * k for m, k in zip(self.dims_out, self.basis_per_output)]
        return [[block.reshape(m, k, -1)] for block, m, k in zip(projected.split(sizes), self.dims_out, self.basis_per_output)]

    def _project(self, monomials: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per output irrep, one (M, K, N·u) block per degree (none where K = 0): the basis times the monomials."""
        terms: list[list[torch.Tensor]] = [[] for _ in self.dims_out]
        for degree, monomial in enumerate(monomials, start=1):
            projected = getattr(self, f"basis_{degree}").to(monomial.dtype) @ monomial  # (Σ_o M·K, N·u)
            sizes = [m * k for m, k in zip(self.dims_out, self.num_basis[degree - 1])]
            for o, (block, m, k) in enumerate(zip(projected.split(sizes), self.dims_out, self.num_basis[degree - 1])):
                if k:
                    terms[o].append(block.reshape(m, k, -1))
        return terms

    def forward(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """(N, irreps_in.dim) features and (N,) species indices -> (N, irreps_out.dim)."""
        n, u = features.shape[0], self.channels
        # (D, N·u): each component of every channel as one contiguous row, irreps in order
        blocks = features.split([u * d for d in self.dims_in], dim=1)
        x = torch.cat([b.reshape(n, u, -1).permute(2, 0, 1) for b in blocks], dim=0).reshape(-1, n * u)
        weights = torch.cat([getattr(self, f"weights_{d}") for d in range(1, self.correlation + 1)], dim=1)
        # (Σ K, N, u), ordered (output irrep, degree, k)
        weights = weights.index_select(1, self.weight_order).transpose(0, 1).index_select(1, species)
        monomials = [x]
        for degree in range(2, self.correlation if self.contracts_last_factor else self.correlation + 1):
            parents, lasts = getattr(self, f"parents_{degree}"), getattr(self, f"lasts_{degree}")
            monomials.append(monomials[-1].index_select(0, parents) * x.index_select(0, lasts))
        terms = self._contract_last_factor(x, monomials) if self.contracts_last_factor else self._project(monomials)
        outputs, start = [], 0
        for m, blocks in zip(self.dims_out, terms):  # Σ over the basis (and degrees) with each atom's species weights
            out = None
            for block in blocks:  # (M, K, N·u)
                k = block.shape[1]
                term = (block.reshape(m, k, n, u) * weights[start : start + k]).sum(1)
                out, start = term if out is None else out + term, start + k
            outputs.append(features.new_zeros(m, n, u) if out is None else out)
        return torch.cat([out.permute(1, 2, 0).reshape(n, -1) for out in outputs], dim=1)
