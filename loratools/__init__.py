"""loratools: extract, inspect, merge, combine, resize and convert LoRA adapters; the public API.

Every function here takes paths or tensors and returns result objects with ``to_json()``; none prints.

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
