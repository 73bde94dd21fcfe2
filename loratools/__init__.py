"""loratools: extract, inspect, merge and convert LoRA adapters; the public API."""

__version__ = "0.1.0"

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import load_adapter, save_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import (
    CheckpointError,
    ExportError,
    FormatError,
    LoratoolsError,
    OutputError,
    ShapeError,
)
from loratools.linalg import RankPolicy

__all__ = [
    "Adapter",
    "CheckpointError",
    "ExportError",
    "FormatError",
    "LoraModule",
    "LoratoolsError",
    "OutputError",
    "RankPolicy",
    "ShapeError",
    "TensorIndex",
    "load_adapter",
    "open_checkpoint",
    "save_adapter",
]
