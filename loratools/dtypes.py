"""The one dtype convention of the public API, and the rule for which dtype arithmetic runs in.

Every public function that takes a dtype accepts a `DType`: a name (``fp32``, ``fp16``, ``bf16``; the CLI's
spelling; ``q8_0`` for GGUF adapters only) or a ``torch.dtype``, resolved here once. Arithmetic on factors and weights runs in float32, or in
float64 when the data is float64 (`accumulation_dtype`); ``--precision`` picks fp32 or fp64 for ΔW and SVDs.
"""

from __future__ import annotations

import torch

from loratools.errors import LoratoolsError
from loratools.options import OUTPUT_DTYPE_NAMES, QUANTIZED_DTYPE_NAMES
from loratools.options import PRECISIONS as PRECISION_NAMES

DType = str | torch.dtype
OUTPUT_DTYPES = dict(zip(OUTPUT_DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
# quantized types only GGUF files hold: name -> the dtype the factors are kept in until the GGUF writer quantizes
QUANTIZED_DTYPES = dict(zip(QUANTIZED_DTYPE_NAMES, (torch.float32,), strict=True))
PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.float64), strict=True))


def resolve_dtype(value: DType | None, *, option: str = "--dtype", quantized: bool = False) -> torch.dtype | None:
    """A written dtype from a name or a torch dtype (None stays None: "keep the input's"); with `quantized`,
    ``q8_0`` gives the float32 its factors are kept in until the GGUF writer quantizes them.

    Raises:
        LoratoolsError naming `option` for an unknown name or a dtype loratools does not write.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in OUTPUT_DTYPES.values():
            return value
        raise LoratoolsError(f"{option} {value}: loratools writes {', '.join(OUTPUT_DTYPES)} only")
    if value in QUANTIZED_DTYPES and quantized:
        return QUANTIZED_DTYPES[value]
    if value not in OUTPUT_DTYPES:
        raise LoratoolsError(f"{option} {value!r}: choose one of {', '.join(OUTPUT_DTYPES)}"
                             + (" (q8_0: GGUF adapters only)" if value in QUANTIZED_DTYPES else ""))
    return OUTPUT_DTYPES[value]


def check_dtype_format(value: DType | None, format: str) -> None:
    """Refuse a quantized dtype (``q8_0``) for a format other than GGUF, naming the fix."""
    if isinstance(value, str) and value in QUANTIZED_DTYPES and format != "gguf":
        raise LoratoolsError(f"--dtype {value}: only GGUF adapters are quantized; add --format gguf or choose one of"
                             f" {', '.join(OUTPUT_DTYPES)}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of weights and deltas are accumulated: float64 for float64 data, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16`` …: the name reports and config.json use."""
    return str(dtype).removeprefix("torch.")
