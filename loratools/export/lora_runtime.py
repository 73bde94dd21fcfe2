"""The onnx / onnxruntime side of multi-LoRA and of merging adapters into an existing ONNX model.

The second importer of onnx and onnxruntime (beside `runtime`, which finishes and runs exported graphs): kept
apart because it reads and edits graphs loratools did not trace (slots, adapter files, other exporters'
graphs). Arrays are numpy; tensors cross as raw bytes with a
dtype name ("float32", "float16", "bfloat16", "float64"), so bf16 needs no numpy extension here.

- Slots: zero-size default initializers for the slot inputs (a run without an adapter is the base model), the
  slot table in the graph's metadata, reading the slot inputs back (name, dtype, shape) without the weights.
- Adapter files: ``onnxruntime.AdapterFormat`` write / read, runs with adapters active (``RunOptions``).
- ONNX merge: every initializer's name, shape, dtype and bytes; replacing an initializer's data in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

from loratools.errors import CheckpointError, ExportError
from loratools.export.runtime import quiet

ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


@dataclass(frozen=True)
class SlotInput:
    """A LoRA slot input of a graph: name, dtype name, shape (a str for a symbolic axis such as ``lora_r``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


def add_slot_defaults(model: ir.Model, shapes: dict[str, tuple[int, int]], *, metadata_key: str,
                      metadata: dict) -> None:
    """Give each slot input of `model` a zero-size fp32 default initializer of `shapes[name]` ((in, 0) or
    (0, out)) and record `metadata` (JSON) under `metadata_key` in the model's metadata."""
    inputs = {value.name: value for value in model.graph.inputs}
    for name, shape in shapes.items():
        value = inputs.get(name)
        if value is None:
            raise ExportError(f"{name}: the exporter dropped this LoRA slot input (the module is not on the traced path)")
        value.const_value = ir.tensor(np.zeros(shape, dtype=np.float32), name=name)
        model.graph.register_initializer(value)
    model.metadata_props[metadata_key] = json.dumps(metadata)


def _proto(path: Path, *, weights: bool) -> onnx.ModelProto:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as exc:  # protobuf and onnx raise several types; the user needs one line
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable ONNX model ({first})") from None


def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in dims)


def read_slots(path: Path, *, suffixes: Sequence[str], metadata_key: str) -> tuple[list[SlotInput], dict | None]:
    """The graph inputs of `path` whose names end with one of `suffixes`, and the slot metadata (None when the
    graph was not written by loratools). Reads no weights."""
    proto = _proto(path, weights=False)
    found = [
        SlotInput(i.name, ONNX_DTYPES.get(i.type.tensor_type.elem_type, str(i.type.tensor_type.elem_type)), _dims(i))
        for i in proto.graph.input if i.name.endswith(tuple(suffixes))
    ]
    raw = next((p.value for p in proto.metadata_props if p.key == metadata_key), None)
    return found, json.loads(raw) if raw else None


def graph_inputs(path: Path) -> list[str]:
    """Names of the graph inputs of `path` (those with defaults included)."""
    return [i.name for i in _proto(path, weights=False).graph.input]


def write_adapter(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An onnxruntime adapter file (``.onnx_adapter``) holding `arrays` by graph input name."""
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                            for name, a in arrays.items()})
    adapter.export_adapter(str(path))


def read_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of an onnxruntime adapter file, by name."""
    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return {name: value.numpy() for name, value in params.items()}


def run_with_adapters(sess: ort.InferenceSession, feeds: dict[str, np.ndarray],
                      adapters: Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """Outputs by name of one run with the adapter files `adapters` active."""
    options = ort.RunOptions()
    loaded = []  # RunOptions does not keep its adapters alive: hold them until the run is done
    for path in adapters:
        loaded.append(ort.LoraAdapter())
        loaded[-1].Load(str(path))
        options.add_active_adapter(loaded[-1])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds, options), strict=True))


# ---- ONNX merge: initializers by name, shape, dtype and bytes ------------------------------------------------


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
        header = _proto(self.path, weights=False)
        self.external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
        with quiet():
            self.proto = _proto(self.path, weights=True)
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
        from loratools.export.runtime import EXTERNAL_THRESHOLD, data_file

        if external:
            onnx.save_model(self.proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file(path).name, size_threshold=EXTERNAL_THRESHOLD)
        else:
            onnx.save_model(self.proto, str(path))


ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _itemsize(data_type: int) -> int:
    return ITEMSIZE.get(ONNX_DTYPES.get(data_type, ""), 0)
