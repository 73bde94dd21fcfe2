"""Stable Diffusion names: diffusers pipeline components, original (LDM / SGM) single-file layouts renamed to
the diffusers layout, and the default output format an input calls for."""

from __future__ import annotations

import re

DIFFUSERS_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.")
# config.json class of a model folder (diffusers ``_class_name`` or transformers ``architectures[0]``) -> the
# component namespace its modules have in a Stable Diffusion pipeline's LoRA.
COMPONENT_CLASSES = {
    "UNet2DConditionModel": "unet.",
    "CLIPTextModel": "text_encoder.",
    "CLIPTextModelWithProjection": "text_encoder_2.",
}
# transformers 5 saves CLIP text models without their ``text_model.`` wrapper; pipeline names keep it (every
# loader maps it, and diffusers strips it again for a flat model).
FLAT_CLIP_ROOTS = ("embeddings.", "encoder.")
# Original (LDM / SGM) single-file namespaces -> pipeline namespace; None: the U-Net, renamed block by block.
ORIGINAL_NAMESPACES = {
    "model.diffusion_model.": None,
    "cond_stage_model.transformer.": "text_encoder.",
    "conditioner.embedders.0.transformer.": "text_encoder.",
    "conditioner.embedders.1.model.transformer.resblocks.": "text_encoder_2.text_model.encoder.layers.",
}
# OpenCLIP layer names (SDXL's second text encoder) -> transformers CLIP names; its fused q/k/v projection
# (``attn.in_proj_weight``) is no LoRA layer at all.
OPEN_CLIP_LAYERS = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Original U-Net modules outside the numbered blocks -> diffusers names.
UNET_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Layers inside an original resnet block -> diffusers names (attention blocks keep theirs).
UNET_RESNET_LAYERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_UNET_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)$")
_UNET_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.0\.op$")

# Default output format by input: (config classes, tensor-name prefixes, format, what the input is). First row
# whose class is config.json's, or one of whose prefixes starts a tensor name, wins.
DEFAULT_FORMATS = (
    (("UNet2DConditionModel",), ("down_blocks.", "mid_block.", "up_blocks."), "kohya", "a diffusers UNet"),
    ((), ("conditioner.embedders.",), "kohya", "an SDXL single-file checkpoint (original SGM layout)"),
    ((), ("model.diffusion_model.", "cond_stage_model."), "kohya", "a Stable Diffusion single-file checkpoint"
     " (original LDM layout)"),
    ((), ("unet.", "text_encoder.", "text_encoder_2."), "kohya", "a checkpoint with diffusers UNet / text-encoder"
     " names"),
    (("CLIPTextModel", "CLIPTextModelWithProjection"), ("text_model.encoder.",), "kohya",
     "a CLIP text encoder (Stable Diffusion's)"),
)
FORMAT_USERS = {
    "kohya": "kohya files load in A1111, ComfyUI, kohya sd-scripts and diffusers (load_lora_weights)",
    "peft": "PEFT loads it (PeftModel.from_pretrained)",
    "diffusers": "diffusers loads it (load_lora_weights)",
}


def _config_class(config: dict | None) -> str | None:
    config = config or {}
    return config.get("_class_name") or next(iter(config.get("architectures") or []), None)


def default_format(tensor_names: list[str], config: dict | None = None, *,
                   adapter_format: str | None = None) -> tuple[str, str]:
    """The output format an input calls for, and why (a sentence for the user).

    Args:
        tensor_names: the input checkpoint's tensor names, or the input adapter's module names.
        config: the checkpoint's ``config.json``, when it has one.
        adapter_format: the input adapter's format, when the input is an adapter (combine, resize …).
    Returns:
        ("kohya" | "peft" | "diffusers", why). Adapters keep their format (diffusers only while every module is
        under a pipeline component such as ``unet.``, else PEFT); Stable Diffusion checkpoints (diffusers UNet
        or CLIP text-encoder folders, original single files, diffusers-named files) get kohya; others PEFT.

    Example:
        >>> default_format(["down_blocks.0.resnets.0.conv1.weight"], {"_class_name": "UNet2DConditionModel"})
        ('kohya', 'kohya: the input is a diffusers UNet; kohya files load in A1111, ComfyUI, ...')
    """
    if adapter_format is not None:
        fmt = adapter_format
        if fmt == "diffusers" and not all(n.startswith(DIFFUSERS_COMPONENTS) for n in tensor_names):
            return "peft", "peft: the input is a diffusers-style adapter without pipeline component names"
        return fmt, f"{fmt}: the input adapter's format"
    cls = _config_class(config)
    for classes, prefixes, fmt, what in DEFAULT_FORMATS:
        if cls in classes or any(name.startswith(prefixes) for name in tensor_names):
            return fmt, f"{fmt}: the input is {what}; {FORMAT_USERS[fmt]}"
    if (config or {}).get("architectures"):
        return "peft", f"peft: the input is a transformers model ({cls}); {FORMAT_USERS['peft']}"
    return "peft", f"peft: the input is not a Stable Diffusion layout; {FORMAT_USERS['peft']}"


def pipeline_names(tensor_names: list[str], config: dict | None = None) -> dict[str, str]:
    """Module name -> its name in a diffusers pipeline's LoRA (``unet.down_blocks.0…``), for every module whose
    pipeline name is known.

    Modules already under a component (``unet.`` …) keep their names; a model folder's modules get the
    namespace of its config class (COMPONENT_CLASSES); original single-file names (``model.diffusion_model.``,
    ``cond_stage_model.``, ``conditioner.embedders.``) are renamed to the diffusers layout, the U-Net's blocks
    numbered from the checkpoint's own ``input_blocks`` (layers per block read from where the first
    downsampler sits). Modules of no known layout (SDXL's fused q/k/v projection …) are left out.

    Args:
        tensor_names: every tensor name of the checkpoint (modules are the names ending ``.weight``).
    """
    modules = [n[: -len(".weight")] for n in tensor_names if n.endswith(".weight")]
    cls = _config_class(config)
    space = COMPONENT_CLASSES.get(cls) if cls is not None else None
    downsamplers = sorted(int(m.group(1)) for n in modules if (m := _UNET_INPUT_BLOCK.search(n)))
    per_block = downsamplers[0] - 1 if downsamplers else None  # input_blocks 1..per_block, then the downsampler
    names: dict[str, str] = {}
    for module in modules:
        if module.startswith(DIFFUSERS_COMPONENTS):
            names[module] = module
            continue
        original = next((s for s in ORIGINAL_NAMESPACES if module.startswith(s)), None)
        if original is None:
            if space is not None:
                flat = space.startswith("text_encoder") and module.startswith(FLAT_CLIP_ROOTS)
                names[module] = space + ("text_model." if flat else "") + module
            continue
        target, rest = ORIGINAL_NAMESPACES[original], module[len(original):]
        if target is None:
            renamed = _diffusers_unet_name(rest, per_block)
        elif original.endswith("resblocks."):
            number, _, layer = rest.partition(".")
            renamed = f"{target}{number}.{OPEN_CLIP_LAYERS[layer]}" if layer in OPEN_CLIP_LAYERS else None
        else:
            renamed = target + rest
        if renamed is not None:
            names[module] = renamed
    return names


def _diffusers_unet_name(name: str, per_block: int | None) -> str | None:
    """An original U-Net module name (after ``model.diffusion_model.``) in the diffusers layout, or None."""
    if name in UNET_TOP_LEVEL:
        return "unet." + UNET_TOP_LEVEL[name]
    middle = _UNET_MIDDLE.match(name)
    if middle is not None:
        inner, rest = int(middle.group(1)), middle.group(2)
        part = ("resnets.0", "attentions.0", "resnets.1")[inner] if inner < 3 else None
        return f"unet.mid_block.{part}.{_resnet_layer(rest)}" if part else None
    match = _UNET_BLOCK.match(name)
    if match is None:
        return None
    kind, number, inner, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if per_block is None:  # one down block and no downsampler: every input block is in block 0
        per_block = 1 << 30
    if kind == "input_blocks":
        block, layer = divmod(number - 1, per_block + 1)
        if rest == "op":
            return f"unet.down_blocks.{block}.downsamplers.0.conv"
        if inner >= 2:
            return None
        return f"unet.down_blocks.{block}.{('resnets', 'attentions')[inner]}.{layer}.{_resnet_layer(rest)}"
    block, layer = divmod(number, per_block + 1)
    if rest == "conv":  # the upsampler sits after the resnet (and the attention, if any)
        return f"unet.up_blocks.{block}.upsamplers.0.conv"
    if inner >= 2:
        return None
    return f"unet.up_blocks.{block}.{('resnets', 'attentions')[inner]}.{layer}.{_resnet_layer(rest)}"


def _resnet_layer(rest: str) -> str:
    return next((new + rest[len(old):] for old, new in UNET_RESNET_LAYERS.items()
                 if rest == old or rest.startswith(old + ".")), rest)

