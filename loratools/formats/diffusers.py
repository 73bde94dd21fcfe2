"""diffusers LoRA files: what ``pipeline.save_lora_weights`` writes, ``<component>.<module>.lora_A.weight`` /
``.lora_B.weight`` in ``pytorch_lora_weights.safetensors``. diffusers gives every module alpha = rank (scale
1.0) unless the file's ``lora_adapter_metadata`` says otherwise, so each module's scale is folded into B."""

from __future__ import annotations

import json

import torch

from loratools.adapter import Adapter
from loratools.errors import FormatError
from loratools.formats.keys import KOHYA_PREFIXES
from loratools.formats.peft import peft_pattern_value
from loratools.formats.sd_names import DIFFUSERS_COMPONENTS, ORIGINAL_NAMESPACES

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def render_diffusers(adapter: Adapter, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """diffusers tensors (``unet.<module>.lora_A.weight`` …, as ``save_lora_weights`` writes) for `adapter`.

    Each module's scale is folded into its B (diffusers applies B·A with alpha = rank). Module names are
    looked up in `names` (from `pipeline_names`) first; names outside any pipeline component get ``unet.``,
    or ``text_encoder.`` for CLIP text-model names (``text_model.``).
    Raises:
        FormatError for full tensors, embedding / Conv1D layers, unresolved kohya stems and original
        single-file names that have no diffusers name.
    """
    if adapter.full:
        raise FormatError(f"diffusers format cannot hold full tensors ({', '.join(sorted(adapter.full))});"
                          " use --format peft")
    names = names or {}
    tensors: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        if module.kind in ("embedding", "conv1d"):
            raise FormatError(f"{module.name}: diffusers format has no {module.kind} layout; use --format peft")
        name = names.get(module.name, module.name)
        if name.startswith(KOHYA_PREFIXES):
            raise FormatError(f"{name}: kohya module names must be resolved to dotted paths before writing diffusers"
                              " (pass --base with the model the adapter was made for)")
        if name.startswith(tuple(ORIGINAL_NAMESPACES) + ("conditioner.", "cond_stage_model.")):
            raise FormatError(f"{name}: no diffusers name for this original-layout layer; --exclude it, or use"
                              " --format kohya")
        if not name.startswith(DIFFUSERS_COMPONENTS):
            name = ("text_encoder." if name.startswith("text_model.") else "unet.") + name
        key = f"{name}.lora_A.weight"
        if key in tensors:
            raise FormatError(f"{module.name}: two modules become diffusers key {key}; rename or use peft")
        tensors[key] = module.A.contiguous()
        tensors[f"{name}.lora_B.weight"] = (module.B * module.scale).contiguous()
    return tensors


def diffusers_alpha(name: str, rank: int, metadata: dict[str, str]) -> float:
    """The plain alpha (scale · rank) diffusers gives module `name` (``unet.…``) of a file with this metadata:
    its component's ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora`` from ``lora_adapter_metadata``, or
    alpha = rank (scale 1.0) when the file has none."""
    config = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    component = next((c for c in DIFFUSERS_COMPONENTS if name.startswith(c)), "")
    local = {k[len(component):]: v for k, v in config.items() if k.startswith(component)} if component else config
    if "lora_alpha" not in local:
        return float(rank)
    alpha = peft_pattern_value(local.get("alpha_pattern") or {}, name[len(component):], local["lora_alpha"])
    return float(alpha) * (rank ** 0.5 if local.get("use_rslora") else 1.0)


# ---- validation of what a file claims -------------------------------------------------------------------------
