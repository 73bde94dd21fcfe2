"""Key names every format module shares: the PEFT and kohya prefixes, the metadata keys loratools writes, and
the recognised module types it reads past (GLoRA, OFT, (IA)³ …)."""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
NAME_MAP_KEY = "loratools_module_names"
PEFT_CONFIG_KEY = "loratools_adapter_config"

# Recognised module types this tool reads past but cannot use: a key suffix that marks one -> its name (LoHa,
# LoKr and DoRA keys are read by `formats.lycoris`).
UNSUPPORTED_SUFFIXES = {
    ".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA", ".bm.weight": "GLoRA",
    ".on_input": "(IA)³",
    ".oft_blocks": "OFT / BOFT",
    ".oft_diag": "OFT",
    ".rescale": "OFT / BOFT",
    ".w_norm": "LyCORIS norm tuning", ".b_norm": "LyCORIS norm tuning",
    ".lambda_layer": "T-LoRA", ".q_layer.weight": "T-LoRA", ".p_layer.weight": "T-LoRA",
    ".lora_mid.weight": "LoCon Tucker core",
    ".diff": "LyCORIS full (dense diff)", ".diff_b": "LyCORIS full (dense diff)",
    ".lora_E": "AdaLoRA",
    ".lora_B.bias": "LoRA bias",
}
# Full base tensors saved inside a PEFT adapter: key suffix -> suffix of the base tensor it replaces.


def split_key(key: str, table: dict[str, tuple[str, bool]]) -> tuple[str, str] | None:
    """(module name, suffix) for the longest suffix of `table` that `key` ends with."""
    best = max((s for s in table if key.endswith(s)), key=len, default=None)
    return (key[: -len(best)], best) if best else None
