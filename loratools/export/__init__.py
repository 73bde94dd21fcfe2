"""ONNX export of a Hugging Face model with adapters merged in memory (``loratools export-onnx``).

Modules: `model` (build the fp32 model and merge, torch + transformers), `trace` (wrappers and torch.onnx),
`runtime` (onnx and onnxruntime), `command` (`export_onnx`, the public entry point); multi-LoRA:
`slots` (which modules get a LoRA slot, the branch, torch), `lora_runtime` (its onnx / onnxruntime side),
`multilora` (`export_adapter`: onnxruntime adapter files), `onnx_merge` (`merge_onnx`: adapters into an ONNX
model exported elsewhere).
Importing this package is light (torch only); onnx, onnxruntime, transformers and onnxscript are imported
when an export runs (transformers and onnxscript are the `export` extra: one line says so when missing).

Example:
    >>> from loratools.export import export_onnx
    >>> export_onnx("fixtures/llama-base", "out/llama.onnx", with_past=True).verification.passed
    True
"""

from loratools.export.command import ExportCheck, ExportResult, export_onnx
from loratools.export.multilora import AdapterExportResult, export_adapter
from loratools.export.onnx_merge import OnnxMergeResult, merge_onnx

__all__ = ["AdapterExportResult", "ExportCheck", "ExportResult", "OnnxMergeResult", "export_adapter", "export_onnx",
           "merge_onnx"]
