"""Validation of what an adapter file claims: PEFT config types and ranges, ranks against tensors, finite
values, factor shapes, stored alphas."""

from __future__ import annotations

import json
import math
import re

import torch

from loratools.adapter import LoraModule
from loratools.errors import FormatError
from loratools.formats.peft import peft_pattern_value


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


def embedded_config(text: str, source: str) -> dict:
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{source} is not valid JSON ({exc}); re-save the adapter") from None
    check_peft_config(config, source)
    return config


