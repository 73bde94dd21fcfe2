"""Numbers that summarise a singular-value spectrum S (descending), and the exact spectrum of a LoRA module.

All functions are pure: a (k,) tensor in, floats or a string out. ``total_energy`` is ‖ΔW‖²_F; it defaults
to Σ σ_i², which is exact when S is the whole spectrum (a LoRA module's, or `--exact`), and is passed in
when S holds only the leading values of a larger matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratools.adapter import LoraModule
from loratools.linalg import factor_spectrum

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


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


def sparkline(S: torch.Tensor, width: int = 16, decades: float = 3.0) -> str:
    """A block-character sketch of S on a log scale: σ_1 is a full block, σ_1·10^-decades and below the lowest.

    Spectra longer than `width` are resampled at evenly spaced indices (first and last kept).

    Example:
        >>> sparkline(torch.tensor([1.0, 0.1, 0.01, 0.001]))
        '█▆▃▁'
    """
    if len(S) == 0:
        return ""
    s = S.double()
    if len(s) > width:
        s = s[torch.linspace(0, len(s) - 1, width).round().long()]
    top = float(s[0])
    if top <= 0:
        return SPARK_BLOCKS[0] * len(s)
    level = ((s.clamp_min(top * 10**-decades) / top).log10() / decades + 1) * (len(SPARK_BLOCKS) - 1)
    return "".join(SPARK_BLOCKS[int(i)] for i in level.round().clamp(0, len(SPARK_BLOCKS) - 1))
