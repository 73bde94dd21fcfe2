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


def render_kohya(adapter: Adapter, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors (``lora_down``/``lora_up``/``alpha`` per module) and ``ss_*`` metadata for `adapter`."""
    if adapter.full:
        raise FormatError(f"kohya format cannot hold full tensors ({', '.join(sorted(adapter.full))}); use --format peft")
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    sdxl = is_sdxl(adapter.modules)
    for module in adapter.modules.values():
        if module.kind in ("embedding", "conv1d"):
            raise FormatError(f"{module.name}: kohya format has no {module.kind} layout; use --format peft")
        module = module.with_plain_alpha()
        stem = kohya_stem(module.name, prefix, sdxl)
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


# ---- validation of what a file claims (hardening) -----------------------------------------------------------------

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
