"""Rank policies: how many singular values a truncation keeps, and what each truncation costs. Pure functions.

A `RankPolicy` is chosen by the user (``--rank``, ``--energy``, ``--max-error``, ``--sv-ratio``,
``--threshold``, capped by ``--max-rank``); `choose_rank` applies it to a descending spectrum and
`truncation_errors` gives the Eckart–Young error of every truncation of it.
"""

from __future__ import annotations

import torch

from loratools.options import RankPolicy


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
