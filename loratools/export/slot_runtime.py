"""The onnx / onnxruntime side of multi-LoRA: slot defaults and metadata in a graph, slot inputs read back,
onnxruntime adapter files written and read, runs with adapters active.

Kept apart from `runtime` (which finishes and runs exported graphs) because it reads and edits graphs
loratools did not trace. Arrays are numpy.

- Slots: zero-size default initializers for the slot inputs (a run without an adapter is the base model), the
  slot table in the graph's metadata, reading the slot inputs back (name, dtype, shape) without the weights.
- Adapter files: ``onnxruntime.AdapterFormat`` write / read, runs with adapters active (``RunOptions``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from loratools.errors import ExportError
from loratools.export.runtime import ONNX_DTYPES, load_proto

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


def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in dims)


def read_slots(path: Path, *, suffixes: Sequence[str], metadata_key: str) -> tuple[list[SlotInput], dict | None]:
    """The graph inputs of `path` whose names end with one of `suffixes`, and the slot metadata (None when the
    graph was not written by loratools). Reads no weights."""
    proto = load_proto(path, weights=False)
    found = [
        SlotInput(i.name, ONNX_DTYPES.get(i.type.tensor_type.elem_type, str(i.type.tensor_type.elem_type)), _dims(i))
        for i in proto.graph.input if i.name.endswith(tuple(suffixes))
    ]
    raw = next((p.value for p in proto.metadata_props if p.key == metadata_key), None)
    return found, json.loads(raw) if raw else None


def graph_inputs(path: Path) -> list[str]:
    """Names of the graph inputs of `path` (those with defaults included)."""
    return [i.name for i in load_proto(path, weights=False).graph.input]


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
