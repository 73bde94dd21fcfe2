"""The adapter data model: an Adapter gathers one module per adapted layer, plain LoRA (`lora_module`, whose
names it re-exports: the layout table of every layer kind is there) or structured (`structured_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from loratools.lora_module import KINDS, TRANSPOSED_KINDS, LoraModule, base_layout, lora_matrix
from loratools.structured_modules import StructuredModule

__all__ = ["KINDS", "TRANSPOSED_KINDS", "Adapter", "LoraModule", "base_layout", "lora_matrix"]


@dataclass
class Adapter:
    """A LoRA adapter, independent of its file format.

    Attributes:
        modules: LoRA modules by name, in a stable order.
        format: "peft", "kohya" or "diffusers" (how it was read, or how it will be written by default).
        base_model: ``base_model_name_or_path`` when known.
        metadata: safetensors ``__metadata__`` strings (kohya ``ss_*`` kept verbatim).
        config: the PEFT ``adapter_config.json`` contents, when read from PEFT.
        full: full tensors saved as-is (PEFT ``modules_to_save``), by base tensor name.
        structured: modules that are not plain LoRA (LoHa, LoKr, DoRA: `structured_modules`), by name.
        unsupported: recognised adapter modules this tool cannot use, name -> type (GLoRA, OFT, (IA)³ ...).
        notes: warnings gathered while reading (e.g. an assumed alpha).
    """

    modules: dict[str, LoraModule]
    format: str = "peft"
    base_model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    structured: dict[str, StructuredModule] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.modules.values()]

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the first module's factors (None for an empty adapter)."""
        first = next(iter(self.modules.values()), None)
        return first.A.dtype if first is not None else None

    def num_parameters(self) -> int:
        """Trainable parameters: all A and B entries plus full tensors."""
        lora = sum(m.A.numel() + m.B.numel() for m in self.modules.values())
        structured = sum(t.numel() for m in self.structured.values() for t in m.tensors())
        return lora + structured + sum(t.numel() for t in self.full.values())

    def to(self, dtype: torch.dtype) -> Adapter:
        """A copy with every factor and full tensor cast to `dtype`."""
        modules = {n: replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for n, m in self.modules.items()}
        return replace(self, modules=modules, full={n: t.to(dtype) for n, t in self.full.items()})
