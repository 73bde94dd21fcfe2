"""LyCORIS and DoRA keys: LoHa / LoKr factors (kohya-style LyCORIS files and PEFT LOHA / LOKR adapters), DoRA
magnitudes (PEFT ``lora_magnitude_vector``, LyCORIS ``dora_scale``), and the LyCORIS algorithms loratools names
but cannot read.

Scale rules (what each runtime applies; `structured_modules` stores the resolved scale):
- LyCORIS LoHa: alpha / r with r = ``hada_w1_b.shape[0]`` (LyCORIS, ComfyUI and A1111 agree).
- LyCORIS LoKr: alpha / r with r the rank of the factorized half (``lokr_w1_b`` or else ``lokr_w2_b``
  ``.shape[0]``); 1 when both halves are full matrices (LyCORIS forces alpha = rank there; ComfyUI uses 1).
- PEFT LOHA / LOKR: ``alpha / r`` from ``adapter_config.json`` (``alpha_pattern`` / ``rank_pattern`` per module),
  also when both LoKr halves are full.
- A missing ``alpha`` means alpha = r (scale 1), as LyCORIS's loader does.
- LyCORIS ``dora_scale`` (out, 1[, 1, 1]) is a per-output-row magnitude (``wd_on_out``, the default);
  (1, in[, 1, 1]) is per input channel. PEFT's ``lora_magnitude_vector`` is per output channel.
"""

from __future__ import annotations

import math

import torch

from loratools.adapter import LoraModule
from loratools.errors import FormatError
from loratools.formats.config_rules import stored_alpha
from loratools.formats.keys import UNSUPPORTED_SUFFIXES
from loratools.formats.peft import peft_pattern_value
from loratools.structured_modules import DoraModule, LohaModule, LokrModule, StructuredModule

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DORA_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".dora_scale")
LYCORIS_EPS = float(torch.finfo(torch.float32).eps)
READABLE_PEFT_TYPES = ("LORA", "LOHA", "LOKR")


def structured_suffixes() -> tuple[str, ...]:
    """Every key suffix of a LoHa / LoKr factor or a DoRA magnitude (for format detection)."""
    return (*(f".{k}" for k in LOHA_KEYS + LOKR_KEYS), *DORA_SUFFIXES)


def algorithm_name(suffix: str, tensor: torch.Tensor) -> str:
    """The unsupported algorithm a key marks; a 4-D ``oft_blocks`` is BOFT, a 3-D one LyCORIS diag-OFT."""
    if suffix == ".oft_blocks":
        return "BOFT" if tensor.dim() == 4 else "OFT (diag-oft)"
    return UNSUPPORTED_SUFFIXES[suffix]


def check_peft_type(config: dict, source: str) -> None:
    """Refuse PEFT adapter types loratools cannot read, by name (IA3, OFT, BOFT, VERA, ADALORA …)."""
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type not in READABLE_PEFT_TYPES:
        raise FormatError(f"{source}: adapter_config.json peft_type {peft_type} is not supported; loratools reads"
                          f" {', '.join(READABLE_PEFT_TYPES)} adapters (convert it to LoRA with PEFT first)")


def split_structured(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                             dict[str, torch.Tensor]]:
    """Split LoHa / LoKr modules off a flat state dict.

    Returns:
        (module stem -> {role: tensor} for every module with a ``hada_*`` or ``lokr_*`` key, its ``alpha`` and
        ``dora_scale`` included; every other key -> tensor). `prefix` (PEFT's ``base_model.model.``) is removed
        from the stems.
    """
    roles = {f".{k}": k for k in LOHA_KEYS + LOKR_KEYS}
    stems = set()
    for key in state:
        suffix = next((s for s in roles if key.endswith(s)), None)
        if suffix is not None:
            stems.add(key[: -len(suffix)])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        stem, _, role = key.rpartition(".")
        if stem in stems and role in (*LOHA_KEYS, *LOKR_KEYS, "alpha", "dora_scale"):
            groups.setdefault(stem.removeprefix(prefix), {})[role] = tensor
        else:
            rest[key] = tensor
    return groups, rest


def _need(stem: str, parts: dict[str, torch.Tensor], names: tuple[str, ...], what: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        have = ", ".join(sorted(k for k in parts if k != "alpha"))
        raise FormatError(f"{stem}: {what} needs {', '.join(names)} but {', '.join(missing)} is missing (has {have});"
                          " the file is truncated or not a LyCORIS file: re-save it")
    for n in names:
        if not parts[n].is_floating_point():
            raise FormatError(f"{stem}.{n} has dtype {parts[n].dtype}; factors are floating point")
    return [parts[n] for n in names]


def _peft_scale(name: str, rank: int, config: dict) -> tuple[float, float]:
    r = peft_pattern_value(config.get("rank_pattern") or {}, name, config.get("r") or rank)
    alpha = peft_pattern_value(config.get("alpha_pattern") or {}, name, config.get("alpha", r))
    return float(alpha), float(alpha) / float(r)


def _lycoris_scale(stem: str, parts: dict[str, torch.Tensor], rank: int) -> tuple[float, float]:
    if rank == 0:  # LoKr with two full halves: LyCORIS applies scale 1 whatever alpha says
        return float(stored_alpha(stem, parts["alpha"])) if "alpha" in parts else 1.0, 1.0
    alpha = stored_alpha(stem, parts["alpha"]) if "alpha" in parts else float(rank)
    return alpha, (alpha / rank) if alpha else 1.0


def _loha(stem: str, name: str, parts: dict[str, torch.Tensor], peft: dict | None) -> LohaModule:
    w1a, w1b, w2a, w2b = _need(stem, parts, LOHA_KEYS[:4], "a LoHa")
    tucker = "hada_t1" in parts or "hada_t2" in parts
    t1, t2 = _need(stem, parts, LOHA_KEYS[4:], "a Tucker LoHa") if tucker else (None, None)
    rank = int(w1b.shape[0])
    alpha, scale = _peft_scale(name, rank, peft) if peft is not None else _lycoris_scale(stem, parts, rank)
    if tucker:
        assert t1 is not None and t2 is not None
        ok = (w1a.dim() == w1b.dim() == 2 and t1.shape[:2] == (w1a.shape[0], w1b.shape[0])
              and t1.shape == t2.shape and w2a.shape == w1a.shape and w2b.shape == w1b.shape)
        kernel = tuple(t1.shape[2:])
        shape: tuple[int, ...] | None = (int(w1a.shape[1]), int(w1b.shape[1]), *kernel)
    else:
        ok = (w1a.dim() == 2 and w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0]
              and w1a.shape[0] == w2a.shape[0] and math.prod(w1b.shape[1:]) == math.prod(w2b.shape[1:]))
        shape = None
    if not ok:
        layout = {k: tuple(parts[k].shape) for k in parts if k != "alpha"}
        raise FormatError(f"{stem}: LoHa factor shapes do not fit together ({layout}); the file is corrupt")
    return LohaModule(name, w1a, w1b, w2a, w2b, alpha, scale, t1, t2, shape)


def _lokr(stem: str, name: str, parts: dict[str, torch.Tensor], peft: dict | None) -> LokrModule:
    if "lokr_w1" in parts:
        w1, w1a, w1b = _need(stem, parts, ("lokr_w1",), "a LoKr")[0], None, None
    else:
        w1 = None
        w1a, w1b = _need(stem, parts, ("lokr_w1_a", "lokr_w1_b"), "a LoKr without lokr_w1")
    if "lokr_w2" in parts:
        w2, w2a, w2b, t2 = _need(stem, parts, ("lokr_w2",), "a LoKr")[0], None, None, None
    else:
        w2 = None
        w2a, w2b = _need(stem, parts, ("lokr_w2_a", "lokr_w2_b"), "a LoKr without lokr_w2")
        t2 = parts.get("lokr_t2")
    rank = int(w1b.shape[0]) if w1b is not None else int(w2b.shape[0]) if w2b is not None else 0
    alpha, scale = _peft_scale(name, rank, peft) if peft is not None else _lycoris_scale(stem, parts, rank)
    module = LokrModule(name, alpha, scale, w1, w1a, w1b, w2, w2a, w2b, t2)
    try:
        first, second = module.halves()
    except RuntimeError as exc:
        layout = {k: tuple(parts[k].shape) for k in parts if k != "alpha"}
        raise FormatError(f"{stem}: LoKr factor shapes do not fit together ({layout}): {exc}; the file is"
                          " corrupt") from None
    if w2 is not None and w2.dim() > 2:
        module.base_shape = (first.shape[0] * w2.shape[0], first.shape[1] * w2.shape[1], *w2.shape[2:])
    elif t2 is not None and w2b is not None:
        module.base_shape = (first.shape[0] * second.shape[0], first.shape[1] * w2b.shape[1], *t2.shape[2:])
    return module


def build_structured(groups: dict[str, dict[str, torch.Tensor]], *, names: dict[str, str],
                     peft_config: dict | None) -> tuple[dict[str, StructuredModule], list[str]]:
    """LoHa / LoKr (and LyCORIS DoRA on them) modules from `split_structured` groups.

    Args:
        names: kohya stem -> dotted name (loratools' name map), applied to module names.
        peft_config: ``adapter_config.json`` for PEFT adapters (scales from alpha / r), None for LyCORIS files.
    Returns:
        (modules by name, problems: one line per module that cannot be read).
    """
    modules: dict[str, StructuredModule] = {}
    problems: list[str] = []
    for stem in sorted(groups):
        parts, name = groups[stem], names.get(stem, stem)
        try:
            loha = any(k.startswith("hada_") for k in parts)
            lokr = any(k.startswith("lokr_") for k in parts)
            if loha and lokr:
                raise FormatError(f"{stem} has both LoHa (hada_*) and LoKr (lokr_*) keys; one module is one type")
            delta: LohaModule | LokrModule = _loha(stem, name, parts, peft_config) if loha else _lokr(
                stem, name, parts, peft_config)
            modules[name] = lycoris_dora(stem, delta, parts["dora_scale"]) if "dora_scale" in parts else delta
        except FormatError as exc:
            problems.append(str(exc))
    return modules, problems


def lycoris_dora(stem: str, delta: LoraModule | LohaModule | LokrModule, scale: torch.Tensor) -> DoraModule:
    """LyCORIS weight decomposition: ``dora_scale`` (out, 1, …) per output row or (1, in, …) per input channel."""
    rows, cols = (delta.factors()[0].shape[0], delta.factors()[1].shape[1]) if isinstance(delta, LoraModule) \
        else delta.matrix_shape
    if scale.dim() >= 2 and scale.shape[0] == rows and scale.numel() == rows:
        return DoraModule(delta.name, delta, scale.reshape(-1), True, "lycoris", LYCORIS_EPS)
    if scale.dim() >= 2 and scale.shape[0] == 1 and cols % scale.numel() == 0:
        return DoraModule(delta.name, delta, scale.reshape(-1), False, "lycoris", LYCORIS_EPS)
    raise FormatError(f"{stem}.dora_scale has shape {tuple(scale.shape)}; a LyCORIS magnitude is ({rows}, 1, …)"
                      f" or (1, in, …) for this {rows}×{cols} layer: the file is corrupt")


def peft_dora(name: str, delta: LoraModule, magnitude: torch.Tensor) -> DoraModule:
    """PEFT DoRA: ``lora_magnitude_vector`` (out,) — (1, out, 1, 1) for a convolution — per output channel."""
    rows = int(delta.factors()[0].shape[0])
    if magnitude.numel() != rows or not magnitude.is_floating_point():
        raise FormatError(f"{name}.lora_magnitude_vector has shape {tuple(magnitude.shape)}; this layer has {rows}"
                          " output channels: the adapter is corrupt")
    return DoraModule(name, delta, magnitude.reshape(-1), True, "peft", 0.0)
