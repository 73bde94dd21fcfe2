"""Reading: a flat ``{key: tensor}`` dict into an `Adapter`, whatever the format (detected from the keys).

Every key must be recognised: unknown keys, A without B and rank mismatches raise FormatError listing them.
LoHa, LoKr and DoRA modules are read by `formats.lycoris` into `Adapter.structured`; recognised but unsupported
module types (GLoRA, OFT / BOFT, (IA)³, Tucker LoCon, dense diffs) are named in `Adapter.unsupported`.
"""

from __future__ import annotations

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.errors import FormatError
from loratools.formats.config_rules import (
    check_config_ranks,
    check_module_values,
    check_peft_config,
    embedded_config,
    factor_problem,
    stored_alpha,
)
from loratools.formats.diffusers import diffusers_alpha
from loratools.formats.keys import KOHYA_PREFIXES, PEFT_CONFIG_KEY, PEFT_PREFIX, UNSUPPORTED_SUFFIXES, split_key
from loratools.formats.kohya import KOHYA_SUFFIXES, name_map
from loratools.formats.lycoris import (
    DORA_SUFFIXES,
    algorithm_name,
    build_structured,
    check_peft_type,
    lycoris_dora,
    peft_dora,
    split_structured,
    structured_suffixes,
)
from loratools.formats.peft import PEFT_FULL_SUFFIXES, PEFT_SUFFIXES, peft_pattern_value


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
    if any(k.endswith((*UNSUPPORTED_SUFFIXES, *structured_suffixes())) for k in keys):
        return "kohya"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise FormatError(f"no LoRA keys found (first keys: {sample}); expected PEFT, kohya or diffusers-style names")


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
        config = embedded_config(metadata[PEFT_CONFIG_KEY], config_source)
    if config is not None:
        check_peft_config(config, config_source)
        check_peft_type(config, source)
    fmt = format or detect_format(list(state), has_peft_config=config is not None)
    names = name_map(metadata, source) if fmt == "kohya" else {}
    groups, state = split_structured(state, PEFT_PREFIX if fmt == "peft" else "")
    config = dict(config or {})
    table = KOHYA_SUFFIXES if fmt == "kohya" else PEFT_SUFFIXES
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    full: dict[str, torch.Tensor] = {}
    unsupported: dict[str, str] = {}
    unknown: list[str] = []
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name_key = key[len(PEFT_PREFIX):] if fmt == "peft" and key.startswith(PEFT_PREFIX) else key
        dora_suffix = next((s for s in DORA_SUFFIXES if name_key.endswith(s)), None)
        if dora_suffix is not None:
            magnitudes[name_key[: -len(dora_suffix)]] = tensor
            continue
        split = split_key(name_key, table)
        if split is not None:
            name, suffix = split
            role, is_embedding = table[suffix]
            parts.setdefault(name, {})[role] = tensor
            if is_embedding:
                embedding.add(name)
            continue
        odd = split_key(name_key, {s: ("", False) for s in UNSUPPORTED_SUFFIXES})
        if odd is not None:
            unsupported[odd[0]] = algorithm_name(odd[1], tensor)
            continue
        full_split = split_key(name_key, {s: ("", False) for s in PEFT_FULL_SUFFIXES}) if fmt == "peft" else None
        if full_split is not None:
            full[full_split[0] + PEFT_FULL_SUFFIXES[full_split[1]]] = tensor
            continue
        unknown.append(key)
    for name in unsupported:  # a GLoRA/OFT/… key makes its whole module unusable, alpha and factors included
        parts.pop(name, None)
        magnitudes.pop(name, None)
    unknown = [k for k in unknown if k.rpartition(".")[0].removeprefix(PEFT_PREFIX) not in unsupported]
    modules, problems, assumed_alpha = _build_modules(parts, embedding, fmt, config, metadata)
    structured, structured_problems = build_structured(groups, names=names,
                                                       peft_config=config if fmt == "peft" else None)
    problems += structured_problems
    for stem, magnitude in magnitudes.items():
        dotted = names.get(stem, stem)
        if dotted not in modules:
            problems.append(f"{stem} has a DoRA magnitude but no LoRA factors")
            continue
        try:
            delta = modules.pop(dotted)
            if delta.kind == "embedding":  # PEFT's DoRA on embeddings normalises another axis: not read
                unsupported[dotted] = "DoRA on an embedding"
                continue
            structured[dotted] = lycoris_dora(stem, delta, magnitude) if fmt == "kohya" else peft_dora(
                dotted, delta, magnitude)
        except FormatError as exc:
            problems.append(str(exc))
    problems += check_module_values(modules, full)
    problems += [f"{name} has non-finite values (nan or inf) in its factors" for name, module in structured.items()
                 if not all(bool(torch.isfinite(t).all()) for t in module.tensors())]
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
        structured=structured,
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
    names = name_map(metadata) if fmt == "kohya" else {}
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


