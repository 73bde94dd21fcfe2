"""One adapted layer as a plain LoRA (`LoraModule`), and the LoRA-matrix layout of every layer kind.

Layouts (r = rank):

============  =======================  ==================  ==================  =====================
kind          base weight              A                   B                   LoRA matrix B·A
============  =======================  ==================  ==================  =====================
linear        (out, in)                (r, in)             (out, r)            (out, in)
conv2d        (out, in, kh, kw)        (r, in, kh, kw)     (out, r, 1, 1)      (out, in·kh·kw)
embedding     (num, dim)               (r, num)            (dim, r)            (dim, num) = Wᵀ
conv1d        (in, out)  [HF Conv1D]   (r, in)             (out, r)            (out, in) = Wᵀ
============  =======================  ==================  ==================  =====================

The "LoRA matrix" is the 2-D matrix whose truncated SVD gives B (left) and A (right); `lora_matrix` and
`base_layout` convert between it and the base weight's own layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from loratools.errors import FormatError

KINDS = ("linear", "conv2d", "embedding", "conv1d")
TRANSPOSED_KINDS = ("embedding", "conv1d")


def lora_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A base-layout weight (or delta) as the 2-D LoRA matrix of its kind.

    Args:
        weight: (out, in), (out, in, kh, kw), (num, dim) or (in, out), by `kind`.
        kind: one of KINDS.
    Returns:
        (rows, cols): (out, in), (out, in·kh·kw), (dim, num) or (out, in). A view where possible.
    """
    if kind in TRANSPOSED_KINDS:
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def base_layout(matrix: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `lora_matrix`: a (rows, cols) LoRA matrix back in the base weight's `shape`."""
    if kind in TRANSPOSED_KINDS:
        return matrix.T
    return matrix.reshape(shape)


@dataclass
class LoraModule:
    """One adapted layer: ΔW = scale · B · A in the LoRA layout (see the module docstring).

    Attributes:
        name: the module's path, e.g. ``model.layers.0.self_attn.q_proj`` (PEFT) or the kohya stem
            ``lora_unet_down_blocks_0_attentions_0_proj_in`` when the dotted path is unknown.
        A: (r, in), (r, in, kh, kw) or (r, num).
        B: (out, r), (out, r, 1, 1) or (dim, r).
        alpha: scale = alpha / r (alpha / sqrt(r) with rslora).
        kind: one of KINDS.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    kind: str = "linear"
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"{self.name}: unknown layer kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise FormatError(
                f"{self.name}: rank mismatch, A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns"
            )
        if self.kind == "conv2d" and (self.A.dim() != 4 or self.B.dim() != 4):
            raise FormatError(f"{self.name}: a conv2d LoRA needs 4-D A and B, got {tuple(self.A.shape)}, {tuple(self.B.shape)}")
        if self.kind != "conv2d" and (self.A.dim() != 2 or self.B.dim() != 2):
            raise FormatError(f"{self.name}: a {self.kind} LoRA needs 2-D A and B, got {tuple(self.A.shape)}, {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """The factor applied to B·A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module adapts."""
        rows, cols = int(self.B.shape[0]), int(self.A.shape[1])
        if self.kind == "conv2d":
            return (rows, cols, *self.A.shape[2:])
        if self.kind in TRANSPOSED_KINDS:
            return (cols, rows)
        return (rows, cols)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B2, A2): B as (rows, r) and A as (r, cols), in `dtype`, so that the LoRA matrix is scale·B2·A2."""
        return self.B.reshape(self.B.shape[0], -1).to(dtype), self.A.reshape(self.rank, -1).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = scale · B · A in the base weight's own layout (`base_shape`), computed in `dtype`."""
        b, a = self.factors(dtype)
        return base_layout((b @ a) * self.scale, self.kind, self.base_shape)

    def with_plain_alpha(self) -> LoraModule:
        """The same delta with rslora off (alpha rescaled so that scale = alpha / r)."""
        if not self.rslora:
            return self
        return replace(self, alpha=self.scale * self.rank, rslora=False)

    @classmethod
    def from_lora_matrix_factors(
        cls, name: str, left: torch.Tensor, right: torch.Tensor, kind: str, base_shape: tuple[int, ...], alpha: float
    ) -> LoraModule:
        """Build a module from 2-D factors left (rows, r) and right (r, cols), with scale = alpha / r folded out.

        The LoRA matrix is left @ right; B and A are stored so that scale · B · A equals it (up to rounding).
        Args: left (rows, r), right (r, cols); base_shape: the adapted weight's shape; r ≥ 1.
        """
        rank = right.shape[0]
        b = left / (alpha / rank)
        if kind == "conv2d":
            return cls(name, right.reshape(rank, *base_shape[1:]), b.reshape(*b.shape, 1, 1), alpha, kind)
        return cls(name, right, b, alpha, kind)
