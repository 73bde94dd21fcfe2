"""`verify`: how close an existing adapter is to the real fine-tune, layer by layer, and what it leaves out.

For each adapter module matched to a checkpoint tensor, with ΔW = tuned − base in the module's LoRA layout:
- ``rel_error`` = ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F, measured in float64 blocks (the product is never held whole);
- ``optimal_rel_error`` = the Eckart–Young error of the best approximation of the same rank r: the measured
  ‖ΔW − U_r Σ_r V_rᵀ‖_F / ‖ΔW‖_F of the rank-r truncated SVD of ΔW (`rsvd.low_rank`: randomized; ``svd.exact``: a
  full SVD). Measured rather than √(‖ΔW‖² − Σσ²), which cancels catastrophically when the error is tiny; a
  randomized truncation is never better than the true optimum, so this figure is never too optimistic.
Coverage both ways: changed tensors that no module or full tensor touches (`uncovered`), and adapter modules
that match no tensor or a tensor of another shape (`unmatched`, with the reason). Base and tuned tensors are
paired by `plan.plan_extract` (names in one checkpoint only, and shape mismatches, are listed, never an error).

Decisions:
- Modules are matched to base tensors by `matching.match_adapter` (kohya stems resolved first).
- Full tensors (PEFT ``modules_to_save``) replace the base tensor; a LoRA on the same tensor adds to the
  replacement. Their optimal error is 0 (no rank limit) and their rank is None.
- LoHa, LoKr and DoRA modules (`Adapter.structured`) are checked with their true ΔW (`structured_modules`; DoRA's
  from the base weight). Their "same rank" is the exact rank of that ΔW for LoHa / LoKr (what a plain LoRA needs
  to hold it), and for DoRA the rank of its direction update (a DoRA ΔW is full rank in general, so its error
  can fall below that optimum: the magnitude vector buys it).
- Overall errors weight layers by ‖ΔW‖²_F: √(Σ residual² / Σ ‖ΔW‖²_F) (`linalg.pooled_rel_error`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch

from loratools.adapter import Adapter, LoraModule, lora_matrix
from loratools.adapter_files import load_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.deltas import TensorChange, non_finite_error, tensor_change
from loratools.errors import FormatError
from loratools.linalg import frobenius_energy, pooled_rel_error, residual_energy
from loratools.matching import Target, match_adapter
from loratools.names import natural_key
from loratools.options import RankPolicy, Selection, SvdSettings
from loratools.plan import Pairing, plan_extract
from loratools.progress import Progress
from loratools.rsvd import low_rank, svd_device
from loratools.structured import numerical_rank
from loratools.structured_convert import structured_targets
from loratools.structured_modules import DoraModule, StructuredModule, layer_kind, structured_delta


@dataclass
class LayerCheck:
    """One verified tensor.

    Attributes:
        name: the module name (the full tensor's name for a full-only replacement).
        tensor: the checkpoint tensor it changes.
        kind: the module kind, or "full" for a full replacement.
        rank: the module's rank (None for a full replacement); for LoHa / LoKr / DoRA the rank of the optimum
            (see the module docstring).
        type: LoRA, LoHa, LoKr, DoRA, LoHa+DoRA … ("full" for a full replacement).
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
    type: str = "LoRA"

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
            "type": self.type,
            "shape": list(self.shape),
            "rank": self.rank,
            "rel_error": _finite(self.rel_error),
            "optimal_rel_error": _finite(self.optimal_rel_error),
            "delta_norm": math.sqrt(self.delta_energy),
        }


def _ratio(part: float, whole: float) -> float:
    return pooled_rel_error([(max(0.0, part), whole)])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class VerifyReport:
    """Per-layer errors and coverage of an adapter against a base / tuned pair.

    Attributes:
        layers: matched tensors, in natural name order (``layers.2`` before ``layers.10``).
        uncovered: tensors that differ between base and tuned but nothing in the adapter touches.
        unmatched: adapter module or full-tensor name -> why it matches no tensor.
        unsupported: recognised adapter modules of a type not verified (GLoRA, OFT, ...), name -> type.
        pairing: names in one checkpoint only, and shape mismatches.
        unchanged: number of tensors equal in base and tuned and untouched by the adapter.
    """

    layers: list[LayerCheck]
    uncovered: list[TensorChange] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    pairing: Pairing = field(default_factory=Pairing)
    unchanged: int = 0

    @property
    def notes(self) -> list[str]:
        """Warnings for the user: none (everything is in the report)."""
        return []

    def summary(self) -> dict:
        """Overall (‖ΔW‖²-weighted) errors, the worst layer, and the coverage lists."""
        worst = max(self.layers, key=lambda layer: layer.rel_error, default=None)
        return {
            "layers": len(self.layers),
            "rel_error": _finite(pooled_rel_error((layer.residual_energy, layer.delta_energy) for layer in self.layers)),
            "optimal_rel_error": _finite(pooled_rel_error((layer.optimal_energy, layer.delta_energy)
                                                          for layer in self.layers)),
            "worst_layer": worst.name if worst is not None else None,
            "worst_rel_error": _finite(worst.rel_error) if worst is not None else None,
            "uncovered": [change.name for change in self.uncovered],
            "unmatched": self.unmatched,
            "unsupported": self.unsupported,
            **self.pairing.to_json(),
            "unchanged": self.unchanged,
        }

    def to_json(self) -> dict:
        """``{"layers": [{"name", "rank", "rel_error", "optimal_rel_error", ...}, ...], "summary": {...}}``."""
        return {"layers": [layer.to_json() for layer in self.layers], "summary": self.summary()}


def _match(adapter: Adapter, base: TensorIndex, tuned: TensorIndex) -> tuple[dict[str, Target], dict[str, str]]:
    """The adapter's targets whose tensor the tuned checkpoint holds with the same shape; and the unmatched."""
    match = match_adapter(adapter, base)
    unmatched = match.unmatched
    targets = {}
    for tensor, target in match.targets.items():
        if tensor not in tuned:
            unmatched[target.name] = f"{tensor} is not in {tuned.path}"
        elif base.info(tensor).shape != tuned.info(tensor).shape:
            unmatched[target.name] = (f"{tensor} has shape {base.info(tensor).shape} in base,"
                                      f" {tuned.info(tensor).shape} in tuned")
        else:
            targets[tensor] = target
    return targets, unmatched


def _match_structured(adapter: Adapter, base: TensorIndex, tuned: TensorIndex
                      ) -> tuple[dict[str, tuple[str, str, StructuredModule]], dict[str, str]]:
    """Tensor -> (module name, tensor, module) for the adapter's LoHa / LoKr / DoRA modules; and the unmatched."""
    found, unmatched = structured_targets(adapter, base)
    targets = {}
    for name, (tensor, module) in found.items():
        if tensor not in tuned:
            unmatched[name] = f"{tensor} is not in {tuned.path}"
        elif base.info(tensor).shape != tuned.info(tensor).shape:
            unmatched[name] = f"{tensor} has shape {base.info(tensor).shape} in base, {tuned.info(tensor).shape} in tuned"
        else:
            targets[tensor] = (name, tensor, module)
    return targets, unmatched


def _check(target: Target, base: torch.Tensor, tuned: torch.Tensor, svd: SvdSettings) -> LayerCheck:
    module, full, name, tensor = target.module, target.full, target.name, target.tensor
    delta = tuned.float() - base.float()
    kind = module.kind if module is not None else "full"
    shape = tuple(delta.shape)
    remainder = tuned.float() - full.to(tuned.device).float() if full is not None else delta
    if module is None:
        return LayerCheck(name, tensor, kind, shape, None, frobenius_energy(delta), frobenius_energy(remainder), 0.0,
                          "full")
    b, a = (factor.to(delta.device) for factor in module.factors(torch.float32))
    matrix = lora_matrix(delta, kind)
    total = frobenius_energy(matrix)
    residual = residual_energy(lora_matrix(remainder, kind), b * module.scale, a)
    if full is not None or total == 0:
        optimal = 0.0
    else:
        best = low_rank(matrix, RankPolicy("rank", module.rank), settings=svd.for_layer(name), total_energy=total)
        optimal = best.rel_error**2 * total
    return LayerCheck(name, tensor, kind, shape, module.rank if full is None else None, total, residual, optimal)


def _structured_rank(module: StructuredModule, shape: tuple[int, int]) -> int:
    """The rank of the optimum a structured module is compared with (see the module docstring)."""
    inner = module.delta if isinstance(module, DoraModule) else module
    if isinstance(inner, LoraModule):
        return inner.rank
    exact, _ = inner.svd(torch.float64)
    return numerical_rank(exact.S, shape)


def _check_structured(name: str, tensor: str, module: StructuredModule, base: torch.Tensor, tuned: torch.Tensor,
                      svd: SvdSettings) -> LayerCheck:
    """A LoHa / LoKr / DoRA module against ΔW = tuned − base: its true ΔW, computed on the CPU in float64."""
    kind = layer_kind(module)
    delta = lora_matrix(tuned.double() - base.double(), kind)
    weight = lora_matrix(base.double(), kind).cpu()
    predicted = structured_delta(module, weight, dtype=torch.float64).to(delta.device)
    total = frobenius_energy(delta)
    rank = _structured_rank(module, module.matrix_shape)
    optimal = 0.0
    if total > 0:
        best = low_rank(delta, RankPolicy("rank", rank), settings=svd.for_layer(name), total_energy=total)
        optimal = best.rel_error**2 * total
    return LayerCheck(name, tensor, kind, tuple(base.shape), rank, total, frobenius_energy(delta - predicted), optimal,
                      module.type_name)


def verify_adapter(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    adapter: str | os.PathLike | Adapter,
    *,
    selection: Selection = Selection(),
    svd: SvdSettings = SvdSettings(),
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare an adapter with the true deltas tuned − base, one tensor pair in memory at a time.

    Args:
        base, tuned: anything `open_checkpoint` reads; adapter: anything `load_adapter` reads, or an Adapter.
        selection: include / exclude patterns limit the tensors verified; mismatched shapes are always listed.
        svd: how the optimal errors are computed (randomized or exact SVD, seed, device; `SvdSettings`).
        progress: called as ``progress(done, total, tensor_name)`` for every tensor read.
    Returns:
        A VerifyReport (layers in natural name order).
    Example:
        >>> report = verify_adapter("fixtures/sd-base.safetensors", "fixtures/sd-tuned.safetensors",
        ...                         "fixtures/sd-lora-kohya.safetensors")
        >>> report.summary()["rel_error"] < 1e-6
        True
    """
    loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, base=base)
    device = svd_device(svd)
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        targets, unmatched = _match(loaded, base_index, tuned_index)
        structured, unmatched_structured = _match_structured(loaded, base_index, tuned_index)
        plan = plan_extract(base_index, tuned_index, selection=replace(selection, skip_mismatched=True))
        report = VerifyReport([], unmatched={**unmatched, **unmatched_structured}, unsupported=dict(loaded.unsupported),
                              pairing=plan.pairing)
        tensors = sorted([p.tensor for p in plan.pairs] + [w.tensor for w in plan.whole], key=natural_key)
        for done, tensor in enumerate(tensors, 1):
            if tensor in targets or tensor in structured:
                b, t = base_index.get(tensor).to(device), tuned_index.get(tensor).to(device)
                if not bool(torch.isfinite(b).all() and torch.isfinite(t).all()):
                    raise non_finite_error(tensor, base_index, tuned_index)
                if tensor in targets:
                    layer = _check(targets[tensor], b, t, svd)
                else:
                    layer = _check_structured(*structured[tensor], b, t, svd)
                if not math.isfinite(layer.residual_energy):
                    raise FormatError(f"{layer.name}: the adapter's factors hold non-finite values (nan or inf)")
                report.layers.append(layer)
            else:
                change = tensor_change(base_index, tuned_index, tensor)
                if change is None:
                    report.unchanged += 1
                else:
                    report.uncovered.append(change)
            if progress is not None:
                progress(done, len(tensors), tensor)
    return report
