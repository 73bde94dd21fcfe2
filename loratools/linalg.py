"""Dense and factored matrix math: Frobenius energies accumulated in float64, residuals, relative errors, and
the exact SVD / spectrum of a product B·A from its factors. Tensors in, tensors or floats out; no files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

CHUNK_ELEMENTS = 1 << 24  # residuals are formed over blocks of rows of about this many entries (64 MB in fp32)
NORM_BLOCK_ELEMENTS = 1 << 20  # float64 norms are taken over blocks of rows of about this many entries (8 MB)


def frobenius_energy(M: torch.Tensor) -> float:
    """‖M‖²_F, accumulated in float64.

    One float32 norm over a whole large matrix is not good enough: torch's float32 norm of a 11008×4096 matrix
    is off by ~0.7%, which would misreport every error and energy derived from it. Each row's norm is taken in
    float32 (a few thousand terms, relative error ~1e-7) and the squares are summed in float64; that is 4× faster
    than converting blocks to float64. Where a float32 square overflows (entries above ~1e19), the rows are
    summed in float64 instead.

    Args:
        M: (rows, cols), any floating dtype.
    Returns:
        The squared Frobenius norm; inf or nan when M holds non-finite values.
    """
    rows = M.reshape(-1, M.shape[-1]) if M.dim() else M.reshape(1, 1)
    energy = float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())
    if math.isfinite(energy):
        return energy
    step = max(1, NORM_BLOCK_ELEMENTS // max(1, rows.shape[-1]))
    return sum(float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2 for block in rows.split(step))


def residual_energy(M: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """‖M − left·right‖²_F, a block of rows at a time (see `frobenius_energy`).

    Args:
        M: (rows, cols); left: (rows, r); right: (r, cols), on one device and in one dtype.
    """
    step = max(1, CHUNK_ELEMENTS // max(1, M.shape[1]))
    blocks = zip(M.split(step), left.split(step), strict=True)
    return sum(frobenius_energy(block - lb @ right) for block, lb in blocks)


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


def factor_spectrum(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The exact singular values of scale · B · A from the r×r Gram matrices of the factors, in float64.

    BᵀB = V_B Λ_B V_Bᵀ gives a square root R_B = Λ_B^½ V_Bᵀ with R_Bᵀ R_B = BᵀB — the R of a QR of B up to an
    orthogonal factor — and likewise R_A from AAᵀ; the singular values of B·A are those of the r×r core
    R_B R_Aᵀ. Same O((rows + cols)·r²) cost as QR of B and Aᵀ but a matrix product
    instead of Householder sweeps: ~20× faster on 11008×64 factors. float64 keeps small values: the absolute
    error is about 1e-16·σ_1²/σ_i, and at most 1e-8·σ_1 for σ_i → 0; rank-deficient factors (B = 0) are fine.

    Args:
        B: (rows, r); A: (r, cols) — flatten conv factors first (`LoraModule.factors`).
    Returns:
        (k,) float32, descending, k = min(r, rows, cols).
    """
    b, a = B.double(), A.double()
    eig_b, vec_b = torch.linalg.eigh(b.T @ b)
    eig_a, vec_a = torch.linalg.eigh(a @ a.T)
    root_b = eig_b.clamp_min(0).sqrt()[:, None] * vec_b.T
    root_a = eig_a.clamp_min(0).sqrt()[:, None] * vec_a.T
    k = min(B.shape[1], B.shape[0], A.shape[1])
    return (torch.linalg.svdvals(root_b @ root_a.T)[:k] * abs(scale)).float()


def pooled_rel_error(parts: Iterable[tuple[float, float]]) -> float:
    """The relative error of a set of layers taken as one vector: √(Σ residual² / Σ ‖ΔW‖²).

    Args:
        parts: (‖ΔW_l − approx_l‖²_F, ‖ΔW_l‖²_F) per layer.
    Returns:
        0 when every ΔW is zero and so is every residual; inf when only the residuals are non-zero.
    """
    residual = total = 0.0
    for part_residual, part_total in parts:
        residual += part_residual
        total += part_total
    if total == 0:
        return 0.0 if residual == 0 else math.inf
    return math.sqrt(residual / total)
