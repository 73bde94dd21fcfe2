"""ONNX export of a Hugging Face model with adapters merged in memory (``loratools export-onnx``).

Modules: `model` (build the fp32 model and merge, torch + transformers), `trace` (wrappers and torch.onnx),
`runtime` (the only importer of onnx and onnxruntime), `command` (`export_onnx`, the public entry point).
Importing this package needs onnx; transformers and onnxscript are checked when `export_onnx` runs.

Example:
    >>> from loratools.export import export_onnx
    >>> export_onnx("fixtures/llama-base", "out/llama.onnx", with_past=True).verification.passed
    True
"""

from loratools.export.command import ExportCheck, ExportResult, export_onnx

__all__ = ["ExportResult", "ExportCheck", "export_onnx"]
