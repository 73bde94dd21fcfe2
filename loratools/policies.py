"""Rank policies: how many singular values a truncation keeps, and what each truncation costs. Pure functions.

A `RankPolicy` is chosen by the user (``--rank``, ``--energy``, ``--max-error``, ``--sv-ratio``,
``--threshold``, capped by ``--max-rank``); `choose_rank` applies it to a descending spectrum and
`truncation_errors` gives the Eckart–Young error of every truncation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratools.errors import LoratoolsError

POLICIES = ("rank", "energy", "max_error", "sv_ratio", "threshold")


@dataclass(frozen=True)
class RankPolicy:
    """How many singular values to keep.

    kind:
        ``rank``       keep `value` (clamped to the layer's min(out, in));
        ``energy``     smallest k with Σ_{i<k} σ_i² ≥ value · ‖ΔW‖²_F;
        ``max_error``  smallest k with ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F ≤ value;
        ``sv_ratio``   keep σ_i ≥ σ_1 / value (kohya's resize);
        ``threshold``  keep σ_i > value (mergekit's sv-epsilon).
    Dynamic kinds (all but ``rank``) are capped at `max_rank`.
    """

    kind: str = "rank"
    value: float = 16
    max_rank: int = 128

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise LoratoolsError(f"unknown rank policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        limits = {
            "rank": self.value >= 1 and float(self.value).is_integer(),
            "energy": 0 < self.value <= 1,
            "max_error": 0 <= self.value < 1,
            "sv_ratio": self.value >= 1,
            "threshold": self.value >= 0,
        }
        if not limits[self.kind]:
            wants = {
                "rank": "a whole number ≥ 1",
                "energy": "a fraction in (0, 1]",
                "max_error": "a fraction in [0, 1)",
                "sv_ratio": "a ratio ≥ 1",
                "threshold": "a value ≥ 0",
            }[self.kind]
            raise LoratoolsError(f"--{self.kind.replace('_', '-')} {self.value} is out of range; it must be {wants}")
        if self.max_rank < 1:
            raise LoratoolsError(f"--max-rank {self.max_rank} must be ≥ 1")

    @property
    def dynamic(self) -> bool:
        return self.kind != "rank"

    def describe(self) -> str:
        """The policy as its option reads, e.g. ``rank 16`` or ``energy 0.9 (max rank 128)``."""
        value = int(self.value) if float(self.value).is_integer() else self.value
        text = f"{self.kind.replace('_', '-')} {value}"
        return text + (f" (max rank {self.max_rank})" if self.dynamic else "")


def choose_rank(S: torch.Tensor, policy: RankPolicy, total_energy: float | None = None) -> int | None:
    """The rank `policy` asks for, given the leading singular values S (descending).

    Args:
        S: (k,) the top-k singular values; all of them when k = min(out, in).
        total_energy: ‖ΔW‖²_F; defaults to Σ S² (S complete).
    Returns:
        The rank (0 for an all-zero delta), or None when S is too short to decide: the policy needs
        singular values beyond S and the cap `max_rank` is above len(S). Callers sketching more then retry.
    """
    s = S.double()
    total = float((s * s).sum()) if total_energy is None else float(total_energy)
    if policy.kind == "rank":
        return min(int(policy.value), len(s))
    if total <= 0 or len(s) == 0 or float(s[0]) == 0:
        return 0
    kept = torch.cumsum(s * s, 0)
    if policy.kind == "energy":
        met = kept >= policy.value * total * (1 - 1e-12)
    elif policy.kind == "max_error":
        met = (total - kept).clamp_min(0) <= (policy.value**2) * total * (1 + 1e-12)
    elif policy.kind == "sv_ratio":
        met = s < s[0] / policy.value
    else:
        met = s <= policy.value
    hits = torch.nonzero(met)
    if policy.kind in ("energy", "max_error"):
        rank = int(hits[0]) + 1 if len(hits) else None
    else:  # count of values that pass: the index of the first that fails
        rank = int(hits[0]) if len(hits) else None
    if rank is None:
        return policy.max_rank if len(s) >= policy.max_rank else None
    return min(rank, policy.max_rank)


def truncation_errors(S: torch.Tensor, total_energy: float | None = None) -> torch.Tensor:
    """Relative Frobenius error of the best rank-k approximation for k = 0 … len(S) (Eckart–Young).

    Args:
        S: (k,) leading singular values, descending.
        total_energy: ‖ΔW‖²_F (default Σ S²).
    Returns:
        (k + 1,) float64: sqrt(max(0, total − Σ_{i<k} σ_i²) / total); zeros for an all-zero delta.
    """
    s = S.double()
    total = float((s * s).sum()) if total_energy is None else float(total_energy)
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s * s, 0)])
    if total <= 0:
        return torch.zeros_like(kept)
    return ((total - kept).clamp_min(0) / total).sqrt()
