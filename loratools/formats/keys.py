"""Key names every format module shares: the PEFT and kohya prefixes, the metadata keys loratools writes, and
the recognised module types it reads past (LyCORIS, DoRA …)."""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
NAME_MAP_KEY = "loratools_module_names"
PEFT_CONFIG_KEY = "loratools_adapter_config"

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


def split_key(key: str, table: dict[str, tuple[str, bool]]) -> tuple[str, str] | None:
    """(module name, suffix) for the longest suffix of `table` that `key` ends with."""
    best = max((s for s in table if key.endswith(s)), key=len, default=None)
    return (key[: -len(best)], best) if best else None
