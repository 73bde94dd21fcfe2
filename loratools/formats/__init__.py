"""Adapter key formats, one module per format; the only package that knows adapter key names.

- `keys`: prefixes and metadata keys every format shares; recognised module types loratools reads past.
- `peft`: PEFT folders / bare files (``base_model.model.<module>.lora_A.weight`` + ``adapter_config.json``).
- `kohya`: kohya / A1111 / ComfyUI single files (``lora_unet_…​.lora_down.weight``, ``.alpha``).
- `diffusers`: ``pipeline.save_lora_weights`` files (``unet.<module>.lora_A.weight``, scale folded into B).
- `sd_names`: Stable Diffusion pipeline and original single-file names; the default output format.
- `config_rules`: checks of what a file claims (config types, ranks, finite values).
- `parse`: any flat state dict into an `Adapter`.
- `gguf_file`: GGUF files read safely (bounds-checked header, tensors one at a time); no ``gguf`` import.
- `gguf`: llama.cpp GGUF LoRA adapters (names from gguf's tables, scales folded into B); imports ``gguf`` only
  when used, so it is imported by its users, not re-exported here.

A new format is one new module here plus one entry in `adapter_files.WRITERS` (and, for reading, in
`parse.detect_format`).
"""

from loratools.formats.diffusers import DIFFUSERS_METADATA_KEY, DIFFUSERS_WEIGHTS, render_diffusers
from loratools.formats.keys import KOHYA_PREFIXES, NAME_MAP_KEY, PEFT_CONFIG_KEY, PEFT_PREFIX
from loratools.formats.kohya import KOHYA_NAMESPACES, is_sdxl, kohya_stem, kohya_stems, render_kohya
from loratools.formats.parse import detect_format, parse
from loratools.formats.peft import peft_pattern_value, render_peft
from loratools.formats.sd_names import ORIGINAL_NAMESPACES, default_format, pipeline_names

__all__ = [
    "DIFFUSERS_METADATA_KEY",
    "DIFFUSERS_WEIGHTS",
    "KOHYA_NAMESPACES",
    "KOHYA_PREFIXES",
    "NAME_MAP_KEY",
    "ORIGINAL_NAMESPACES",
    "PEFT_CONFIG_KEY",
    "PEFT_PREFIX",
    "default_format",
    "detect_format",
    "is_sdxl",
    "kohya_stem",
    "kohya_stems",
    "parse",
    "peft_pattern_value",
    "pipeline_names",
    "render_diffusers",
    "render_kohya",
    "render_peft",
]
