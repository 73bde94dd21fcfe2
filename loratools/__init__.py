"""loratools: extract, inspect, merge, combine, resize and convert LoRA adapters; the public API.

Every function here takes paths or tensors and returns a result object with ``to_json()`` and ``notes``
(warnings); none prints. Public functions take their paths positionally and everything else by keyword;
options that travel together are frozen dataclasses: `Selection` (which tensors), `SvdSettings` (how each
truncated SVD is computed), `RankPolicy` (which rank). Dtypes are given as ``"fp32"``/``"fp16"``/``"bf16"``
or a ``torch.dtype`` (`dtypes.DType`).

Layers, bottom up; a module imports only from layers below its own (checked by shared/tools/import-layers):

    errors, progress, version, names   no loratools imports: exceptions, the progress callback, the version,
                                       tensor-name patterns and natural order
    linalg                             Frobenius energies in float64, residuals, factored SVD / spectrum
    dtypes, policies                   the dtype convention; rank policies and Eckart–Young errors
    adapter, checkpoint                the adapter data model; lazy checkpoint reading (headers, one tensor)
    rsvd, spectral                     randomized SVD and low_rank (SvdSettings); spectrum statistics
    formats, writer, plan              the one table of key names; atomic writes and provenance;
                                       which tensors become which ops (Selection, Plan, Pairing)
    adapter_files, algebra,            adapter files in/out; adapter math on factors;
    deltas, matching                   ΔW streaming and whole-tensor changes; adapter module <-> tensor
    extract, spectrum, verify,         one module per command family: each opens its inputs, calls the
    inspection, merge,                 layers below, writes atomically and returns a result
    adapter_commands
    export (model, trace, runtime,     export-onnx: the merged model in memory (transformers), traced with
    command, slots, lora_runtime,      torch.onnx, written and verified; multi-LoRA slots and adapter files
    multilora, onnx_merge)             (export-adapter); adapters merged into an existing ONNX model; runtime
                                       and lora_runtime are the only importers of onnx and onnxruntime
    cli (app, options, render, commands)   the only importer of click and rich
    plot                               --plot PNGs, the only importer of matplotlib (used by cli)
    __init__                           this public API; nothing inside the package imports it

Example:
    >>> import loratools
    >>> result = loratools.extract("fixtures/llama-base", "fixtures/llama-tuned", "out/adapter",
    ...                            policy=loratools.RankPolicy("rank", 8))
    >>> loratools.inspect_adapter("out/adapter").modules[0].singular_values
"""

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_commands import AdapterResult, combine, convert, rescale, resize
from loratools.adapter_files import load_adapter, save_adapter
from loratools.algebra import combine_adapters, rescale_adapter, resize_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import (
    CheckpointError,
    ExportError,
    FormatError,
    LoratoolsError,
    OutputError,
    ShapeError,
)
from loratools.export import AdapterExportResult, ExportResult, OnnxMergeResult, export_adapter, export_onnx, merge_onnx
from loratools.extract import ExtractResult, extract
from loratools.inspection import InspectReport, inspect_adapter
from loratools.linalg import factor_spectrum
from loratools.merge import MergeResult, merge
from loratools.plan import Selection, plan_extract
from loratools.policies import RankPolicy
from loratools.rsvd import SvdSettings, low_rank, randomized_svd
from loratools.spectrum import SpectrumReport, rank_spectrum
from loratools.verify import VerifyReport, verify_adapter
from loratools.version import __version__

__all__ = [
    "Adapter",
    "AdapterExportResult",
    "AdapterResult",
    "CheckpointError",
    "ExportError",
    "ExportResult",
    "ExtractResult",
    "FormatError",
    "InspectReport",
    "LoraModule",
    "LoratoolsError",
    "MergeResult",
    "OnnxMergeResult",
    "OutputError",
    "RankPolicy",
    "Selection",
    "ShapeError",
    "SpectrumReport",
    "SvdSettings",
    "TensorIndex",
    "VerifyReport",
    "__version__",
    "combine",
    "combine_adapters",
    "convert",
    "export_adapter",
    "export_onnx",
    "extract",
    "factor_spectrum",
    "inspect_adapter",
    "load_adapter",
    "low_rank",
    "merge",
    "merge_onnx",
    "open_checkpoint",
    "plan_extract",
    "randomized_svd",
    "rank_spectrum",
    "rescale",
    "rescale_adapter",
    "resize",
    "resize_adapter",
    "save_adapter",
    "verify_adapter",
]
