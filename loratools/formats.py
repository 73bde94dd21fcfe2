"""The only module that knows adapter key names: PEFT, kohya (A1111 / ComfyUI) and diffusers-style tables.

``parse(state, ...)`` turns a flat ``{key: tensor}`` dict into an `Adapter`; ``render_peft`` and
``render_kohya`` turn an Adapter back into ``{key: tensor}`` plus config or metadata. Every key must be
recognised: unknown keys, A without B and rank mismatches raise FormatError listing them. Recognised but
unsupported module types (DoRA, LoHa, LoKr, Tucker LoCon, dense diffs) are named in `Adapter.unsupported`.

Decisions:
- PEFT ``target_modules`` is written as the sorted list of full module names, so it never matches a module
  that was not extracted (a leaf name such as ``q_proj`` would).
- Mixed ranks are written with ``rank_pattern`` and ``alpha_pattern`` keyed by full module names (exact
  per-module scale; PEFT matches them with ``(.*\\.)?(key)$``).
- kohya files always carry an ``alpha`` per module. Names that are not already kohya stems get a prefix
  (given, or chosen from the name's namespace by KOHYA_NAMESPACES) and ``.`` replaced by ``_``; the dotted names are kept in the metadata
  key ``loratools_module_names`` so a kohya file written here converts back to PEFT without a base model.
- kohya has no layout for embeddings or transposed Conv1D layers: writing those raises FormatError.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import TypeVar

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.errors import FormatError

T = TypeVar("T")
PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
NAME_MAP_KEY = "loratools_module_names"
PEFT_CONFIG_KEY = "loratools_adapter_config"

# key suffix -> role of the tensor in a LoRA module ("A", "B", "alpha") and whether it marks an embedding.
PEFT_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".alpha": ("alpha", False),
}
KOHYA_SUFFIXES = {
    ".lora_down.weight": ("A", False),
    ".lora_up.weight": ("B", False),
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".alpha": ("alpha", False),
}
# Recognised module types this tool reads past but cannot use: key suffix -> what it is.
UNSUPPORTED_SUFFIXES = {
    ".lora_magnitude_vector": "DoRA magnitude",
    ".lora_magnitude_vector.weight": "DoRA magnitude",
    ".dora_scale": "DoRA magnitude",
    ".lora_B.bias": "LoRA bias",
    ".lora_E": "AdaLoRA",
    ".lora_mid.weight": "LoCon Tucker core",
    ".diff": "dense weight diff",
    ".diff_b": "dense bias diff",
    ".hada_w1_a": "LoHa",
    ".hada_w1_b": "LoHa",
    ".hada_w2_a": "LoHa",
    ".hada_w2_b": "LoHa",
    ".hada_t1": "LoHa",
    ".hada_t2": "LoHa",
    ".lokr_w1": "LoKr",
    ".lokr_w2": "LoKr",
    ".lokr_w1_a": "LoKr",
    ".lokr_w1_b": "LoKr",
    ".lokr_w2_a": "LoKr",
    ".lokr_w2_b": "LoKr",
    ".lokr_t2": "LoKr",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
}
# Full base tensors saved inside a PEFT adapter: key suffix -> suffix of the base tensor it replaces.
PEFT_FULL_SUFFIXES = {".base_layer.weight": ".weight", ".weight": ".weight", ".bias": ".bias"}
FORMATS = ("peft", "kohya", "diffusers")


def detect_format(keys: list[str], has_peft_config: bool = False) -> str:
    """Name the format of a flat adapter state dict from its keys: "peft", "kohya" or "diffusers".

    Raises FormatError when no key looks like a LoRA.
    """
    if has_peft_config or any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith(KOHYA_PREFIXES) or k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    if any(k.endswith(tuple(UNSUPPORTED_SUFFIXES)) for k in keys):
        return "kohya"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise FormatError(f"no LoRA keys found (first keys: {sample}); expected PEFT, kohya or diffusers-style names")


def _split_key(key: str, table: dict[str, tuple[str, bool]]) -> tuple[str, str] | None:
    """(module name, suffix) for the longest suffix of `table` that `key` ends with."""
    best = max((s for s in table if key.endswith(s)), key=len, default=None)
    return (key[: -len(best)], best) if best else None


def peft_pattern_value(patterns: dict, name: str, default: T) -> T:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def parse(
    state: dict[str, torch.Tensor],
    *,
    format: str | None = None,
    config: dict | None = None,
    metadata: dict[str, str] | None = None,
    source: str = "adapter",
) -> Adapter:
    """Build an Adapter from a flat state dict.

    Args:
        state: key -> tensor, as stored in the file.
        format: "peft", "kohya" or "diffusers"; detected from the keys when None.
        config: PEFT ``adapter_config.json`` contents (alpha, patterns, fan_in_fan_out, rslora).
        metadata: safetensors ``__metadata__``; kept on the Adapter.
        source: the file name, for error messages.
    Raises:
        FormatError listing every unknown key, A without B, B without A and rank mismatch.
    """
    metadata = dict(metadata or {})
    config_source = f"{source}: adapter_config.json"
    if config is None and PEFT_CONFIG_KEY in metadata:
        config_source = f"{source}: metadata {PEFT_CONFIG_KEY}"
        config = _embedded_config(metadata[PEFT_CONFIG_KEY], config_source)
    if config is not None:
        check_peft_config(config, config_source)
    fmt = format or detect_format(list(state), has_peft_config=config is not None)
    if fmt == "kohya":
        _name_map(metadata, source)
    config = dict(config or {})
    table = KOHYA_SUFFIXES if fmt == "kohya" else PEFT_SUFFIXES
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    full: dict[str, torch.Tensor] = {}
    unsupported: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        name_key = key[len(PEFT_PREFIX):] if fmt == "peft" and key.startswith(PEFT_PREFIX) else key
        split = _split_key(name_key, table)
        if split is not None:
            name, suffix = split
            role, is_embedding = table[suffix]
            parts.setdefault(name, {})[role] = tensor
            if is_embedding:
                embedding.add(name)
            continue
        odd = _split_key(name_key, {s: ("", False) for s in UNSUPPORTED_SUFFIXES})
        if odd is not None:
            unsupported[odd[0]] = UNSUPPORTED_SUFFIXES[odd[1]]
            continue
        full_split = _split_key(name_key, {s: ("", False) for s in PEFT_FULL_SUFFIXES}) if fmt == "peft" else None
        if full_split is not None:
            full[full_split[0] + PEFT_FULL_SUFFIXES[full_split[1]]] = tensor
            continue
        unknown.append(key)
    for name in unsupported:  # a LyCORIS/DoRA key makes its whole module unusable, alpha and factors included
        parts.pop(name, None)
    modules, problems, assumed_alpha = _build_modules(parts, embedding, fmt, config, metadata)
    problems += check_module_values(modules, full)
    if fmt == "peft" and not problems:
        problems += check_config_ranks(modules, config, config_source.partition(": ")[2])
    if unknown:
        problems.insert(0, f"unknown keys: {', '.join(sorted(unknown)[:8])}" + (" ..." if len(unknown) > 8 else ""))
    if problems:
        raise FormatError(f"{source}: not a valid {fmt} adapter: " + "; ".join(problems))
    adapter = Adapter(
        modules=modules,
        format=fmt,
        base_model=config.get("base_model_name_or_path") or metadata.get("ss_sd_model_name") or None,
        metadata=metadata,
        config=config,
        full=full,
        unsupported=unsupported,
    )
    if assumed_alpha:
        adapter.notes.append("alpha not stored for some modules: alpha = rank assumed (scale 1.0, as A1111/ComfyUI do)")
    if unsupported:
        kinds = sorted(set(unsupported.values()))
        adapter.notes.append(f"{len(unsupported)} module(s) of unsupported type ({', '.join(kinds)}) not used")
    return adapter


def _build_modules(
    parts: dict[str, dict[str, torch.Tensor]], embedding: set[str], fmt: str, config: dict, metadata: dict[str, str]
) -> tuple[dict[str, LoraModule], list[str], bool]:
    names = _name_map(metadata) if fmt == "kohya" else {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    problems: list[str] = []
    assumed_alpha = False
    for stem in sorted(parts):
        roles = parts[stem]
        missing = [r for r in ("A", "B") if r not in roles]
        if missing:
            have = ", ".join(sorted(roles))
            problems.append(f"{stem} has {have} but no {' or '.join(missing)}")
            continue
        a, b = roles["A"], roles["B"]
        odd = factor_problem(stem, a, b)
        if odd:
            problems.append(odd)
            continue
        if stem in embedding:
            kind = "embedding"
        elif a.dim() == 4:
            kind = "conv2d"
        else:
            kind = "conv1d" if fan_in_fan_out else "linear"
        name = names.get(stem, stem)
        try:
            if fmt == "peft" and config.get("lora_alpha") is not None:
                alpha = peft_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
            elif "alpha" in roles:
                alpha = stored_alpha(stem, roles["alpha"])
            elif fmt == "diffusers":  # diffusers' convention: alpha = rank unless its metadata says otherwise
                alpha = diffusers_alpha(name, a.shape[0], metadata)
            else:
                alpha, assumed_alpha = a.shape[0], True
            modules[name] = LoraModule(name, a, b, float(alpha), kind, rslora=rslora)
        except FormatError as exc:
            problems.append(str(exc))
    return modules, problems, assumed_alpha


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


# ---- diffusers pipelines and Stable Diffusion checkpoints ---------------------------------------------------
# The diffusers layout is what ``pipeline.save_lora_weights`` writes: ``<component>.<module>.lora_A.weight`` /
# ``.lora_B.weight`` in ``pytorch_lora_weights.safetensors``. diffusers gives every module alpha = rank (scale
# 1.0) unless the file's ``lora_adapter_metadata`` says otherwise, so each module's scale is folded into B.

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
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

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_name_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# PEFT config key -> (test of its value, what it must be); None is accepted for every key (PEFT's default).
CONFIG_RULES = {
    "r": (_is_rank, "a whole number ≥ 1"),
    "lora_alpha": (_is_number, "a finite number"),
    "rank_pattern": (lambda v: isinstance(v, dict), "an object of module pattern -> rank"),
    "alpha_pattern": (lambda v: isinstance(v, dict), "an object of module pattern -> alpha"),
    "target_modules": (lambda v: isinstance(v, str) or _is_name_list(v), "a list of module names or a regex string"),
    "modules_to_save": (_is_name_list, "a list of module names"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
    "task_type": (lambda v: isinstance(v, str), "a string"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
}
PATTERN_RULES = {"rank_pattern": (_is_rank, "a whole number ≥ 1"), "alpha_pattern": (_is_number, "a finite number")}


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_peft_config(config: object, source: str) -> None:
    """Refuse a PEFT config that is not a JSON object or holds a value of the wrong type or range.

    Args:
        config: the parsed ``adapter_config.json`` (or the config embedded in a bare file's metadata).
        source: names the config in messages, e.g. ``adapter/: adapter_config.json``.
    Raises:
        FormatError naming the key, the value, what it must be and the fix.
    """
    if not isinstance(config, dict):
        raise FormatError(f"{source} is not a JSON object ({type(config).__name__}); fix or regenerate the config")
    for key, (test, wants) in CONFIG_RULES.items():
        value = config.get(key)
        if value is not None and not test(value):
            raise FormatError(f"{source} {key!r} is {_shown(value)}; it must be {wants}: fix the config")
    for key, (test, wants) in PATTERN_RULES.items():
        for pattern, value in (config.get(key) or {}).items():
            if not test(value):
                raise FormatError(f"{source} {key!r} gives {pattern!r} the value {_shown(value)}; it must be {wants}:"
                                  " fix the config")
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                raise FormatError(f"{source} {key!r} key {pattern!r} is not a valid regular expression ({exc}):"
                                  " fix the config") from None


def check_config_ranks(modules: dict[str, LoraModule], config: dict, where: str = "adapter_config.json") -> list[str]:
    """A problem (at most one line) when the config's ``r`` / ``rank_pattern`` disagree with the tensors' ranks.

    PEFT refuses such an adapter (its layers are built at the config's rank), and alpha / r would be ambiguous.
    """
    if config.get("r") is None:
        return []
    wrong = []
    for name, module in modules.items():
        expected = peft_pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if expected != module.rank:
            wrong.append((name, expected, module.rank))
    if not wrong:
        return []
    name, expected, rank = wrong[0]
    via = "rank_pattern" if expected != config["r"] else "r"
    more = f" (and {len(wrong) - 1} more modules)" if len(wrong) > 1 else ""
    return [f"{name}: {where} says {via} r={expected} but its tensors have rank {rank}{more};"
            " fix r / rank_pattern in the config to the tensors' ranks"]


def check_module_values(modules: dict[str, LoraModule], full: dict[str, torch.Tensor]) -> list[str]:
    """Problems for modules of rank 0 and for nan / inf in factors, alphas or full tensors."""
    problems = []
    for name, module in modules.items():
        if module.rank == 0:
            problems.append(f"{name} has rank 0 (A has no rows)")
        elif not math.isfinite(module.alpha):
            problems.append(f"{name} has alpha {module.alpha}")
        elif not (bool(torch.isfinite(module.A).all()) and bool(torch.isfinite(module.B).all())):
            problems.append(f"{name} has non-finite values (nan or inf) in its factors")
    problems += [f"{name} has non-finite values (nan or inf)" for name, tensor in full.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    return problems


def factor_problem(stem: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why `a` and `b` cannot be a LoRA's factors (not floating point, not 2-D or 4-D alike), or None."""
    if not (a.is_floating_point() and b.is_floating_point()):
        return f"{stem} has factors of dtype {a.dtype} / {b.dtype}; LoRA factors are floating point"
    if a.dim() not in (2, 4) or b.dim() != a.dim():
        return f"{stem} has factors of shapes {tuple(a.shape)} / {tuple(b.shape)}; expected 2-D (or 4-D conv) A and B"
    return None


def stored_alpha(stem: str, tensor: torch.Tensor) -> float:
    """A kohya ``.alpha`` tensor's value; FormatError unless it holds one finite number."""
    if tensor.numel() != 1:
        raise FormatError(f"{stem}.alpha holds {tensor.numel()} values; an alpha is one number")
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value):
        raise FormatError(f"{stem}.alpha is {value}; an alpha must be a finite number")
    return value


def _embedded_config(text: str, source: str) -> dict:
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{source} is not valid JSON ({exc}); re-save the adapter") from None
    check_peft_config(config, source)
    return config


def _name_map(metadata: dict[str, str], source: str = "adapter") -> dict[str, str]:
    """The kohya stem -> dotted name map written by loratools; FormatError when it is not an object of strings."""
    try:
        names = json.loads(metadata.get(NAME_MAP_KEY, "{}"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{source}: metadata {NAME_MAP_KEY} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise FormatError(f"{source}: metadata {NAME_MAP_KEY} must map kohya stems to module names; re-save the adapter")
    return names
