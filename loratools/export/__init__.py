"""ONNX export of a Hugging Face model with adapters merged in memory (``loratools export-onnx``).

Modules, by what they hold:
- `model` (the fp32 model with adapters merged; transformers), `trace` (wrappers and torch.onnx), `kit` (what
  every ONNX output shares: VerifyOptions, the verification against PyTorch, the staged write, timed steps);
- `onnx_export` (`export_onnx`, ``loratools export-onnx``), `adapter_export` (`export_adapter`: onnxruntime
  adapter files, ``export-adapter``), `onnx_merge` (`merge_onnx`: adapters into an ONNX model exported
  elsewhere, ``merge-onnx``);
- `genai_config` (genai_config.json from config dicts; pure), `genai_bundle` (`export_genai`: onnxruntime-genai
  bundle folders, ``export-onnx --genai``), `genai_generate` (`generate`: text from a bundle, ``generate``);
- `slots` (which modules get a LoRA slot, the branch; torch); `quantize` (int4 MatMulNBits of a written graph,
  the accuracy report of quantized graphs);
- the only importers of onnx / onnxruntime: `runtime` (finish, save, run exported graphs), `slot_runtime`
  (slot defaults, adapter files, runs with adapters), `onnx_weights` (initializers of a graph made elsewhere);
  the only importer of onnxruntime_genai: `genai_runtime` (load a bundle, tokenize, generate).
Importing this package is light (torch only); onnx, onnxruntime, transformers and onnxscript are imported
when an export runs (transformers and onnxscript are the `export` extra: one line says so when missing).

Example:
    >>> from loratools.export import ExportOptions, export_onnx
    >>> export_onnx("fixtures/llama-base", "out/llama.onnx", options=ExportOptions(with_past=True)).verification.passed
    True
"""

from loratools.export.adapter_export import AdapterExportResult, export_adapter
from loratools.export.genai_bundle import BundleOptions, BundleResult, ServedAdapter, export_genai
from loratools.export.genai_generate import GenerateOptions, GenerateResult, generate
from loratools.export.kit import ExportCheck, VerifyOptions
from loratools.export.onnx_export import ExportOptions, ExportResult, export_onnx
from loratools.export.onnx_merge import OnnxMergeResult, merge_onnx
from loratools.export.quantize import Int4Options, quantize_int4

__all__ = ["AdapterExportResult", "BundleOptions", "BundleResult", "ExportCheck", "ExportOptions", "ExportResult",
           "GenerateOptions", "GenerateResult", "Int4Options", "OnnxMergeResult", "ServedAdapter", "VerifyOptions",
           "export_adapter", "export_genai", "export_onnx", "generate", "merge_onnx", "quantize_int4"]
