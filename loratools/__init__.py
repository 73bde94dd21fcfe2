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

import importlib
from typing import TYPE_CHECKING

from loratools.version import __version__

if TYPE_CHECKING:
    from loratools.adapter import Adapter, LoraModule
    from loratools.adapter_commands import AdapterResult, combine, convert, rescale, resize
    from loratools.adapter_files import load_adapter, save_adapter
    from loratools.algebra import combine_adapters, rescale_adapter, resize_adapter
    from loratools.behaviour import (
        BehaviourReport,
        SpectrumBehaviourReport,
        VerifyBehaviourReport,
        spectrum_behaviour,
        verify_behaviour,
    )
    from loratools.checkpoint import TensorIndex, open_checkpoint
    from loratools.errors import (
        CheckpointError,
        ExportError,
        FormatError,
        LoratoolsError,
        ModelError,
        OutputError,
        ShapeError,
    )
    from loratools.export import (
        AdapterExportResult,
        ExportOptions,
        ExportResult,
        OnnxMergeResult,
        VerifyOptions,
        export_adapter,
        export_onnx,
        merge_onnx,
    )
    from loratools.extraction import ExtractResult, extract
    from loratools.inspection import InspectReport, inspect_adapter
    from loratools.linalg import factor_spectrum
    from loratools.merging import MergeResult, merge
    from loratools.options import BehaviourOptions, RankPolicy, Selection, SvdSettings
    from loratools.plan import plan_extract
    from loratools.rsvd import low_rank, randomized_svd
    from loratools.spectrum import SpectrumReport, rank_spectrum
    from loratools.verify import VerifyReport, verify_adapter

# public name -> the module that defines it; imported on first use, so ``import loratools`` (and with it the
# command line, ``loratools --help``) loads no torch until a function or class is used.
_PUBLIC = {
    "Adapter": "loratools.adapter",
    "AdapterExportResult": "loratools.export",
    "AdapterResult": "loratools.adapter_commands",
    "BehaviourOptions": "loratools.options",
    "BehaviourReport": "loratools.behaviour",
    "CheckpointError": "loratools.errors",
    "combine": "loratools.adapter_commands",
    "combine_adapters": "loratools.algebra",
    "convert": "loratools.adapter_commands",
    "export_adapter": "loratools.export",
    "export_onnx": "loratools.export",
    "ExportError": "loratools.errors",
    "ExportOptions": "loratools.export",
    "ExportResult": "loratools.export",
    "extract": "loratools.extraction",
    "ExtractResult": "loratools.extraction",
    "factor_spectrum": "loratools.linalg",
    "FormatError": "loratools.errors",
    "inspect_adapter": "loratools.inspection",
    "InspectReport": "loratools.inspection",
    "load_adapter": "loratools.adapter_files",
    "LoraModule": "loratools.adapter",
    "LoratoolsError": "loratools.errors",
    "low_rank": "loratools.rsvd",
    "merge": "loratools.merging",
    "merge_onnx": "loratools.export",
    "MergeResult": "loratools.merging",
    "ModelError": "loratools.errors",
    "OnnxMergeResult": "loratools.export",
    "open_checkpoint": "loratools.checkpoint",
    "OutputError": "loratools.errors",
    "plan_extract": "loratools.plan",
    "randomized_svd": "loratools.rsvd",
    "rank_spectrum": "loratools.spectrum",
    "RankPolicy": "loratools.options",
    "rescale": "loratools.adapter_commands",
    "rescale_adapter": "loratools.algebra",
    "resize": "loratools.adapter_commands",
    "resize_adapter": "loratools.algebra",
    "save_adapter": "loratools.adapter_files",
    "Selection": "loratools.options",
    "ShapeError": "loratools.errors",
    "spectrum_behaviour": "loratools.behaviour",
    "SpectrumBehaviourReport": "loratools.behaviour",
    "SpectrumReport": "loratools.spectrum",
    "SvdSettings": "loratools.options",
    "TensorIndex": "loratools.checkpoint",
    "verify_adapter": "loratools.verify",
    "verify_behaviour": "loratools.behaviour",
    "VerifyBehaviourReport": "loratools.behaviour",
    "VerifyOptions": "loratools.export",
    "VerifyReport": "loratools.verify",
}


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'loratools' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


__all__ = sorted([*_PUBLIC, "__version__"])
