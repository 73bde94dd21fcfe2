"""LoRA slots for onnxruntime multi-LoRA: which modules get one, the branch they add, and the LoRA layout they take.

torch and transformers only (transformers through the model given). A slot on a module adds
``(x @ A) @ B`` to its output, A (in, r) and B (r, out) being graph inputs named like Olive's
``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` with a dynamic rank axis ``lora_r_<i>``.

Decisions:
- Slots go on ``nn.Linear`` (weight (out, in), y = x·Wᵀ + b) and transformers' ``Conv1D`` (GPT-2: weight
  (in, out), y = x·W + b); the branch is the same for both. Embeddings, convolutions and other layers are
  refused by name (a LoRA there is not a matmul on the layer's input).
- The branch is a forward hook that reads A and B from the top module's forward arguments, so the model's
  own code, weights and names are untouched; without slot tensors the hook does nothing (the model in PyTorch
  is the base model, which is what a run without an adapter must equal).
- `onnx_factors` turns an adapter module into the slot's (A, B), the scale folded into B: for a module whose
  base-layout delta D is applied as x·Dᵀ (Linear) or x·D (Conv1D).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import load_usable
from loratools.checkpoint import TensorIndex, TensorInfo
from loratools.errors import ExportError, ShapeError
from loratools.export.trace import GraphModule, GraphSpec
from loratools.matching import AdapterMatch, match_adapter
from loratools.names import short_list

LAYOUTS = ("linear", "conv1d")
RANK_AXIS = "lora_r"  # slot i's rank axis is lora_r_i (see trace_extra)
TRACE_RANK = 16  # slot i is traced at rank 16 + i: not 0 or 1 (specialized), none equal (duck-sized together)
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
METADATA_KEY = "loratools.lora_slots"  # graph metadata: JSON {module: [layout, in, out]}


@dataclass(frozen=True)
class Slot:
    """One module's LoRA slot.

    Attributes:
        module: the module's path in the model, e.g. ``model.layers.0.self_attn.q_proj``.
        layout: "linear" (base weight (out, in)) or "conv1d" (base weight (in, out), transformers' Conv1D).
        in_features, out_features: A is (in_features, r), B is (r, out_features).
    """

    module: str
    layout: str
    in_features: int
    out_features: int

    @property
    def a_name(self) -> str:
        return self.module + A_SUFFIX

    @property
    def b_name(self) -> str:
        return self.module + B_SUFFIX

    @property
    def base_shape(self) -> tuple[int, int]:
        """The base weight's shape in the checkpoint's layout."""
        if self.layout == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def empty(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-rank (A, B): (in, 0) and (0, out)."""
        return torch.zeros(self.in_features, 0, dtype=dtype), torch.zeros(0, self.out_features, dtype=dtype)


def _layer_layout(layer: torch.nn.Module) -> tuple[str, int, int] | None:
    if isinstance(layer, torch.nn.Linear):
        return "linear", int(layer.in_features), int(layer.out_features)
    if type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None:  # transformers' Conv1D
        weight = cast(torch.Tensor, layer.weight)
        return "conv1d", int(weight.shape[0]), int(weight.shape[1])
    return None


def slot_for(model: torch.nn.Module, name: str) -> Slot:
    """The slot of module `name` of `model`; ExportError naming it when it cannot take one."""
    layer = model.get_submodule(name)
    found = _layer_layout(layer)
    if found is None:
        kind = type(layer).__name__
        hint = " (embedding LoRAs are not supported as slots; merge them with export-onnx -a)" \
            if isinstance(layer, torch.nn.Embedding) else ""
        raise ExportError(f"{name}: a {kind} cannot take a LoRA slot; slots go on Linear and Conv1D layers{hint}")
    return Slot(name, *found)


class _ShapeIndex:
    """Tensor names and shapes without files: what `match_adapter` reads of a TensorIndex."""

    def __init__(self, label: str, shapes: dict[str, tuple[int, ...]]):
        self.path = Path(label)
        self.config: dict | None = None
        self.metadata: dict[str, str] = {}
        self.tensors = {n: TensorInfo(n, s, torch.float32, self.path) for n, s in shapes.items()}

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]


def shape_index(label: str, shapes: dict[str, tuple[int, ...]]) -> TensorIndex:
    """An in-memory index of tensor names and shapes (no data) for `match_adapter`; `label` names it in errors."""
    return cast(TensorIndex, _ShapeIndex(label, shapes))


def match_slots(adapter: Adapter, index: TensorIndex, *, label: str) -> AdapterMatch:
    """Match `adapter` (read from `label`) to `index`; ShapeError for full tensors and modules that do not fit."""
    if adapter.full:
        raise ShapeError(f"{label}: {short_list(sorted(adapter.full))} saved whole (modules_to_save) cannot"
                         " go into a LoRA slot; merge them into the base first (export-onnx -a) or drop them")
    match = match_adapter(adapter, index)
    if match.misfit:
        name, why = next(iter(match.misfit.items()))
        raise ShapeError(f"{label}: {name} is {why}; the adapter was made for another model")
    return match


def resolve_slots(model: torch.nn.Module, spec: str, *, label: str) -> list[Slot]:
    """The slots a SPEC asks for, in model order.

    Args:
        spec: an adapter path (its modules become the slots) or comma-separated module names, leaf names
            (``q_proj``, as PEFT's target_modules) or globs (``*.self_attn.*``).
        label: the model's path, for error messages.
    Raises:
        ExportError naming a module that cannot take a slot, a name or glob that matches none.
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    if Path(spec).exists():
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        match = match_slots(load_usable(spec), shape_index(label, shapes), label=spec)
        if match.missing:
            raise ShapeError(f"{spec}: {len(match.missing)} adapter module(s) match no layer of {label}:"
                             f" {short_list(list(match.missing))}; is the adapter for this model?")
        names = {t.tensor.removesuffix(".weight") for t in match.targets.values()}
        for target in match.targets.values():
            if target.module is not None and target.module.kind not in LAYOUTS:
                raise ExportError(f"{target.name}: a {target.module.kind} LoRA cannot be a slot; slots go on Linear"
                                  " and Conv1D layers (merge it with export-onnx -a instead)")
        return [slot_for(model, name) for name in sorted(names, key=lambda n: order.get(n, 0))]
    chosen: list[str] = []
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        glob = any(c in pattern for c in "*?[")
        hits = [name for name in order if name and (name == pattern or name.endswith("." + pattern)
                                                    or (glob and fnmatch.fnmatchcase(name, pattern)))]
        if glob:
            hits = [name for name in hits if _layer_layout(model.get_submodule(name)) is not None]
        if not hits:
            raise ExportError(f"--lora-slots {pattern!r} matches no {'Linear or Conv1D ' if glob else ''}module of"
                              f" {label} (and is no adapter path); give module names such as q_proj or"
                              " model.layers.0.self_attn.q_proj, or globs")
        chosen += [name for name in hits if name not in chosen]
    return [slot_for(model, name) for name in sorted(chosen, key=order.__getitem__)]


class SlottedModule(GraphModule):
    """A GraphModule whose forward also takes (A, B) per slot after the graph's own inputs.

    ``forward(*graph_inputs, a_0, b_0, a_1, b_1, …)`` adds ``(x @ a_i) @ b_i`` to slot i's output; called with
    the graph inputs only (as `trace.sample_inputs` / `run_torch` do) it is the base model.
    """

    def __init__(self, model: torch.nn.Module, spec: GraphSpec, slots: Sequence[Slot]):
        super().__init__(model, spec)
        self.slots = list(slots)
        self.active: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for slot in self.slots:
            model.get_submodule(slot.module).register_forward_hook(self._branch(slot.module))

    def _branch(self, name: str) -> Any:
        def hook(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            factors = self.active.get(name)
            if factors is None:
                return None
            a, b = factors
            return output + (args[0] @ a) @ b

        return hook

    @property
    def slot_inputs(self) -> list[str]:
        return [name for slot in self.slots for name in (slot.a_name, slot.b_name)]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.spec.inputs)
        lora = tensors[count:]
        self.active = {slot.module: (lora[2 * i], lora[2 * i + 1]) for i, slot in enumerate(self.slots)} if lora else {}
        try:
            return super().forward(*tensors[:count])
        finally:
            self.active = {}

    def trace_extra(self) -> list[tuple[str, torch.Tensor, dict]]:
        """(name, sample, dynamic axes) of every slot input, for `trace.trace(extra=...)`.

        One rank axis per slot (``lora_r_<i>``), shared by its A and B: onnxruntime plans buffers assuming inputs
        with the same symbolic dimension have the same size, so one axis for all slots breaks with mixed ranks.
        """
        generator = torch.Generator().manual_seed(4)
        extra = []
        for i, slot in enumerate(self.slots):
            rank = torch.export.Dim(f"{RANK_AXIS}_{i}", min=0)
            a = torch.randn(slot.in_features, TRACE_RANK + i, generator=generator) * 0.02
            b = torch.randn(TRACE_RANK + i, slot.out_features, generator=generator) * 0.02
            extra += [(slot.a_name, a, {1: rank}), (slot.b_name, b, {0: rank})]
        return extra


def onnx_factors(module: LoraModule, layout: str, *, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A module fitted to a slot's base weight (`matching.fit_module`) as the slot's fp32 (A, B) with
    weight · scale folded into B.

    The module's base-layout delta is D = s·B·A (kind linear) or s·(B·A)ᵀ (conv1d); a Linear adds x·Dᵀ, a
    Conv1D x·D, so the slot takes (Aᵀ, s·Bᵀ) when the two agree and (s·B, A) when they do not (a square
    Conv1D weight with a non-fan_in_fan_out adapter, applied as `merge` applies it).

    Returns:
        A (in, r), B (r, out), fp32, contiguous.
    """
    b, a = module.factors(torch.float32)
    b = b * (module.scale * weight)
    if (module.kind == "conv1d") == (layout == "conv1d"):
        return a.T.contiguous(), b.T.contiguous()
    return b.contiguous(), a.contiguous()


def slot_metadata(slots: Sequence[Slot]) -> dict[str, list]:
    """module → [layout, in, out], stored in the graph so `export_adapter` knows each base weight's layout."""
    return {s.module: [s.layout, s.in_features, s.out_features] for s in slots}


def slots_from_metadata(metadata: dict[str, list]) -> list[Slot]:
    return [Slot(module, str(layout), int(n_in), int(n_out)) for module, (layout, n_in, n_out) in metadata.items()]


def add_slots(model: Any, module: SlottedModule) -> None:
    """Finish an exported slotted graph (an onnx_ir model): zero-size defaults for the slot inputs and the slot
    table in the metadata."""
    from loratools.export.slot_runtime import add_slot_defaults

    shapes: dict[str, tuple[int, int]] = {}
    for slot in module.slots:
        shapes[slot.a_name] = (slot.in_features, 0)
        shapes[slot.b_name] = (0, slot.out_features)
    add_slot_defaults(model, shapes, metadata_key=METADATA_KEY, metadata=slot_metadata(module.slots))
