"""loratools: extract, inspect, merge, combine, resize and convert LoRA adapters; the public API.

Every function here takes paths or tensors and returns result objects with ``to_json()``; none prints.

Example:
    >>> import loratools
    >>> result = loratools.extract("fixtures/llama-base", "fixtures/llama-tuned", "out/adapter",
    ...                            policy=loratools.RankPolicy("rank", 8))
    >>> loratools.inspect_adapter("out/adapter").modules[0].singular_values
"""

__version__ = "0.1.0"

from loratools.adapter import Adapter, LoraModule
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
from loratools.extract import ExtractResult, extract
from loratools.inspection import InspectReport, inspect_adapter
from loratools.linalg import RankPolicy, factor_spectrum, low_rank, randomized_svd
from loratools.merge import MergeResult, merge
from loratools.operations import AdapterResult, combine, convert, rescale, resize
from loratools.plan import plan_extract
from loratools.sweep import SpectrumReport, rank_spectrum
from loratools.verify import VerifyReport, verify_adapter

__all__ = [
    "Adapter",
    "AdapterResult",
    "CheckpointError",
    "ExportError",
    "ExtractResult",
    "FormatError",
    "InspectReport",
    "LoraModule",
    "LoratoolsError",
    "MergeResult",
    "OutputError",
    "RankPolicy",
    "ShapeError",
    "SpectrumReport",
    "TensorIndex",
    "VerifyReport",
    "combine",
    "combine_adapters",
    "convert",
    "extract",
    "factor_spectrum",
    "inspect_adapter",
    "load_adapter",
    "low_rank",
    "merge",
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
