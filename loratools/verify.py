"""`verify`: how close an existing adapter is to the real fine-tune, layer by layer, and what it leaves out.

For each adapter module matched to a checkpoint tensor, with ΔW = tuned − base in the module's LoRA layout:
- ``rel_error`` = ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F, measured in float64 blocks (the product is never held whole);
- ``optimal_rel_error`` = the Eckart–Young error of the best approximation of the same rank r: the measured
  ‖ΔW − U_r Σ_r V_rᵀ‖_F / ‖ΔW‖_F of the rank-r truncated SVD of ΔW (`linalg.low_rank`: randomized; `exact`: a
  full SVD). Measured rather than √(‖ΔW‖² − Σσ²), which cancels catastrophically when the error is tiny; a
  randomized truncation is never better than the true optimum, so this figure is never too optimistic.
Coverage both ways: changed tensors that no module or full tensor touches (`uncovered`), and adapter modules
that match no tensor or a tensor of another shape (`unmatched`, with the reason). Base and tuned tensors are
paired by `plan.plan_extract` (names in one checkpoint only, and shape mismatches, are listed).

Decisions:
- Modules match ``<module>.weight`` in the base checkpoint, or the one tensor ending in ``.<module>.weight``
  (a PEFT adapter for the inner model of a checkpoint with another prefix); kohya stems are resolved first.
- Full tensors (PEFT ``modules_to_save``) replace the base tensor; a LoRA on the same tensor adds to the
  replacement. Their optimal error is 0 (no rank limit) and their rank is None.
- Overall errors weight layers by ‖ΔW‖²_F: √(Σ residual² / Σ ‖ΔW‖²_F).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from loratools.adapter import Adapter, LoraModule, lora_matrix
from loratools.adapter_files import load_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import FormatError
from loratools.extract import non_finite_error
from loratools.formats import KOHYA_PREFIXES, resolve_kohya_names
from loratools.linalg import RankPolicy, frobenius_energy, low_rank, residual_energy
from loratools.plan import find_tensor, fit_module, natural_key, plan_extract
from loratools.progress import Progress


@dataclass
class LayerCheck:
    """One verified tensor.

    Attributes:
        name: the module name (the full tensor's name for a full-only replacement).
        tensor: the checkpoint tensor it changes.
        kind: the module kind, or "full" for a full replacement.
        rank: the module's rank (None for a full replacement).
        delta_energy: ‖ΔW‖²_F; residual_energy: ‖ΔW − predicted ΔW‖²_F; optimal_energy: Eckart–Young residual.
    """

    name: str
    tensor: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None
    delta_energy: float
    residual_energy: float
    optimal_energy: float

    @property
    def rel_error(self) -> float:
        """‖ΔW − scale·B·A‖_F / ‖ΔW‖_F (0 when both are zero, inf when only ΔW is)."""
        return _ratio(self.residual_energy, self.delta_energy)

    @property
    def optimal_rel_error(self) -> float:
        """The best error any approximation of this rank reaches."""
        return _ratio(self.optimal_energy, self.delta_energy)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "tensor": self.tensor,
            "kind": self.kind,
            "shape": list(self.shape),
            "rank": self.rank,
            "rel_error": _finite(self.rel_error),
            "optimal_rel_error": _finite(self.optimal_rel_error),
            "delta_norm": math.sqrt(self.delta_energy),
        }


def _ratio(part: float, whole: float) -> float:
    if whole <= 0:
        return 0.0 if part <= 0 else math.inf
    return math.sqrt(max(0.0, part) / whole)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class VerifyReport:
    """Per-layer errors and coverage of an adapter against a base / tuned pair.

    Attributes:
        layers: matched tensors, in natural name order (``layers.2`` before ``layers.10``).
        uncovered: (tensor name, shape) of tensors that differ between base and tuned but nothing in the adapter
            touches.
        unmatched: adapter module or full-tensor name -> why it matches no tensor.
        unsupported: recognised adapter modules of a type not verified (LoHa, DoRA, ...), name -> type.
        only_in_base, only_in_tuned: tensor names present in one checkpoint only; mismatched: same name, other shape.
        unchanged: number of tensors equal in base and tuned and untouched by the adapter.
    """

    layers: list[LayerCheck]
    uncovered: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unchanged: int = 0

    def summary(self) -> dict:
        """Overall (‖ΔW‖²-weighted) errors, the worst layer, and the coverage lists."""
        delta = sum(layer.delta_energy for layer in self.layers)
        worst = max(self.layers, key=lambda layer: layer.rel_error, default=None)
        return {
            "layers": len(self.layers),
            "rel_error": _finite(_ratio(sum(layer.residual_energy for layer in self.layers), delta)),
            "optimal_rel_error": _finite(_ratio(sum(layer.optimal_energy for layer in self.layers), delta)),
            "worst_layer": worst.name if worst is not None else None,
            "worst_rel_error": _finite(worst.rel_error) if worst is not None else None,
            "uncovered": [name for name, _ in self.uncovered],
            "unmatched": self.unmatched,
            "unsupported": self.unsupported,
            "only_in_base": self.only_in_base,
            "only_in_tuned": self.only_in_tuned,
            "mismatched": self.mismatched,
            "unchanged": self.unchanged,
        }

    def to_json(self) -> dict:
        """``{"layers": [{"name", "rank", "rel_error", "optimal_rel_error", ...}, ...], "summary": {...}}``."""
        return {"layers": [layer.to_json() for layer in self.layers], "summary": self.summary()}


def _match(
    adapter: Adapter, base: TensorIndex, tuned: TensorIndex
) -> tuple[dict[str, tuple[LoraModule | None, torch.Tensor | None, str]], dict[str, str]]:
    """tensor -> (module, full tensor, display name) for everything the adapter touches; and the unmatched."""
    targets: dict[str, tuple[LoraModule | None, torch.Tensor | None, str]] = {}
    unmatched: dict[str, str] = {}
    wanted = [(n + ".weight", n, m, None, m.base_shape) for n, m in adapter.modules.items()]
    wanted += [(n, n, None, t, tuple(t.shape)) for n, t in adapter.full.items()]
    for tensor_name, name, module, full, shape in wanted:
        found = find_tensor(tensor_name, base)
        base_shape = base.info(found).shape if found is not None else None
        fitted = fit_module(module, base_shape) if module is not None and base_shape is not None else None
        if found is None:
            unmatched[name] = f"no tensor {tensor_name} in {base.path}"
        elif found not in tuned:
            unmatched[name] = f"{found} is not in {tuned.path}"
        elif base_shape != tuned.info(found).shape:
            unmatched[name] = f"{found} has shape {base_shape} in base, {tuned.info(found).shape} in tuned"
        elif (fitted is None) if module is not None else (base_shape != shape):
            what = f"a {module.kind} LoRA" if module is not None else "a full tensor"
            unmatched[name] = f"{what} for shape {shape}, but {found} has shape {base_shape}"
        else:
            old_module, old_full, old_name = targets.get(found, (None, None, name))
            targets[found] = (fitted or old_module, full if full is not None else old_full, old_name)
    return targets, unmatched


def _check(
    name: str, tensor: str, module: LoraModule | None, full: torch.Tensor | None, base: torch.Tensor,
    tuned: torch.Tensor, exact: bool, seed: int,
) -> LayerCheck:
    delta = tuned.float() - base.float()
    kind = module.kind if module is not None else "full"
    shape = tuple(delta.shape)
    remainder = tuned.float() - full.float() if full is not None else delta
    if module is None:
        return LayerCheck(name, tensor, kind, shape, None, frobenius_energy(delta), frobenius_energy(remainder), 0.0)
    b, a = module.factors(torch.float32)
    matrix = lora_matrix(delta, kind)
    total = frobenius_energy(matrix)
    residual = residual_energy(lora_matrix(remainder, kind), b * module.scale, a)
    if full is not None or total == 0:
        optimal = 0.0
    else:
        best = low_rank(matrix, RankPolicy("rank", module.rank), exact=exact, seed=seed, total_energy=total)
        optimal = best.rel_error**2 * total
    return LayerCheck(name, tensor, kind, shape, module.rank if full is None else None, total, residual, optimal)


def verify_adapter(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    adapter: str | os.PathLike | Adapter,
    *,
    exact: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare an adapter with the true deltas tuned − base, one tensor pair in memory at a time.

    Args:
        base, tuned: anything `open_checkpoint` reads; adapter: anything `load_adapter` reads, or an Adapter.
        exact: optimal errors from a full SVD instead of a randomized one (slower on large layers).
        seed: seed of the randomized SVD.
        progress: called as ``progress(done, total, tensor_name)`` for every tensor read.
    Returns:
        A VerifyReport (layers in natural name order).
    Example:
        >>> report = verify_adapter("fixtures/sd-base.safetensors", "fixtures/sd-tuned.safetensors",
        ...                         "fixtures/sd-lora-kohya.safetensors")
        >>> report.summary()["rel_error"] < 1e-6
        True
    """
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        if any(name.startswith(KOHYA_PREFIXES) for name in adapter.modules):
            adapter = resolve_kohya_names(adapter, list(base_index.tensors))
        targets, unmatched = _match(adapter, base_index, tuned_index)
        plan = plan_extract(base_index, tuned_index, skip_mismatched=True)
        report = VerifyReport(
            [], unmatched=unmatched, unsupported=dict(adapter.unsupported), only_in_base=plan.only_in_base,
            only_in_tuned=plan.only_in_tuned, mismatched=[name for name, _, _ in plan.mismatched],
        )
        pairs = sorted([p.tensor for p in plan.pairs] + [w.tensor for w in plan.whole], key=natural_key)
        for done, tensor in enumerate(pairs, 1):
            b, t = base_index.get(tensor), tuned_index.get(tensor)
            if tensor in targets:
                module, full, name = targets[tensor]
                if not bool(torch.isfinite(b).all() and torch.isfinite(t).all()):
                    raise non_finite_error(tensor, base_index, tuned_index)
                layer = _check(name, tensor, module, full, b, t, exact, seed)
                if not math.isfinite(layer.residual_energy):
                    raise FormatError(f"{name}: the adapter's factors hold non-finite values (nan or inf)")
                report.layers.append(layer)
            elif torch.equal(b, t):
                report.unchanged += 1
            else:
                report.uncovered.append((tensor, tuple(b.shape)))
            if progress is not None:
                progress(done, len(pairs), tensor)
    return report
