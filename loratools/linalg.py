"""Pure tensor math for low-rank work: rank policies, factor spectra, truncation errors. No files, no printing.

All functions take and return tensors; they compute in float32 unless given float64, whatever the input dtype.
"""

from __future__ import annotations

import math
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


def compute_dtype(precision: str = "fp32") -> torch.dtype:
    """torch dtype for a --precision name (fp32 or fp64)."""
    return {"fp32": torch.float32, "fp64": torch.float64}[precision]


def factor_svd(
    B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of scale · B · A from the factors, never forming the product.

    QR of B and of Aᵀ, then the SVD of the r×r core: O((rows + cols)·r²).

    Args:
        B: (rows, r); A: (r, cols) — flatten conv factors first (`LoraModule.factors`).
    Returns:
        U (rows, k), S (k,), Vh (k, cols) with k = min(r, rows, cols), so that scale·B·A = U·diag(S)·Vh.
    """
    b, a = B.to(dtype), A.to(dtype)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    core = (rb * scale) @ ra.T
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, (qa @ vhc.T).T


def factor_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(k,) singular values of scale · B · A (descending), from the factors as in `factor_svd`."""
    b, a = B.float(), A.float()
    rb = torch.linalg.qr(b, mode="r")[1]
    ra = torch.linalg.qr(a.T, mode="r")[1]
    return torch.linalg.svdvals((rb * scale) @ ra.T)


def relative_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """‖target − approx‖_F / ‖target‖_F in float64 (0 when both are zero, inf when only target is)."""
    t, a = target.double(), approx.double()
    norm = float(torch.linalg.vector_norm(t))
    diff = float(torch.linalg.vector_norm(t - a))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm
