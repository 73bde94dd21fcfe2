"""The package's layers, bottom up: the one declaration of its import order (tests/test_layers.py holds it).

A module imports from its own layer and the layers below, never from one above; there are no cycles, at top
level or inside functions. Heavy and optional third-party packages are imported only by the modules that own
them (`OWNERS`), so ``import loratools`` and the command line stay light and a missing extra is one line.
Names are module paths below ``loratools`` (``formats.peft``); a trailing ``.*`` takes a whole subpackage and
``""`` is the package itself (the public API).
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # exceptions, the progress callback, the version, tensor-name patterns, the option dataclasses, silencing
    ("foundation", ("errors", "progress", "version", "names", "options", "layers", "silence")),
    # Frobenius energies and factored SVDs, the dtype convention, rank policies and Eckart–Young errors; exact
    # LoHa / LoKr / DoRA delta math
    ("math", ("linalg", "dtypes", "policies", "structured")),
    # plain and structured (LoHa, LoKr, DoRA) modules; the adapter data model; lazy checkpoint reading; hub ids
    # to cached folders
    ("data", ("lora_module", "structured_modules", "adapter", "checkpoint", "hub")),
    # randomized SVD and low_rank; spectrum statistics
    ("algorithms", ("rsvd", "spectral")),
    # adapter key formats (one module per format); atomic writes and provenance; which tensors become which ops;
    # Hugging Face model folders loaded with transformers (config, kind, model, tokenizer)
    ("formats and io", ("formats", "formats.*", "writer", "plan", "hf_model")),
    # adapter files in and out; adapter math on factors; ΔW streaming; adapter module <-> checkpoint tensor;
    # structured modules as plain LoRA; an extraction fitted to its output format
    ("adapter operations", ("adapter_files", "algebra", "deltas", "matching", "structured_convert", "format_fit")),
    # one module per command family: each opens its inputs, calls the layers below, writes, returns a result
    ("commands", ("extraction", "spectrum", "verify", "inspection", "merging", "adapter_commands", "plot",
                  "behaviour_metrics", "behaviour")),
    # many fine-tunes of one base through extraction's per-pair steps; their Ray executor (ray imported only here)
    ("fleets", ("fleet", "fleet_ray")),
    # ONNX export, multi-LoRA slots and adapter files, ONNX merge (onnx and onnxruntime imported only here)
    ("export", ("export", "export.*")),
    # the command line: the only importer of click and rich
    ("cli", ("cli", "cli.*")),
    # the public API, re-exported lazily; nothing inside the package imports it
    ("api", ("",)),
)

# third-party package -> the modules allowed to import it
OWNERS: dict[str, tuple[str, ...]] = {
    "onnx": ("export.runtime", "export.slot_runtime", "export.onnx_weights", "export.quantize"),
    "onnxruntime": ("export.runtime", "export.slot_runtime", "export.onnx_weights", "export.quantize"),
    "onnx_ir": ("export.runtime", "export.slot_runtime"),
    "onnxscript": (),
    "onnxruntime_genai": ("export.genai_runtime",),
    "transformers": ("hf_model", "export.trace", "plan", "silence"),
    "matplotlib": ("plot",),
    "ray": ("fleet_ray",),
    "huggingface_hub": ("hub",),
    "gguf": ("formats.gguf",),
    "llama_cpp": (),  # a test judge only
    "click": ("cli.*",),
    "rich": ("cli.*",),
}
