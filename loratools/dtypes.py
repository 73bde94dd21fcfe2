"""The one dtype convention of the public API, and the rule for which dtype arithmetic runs in.

Every public function that takes a dtype accepts a `DType`: a name (``fp32``, ``fp16``, ``bf16``; the CLI's
spelling) or a ``torch.dtype``, resolved here once. Arithmetic on factors and weights runs in float32, or in
float64 when the data is float64 (`accumulation_dtype`); ``--precision`` picks fp32 or fp64 for ΔW and SVDs.
"""

from __future__ import annotations

import torch

from loratools.errors import LoratoolsError
from loratools.options import OUTPUT_DTYPE_NAMES
from loratools.options import PRECISIONS as PRECISION_NAMES

DType = str | torch.dtype
OUTPUT_DTYPES = dict(zip(OUTPUT_DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.float64), strict=True))


def resolve_dtype(value: DType | None, *, option: str = "--dtype") -> torch.dtype | None:
    """A written dtype from a name or a torch dtype (None stays None: "keep the input's").

    Raises:
        LoratoolsError naming `option` for an unknown name or a dtype loratools does not write.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in OUTPUT_DTYPES.values():
            return value
        raise LoratoolsError(f"{option} {value}: loratools writes {', '.join(OUTPUT_DTYPES)} only")
    if value not in OUTPUT_DTYPES:
        raise LoratoolsError(f"{option} {value!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[value]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of weights and deltas are accumulated: float64 for float64 data, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16`` …: the name reports and config.json use."""
    return str(dtype).removeprefix("torch.")
