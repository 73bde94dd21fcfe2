"""loratools: extract, inspect, merge, combine, resize and convert LoRA adapters; the public API.

Every function here takes paths or tensors and returns a result object with ``to_json()`` and ``notes``
(warnings); none prints. Public functions take their paths positionally and everything else by keyword;
options that travel together are frozen dataclasses: `Selection` (which tensors), `SvdSettings` (how each
truncated SVD is computed), `RankPolicy` (which rank). Dtypes are given as ``"fp32"``/``"fp16"``/``"bf16"``
or a ``torch.dtype`` (`dtypes.DType`).

The package's layers and the owners of heavy imports are declared once, in `loratools.layers`.

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
        BundleOptions,
        BundleResult,
        ExportOptions,
        ExportResult,
        GenerateOptions,
        GenerateResult,
        OnnxMergeResult,
        VerifyOptions,
        export_adapter,
        export_genai,
        export_onnx,
        generate,
        merge_onnx,
    )
    from loratools.extraction import ExtractResult, ExtractSettings, extract
    from loratools.fleet import FleetEntry, FleetOptions, FleetResult, extract_fleet
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
    "BundleOptions": "loratools.export",
    "BundleResult": "loratools.export",
    "CheckpointError": "loratools.errors",
    "combine": "loratools.adapter_commands",
    "combine_adapters": "loratools.algebra",
    "convert": "loratools.adapter_commands",
    "export_adapter": "loratools.export",
    "export_genai": "loratools.export",
    "export_onnx": "loratools.export",
    "ExportError": "loratools.errors",
    "ExportOptions": "loratools.export",
    "ExportResult": "loratools.export",
    "extract": "loratools.extraction",
    "ExtractResult": "loratools.extraction",
    "ExtractSettings": "loratools.extraction",
    "extract_fleet": "loratools.fleet",
    "factor_spectrum": "loratools.linalg",
    "FleetEntry": "loratools.fleet",
    "FleetOptions": "loratools.fleet",
    "FleetResult": "loratools.fleet",
    "FormatError": "loratools.errors",
    "generate": "loratools.export",
    "GenerateOptions": "loratools.export",
    "GenerateResult": "loratools.export",
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
