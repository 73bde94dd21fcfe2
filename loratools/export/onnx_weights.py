"""The onnx side of merging adapters into an existing ONNX model: every initializer's name, shape, dtype and
bytes, and replacing an initializer's data in place. Tensors cross as raw bytes with a dtype name ("float32",
"float16", "bfloat16", "float64"), so bf16 needs no numpy extension here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loratools.errors import ExportError
from loratools.export.runtime import EXTERNAL_THRESHOLD, ONNX_DTYPES, data_file, load_proto
from loratools.silence import ONNX_LOGGERS, silenced


@dataclass(frozen=True)
class InitializerInfo:
    """One initializer: name, shape, dtype name (float types only are listed) and bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class OnnxWeights:
    """An ONNX model file loaded with its external data, its float initializers listed and editable in place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = load_proto(self.path, weights=False)
        self.external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
        with silenced(ONNX_LOGGERS):
            self.proto = load_proto(self.path, weights=True)
        self._tensors = {t.name: t for t in self.proto.graph.initializer}
        self.initializers = [
            InitializerInfo(t.name, tuple(int(d) for d in t.dims), ONNX_DTYPES[t.data_type],
                            int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t.data_type))
            for t in self.proto.graph.initializer if t.data_type in ONNX_DTYPES
        ]

    def __iter__(self) -> Iterator[InitializerInfo]:
        return iter(self.initializers)

    @property
    def inputs(self) -> list[str]:
        return [i.name for i in self.proto.graph.input]

    def raw(self, name: str) -> bytes:
        """The initializer's data, little-endian, C order."""
        tensor = self._tensors[name]
        if tensor.raw_data:
            return bytes(tensor.raw_data)
        return numpy_helper.to_array(tensor).tobytes()

    def replace(self, name: str, raw: bytes) -> None:
        """Replace the data of initializer `name` (same shape and dtype) by `raw`."""
        tensor = self._tensors[name]
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * _itemsize(tensor.data_type)
        if len(raw) != expected:
            raise ExportError(f"{name}: {len(raw)} bytes for an initializer of {expected}")
        for field in ("float_data", "int32_data", "double_data", "external_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = raw

    def weight_bytes(self) -> int:
        return sum(i.nbytes for i in self.initializers)

    def save(self, path: Path, *, external: bool) -> None:
        """Write the model to `path` (tensors ≥ 1 KiB to ``<path>.data`` with `external`)."""
        if external:
            onnx.save_model(self.proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file(path).name, size_threshold=EXTERNAL_THRESHOLD)
        else:
            onnx.save_model(self.proto, str(path))


ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _itemsize(data_type: int) -> int:
    return ITEMSIZE.get(ONNX_DTYPES.get(data_type, ""), 0)
