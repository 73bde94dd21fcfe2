"""PEFT LoRA adapters: the key table and ``render_peft`` (tensors + ``adapter_config.json``).

Decisions:
- PEFT ``target_modules`` is written as the sorted list of full module names, so it never matches a module
  that was not extracted (a leaf name such as ``q_proj`` would).
- Mixed ranks are written with ``rank_pattern`` and ``alpha_pattern`` keyed by full module names (exact
  per-module scale; PEFT matches them with ``(.*\\.)?(key)$``).
"""

from __future__ import annotations

import re
from typing import TypeVar

import torch

from loratools.adapter import Adapter
from loratools.errors import FormatError
from loratools.formats.keys import KOHYA_PREFIXES, PEFT_PREFIX

T = TypeVar("T")
# key suffix -> role of the tensor in a LoRA module ("A", "B", "alpha") and whether it marks an embedding.
PEFT_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".alpha": ("alpha", False),
}
# Full base tensors saved inside a PEFT adapter: key suffix -> suffix of the base tensor it replaces.
PEFT_FULL_SUFFIXES = {".base_layer.weight": ".weight", ".weight": ".weight", ".bias": ".bias"}


def peft_pattern_value(patterns: dict, name: str, default: T) -> T:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def render_peft(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensors (``base_model.model.<module>.lora_A.weight`` ...) and ``adapter_config.json`` contents."""
    tensors: dict[str, torch.Tensor] = {}
    rslora = {m.rslora for m in adapter.modules.values()}
    modules = list(adapter.modules.values())
    if len(rslora) > 1:
        modules = [m.with_plain_alpha() for m in modules]
    for module in modules:
        if module.name.startswith(KOHYA_PREFIXES):
            raise FormatError(
                f"{module.name}: kohya module names must be resolved to dotted paths before writing PEFT"
                " (pass the base model so names can be matched)"
            )
        if module.kind == "embedding":
            tensors[f"{PEFT_PREFIX}{module.name}.lora_embedding_A"] = module.A.contiguous()
            tensors[f"{PEFT_PREFIX}{module.name}.lora_embedding_B"] = module.B.contiguous()
        else:
            tensors[f"{PEFT_PREFIX}{module.name}.lora_A.weight"] = module.A.contiguous()
            tensors[f"{PEFT_PREFIX}{module.name}.lora_B.weight"] = module.B.contiguous()
    for name, tensor in adapter.full.items():
        tensors[f"{PEFT_PREFIX}{name}"] = tensor.contiguous()
    ranks = [m.rank for m in modules]
    alphas = [m.alpha for m in modules]
    r = max(set(ranks), key=lambda x: (ranks.count(x), -x)) if ranks else 8
    alpha = max(set(alphas), key=lambda x: (alphas.count(x), -x)) if alphas else r
    config = {
        "peft_type": "LORA",
        "task_type": adapter.config.get("task_type"),
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _json_number(alpha),
        "target_modules": sorted(m.name for m in modules),
        "rank_pattern": {m.name: m.rank for m in modules if m.rank != r},
        "alpha_pattern": {m.name: _json_number(m.alpha) for m in modules if m.alpha != alpha},
        "fan_in_fan_out": any(m.kind == "conv1d" for m in modules),
        "use_rslora": rslora == {True},
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in adapter.full}) or None,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
    }
    return tensors, config


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)

