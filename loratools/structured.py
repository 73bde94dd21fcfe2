"""Exact math of structured deltas: LoHa (Hadamard), LoKr (Kronecker) and DoRA (weight-decomposed) ΔW as 2-D
LoRA matrices, their exact spectra and their best low-rank factors. Tensors in, tensors out; no files.

Every ΔW here is the LoRA matrix of its layer: (out, in) for a linear layer, (out, in·kh·kw) for a convolution
(`adapter.lora_matrix`), so a structured delta and a plain LoRA of the same layer compare entry for entry.

- LoHa: ΔW = s·(B₁A₁) ⊙ (B₂A₂). Column by column, (B₁A₁) ⊙ (B₂A₂) = Σ_pq (b₁ₚ ⊙ b₂_q)(a₁ₚ ⊙ a₂_q)ᵀ, so ΔW is
  exactly the product of an (out, r₁r₂) and an (r₁r₂, in) factor (`hadamard_factors`): rank ≤ r₁·r₂, and its
  exact SVD comes from QR of both factors and the SVD of the small core (`linalg.factor_svd`), ΔW never formed.
- LoKr: ΔW = s·kron(W₁, W₂). kron(U₁S₁V₁ᵀ, U₂S₂V₂ᵀ) = kron(U₁, U₂)·kron(S₁, S₂)·kron(V₁, V₂)ᵀ, so the singular
  values are the products σ₁ᵢ·σ₂ⱼ and the best rank-k factors are Kronecker products of the factors' singular
  vectors (`KronSvd`): exact, from two small SVDs.
- DoRA: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with the norm per output row (PEFT, LyCORIS ``wd_on_out``) or per input
  column (LyCORIS otherwise); the true delta W' − W is full rank in general, so it is formed (`dora_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratools.linalg import factor_svd

RANK_TOLERANCE = float(torch.finfo(torch.float32).eps)  # σ ≤ σ₁·max(rows, cols)·eps counts as zero (matrix_rank)


def hadamard_factors(
    left1: torch.Tensor, right1: torch.Tensor, left2: torch.Tensor, right2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a Hadamard product of two low-rank matrices: left @ right = (left1 @ right1) ⊙ (left2 @ right2).

    Args:
        left1: (rows, r1); right1: (r1, cols); left2: (rows, r2); right2: (r2, cols).
    Returns:
        left (rows, r1·r2), right (r1·r2, cols): column p·r2 + q of left is left1[:, p] ⊙ left2[:, q], row
        p·r2 + q of right is right1[p] ⊙ right2[q].
    """
    rows, cols = left1.shape[0], right1.shape[1]
    left = (left1[:, :, None] * left2[:, None, :]).reshape(rows, -1)
    right = (right1[:, None, :] * right2[None, :, :]).reshape(-1, cols)
    return left, right


def tucker_factors(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Tucker (CP) conv half as LoRA-matrix factors, the layout LyCORIS and PEFT store (``hada_t1`` …).

    The half is ``einsum("i j ..., j r, i p -> p r ...", core, down, up)``, (out, in, *kernel); as its LoRA
    matrix (out, in·prod(kernel)) it is upᵀ @ right.

    Args:
        core: (r, r, *kernel); up: (r, out); down: (r, in).
    Returns:
        left (out, r), right (r, in·prod(kernel)).
    """
    right = torch.einsum("ij...,jq->iq...", core, down)
    return up.T, right.reshape(right.shape[0], -1)


def tucker_matrix(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker half formed as its LoRA matrix (out, in·prod(kernel)); see `tucker_factors`."""
    left, right = tucker_factors(core, up, down)
    return left @ right


@dataclass(frozen=True)
class ExactSvd:
    """M = U·diag(S)·Vh with every non-zero singular value (the thin SVD).

    Attributes:
        U: (rows, k); S: (k,) descending; Vh: (k, cols); k ≥ rank(M).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-`rank` approximation as (left (rows, rank), right (rank, cols)), √σ on each side."""
        root = self.S[:rank].sqrt()
        return self.U[:, :rank] * root, root[:, None] * self.Vh[:rank]


@dataclass(frozen=True)
class KronSvd:
    """The SVD of scale·kron(W₁, W₂) kept as the SVDs of its two factors (never formed).

    Attributes:
        first: SVD of scale·W₁ (a, b); second: SVD of W₂ (c, d); the product is (a·c, b·d).
        order: (k, 2) pairs (i, j) of factor singular values, by descending product σ₁ᵢ·σ₂ⱼ.
        S: (k,) those products, k = len(first.S)·len(second.S): the complete spectrum.
    """

    first: ExactSvd
    second: ExactSvd
    order: torch.Tensor
    S: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-`rank` approximation: column t of left is kron(u₁ᵢ, u₂ⱼ)·√σ_t, row t of right
        kron(v₁ᵢ, v₂ⱼ)·√σ_t, for the t-th pair (i, j) of `order`. Shapes (a·c, rank), (rank, b·d)."""
        i, j = self.order[:rank, 0], self.order[:rank, 1]
        root = self.S[:rank].sqrt()
        u1, u2 = self.first.U[:, i], self.second.U[:, j]
        v1, v2 = self.first.Vh[i], self.second.Vh[j]
        left = (u1[:, None, :] * u2[None, :, :]).reshape(-1, rank) * root
        right = (v1[:, :, None] * v2[:, None, :]).reshape(rank, -1) * root[:, None]
        return left, right


def dense_svd(M: torch.Tensor, dtype: torch.dtype = torch.float32) -> ExactSvd:
    """The thin SVD of a formed matrix M (rows, cols), computed in `dtype`."""
    U, S, Vh = torch.linalg.svd(M.to(dtype), full_matrices=False)
    return ExactSvd(U, S, Vh)


def product_svd(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype = torch.float32) -> ExactSvd:
    """The exact thin SVD of left @ right (rows, R)·(R, cols) from the factors (`linalg.factor_svd`), or from
    the formed product when R ≥ min(rows, cols) (then forming is the cheaper way)."""
    if left.shape[1] >= min(left.shape[0], right.shape[1]):
        return dense_svd(left.to(dtype) @ right.to(dtype), dtype)
    return ExactSvd(*factor_svd(left, right, 1.0, dtype))


def kron_svd(first: torch.Tensor, second: torch.Tensor, scale: float = 1.0,
             dtype: torch.dtype = torch.float32) -> KronSvd:
    """The exact SVD of scale·kron(first, second) from the SVDs of the two factors.

    Args:
        first: (a, b); second: (c, d), both 2-D (flatten a conv factor's kernel into d first).
    Returns:
        A KronSvd whose S holds all min(a, b)·min(c, d) singular values, descending (ties in factor order).
    """
    one = dense_svd(first.to(dtype) * scale, dtype)
    two = dense_svd(second, dtype)
    products = (one.S[:, None] * two.S[None, :]).reshape(-1)
    order = torch.sort(products, descending=True, stable=True).indices
    pairs = torch.stack([order // len(two.S), order % len(two.S)], dim=1)
    return KronSvd(one, two, pairs, products[order])


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values are not rounding noise: σ > σ₁·max(rows, cols)·eps(fp32), as
    ``torch.linalg.matrix_rank`` counts them.

    Args:
        S: (k,) descending singular values; shape: (rows, cols) of the matrix.
    """
    if len(S) == 0 or float(S[0]) == 0:
        return 0
    return int((S[0] * max(shape) * RANK_TOLERANCE < S).sum())


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, per_row: bool = True,
    columns_per_channel: int = 1, eps: float = 0.0,
) -> torch.Tensor:
    """DoRA's merged weight m ⊙ (W + ΔW) / ‖W + ΔW‖, as LoRA matrices.

    Args:
        weight, delta: (rows, cols) LoRA matrices (rows: output channels; a convolution's columns are its
            input channels × kernel positions, `columns_per_channel` of them per input channel).
        magnitude: (rows,) when `per_row` (PEFT; LyCORIS ``wd_on_out``), else (cols / columns_per_channel,).
        per_row: the norm of each row (output channel); else of each input channel's columns (over all rows).
        eps: added to every norm (LyCORIS adds float32's eps; PEFT nothing).
    Returns:
        (rows, cols) W'.
    """
    combined = weight + delta
    if per_row:
        norm = torch.linalg.vector_norm(combined, dim=1) + eps
        return combined * (magnitude / norm)[:, None]
    grouped = combined.reshape(combined.shape[0], -1, columns_per_channel)
    norm = torch.linalg.vector_norm(grouped, dim=(0, 2)) + eps
    return (grouped * (magnitude / norm)[None, :, None]).reshape(combined.shape)


@dataclass(frozen=True)
class DoraChange:
    """How DoRA changed a weight, in the DoRA paper's terms (Liu et al. 2024, §3: ΔM and ΔD).

    Attributes:
        magnitude_change: mean |m − ‖W‖| over the norm groups (rows or input channels).
        relative_magnitude_change: magnitude_change / mean ‖W‖.
        direction_change: mean (1 − cos(W, W')) over the same groups.
    """

    magnitude_change: float
    relative_magnitude_change: float
    direction_change: float


def dora_change(weight: torch.Tensor, merged: torch.Tensor, *, per_row: bool = True,
                columns_per_channel: int = 1) -> DoraChange:
    """ΔM and ΔD between the base W and DoRA's W' (both (rows, cols) LoRA matrices), per norm group."""
    if per_row:
        w, m = weight.double(), merged.double()
        dims: tuple[int, ...] = (1,)
    else:
        w = weight.double().reshape(weight.shape[0], -1, columns_per_channel).transpose(0, 1)
        m = merged.double().reshape(merged.shape[0], -1, columns_per_channel).transpose(0, 1)
        dims = (1, 2)
    base_norm = torch.linalg.vector_norm(w, dim=dims)
    new_norm = torch.linalg.vector_norm(m, dim=dims)
    cosine = (w * m).sum(dim=dims) / (base_norm * new_norm).clamp_min(torch.finfo(torch.float64).tiny)
    change = float((new_norm - base_norm).abs().mean())
    mean_norm = float(base_norm.mean())
    return DoraChange(change, change / mean_norm if mean_norm else 0.0, float((1 - cosine).mean()))
