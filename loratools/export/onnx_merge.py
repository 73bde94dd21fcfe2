"""Merge adapters into an ONNX model exported elsewhere (Optimum, torch, onnxruntime-genai), without transformers:
``loratools merge-onnx model.onnx --base BASE -a ADAPTER [-w W]… -o merged.onnx``.

Each tensor the adapters change (`merge.plan_merge` on BASE's checkpoint: W + Σ wᵢ·ΔWᵢ, the same as
``loratools merge``) is found among the graph's initializers, then replaced by the merged tensor in the
initializer's own layout and dtype.

Decisions:
- By name first: an initializer named like the checkpoint tensor, or ending in ``.<name>`` (a wrapper prefix
  such as ``hf.`` or ``model.``), of the tensor's shape or its transpose, whose values are the base tensor's
  (checked: a name alone could be another model's).
- Then by value, for exporters that renamed the weights (torch's dynamo exporter folds ``Transpose(W)`` of a
  Linear weight into ``val_N``; the TorchScript exporter into ``onnx::MatMul_N``): every float initializer of a
  wanted shape is hashed once (blake2b of its bytes), every changed base tensor is hashed in the
  initializer's dtype, as W and as Wᵀ (MatMul layout); equal hashes match. Linear in model size.
- A base tensor may match several initializers (a tied embedding stored as W for Gather and as Wᵀ for the LM
  head): all are updated, as the tie would. An initializer claimed by two different tensors (equal base
  weights) is ambiguous: an error. An initializer used by several nodes is one initializer: updated once.
- Tensors found nowhere (another model, a quantized graph) are one error listing them; nothing is written.
- External data is read and written back the same way (``merged.onnx.data``), also above 2 GB.
- Verification, when transformers is installed and BASE is a model folder: the merged graph runs in
  onnxruntime against BASE + adapters merged in PyTorch (what exporting the merged checkpoint would give), on
  `command.verify_graph`'s inputs, when the graph's inputs are those loratools exports; otherwise the report
  says what was matched and how, and a note says why it was not verified.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import loratools.export.trace as trace
from loratools.algebra import adapter_weights
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import ExportError, OutputError
from loratools.export.kit import (
    ExportCheck,
    Steps,
    VerifyOptions,
    require_extras,
    result_json,
    staged_graph,
    verify_graph,
)
from loratools.export.model import load_merged_model
from loratools.merging import apply_ops, plan_merge
from loratools.names import short_list
from loratools.progress import Progress
from loratools.writer import check_output

if TYPE_CHECKING:  # onnx is imported only when a graph is read
    from loratools.export.onnx_weights import OnnxWeights

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


@dataclass(frozen=True)
class Placement:
    """Where a changed base tensor went: the initializer, how it was found ("name" or "value") and whether it
    is stored transposed (MatMul layout)."""

    initializer: str
    tensor: str
    how: str
    transposed: bool

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class OnnxMergeResult:
    """What `merge_onnx` wrote.

    Attributes:
        out, files: the merged graph and name → bytes of the files written (graph, ``.data``).
        placements: one per updated initializer (a tensor may have several: tied copies).
        by_name, by_value: how many changed tensors were found each way.
        verification: against BASE + adapters merged in PyTorch, or None (see notes).
    """

    out: Path
    source: Path
    base: str
    adapters: list[str]
    weights: list[float]
    files: dict[str, int]
    external_data: bool
    placements: list[Placement]
    by_name: int
    by_value: int
    timings: dict[str, float]
    verification: ExportCheck | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return result_json(self)


def _digest(raw: bytes | memoryview) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _tensor_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    cast = tensor.to(TORCH_DTYPES[dtype]).contiguous()
    return cast.view(torch.uint8).numpy().tobytes() if cast.numel() else b""


def _by_name(tensor: str, names: list[str]) -> list[str]:
    return [n for n in names if n == tensor or n.endswith("." + tensor) or tensor.endswith("." + n)]


def _same_values(raw: bytes, base: torch.Tensor, dtype: str, transposed: bool) -> bool:
    expected = base.T if transposed else base
    if _tensor_bytes(expected, dtype) == raw:
        return True
    got = torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[dtype]).reshape(expected.shape).float()
    return bool(torch.allclose(got, expected.float(), rtol=1e-3, atol=1e-5))


def locate(weights_file: OnnxWeights, index: TensorIndex, tensors: Sequence[str]) -> tuple[list[Placement], list[str]]:
    """Find each checkpoint tensor of `tensors` among the initializers of `weights_file`, by name then by value
    (module docstring).

    Returns:
        (placements, tensors found nowhere).
    Raises:
        ExportError when an initializer would take two different tensors.
    """
    inits = {i.name: i for i in weights_file}
    names = list(inits)
    placements: list[Placement] = []
    left: list[str] = []
    for tensor in tensors:
        shape = tuple(index.info(tensor).shape)
        found = []
        for name in _by_name(tensor, names):
            info = inits[name]
            for transposed in ((False, True) if len(shape) == 2 and shape[0] != shape[1] else (False,)):
                if info.shape == (shape[::-1] if transposed else shape) and _same_values(
                        weights_file.raw(name), index.get(tensor), info.dtype, transposed):
                    found.append(Placement(name, tensor, "name", transposed))
                    break
        if found:
            placements += found
        else:
            left.append(tensor)
    if left:  # by value: hash each candidate initializer once, each base tensor once per (dtype, layout)
        claimed = {p.initializer for p in placements}
        wanted = {tuple(index.info(t).shape) for t in left}
        wanted |= {s[::-1] for s in wanted if len(s) == 2}
        by_hash: dict[tuple[str, tuple[int, ...], bytes], list[str]] = {}
        for info in inits.values():
            if info.shape in wanted and info.name not in claimed:
                by_hash.setdefault((info.dtype, info.shape, _digest(weights_file.raw(info.name))), []).append(info.name)
        dtypes = sorted({key[0] for key in by_hash})
        still: list[str] = []
        for tensor in left:
            base = index.get(tensor)
            found = []
            for dtype in dtypes:
                layouts = [(False, base)] + ([(True, base.T)] if base.dim() == 2 else [])
                for transposed, layout in layouts:
                    key = (dtype, tuple(layout.shape), _digest(_tensor_bytes(layout, dtype)))
                    found += [Placement(n, tensor, "value", transposed) for n in by_hash.get(key, [])
                              if n not in {p.initializer for p in found}]
            if found:
                placements += found
            else:
                still.append(tensor)
        left = still
    owners: dict[str, str] = {}
    for p in placements:
        if owners.setdefault(p.initializer, p.tensor) != p.tensor:
            raise ExportError(f"{weights_file.path}: initializer {p.initializer} holds the same values as {owners[p.initializer]}"
                              f" and {p.tensor}; cannot tell which one it is")
    return placements, left


def _check_inputs(model: str | os.PathLike, base: str | os.PathLike, out: Path, adapters: Sequence,
                  force: bool) -> None:
    if Path(model).resolve() == out.resolve():
        raise OutputError(f"{out}: the output is the input ONNX model; choose another -o path")
    check_output(out, [model, base, *adapters], force)
    if not adapters:
        raise ExportError("merge-onnx merges adapters into an ONNX model: give at least one -a ADAPTER")


def merge_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    external_data: bool = False,
    checks: VerifyOptions = VerifyOptions(),
    force: bool = False,
    progress: Progress | None = None,
) -> OnnxMergeResult:
    """Add the adapters' deltas to the matching initializers of an existing ONNX model (module docstring).

    Args:
        model: the ONNX graph file (external data beside it is read too).
        out: the merged graph file (``out.data`` beside it when the source had external data, above 2 GB, or
            with `external_data`).
        base: the checkpoint the graph was exported from (folder or file); its tensors identify the weights.
        adapters, weights: PEFT/kohya adapters merged as W + Σ wᵢ·ΔWᵢ (weights default 1).
        checks: compare with BASE + adapters in PyTorch when transformers is installed (see notes otherwise);
            ``keep_on_fail`` does not apply (a failed merge is never kept).
    Returns:
        OnnxMergeResult with every placement (initializer, tensor, by name or value, transposed).
    Raises:
        ShapeError (an adapter for another model), ExportError (tensors not in the graph, ambiguous values,
        failed verification), CheckpointError, OutputError. Nothing is written on error.

    Example:
        >>> merge_onnx("optimum/model.onnx", "merged.onnx", base="base/", adapters=["lora/"]).by_value
    """
    require_extras("merge-onnx", needs=["onnx_ir"])
    import loratools.export.runtime as runtime

    out = Path(out)
    _check_inputs(model, base, out, adapters, force)
    check_output(runtime.data_file(out), [model, base, *adapters], force)
    factors = adapter_weights(len(adapters), weights)
    steps = Steps(["match", "write"] + (["verify"] if checks.verify else []), progress)
    notes: list[str] = []

    from loratools.export.onnx_weights import OnnxWeights  # onnx, only now that a graph is read

    with steps("match"), open_checkpoint(base) as index:
        ops = plan_merge(index, adapters, weights=factors)
        graph = OnnxWeights(model)
        placements, missing = locate(graph, index, list(ops))
        if missing:
            raise ExportError(
                f"{model}: {len(missing)} tensor(s) the adapters change are in no initializer, by name or value:"
                f" {short_list(missing)}; was the graph exported from {base} (unquantized)?")
        dtypes = {i.name: i.dtype for i in graph}
        for tensor, contributions in ops.items():
            merged = apply_ops(index.get(tensor), contributions)
            for p in (p for p in placements if p.tensor == tensor):
                graph.replace(p.initializer, _tensor_bytes(merged.T if p.transposed else merged, dtypes[p.initializer]))

    report: ExportCheck | None = None
    with staged_graph(out, force=force) as tmp_dir:
        with steps("write"):
            external = external_data or graph.external or graph.weight_bytes() > runtime.PROTOBUF_LIMIT
            graph.save(tmp_dir / out.name, external=external)
            dtype = max(graph, key=lambda i: i.nbytes).dtype if graph.initializers else "float32"
            del graph
            files = runtime.file_sizes([tmp_dir / out.name, runtime.data_file(tmp_dir / out.name)])
        if checks.verify:
            with steps("verify"):
                report, why = _verify(tmp_dir / out.name, base, adapters, factors, dtype, checks)
            if why:
                notes.append(f"not verified: {why}")
            if report is not None and not report.passed:
                raise ExportError(f"{out}: verification failed: {report.failure()}; nothing was written (--atol sets"
                                  " the tolerance)")
    steps.done()
    return OnnxMergeResult(
        out=out, source=Path(model), base=str(base), adapters=[str(a) for a in adapters], weights=factors,
        files=files, external_data=runtime.data_file(out).exists(), placements=placements,
        by_name=len({p.tensor for p in placements if p.how == "name"}),
        by_value=len({p.tensor for p in placements if p.how == "value"}),
        timings=steps.timings, verification=report, notes=notes,
    )


def _verify(graph: Path, base: str | os.PathLike, adapters: Sequence, weights: list[float], dtype: str,
            checks: VerifyOptions) -> tuple[ExportCheck | None, str]:
    """(report, "") or (None, why it could not be verified)."""
    missing = [name for name in ("transformers",) if importlib.util.find_spec(name) is None]
    if missing:
        return None, "transformers is not installed (pip install 'loratools[export]')"
    if not (Path(base) / "config.json").is_file():
        return None, f"{base} is not a Hugging Face model folder (no config.json)"
    import loratools.export.runtime as runtime
    from loratools.export.slot_runtime import graph_inputs

    loaded = load_merged_model(base, adapters=adapters, weights=weights)
    names = graph_inputs(graph)
    with_past = any(n.startswith("past_key_values.") for n in names)
    if with_past and loaded.kind != "causal":
        return None, "the graph has KV-cache inputs but the base is not a causal LM"
    spec = trace.graph_spec(loaded.model, loaded.kind, with_past=with_past)
    if sorted(spec.inputs) != sorted(names):
        return None, (f"the graph's inputs ({short_list(names, 5)}) are not the ones loratools feeds"
                      f" ({short_list(list(spec.inputs), 5)})")
    module = trace.GraphModule(loaded.model, spec)
    precision = "fp16" if dtype == "float16" else "fp32"
    return verify_graph(module, runtime.session(graph), precision=precision, atol=checks.tolerance(precision)), ""
