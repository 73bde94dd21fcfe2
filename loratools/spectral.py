"""Numbers that summarise a singular-value spectrum S (descending), and the exact spectrum of a LoRA module.

All functions are pure: a (k,) tensor in, floats out. ``total_energy`` is ‖ΔW‖²_F; it defaults
to Σ σ_i², which is exact when S is the whole spectrum (a LoRA module's, or `--exact`), and is passed in
when S holds only the leading values of a larger matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratools.adapter import LoraModule
from loratools.linalg import factor_spectrum


def module_singular_values(module: LoraModule) -> torch.Tensor:
    """The exact singular values of a module's ΔW = scale · B · A, from the factors (`factor_spectrum`).

    ΔW is taken as its 2-D LoRA matrix ((out, in·kh·kw) for conv2d; transposition does not change singular
    values); it is never formed.

    Returns:
        (k,) float32, descending, k = min(r, out, in).
    Example:
        >>> module_singular_values(LoraModule("m", torch.eye(2, 5), torch.eye(3, 2), alpha=2.0))
        tensor([1., 1.])
    """
    return factor_spectrum(*module.factors(torch.float64), module.scale)


def _energy(S: torch.Tensor, total_energy: float | None) -> float:
    return float((S.double() ** 2).sum()) if total_energy is None else float(total_energy)


def effective_rank(S: torch.Tensor) -> float:
    """exp of the Shannon entropy of p_i = σ_i / Σ_j σ_j (Roy & Vetterli, 2007); 0 for an all-zero spectrum.

    Normalised by the sum of singular values, not of their squares: it ranges from 1 (one direction) to k
    (a flat spectrum of k values). Args: S (k,).
    """
    s = S.double().clamp_min(0)
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(S: torch.Tensor, total_energy: float | None = None) -> float:
    """‖ΔW‖²_F / σ_1² (0 for an all-zero spectrum). Args: S (k,) descending."""
    if len(S) == 0 or float(S[0]) == 0:
        return 0.0
    return _energy(S, total_energy) / float(S[0]) ** 2


def top_energy_fraction(S: torch.Tensor, k: int, total_energy: float | None = None) -> float:
    """Σ_{i<k} σ_i² / ‖ΔW‖²_F: the share of energy in the top k singular values. Args: S (n,) descending."""
    total = _energy(S, total_energy)
    if total == 0:
        return 0.0
    return float((S[:k].double() ** 2).sum()) / total


@dataclass(frozen=True)
class SpectrumStats:
    """Summary of one spectrum: ‖ΔW‖_F, σ_1, effective rank, stable rank, energy in the top quarter of the rank."""

    norm: float
    sigma1: float
    effective_rank: float
    stable_rank: float
    top_quarter_energy: float


def spectrum_stats(S: torch.Tensor, rank: int, total_energy: float | None = None) -> SpectrumStats:
    """All SpectrumStats of S (k,) descending; the top quarter is the first ceil(rank / 4) values."""
    energy = _energy(S, total_energy)
    return SpectrumStats(
        norm=math.sqrt(energy),
        sigma1=float(S[0]) if len(S) else 0.0,
        effective_rank=effective_rank(S),
        stable_rank=stable_rank(S, energy),
        top_quarter_energy=top_energy_fraction(S, max(1, math.ceil(rank / 4)), energy),
    )
