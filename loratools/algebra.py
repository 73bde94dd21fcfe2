"""Adapter algebra on factors: combine (concatenate or recompress), rescale, change alpha, resize. No files.

Every operation is exact, or reports its error against the best possible result: the relative Frobenius error
‖ΔW_exact − ΔW_new‖_F / ‖ΔW_exact‖_F, which for an SVD truncation is the optimal (Eckart–Young) error.
Dense deltas are never formed: sums are kept as stacked factors ``[w₁s₁B₁ … wₙsₙBₙ] · [A₁; …; Aₙ]`` and
recompressed with `factor_svd` (QR of each side, SVD of the small core).

Decisions:
- A combined or resized module keeps a meaningful alpha: its scale is the scale of the first input module
  (``alpha = alpha₁ · rank / r₁``, kohya's resize rule), and each input's ``wᵢ·sᵢ / scale`` is folded into
  its B block. One adapter with weight 1 is reproduced factor for factor.
- Factor-wise averaging of A and B (``(A₁+A₂)/2``) is not offered: it is not the sum of the deltas.
- ``--scale S`` multiplies alpha by S (factors untouched, exact); ``--alpha A`` folds old/new scale into B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.dtypes import accumulation_dtype
from loratools.errors import FormatError, LoratoolsError, ShapeError
from loratools.formats import KOHYA_PREFIXES, is_sdxl, kohya_stem
from loratools.linalg import factor_svd
from loratools.options import RankPolicy
from loratools.policies import choose_rank, truncation_errors
from loratools.progress import Progress

METHODS = ("concat", "svd")


@dataclass(frozen=True)
class ModuleChange:
    """What an operation did to one module: ranks before and after, and its relative Frobenius error."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank_in: int
    rank_out: int
    error: float

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def _reference_scale(module: LoraModule) -> float:
    return module.scale if module.scale != 0 else 1.0


def _output_alpha(first: LoraModule, rank: int) -> float:
    """Alpha giving a rank-`rank` module the reference scale of `first` (its own alpha when ranks agree)."""
    if first.scale == 0:
        return float(rank)
    return first.scale * rank if first.rslora else first.alpha * (rank / first.rank)


def _stacked(
    modules: Sequence[LoraModule], weights: Sequence[float], scale: float, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(B blocks with wᵢ·sᵢ/scale folded in, A blocks), each cast to `dtype`."""
    compute = accumulation_dtype(dtype)
    bs, as_ = [], []
    for module, weight in zip(modules, weights, strict=True):
        fold = weight * module.scale / scale
        b = module.B.to(dtype) if fold == 1 else (module.B.to(compute) * fold).to(dtype)
        bs.append(b)
        as_.append(module.A.to(dtype))
    return bs, as_


def _check_compatible(modules: Sequence[LoraModule]) -> None:
    first = modules[0]
    for other in modules[1:]:
        if other.kind != first.kind or other.base_shape != first.base_shape:
            raise ShapeError(
                f"{first.name}: one adapter has a {first.kind} LoRA for shape {first.base_shape}, another a"
                f" {other.kind} LoRA for {other.base_shape}; these adapters are for different models"
            )


def concat_modules(
    modules: Sequence[LoraModule], weights: Sequence[float], dtype: torch.dtype | None = None
) -> LoraModule:
    """The exact weighted sum Σ wᵢ·ΔWᵢ as one module, by concatenating factors along the rank axis.

    Args:
        modules: LoRAs of one layer (same kind and base shape); A (rᵢ, in[, kh, kw]), B (out, rᵢ[, 1, 1]).
        weights: one wᵢ per module.
        dtype: factor dtype of the result (default: the promoted dtype of the inputs).
    Returns:
        A (Σrᵢ, in[, kh, kw]), B (out, Σrᵢ[, 1, 1]); scale = the first module's scale.

    Example:
        >>> concat_modules([m1, m2], [1.0, 0.5]).delta()   # == m1.delta() + 0.5 * m2.delta()
    """
    _check_compatible(modules)
    dtype = dtype or _promoted_dtype(modules)
    scale = _reference_scale(modules[0])
    bs, as_ = _stacked(modules, weights, scale, dtype)
    rank = sum(a.shape[0] for a in as_)
    first = modules[0]
    return LoraModule(first.name, torch.cat(as_, 0), torch.cat(bs, 1), _output_alpha(first, rank), first.kind)


def _promoted_dtype(modules: Sequence[LoraModule]) -> torch.dtype:
    dtype = modules[0].A.dtype
    for module in modules:
        dtype = torch.promote_types(torch.promote_types(dtype, module.A.dtype), module.B.dtype)
    return dtype


def _truncate(
    template: LoraModule, left: torch.Tensor, right: torch.Tensor, policy: RankPolicy, dtype: torch.dtype
) -> tuple[LoraModule, int, float]:
    """Best approximation of the LoRA matrix left @ right chosen by `policy`: (module, rank, relative error)."""
    U, S, Vh = factor_svd(left, right, 1.0, accumulation_dtype(dtype))
    policy = policy.for_kind(template.kind)
    rank = choose_rank(S, policy)
    if rank is None:  # S is the complete spectrum: the policy keeps every value up to the cap
        rank = min(len(S), policy.max_rank)
    rank = max(rank, 1)  # an all-zero delta is kept as one zero direction, which every loader accepts
    error = float(truncation_errors(S)[rank])
    alpha = _output_alpha(template, rank)
    module = LoraModule.from_lora_matrix_factors(
        template.name, U[:, :rank] * S[:rank], Vh[:rank], template.kind, template.base_shape, alpha
    )
    return replace(module, A=module.A.to(dtype), B=module.B.to(dtype)), rank, error


def recompress_modules(
    modules: Sequence[LoraModule], weights: Sequence[float], policy: RankPolicy, dtype: torch.dtype | None = None
) -> tuple[LoraModule, ModuleChange]:
    """Σ wᵢ·ΔWᵢ recompressed to the rank `policy` chooses, from the stacked factors (QR + small SVD).

    Args:
        modules: LoRAs of one layer (same kind and base shape).
        policy: rank policy applied to the singular values of the exact sum.
    Returns:
        (module with A (k, in[, kh, kw]) and B (out, k[, 1, 1]), report with the relative error against the
        exact sum, which is the optimal error for rank k).
    """
    _check_compatible(modules)
    dtype = dtype or _promoted_dtype(modules)
    compute = accumulation_dtype(dtype)
    left = torch.cat([m.factors(compute)[0] * (w * m.scale) for m, w in zip(modules, weights, strict=True)], 1)
    right = torch.cat([m.factors(compute)[1] for m in modules], 0)
    module, rank, error = _truncate(modules[0], left, right, policy, dtype)
    first = modules[0]
    return module, ModuleChange(first.name, first.kind, first.base_shape, left.shape[1], rank, error)


def resize_module(module: LoraModule, policy: RankPolicy) -> tuple[LoraModule, ModuleChange]:
    """Optimal truncation of one module's delta to the rank `policy` chooses, scale preserved.

    Args:
        module: A (r, in[, kh, kw]), B (out, r[, 1, 1]).
    Returns:
        (module with A (k, …), B (out, k, …) and alpha = alpha · k / r, so alpha / k is the old scale;
        report with the Eckart–Young error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F). A rank above the layer's
        min(out, in) or r is clamped.
    """
    b, a = module.factors(accumulation_dtype(module.A.dtype))
    resized, rank, error = _truncate(module, b * module.scale, a, policy, module.A.dtype)
    return resized, ModuleChange(module.name, module.kind, module.base_shape, module.rank, rank, error)


def rescale_module(module: LoraModule, factor: float) -> LoraModule:
    """The same module with its delta multiplied by `factor` (alpha · factor; factors untouched)."""
    if factor == 0 or not math.isfinite(factor):
        raise LoratoolsError(f"scale {factor} is not usable; give a finite, non-zero --scale")
    return replace(module, alpha=module.alpha * factor)


def set_alpha(module: LoraModule, alpha: float) -> LoraModule:
    """The same delta with a new alpha: B is multiplied by old scale / new scale (computed in fp32)."""
    if alpha == 0 or not math.isfinite(alpha):
        raise LoratoolsError(f"alpha {alpha} is not usable; give a finite, non-zero --alpha")
    new = replace(module, alpha=float(alpha))
    ratio = module.scale / new.scale
    if ratio == 1:
        return new
    return replace(new, B=(module.B.to(accumulation_dtype(module.B.dtype)) * ratio).to(module.B.dtype))


def adapter_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """One float weight per adapter: all 1 when none are given. Raises LoratoolsError when the counts differ."""
    if weights is None or len(weights) == 0:
        return [1.0] * count
    if len(weights) != count:
        raise LoratoolsError(f"got {len(weights)} weights for {count} adapters; give one --weight per adapter")
    return [float(w) for w in weights]


def _match_keys(adapters: Sequence[Adapter]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Per adapter, module name -> matching key; and key -> output name.

    Adapters that mix kohya stems with dotted names are matched on kohya stems; the output keeps a dotted
    name wherever some adapter supplies one.
    """
    names = [name for adapter in adapters for name in adapter.modules]
    mixed = any(n.startswith(KOHYA_PREFIXES) for n in names) and not all(n.startswith(KOHYA_PREFIXES) for n in names)
    sdxl = is_sdxl(names)
    keyed = [{n: kohya_stem(n, sdxl=sdxl) if mixed else n for n in a.modules} for a in adapters]
    out_names: dict[str, str] = {}
    for keys in keyed:
        for name, key in keys.items():
            if key not in out_names or out_names[key].startswith(KOHYA_PREFIXES):
                out_names[key] = name
    return keyed, out_names


def _combine_full(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for name, tensor in adapter.full.items():
            if name in full or weight != 1:
                raise FormatError(
                    f"{name}: a full (modules_to_save) tensor cannot be weighted or summed without the base model;"
                    " merge these adapters into the base with `loratools merge` instead"
                )
            full[name] = tensor
    return full


def _common_metadata(adapters: Sequence[Adapter]) -> dict[str, str]:
    first = adapters[0].metadata
    return {k: v for k, v in first.items() if all(a.metadata.get(k) == v for a in adapters[1:])}


def combine_adapters(
    adapters: Sequence[Adapter],
    *,
    weights: Sequence[float] | None = None,
    method: str = "concat",
    policy: RankPolicy | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> tuple[Adapter, list[ModuleChange]]:
    """Σ wᵢ·ΔWᵢ over adapters; a module missing from an adapter counts as zero there.

    Args:
        adapters: PEFT and/or kohya adapters (kohya stems and dotted names are matched with each other).
        weights: one per adapter (default all 1).
        method: "concat" (exact, ranks add; no `policy`) or "svd" (recompressed to `policy`; default rank:
            the largest input rank of each layer).
        dtype: factor dtype of the result (default: promoted input dtypes).
        progress: called as (done, total, module name).
    Returns:
        (adapter, one ModuleChange per module: ranks and relative error against the exact sum; 0 for concat).
    """
    if method not in METHODS:
        raise LoratoolsError(f"unknown combine method {method!r}; choose concat or svd")
    if method == "concat" and policy is not None:
        raise LoratoolsError("rank policies apply to --method svd; concat keeps every rank (exact)")
    if not adapters:
        raise LoratoolsError("give at least one adapter to combine")
    weights = adapter_weights(len(adapters), weights)
    keyed, out_names = _match_keys(adapters)
    groups: dict[str, list[tuple[LoraModule, float]]] = {key: [] for key in out_names}
    for adapter, keys, weight in zip(adapters, keyed, weights, strict=True):
        for name, module in adapter.modules.items():
            groups[keys[name]].append((replace(module, name=out_names[keys[name]]), weight))
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleChange] = []
    for done, (key, group) in enumerate(groups.items()):
        parts, part_weights = [m for m, _ in group], [w for _, w in group]
        if method == "concat":
            module = concat_modules(parts, part_weights, dtype)
            first = parts[0]
            report = ModuleChange(first.name, first.kind, first.base_shape, module.rank, module.rank, 0.0)
        else:
            layer_policy = policy or RankPolicy("rank", max(m.rank for m in parts))
            module, report = recompress_modules(parts, part_weights, layer_policy, dtype)
        modules[module.name] = module
        reports.append(report)
        if progress:
            progress(done + 1, len(groups), out_names[key])
    lead = adapters[0]
    base_models = {a.base_model for a in adapters}
    combined = Adapter(
        modules=modules,
        format="kohya" if lead.format == "kohya" else "peft",
        base_model=lead.base_model if len(base_models) == 1 else None,
        metadata=_common_metadata(adapters),
        config={"task_type": lead.config.get("task_type")} if lead.config.get("task_type") else {},
        full=_combine_full(adapters, weights),
    )
    return combined, reports


def rescale_adapter(adapter: Adapter, *, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """Every delta multiplied by `scale`, or every alpha set to `alpha` with the deltas unchanged (give one).

    Full (modules_to_save) tensors replace base weights rather than add to them, so they are kept as they are.
    """
    if (scale is None) == (alpha is None):
        raise LoratoolsError("give exactly one of --scale or --alpha")
    if scale is not None:
        modules = {n: rescale_module(m, scale) for n, m in adapter.modules.items()}
    elif alpha is not None:
        modules = {n: set_alpha(m, alpha) for n, m in adapter.modules.items()}
    notes = list(adapter.notes)
    if adapter.full and scale is not None:
        notes.append(f"{len(adapter.full)} full (modules_to_save) tensor(s) kept unscaled: they replace base weights")
    return replace(adapter, modules=modules, notes=notes)


def resize_adapter(
    adapter: Adapter, *, policy: RankPolicy, progress: Progress | None = None
) -> tuple[Adapter, list[ModuleChange]]:
    """Every module truncated optimally to the rank `policy` chooses (see `resize_module`); full tensors kept.

    Returns:
        (adapter, one ModuleChange per module).
    """
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleChange] = []
    for done, (name, module) in enumerate(adapter.modules.items()):
        modules[name], report = resize_module(module, policy)
        reports.append(report)
        if progress:
            progress(done + 1, len(adapter.modules), name)
    return replace(adapter, modules=modules), reports
