"""Adapter modules that are not plain LoRA: LoHa, LoKr (LyCORIS, PEFT) and DoRA (PEFT, LyCORIS ``dora_scale``).

Each module gives its ΔW as the layer's 2-D LoRA matrix (`adapter.lora_matrix`: (out, in) or
(out, in·kh·kw)) and its exact SVD (`structured`). Scales are resolved when the file is read (each format has
its own rule, see `formats.lycoris`), so ``scale`` here is the factor the runtime applies.

Layouts (r = rank; K = kernel positions kh·kw, 1 for a linear layer):

=====  ==========================================  ===========================================================
type   tensors                                     ΔW (LoRA matrix)
=====  ==========================================  ===========================================================
LoHa   w1a (out, r), w1b (r, in·K), same for w2     scale · (w1a·w1b) ⊙ (w2a·w2b)
LoHa   Tucker: t1 (r, r, kh, kw), w1a (r, out),     scale · tucker(t1, w1a, w1b) ⊙ tucker(t2, w2a, w2b)
       w1b (r, in), same for t2 / w2
LoKr   w1 (a, b) or w1a (a, r)·w1b (r, b);          scale · kron(W₁, W₂), W₂ flattened to (c, d·K)
       w2 (c, d[, kh, kw]) or w2a (c, r)·w2b (r, d·K)
       or Tucker t2 (r, r, kh, kw), w2a (r, c), w2b (r, d)
DoRA   any of the above or a LoRA, and a magnitude  m ⊙ (W + ΔW) / ‖W + ΔW‖ − W   (needs the base W)
=====  ==========================================  ===========================================================

A module whose factors are all 2-D does not say whether its layer is a linear layer or a convolution with its
kernel flattened into the columns (LyCORIS and PEFT store non-Tucker convolutions that way): its
``base_shape`` is None until it is matched to a base tensor (`with_base_shape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from loratools.errors import ShapeError
from loratools.lora_module import LoraModule, base_layout
from loratools.structured import (
    ExactSvd,
    KronSvd,
    dense_svd,
    dora_weight,
    hadamard_factors,
    kron_svd,
    product_svd,
    tucker_factors,
    tucker_matrix,
)


def _matrix_kind(base_shape: tuple[int, ...] | None) -> str:
    return "conv2d" if base_shape is not None and len(base_shape) == 4 else "linear"


def _fits(matrix_shape: tuple[int, int], base_shape: tuple[int, ...] | None, shape: tuple[int, ...]) -> bool:
    """Whether a module with this LoRA matrix (and known base shape, if any) applies to a weight of `shape`."""
    if base_shape is not None:
        return tuple(base_shape) == tuple(shape) or (len(shape) == 4 and tuple(shape[2:]) == (1, 1)
                                                     and tuple(base_shape) == tuple(shape[:2]))
    return len(shape) >= 2 and shape[0] == matrix_shape[0] and math.prod(shape[1:]) == matrix_shape[1]


@dataclass
class LohaModule:
    """A LoHa layer (LyCORIS ``hada_*`` keys, PEFT LOHA): ΔW = scale · (W1a·W1b) ⊙ (W2a·W2b). Layouts above."""

    name: str
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    scale: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    base_shape: tuple[int, ...] | None = None

    type_name = "LoHa"

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def rank(self) -> int:
        """The trained rank r (of each Hadamard half)."""
        return int(self.w1b.shape[0])

    @property
    def rank_bound(self) -> int:
        """r₁·r₂: no LoHa of these ranks can have a ΔW of higher rank."""
        return int(self.w1b.shape[0] * self.w2b.shape[0])

    def _half(self, t: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if t is not None:
            return tucker_factors(t.to(dtype), up.to(dtype), down.to(dtype))
        return up.to(dtype), down.to(dtype).reshape(down.shape[0], -1)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        rows = self.w1a.shape[1] if self.tucker else self.w1a.shape[0]
        cols = math.prod(self.w1b.shape[1:]) * (math.prod(self.t1.shape[2:]) if self.t1 is not None else 1)
        return int(rows), int(cols)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = left @ right with left (rows, r₁·r₂) (scale folded in) and right (r₁·r₂, cols); exact."""
        l1, r1 = self._half(self.t1, self.w1a, self.w1b, dtype)
        l2, r2 = self._half(self.t2, self.w2a, self.w2b, dtype)
        left, right = hadamard_factors(l1, r1, l2, r2)
        return left * self.scale, right

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW as its LoRA matrix (rows, cols), formed Hadamard-wise (cheaper than the factors' product)."""
        halves = []
        for t, up, down in ((self.t1, self.w1a, self.w1b), (self.t2, self.w2a, self.w2b)):
            halves.append(tucker_matrix(t.to(dtype), up.to(dtype), down.to(dtype)) if t is not None
                          else up.to(dtype) @ down.to(dtype).reshape(down.shape[0], -1))
        return halves[0] * halves[1] * self.scale

    def svd(self, dtype: torch.dtype = torch.float32) -> tuple[ExactSvd | KronSvd, str]:
        """The exact SVD of ΔW and how it was taken: ``factors`` (QR of the r₁r₂-wide factors and a small SVD)
        when r₁·r₂ < min(rows, cols), else ``formed`` (ΔW formed, full SVD)."""
        if self.rank_bound >= min(self.matrix_shape):
            return dense_svd(self.matrix(dtype), dtype), "formed"
        return product_svd(*self.factors(dtype), dtype), "factors"

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if t is not None]


@dataclass
class LokrModule:
    """A LoKr layer (LyCORIS ``lokr_*`` keys, PEFT LOKR): ΔW = scale · kron(W₁, W₂). Layouts above."""

    name: str
    alpha: float
    scale: float
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    base_shape: tuple[int, ...] | None = None

    type_name = "LoKr"

    @property
    def rank(self) -> int:
        """The trained rank of the factorized half (0 when both halves are full matrices)."""
        for factor in (self.w1b, self.w2b):
            if factor is not None:
                return int(factor.shape[0])
        return 0

    def halves(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W₁ (a, b), W₂ (c, d·K)) formed and 2-D; ΔW = scale · kron(W₁, W₂)."""
        if self.w1 is not None:
            first = self.w1.to(dtype)
        else:
            assert self.w1a is not None and self.w1b is not None
            first = self.w1a.to(dtype) @ self.w1b.to(dtype)
        if self.w2 is not None:
            second = self.w2.to(dtype).reshape(self.w2.shape[0], -1)
        elif self.t2 is not None:
            assert self.w2a is not None and self.w2b is not None
            second = tucker_matrix(self.t2.to(dtype), self.w2a.to(dtype), self.w2b.to(dtype))
        else:
            assert self.w2a is not None and self.w2b is not None
            second = self.w2a.to(dtype) @ self.w2b.to(dtype).reshape(self.w2b.shape[0], -1)
        return first, second

    @property
    def matrix_shape(self) -> tuple[int, int]:
        first, second = self.halves()
        return int(first.shape[0] * second.shape[0]), int(first.shape[1] * second.shape[1])

    @property
    def rank_bound(self) -> int:
        """rank(W₁)·rank(W₂) bound from the stored shapes (r for a factorized half)."""
        first, second = self.halves()
        one = self.w1b.shape[0] if self.w1b is not None else min(first.shape)
        two = self.w2b.shape[0] if self.w2b is not None else min(second.shape)
        return int(one * two)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        first, second = self.halves(dtype)
        return torch.kron(first, second) * self.scale

    def svd(self, dtype: torch.dtype = torch.float32) -> tuple[ExactSvd | KronSvd, str]:
        """The exact SVD of ΔW from the SVDs of W₁ and W₂ (``kron``), never formed."""
        first, second = self.halves(dtype)
        return kron_svd(first, second, self.scale, dtype), "kron"

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2) if t is not None]


@dataclass
class DoraModule:
    """DoRA on a LoRA, LoHa or LoKr: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, so the true delta W' − W needs the base W.

    Attributes:
        delta: the directional update (its own scale included).
        magnitude: (rows,) per output channel when `per_row` (PEFT ``lora_magnitude_vector``, LyCORIS
            ``dora_scale`` with ``wd_on_out``), else (in,) per input channel (LyCORIS without ``wd_on_out``).
        convention: "peft" or "lycoris": how a merge weight λ applies (PEFT scales ΔW inside the norm;
            LyCORIS blends W + ΔW towards its decomposed weight, W' = (W + ΔW)·(λ(m/‖W + ΔW‖ − 1) + 1)).
        eps: added to the norm (LyCORIS: float32 eps; PEFT: 0).
    """

    name: str
    delta: LoraModule | LohaModule | LokrModule
    magnitude: torch.Tensor
    per_row: bool = True
    convention: str = "peft"
    eps: float = 0.0

    @property
    def type_name(self) -> str:
        inner = self.delta.type_name if not isinstance(self.delta, LoraModule) else "LoRA"
        return "DoRA" if inner == "LoRA" else f"{inner}+DoRA"

    @property
    def rank(self) -> int:
        return self.delta.rank

    @property
    def alpha(self) -> float:
        return self.delta.alpha

    @property
    def scale(self) -> float:
        return self.delta.scale

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if isinstance(self.delta, LoraModule):
            b, a = self.delta.factors()
            return int(b.shape[0]), int(a.shape[1])
        return self.delta.matrix_shape

    @property
    def base_shape(self) -> tuple[int, ...] | None:
        return self.delta.base_shape

    def inner_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The directional update ΔW (before the magnitude), as its LoRA matrix."""
        if isinstance(self.delta, LoraModule):
            b, a = self.delta.factors(dtype)
            return (b @ a) * self.delta.scale
        return self.delta.matrix(dtype)

    def merged(self, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """W' for the base LoRA matrix `weight` (rows, cols), with merge weight `multiplier` (see convention)."""
        rows, cols = self.matrix_shape
        if tuple(weight.shape) != (rows, cols):
            raise ShapeError(f"{self.name}: DoRA ΔW is {rows}×{cols} but the base weight is {tuple(weight.shape)}")
        delta = self.inner_matrix(weight.dtype)
        per_channel = cols // self.magnitude.numel() if not self.per_row else 1
        magnitude = self.magnitude.to(weight.dtype)
        if self.convention == "peft":
            return dora_weight(weight, delta * multiplier, magnitude, per_row=self.per_row,
                               columns_per_channel=per_channel, eps=self.eps)
        decomposed = dora_weight(weight, delta, magnitude, per_row=self.per_row, columns_per_channel=per_channel,
                                 eps=self.eps)
        combined = weight + delta
        return combined + multiplier * (decomposed - combined)

    def tensors(self) -> list[torch.Tensor]:
        inner = [self.delta.A, self.delta.B] if isinstance(self.delta, LoraModule) else self.delta.tensors()
        return [*inner, self.magnitude]


StructuredModule = LohaModule | LokrModule | DoraModule


def structured_delta(module: StructuredModule, weight: torch.Tensor | None = None, multiplier: float = 1.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The true ΔW of `module` as its LoRA matrix (rows, cols), times the merge weight `multiplier`.

    Args:
        weight: the base LoRA matrix (rows, cols); required for DoRA (ΔW = W' − W), ignored otherwise.
    """
    if isinstance(module, DoraModule):
        if weight is None:
            raise ShapeError(f"{module.name}: a DoRA delta depends on the base weight; pass --base")
        base = weight.to(dtype)
        return module.merged(base, multiplier) - base
    return module.matrix(dtype) * multiplier


def fits(module: StructuredModule, shape: tuple[int, ...]) -> bool:
    """Whether `module` applies to a base weight of `shape` (flat factors fit a convolution of that size)."""
    return _fits(module.matrix_shape, module.base_shape, shape)


def with_base_shape(module: StructuredModule, shape: tuple[int, ...]) -> StructuredModule:
    """`module` with its layer's shape known (from the base tensor it was matched to)."""
    if isinstance(module, DoraModule):
        inner = module.delta
        if isinstance(inner, LoraModule):
            return module
        return replace(module, delta=replace(inner, base_shape=tuple(shape)))
    return replace(module, base_shape=tuple(shape))


def layer_kind(module: StructuredModule) -> str:
    """``conv2d`` when the module's layer is known to be a 4-D convolution, else ``linear``."""
    if isinstance(module, DoraModule) and isinstance(module.delta, LoraModule):
        return module.delta.kind
    return _matrix_kind(module.base_shape)


def as_base_layout(matrix: torch.Tensor, module: StructuredModule) -> torch.Tensor:
    """A LoRA matrix of `module`'s layer back in the base weight's layout (needs a known base shape)."""
    shape = module.base_shape or module.matrix_shape
    return base_layout(matrix, layer_kind(module), tuple(shape))
