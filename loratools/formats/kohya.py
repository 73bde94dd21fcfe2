"""kohya / A1111 / ComfyUI LoRA files: the key table, kohya stems and ``render_kohya``.

Decisions:
- kohya files always carry an ``alpha`` per module. Names that are not already kohya stems get a prefix
  (given, or chosen from the name's namespace by KOHYA_NAMESPACES) and ``.`` replaced by ``_``; the dotted
  names are kept in the metadata key ``loratools_module_names`` so a kohya file written here converts back to
  PEFT without a base model.
- kohya has no layout for embeddings or transposed Conv1D layers: writing those raises FormatError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from loratools.adapter import Adapter
from loratools.errors import FormatError
from loratools.formats.keys import KOHYA_PREFIXES, NAME_MAP_KEY, PEFT_CONFIG_KEY

KOHYA_SUFFIXES = {
    ".lora_down.weight": ("A", False),
    ".lora_up.weight": ("B", False),
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".alpha": ("alpha", False),
}

# Where kohya prefixes live in base checkpoints: kohya prefix -> namespaces of dotted names it stands for
# (diffusers folders / combined files, original ldm checkpoints, SDXL).
KOHYA_NAMESPACES = {
    "lora_unet_": ("unet.", "model.diffusion_model.", "transformer.", ""),
    "lora_te_": ("text_encoder.", "cond_stage_model.transformer.", "te."),
    "lora_te1_": ("text_encoder.", "conditioner.embedders.0.transformer."),
    "lora_te2_": ("text_encoder_2.", "conditioner.embedders.1.model."),
    "lora_te3_": ("text_encoder_3.",),
    "lora_transformer_": ("transformer.",),
}


def is_sdxl(names: Iterable[str]) -> bool:
    """Whether module names include SDXL's second text encoder (then the first one's kohya prefix is lora_te1_)."""
    return any(n.startswith(("text_encoder_2.", "lora_te2_")) for n in names)


def kohya_stems(tensor_names: Iterable[str]) -> dict[str, str]:
    """kohya stem -> dotted module name for every ``<module>.weight`` of a checkpoint, in every namespace of
    KOHYA_NAMESPACES (the first module claiming a stem keeps it)."""
    by_stem: dict[str, str] = {}
    for tensor in tensor_names:
        if not tensor.endswith(".weight"):
            continue
        module = tensor[: -len(".weight")]
        for prefix, namespaces in KOHYA_NAMESPACES.items():
            for space in namespaces:
                if module.startswith(space):
                    by_stem.setdefault(prefix + module[len(space):].replace(".", "_"), module)
    return by_stem


def kohya_stem(name: str, prefix: str | None = None, sdxl: bool = False) -> str:
    """The kohya key stem of a dotted module name.

    Unchanged when it already has a kohya prefix. With `prefix` given, that prefix is used as-is;
    otherwise it is chosen from the name's namespace (``unet.`` -> ``lora_unet_``, ``text_encoder.`` ->
    ``lora_te_``, or ``lora_te1_`` when `sdxl`; ``text_encoder_2.`` -> ``lora_te2_``), defaulting to
    ``lora_unet_`` for other names.
    """
    if name.startswith(KOHYA_PREFIXES):
        return name
    if prefix is None:
        for candidate, namespaces in KOHYA_NAMESPACES.items():
            if candidate == "lora_te_" and sdxl:
                continue
            for space in namespaces:
                if space and name.startswith(space):
                    return candidate + name[len(space):].replace(".", "_")
        prefix = "lora_unet_"
    return prefix + name.replace(".", "_")


def render_kohya(
    adapter: Adapter, prefix: str | None = None, pipeline: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors (``lora_down``/``lora_up``/``alpha`` per module) and ``ss_*`` metadata for `adapter`.

    `pipeline` (from `pipeline_names`) gives modules the diffusers-layout name their key stem is made from;
    the module's own name is what the metadata records, so the file reads back with it.
    """
    pipeline = pipeline or {}
    if adapter.full:
        raise FormatError(f"kohya format cannot hold full tensors ({', '.join(sorted(adapter.full))}); use --format peft")
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    sdxl = is_sdxl(pipeline.get(n, n) for n in adapter.modules)
    for module in adapter.modules.values():
        if module.kind in ("embedding", "conv1d"):
            raise FormatError(f"{module.name}: kohya format has no {module.kind} layout; use --format peft")
        module = module.with_plain_alpha()
        stem = kohya_stem(pipeline.get(module.name, module.name), prefix, sdxl)
        if stem in names:
            raise FormatError(f"{module.name} and {names[stem]} both become kohya key {stem}; rename or use peft")
        names[stem] = module.name
        tensors[f"{stem}.lora_down.weight"] = module.A.contiguous()
        tensors[f"{stem}.lora_up.weight"] = module.B.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in (NAME_MAP_KEY, PEFT_CONFIG_KEY)}
    ranks = sorted(set(adapter.ranks))
    alphas = sorted({m.with_plain_alpha().alpha for m in adapter.modules.values()})
    metadata.setdefault("ss_network_module", "networks.lora")
    metadata["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    metadata["ss_network_alpha"] = _number(alphas[0]) if len(alphas) == 1 else "Dynamic"
    renamed = {stem: name for stem, name in names.items() if stem != name}
    if renamed:
        metadata[NAME_MAP_KEY] = json.dumps(renamed, sort_keys=True)
    return tensors, metadata


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))



def name_map(metadata: dict[str, str], source: str = "adapter") -> dict[str, str]:
    """The kohya stem -> dotted name map written by loratools; FormatError when it is not an object of strings."""
    try:
        names = json.loads(metadata.get(NAME_MAP_KEY, "{}"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{source}: metadata {NAME_MAP_KEY} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise FormatError(f"{source}: metadata {NAME_MAP_KEY} must map kohya stems to module names; re-save the adapter")
    return names
