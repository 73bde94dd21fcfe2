"""onnxruntime multi-LoRA: adapter files for a graph exported with LoRA slots (``loratools export-adapter``).

A graph exported with ``export_onnx(..., lora_slots=SPEC)`` takes, for every slot module, inputs
``<module>.lora_A.weight`` (in, lora_r) and ``<module>.lora_B.weight`` (lora_r, out) defaulting to zero size.
`export_adapter` writes an ``onnxruntime.AdapterFormat`` file with those tensors for one PEFT or kohya adapter,
so one session serves the base and any number of adapters, chosen per run (``RunOptions.add_active_adapter``).

Decisions:
- Names and shapes come from the graph's inputs, each base weight's layout (Linear or Conv1D) from the slot
  table loratools stores in the graph's metadata (a graph from another tool, e.g. Olive, is taken as Linear).
  Adapter modules are matched to slots as `merge` matches them to a checkpoint (`matching.match_adapter`:
  kohya stems, names without the wrapper prefix, Conv1D flips), so the file applies what `merge` would.
- B carries the whole scale, weight · alpha / r (alpha / √r for rsLoRA; per module with rank_pattern and
  alpha_pattern), computed in fp32, then both factors are cast to the graph's slot dtype.
- Every slot gets a tensor: the adapter's, or zero rank ((in, 0), (0, out)) where the adapter has nothing.
- An adapter module without a slot, a full tensor (modules_to_save), a shape that does not fit, or a dtype
  asked for that is not the graph's: one ShapeError / ExportError naming the module, nothing written.
- With ``verify=MODEL`` the graph runs with the adapter active against MODEL + adapter merged in PyTorch
  (`model.load_merged_model`, the same merge as ``export-onnx -a``), on the inputs `export_onnx` verifies with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import loratools.export.trace as trace
from loratools.adapter_files import load_usable
from loratools.errors import ExportError, LoratoolsError, ShapeError
from loratools.export.kit import ExportCheck, Steps, require_extras, result_json, verify_graph
from loratools.export.model import load_merged_model
from loratools.export.slots import (
    A_SUFFIX,
    B_SUFFIX,
    METADATA_KEY,
    Slot,
    match_slots,
    onnx_factors,
    shape_index,
    slots_from_metadata,
)
from loratools.names import short_list
from loratools.options import DEFAULT_ATOL
from loratools.progress import Progress
from loratools.writer import atomic_output, check_output

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


@dataclass
class AdapterExportResult:
    """What `export_adapter` wrote.

    Attributes:
        out: the ``.onnx_adapter`` file; bytes: its size.
        onnx: the slotted graph it is for; dtype: the slot dtype ("float32" / "float16").
        ranks: slot module → rank written (0: the adapter has nothing there).
        parameters: tensors in the file (two per slot).
        verification: the check against MODEL + adapter merged in PyTorch, when asked.
    """

    out: Path
    onnx: Path
    adapter: str
    weight: float
    dtype: str
    ranks: dict[str, int]
    parameters: int
    bytes: int
    timings: dict[str, float]
    verification: ExportCheck | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def filled(self) -> int:
        return sum(1 for rank in self.ranks.values() if rank)

    def to_json(self) -> dict:
        return result_json(self, filled=self.filled)


def graph_slots(onnx: Path) -> tuple[list[Slot], str]:
    """The slots of a graph and their dtype name, from its inputs (and loratools' slot table when present)."""
    from loratools.export.slot_runtime import read_slots

    inputs, metadata = read_slots(onnx, suffixes=(A_SUFFIX, B_SUFFIX), metadata_key=METADATA_KEY)
    if not inputs:
        raise ExportError(f"{onnx}: the graph has no LoRA slot inputs (<module>{A_SUFFIX}); export the base with"
                          " export-onnx --lora-slots")
    by_name = {i.name: i for i in inputs}
    if metadata is not None:
        slots = slots_from_metadata(metadata)
    else:  # another tool's graph: A (in, r), B (r, out), Linear layout
        slots = []
        for i in inputs:
            if not i.name.endswith(A_SUFFIX):
                continue
            module = i.name.removesuffix(A_SUFFIX)
            b = by_name.get(module + B_SUFFIX)
            if b is None or not isinstance(i.shape[0], int) or not isinstance(b.shape[-1], int):
                raise ExportError(f"{onnx}: slot {i.name} has no {module + B_SUFFIX} of static width; not a LoRA slot")
            slots.append(Slot(module, "linear", i.shape[0], b.shape[-1]))
    for slot in slots:
        for name in (slot.a_name, slot.b_name):
            if name not in by_name:
                raise ExportError(f"{onnx}: the slot table names {name} but the graph has no such input")
    dtypes = sorted({i.dtype for i in inputs})
    if len(dtypes) != 1 or dtypes[0] not in TORCH_DTYPES:
        raise ExportError(f"{onnx}: LoRA slot inputs of dtype {', '.join(dtypes)}; export-adapter writes float32 or"
                          " float16 slots")
    return slots, dtypes[0]


def _check_dtype(dtype: str | None, graph_dtype: str, slots: list[Slot], onnx: Path) -> None:
    if dtype is None:
        return
    wanted = DTYPE_NAMES.get(dtype, dtype)
    if wanted not in TORCH_DTYPES:
        raise LoratoolsError(f"unknown adapter dtype {dtype!r}; choose fp32 or fp16 (the graph's slot dtype)")
    if wanted != graph_dtype:
        raise ExportError(f"{slots[0].module}: the graph {onnx} takes {graph_dtype} slots ({slots[0].a_name}) but"
                          f" {dtype} was asked; onnxruntime refuses an adapter whose dtype differs from the graph's,"
                          f" so drop --dtype (the adapter is written in {graph_dtype})")


def export_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    onnx: str | os.PathLike,
    weight: float = 1.0,
    dtype: str | None = None,
    verify: str | os.PathLike | None = None,
    atol: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> AdapterExportResult:
    """Write an onnxruntime adapter file (``.onnx_adapter``) for a graph exported with LoRA slots.

    Args:
        adapter: a PEFT folder or file, or a kohya file.
        out: the adapter file to write.
        onnx: the slotted graph (``export_onnx(..., lora_slots=...)``).
        weight: multiplies the adapter's delta (folded into B with the scale).
        dtype: "fp32"/"fp16": must be the graph's slot dtype (default: it).
        verify: a model folder: run `onnx` with the adapter active against it + adapter merged in PyTorch.
        atol: verification tolerance (default `options.DEFAULT_ATOL`, scaled by max(1, max |torch|)).
    Returns:
        AdapterExportResult: rank per slot (A (in, r), B (r, out) in the file), size, verification.
    Raises:
        ShapeError (module without a slot, shape that does not fit, full tensors), ExportError (dtype, graph
        without slots, failed verification), OutputError; nothing is written on error.

    Example:
        >>> export_adapter("fixtures/llama-lora-peft", "out/a.onnx_adapter", onnx="out/base.onnx").ranks
    """
    require_extras("export-adapter", needs=["onnx_ir"])
    from loratools.export.slot_runtime import write_adapter

    onnx, out = Path(onnx), Path(out)
    inputs = [adapter, onnx] + ([verify] if verify is not None else [])
    check_output(out, inputs, force)
    steps = Steps(["convert"] + (["verify"] if verify is not None else []), progress)
    with steps("convert"):
        slots, graph_dtype = graph_slots(onnx)
        _check_dtype(dtype, graph_dtype, slots, onnx)
        source = load_usable(adapter)
        index = shape_index(str(onnx), {slot.module + ".weight": slot.base_shape for slot in slots})
        match = match_slots(source, index, label=str(adapter))
        if match.missing:
            raise ShapeError(f"{adapter}: {len(match.missing)} module(s) have no LoRA slot in {onnx}:"
                             f" {short_list(list(match.missing))}; export the base with --lora-slots {adapter}"
                             " (or list those modules)")
        if not match.targets:
            raise ShapeError(f"{adapter}: the adapter has no LoRA module")
        cast = TORCH_DTYPES[graph_dtype]
        arrays, ranks = {}, {}
        for slot in slots:
            target = match.targets.get(slot.module + ".weight")
            if target is not None and target.module is not None:
                a, b = onnx_factors(target.module, slot.layout, weight=weight)
            else:
                a, b = slot.empty()
            if tuple(a.shape) != (slot.in_features, a.shape[1]) or tuple(b.shape) != (a.shape[1], slot.out_features):
                raise ShapeError(f"{slot.module}: the adapter gives A {tuple(a.shape)}, B {tuple(b.shape)} but the slot takes"
                                 f" ({slot.in_features}, r), (r, {slot.out_features})")
            arrays[slot.a_name] = a.to(cast).numpy()
            arrays[slot.b_name] = b.to(cast).numpy()
            ranks[slot.module] = int(a.shape[1])
    report: ExportCheck | None = None
    with atomic_output(out, inputs, force) as tmp:
        write_adapter(tmp, arrays)
        if verify is not None:
            precision = "fp16" if graph_dtype == "float16" else "fp32"
            with steps("verify"):
                report = verify_with_adapter(onnx, tmp, model=verify, adapter=adapter, weight=weight,
                                             precision=precision,
                                             atol=atol if atol is not None else DEFAULT_ATOL[precision])
            if not report.passed:
                raise ExportError(f"{out}: verification failed: {report.failure()}; nothing was written (--atol sets"
                                  " the tolerance)")
        size = tmp.stat().st_size
    steps.done()
    return AdapterExportResult(
        out=out, onnx=onnx, adapter=str(adapter), weight=weight, dtype=graph_dtype, ranks=ranks,
        parameters=len(arrays), bytes=size, timings=steps.timings,
        verification=report, notes=list(source.notes),
    )


class _AdapterSession:
    """An onnxruntime session that runs with adapter files active: what `verify_graph` calls as ``sess``."""

    def __init__(self, sess: Any, adapters: list[Path]):
        self.sess, self.adapters = sess, adapters

    def get_outputs(self) -> Any:
        return self.sess.get_outputs()

    def get_inputs(self) -> Any:
        return self.sess.get_inputs()

    def run(self, names: Any, feeds: dict, options: Any = None) -> Any:
        from loratools.export.slot_runtime import run_with_adapters

        out = run_with_adapters(self.sess, feeds, self.adapters)
        return [out[n] for n in (names or list(out))]


def verify_with_adapter(onnx: Path, adapter_file: Path, *, model: str | os.PathLike, adapter: str | os.PathLike,
                        weight: float, precision: str, atol: float) -> ExportCheck:
    """Run the slotted graph `onnx` with `adapter_file` active against `model` + `adapter` (× weight) merged in
    PyTorch, on `kit.verify_graph`'s inputs (batch 3, 7 tokens, past 6 with the KV cache, one padded row;
    with the KV cache also greedy generation against ``generate``)."""
    import loratools.export.runtime as runtime
    from loratools.export.slot_runtime import graph_inputs

    loaded = load_merged_model(model, adapters=[adapter], weights=[weight])
    names = [n for n in graph_inputs(onnx) if not n.endswith((A_SUFFIX, B_SUFFIX))]
    with_past = any(n.startswith("past_key_values.") for n in names)
    spec = trace.graph_spec(loaded.model, loaded.kind, with_past=with_past)
    if list(spec.inputs) != names:
        raise ExportError(f"{onnx}: graph inputs {short_list(names, 6)} are not those loratools exports for {model}"
                          f" ({short_list(list(spec.inputs), 6)}); verify against the model the graph was exported from")
    module = trace.GraphModule(loaded.model, spec)
    sess = _AdapterSession(runtime.session(onnx), [adapter_file])
    return verify_graph(module, sess, precision=precision, atol=atol)
