"""Merge adapters into a base model: W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ, written as a full model, one tensor at a time.

Plan first, from names and shapes only: every adapter module is matched to a base tensor and its shape
checked before any weight is read, so a wrong adapter fails fast and writes nothing. Then each output tensor
is produced on demand while its file is streamed (`writer.stream_safetensors`): loaded, upcast to fp32,
summed, cast back. Peak memory is a few tensors, whatever the model size.

Decisions:
- Output layout follows the base: a folder gives a folder with the same shard files (``.bin`` shards become
  ``.safetensors``) and a single file gives a single file; ``shard_size`` re-splits (and always gives a
  folder). Non-weight files of a base folder (config, tokenizer, generation config …) are copied; other
  weight files and subfolders are not. ``config.json``'s dtype is updated when ``dtype`` changes it.
- Adapter modules are matched to base tensors by `matching.match_adapter` (kohya stems resolved first).
- A full (``modules_to_save``) tensor with weight w contributes w·(full − W): weight 1 replaces the tensor.
- A linear LoRA on a 1×1 convolution (out, in, 1, 1) is applied as that convolution's delta.
- LoHa / LoKr add w·ΔW (as LyCORIS's forward, ComfyUI and PEFT do); DoRA is applied to the base weight W the way
  its runtime merges it (PEFT: m·(W + w·ΔW)/‖W + w·ΔW‖; LyCORIS: (W + ΔW)·(w·(m/‖W + ΔW‖ − 1) + 1)).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loratools.adapter import Adapter, lora_matrix
from loratools.adapter_files import load_usable
from loratools.algebra import adapter_weights
from loratools.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, TensorIndex, open_checkpoint
from loratools.dtypes import DType, accumulation_dtype, dtype_name, resolve_dtype
from loratools.errors import CheckpointError, LoratoolsError, ShapeError
from loratools.matching import Target, match_adapter, resolve_kohya_names
from loratools.names import short_list
from loratools.progress import Progress
from loratools.structured_convert import base_weights
from loratools.structured_modules import StructuredModule, as_base_layout, layer_kind, structured_delta, with_base_shape
from loratools.writer import (
    TensorSpec,
    atomic_output,
    check_output,
    parse_size,
    provenance,
    shard_layout,
    stream_safetensors,
    write_sharded_model,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")


@dataclass
class MergeResult:
    """What `merge` wrote."""

    out: Path
    adapters: int
    files: list[str]
    dtype: str
    tensors: int
    changed: int
    modules: int
    replaced: int
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**self.__dict__, "out": str(self.out)}


@dataclass(frozen=True)
class Contribution:
    """One adapter's change to a base tensor (a LoRA delta and/or a full replacement), times `weight`."""

    weight: float
    target: Target
    structured: StructuredModule | None = None


def plan_merge(
    index: TensorIndex, adapters: Sequence[str | os.PathLike | Adapter], *, weights: Sequence[float] | None = None
) -> dict[str, list[Contribution]]:
    """Base tensor name -> contributions of the adapters, from names and shapes only (no weights read).

    Args:
        adapters: adapter paths (`load_usable`) or Adapters; weights: one per adapter (default 1 each).
    Raises:
        ShapeError naming adapter modules that match no base tensor, or whose tensor has another shape.
    """
    weights = adapter_weights(len(adapters), weights)
    ops: dict[str, list[Contribution]] = {}
    for source, weight in zip(adapters, weights, strict=True):
        adapter = source if isinstance(source, Adapter) else load_usable(source, structured=True, base=index.path)
        adapter = resolve_kohya_names(adapter, index.tensors)
        for name, tensor in base_weights(adapter, index).items():  # LoHa / LoKr / DoRA, as their loaders merge
            module = with_base_shape(adapter.structured[name], index.info(tensor).shape)
            ops.setdefault(tensor, []).append(Contribution(weight, Target(tensor, name), module))
        match = match_adapter(replace(adapter, structured={}), index)
        if match.misfit:
            name, why = next(iter(match.misfit.items()))
            raise ShapeError(f"{source}: {name} is {why}; the adapter was made for another model"
                             + (f" ({len(match.misfit)} such modules)" if len(match.misfit) > 1 else ""))
        if match.missing:
            raise ShapeError(
                f"{len(match.missing)} adapter module(s) match no tensor in {index.path}:"
                f" {short_list(list(match.missing), 6)}; is the adapter for this base model?"
            )
        for tensor, target in match.targets.items():
            ops.setdefault(tensor, []).append(Contribution(weight, target))
    for contributions in ops.values():  # full replacements first: weight 1 then takes the tensor as it is
        contributions.sort(key=lambda c: c.target.full is None)
    return ops


def apply_ops(weight: torch.Tensor, ops: Sequence[Contribution]) -> torch.Tensor:
    """W + Σ contributions, accumulated in fp32 (fp64 for fp64 weights); returned in that dtype.

    A full replacement with weight w adds w·(full − W): weight 1 replaces the tensor.

    Args:
        weight: the base tensor in its own layout, e.g. (out, in) or (in, out) for Conv1D.
        ops: contributions, full replacements first (`plan_merge` orders them).
    """
    dtype = accumulation_dtype(weight.dtype)
    acc = weight.to(dtype, copy=True)
    touched = False
    for op in ops:
        if op.structured is not None:  # DoRA normalises the base weight W (not a sum with other adapters)
            matrix = lora_matrix(weight.to(dtype), layer_kind(op.structured))
            delta = structured_delta(op.structured, matrix, op.weight, dtype)
            acc += as_base_layout(delta, op.structured).reshape(acc.shape)
            touched = True
            continue
        full, module = op.target.full, op.target.module
        if full is not None:
            if op.weight == 1 and not touched:
                acc = full.to(dtype, copy=True)
            else:
                acc += op.weight * (full.to(dtype) - weight.to(dtype))
        if module is not None:
            delta = module.delta(dtype).reshape(acc.shape)
            acc += delta if op.weight == 1 else op.weight * delta
        touched = True
    return acc


def check_merged_finite(merged: torch.Tensor, name: str, index: TensorIndex) -> None:
    """CheckpointError naming the tensor (and the base file when it is the cause) when a merged tensor holds nan
    or inf: a base tensor that already did, or a sum that overflows the output dtype."""
    if not merged.is_floating_point() or bool(torch.isfinite(merged).all()):
        return
    info = index.info(name)
    if not bool(torch.isfinite(index.get(name)).all()):
        raise CheckpointError(f"{name}: non-finite values (nan or inf) in {index.path} ({info.file.name}); the base"
                              " checkpoint is corrupt or overflowed: repair it; nothing was written")
    raise CheckpointError(f"{name}: the merged weight overflows {dtype_name(merged.dtype)} (nan or inf); lower the"
                          " adapter weights (-w) or write a wider --dtype; nothing was written")


def _output_file(name: str) -> str:
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in WEIGHT_SUFFIXES else name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _copy_extras(index: TensorIndex, folder: Path, dtype: torch.dtype | None) -> tuple[list[str], list[str]]:
    weight_files = {f.name for f in index.files} | {SAFETENSORS_INDEX, BIN_INDEX}
    copied, skipped = [], []
    for entry in sorted(index.path.iterdir()):
        if entry.name.startswith(".") or entry.name in weight_files:
            continue
        if entry.is_dir() or entry.suffix in WEIGHT_SUFFIXES or entry.name.endswith(".index.json"):
            skipped.append(entry.name)
            continue
        if entry.name == "config.json" and dtype is not None:
            config = json.loads(entry.read_text())
            for key in CONFIG_DTYPE_KEYS:
                if key in config:
                    config[key] = dtype_name(dtype)
            (folder / entry.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(entry, folder / entry.name)
        copied.append(entry.name)
    return copied, skipped


def merge(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: DType | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Write base + Σ wᵢ·ΔWᵢ of the adapters as a full model (PEFT ``merge_and_unload`` without loading a model).

    Args:
        base: a model folder (sharded or not) or a single checkpoint file.
        adapters: PEFT folders/files and kohya files.
        weights: one per adapter (default 1 each).
        dtype: output dtype of floating tensors (``fp32``, ``fp16``, ``bf16`` or a torch dtype); default the base's.
        shard_size: re-split the output into shards of at most this many bytes, or a size such as ``5GB``
            (the output is then a folder).
        progress: called as (done, total, tensor name) after each tensor.
    Returns:
        MergeResult: files written, tensors changed, adapter modules applied, files copied.

    Example:
        >>> merge("fixtures/llama-base", ["fixtures/llama-lora-peft"], "out/merged")
    """
    if not adapters:
        raise LoratoolsError("give at least one adapter to merge")
    out_dtype = resolve_dtype(dtype)
    max_bytes = parse_size(shard_size) if shard_size is not None else None
    weights = adapter_weights(len(adapters), weights)
    check_output(out, [base, *adapters], force)
    with open_checkpoint(base) as index:
        ops = plan_merge(index, adapters, weights=weights)
        specs: dict[str, list[TensorSpec]] = {}
        for info in index.tensors.values():
            spec_dtype = out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype
            specs.setdefault(_output_file(info.file.name), []).append(TensorSpec(info.name, info.shape, spec_dtype))
        done = 0

        def produce(spec: TensorSpec) -> torch.Tensor:
            nonlocal done
            tensor = index.get(spec.name)
            if spec.name in ops:
                tensor = apply_ops(tensor, ops[spec.name])
            done += 1
            if progress:
                progress(done, len(index), spec.name)
            written = tensor.to(spec.dtype)
            if spec.name in ops:
                check_merged_finite(written, spec.name, index)
            return written

        all_specs = [spec for group in specs.values() for spec in group]
        metadata = {**index.metadata, **provenance("merge", [base, *adapters], {"weights": weights})}
        as_folder = index.path.is_dir() or max_bytes is not None
        copied: list[str] = []
        skipped: list[str] = []
        with atomic_output(out, [base, *adapters], force, folder=as_folder) as tmp:
            if as_folder:
                shards = shard_layout(all_specs, max_bytes) if max_bytes is not None else specs
                write_sharded_model(tmp, shards, produce, metadata)
                files = list(shards)
                if index.path.is_dir():
                    copied, skipped = _copy_extras(index, tmp, out_dtype)
            else:
                stream_safetensors(tmp, all_specs, produce, metadata)
                files = [Path(out).name]
    contributions = [op for group in ops.values() for op in group]
    return MergeResult(
        out=Path(out),
        adapters=len(adapters),
        files=files,
        dtype=", ".join(sorted({dtype_name(s.dtype) for s in all_specs})),
        tensors=len(all_specs),
        changed=len(ops),
        modules=sum(1 for op in contributions if op.target.module is not None),
        replaced=sum(1 for op in contributions if op.target.full is not None),
        copied=copied,
        skipped=skipped,
    )
