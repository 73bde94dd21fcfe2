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
- An adapter module is matched to ``<name>.weight``, else to the one base tensor ending in ``.<name>.weight``;
  kohya stems are resolved against the base names first.
- A full (``modules_to_save``) tensor with weight w contributes w·(full − W): weight 1 replaces the tensor.
- A linear LoRA on a 1×1 convolution (out, in, 1, 1) is applied as that convolution's delta.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratools.adapter import LoraModule
from loratools.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, TensorIndex, open_checkpoint
from loratools.errors import LoratoolsError, ShapeError
from loratools.formats import KOHYA_PREFIXES, resolve_kohya_names
from loratools.operations import load_usable
from loratools.plan import find_tensor, fit_module
from loratools.progress import Progress
from loratools.writer import (
    OUTPUT_DTYPES,
    TensorSpec,
    atomic_output,
    check_output,
    shard_layout,
    stream_safetensors,
    write_sharded_model,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class MergeResult:
    """What `merge` wrote."""

    out: Path
    files: list[str]
    dtype: str
    tensors: int
    changed: int
    modules: int
    replaced: int
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "out": str(self.out)}


@dataclass
class Contribution:
    """One change to a base tensor: a LoRA delta (`module`) or a full replacement (`full`), times `weight`."""

    weight: float
    module: LoraModule | None = None
    full: torch.Tensor | None = None


def plan_merge(
    index: TensorIndex, adapters: Sequence[os.PathLike | str], weights: Sequence[float]
) -> dict[str, list[Contribution]]:
    """Base tensor name -> contributions, from names and shapes only.

    Raises:
        ShapeError listing adapter modules that match no base tensor, or naming the tensor whose shape differs.
    """
    ops: dict[str, list[Contribution]] = {}
    unmatched: list[str] = []
    base_names = list(index.tensors)
    for path, weight in zip(adapters, weights, strict=True):
        adapter = load_usable(path)
        if any(name.startswith(KOHYA_PREFIXES) for name in adapter.modules):
            adapter = resolve_kohya_names(adapter, base_names)
        for name, module in adapter.modules.items():
            target = find_tensor(name + ".weight", index)
            if target is None:
                unmatched.append(name)
                continue
            shape = index.info(target).shape
            module = fit_module(module, shape)
            if module is None:
                raise ShapeError(
                    f"{target}: base tensor has shape {shape} but {path} holds a {adapter.modules[name].kind} LoRA"
                    f" {name} for shape {adapter.modules[name].base_shape}; the adapter was made for another model"
                )
            ops.setdefault(target, []).append(Contribution(weight, module=module))
        for name, tensor in adapter.full.items():
            target = find_tensor(name, index)
            if target is None:
                unmatched.append(name)
                continue
            shape = index.info(target).shape
            if tuple(tensor.shape) != shape:
                raise ShapeError(
                    f"{target}: base tensor has shape {shape} but {path} replaces it with {tuple(tensor.shape)};"
                    " the adapter was made for another model (or a resized vocabulary)"
                )
            ops.setdefault(target, []).insert(0, Contribution(weight, full=tensor))
    if unmatched:
        shown = ", ".join(unmatched[:6]) + (f" … ({len(unmatched)} in all)" if len(unmatched) > 6 else "")
        raise ShapeError(
            f"{len(unmatched)} adapter module(s) match no tensor in {index.path}: {shown};"
            " is the adapter for this base model?"
        )
    return ops


def apply_ops(weight: torch.Tensor, ops: Sequence[Contribution]) -> torch.Tensor:
    """W + Σ contributions, accumulated in fp32 (fp64 for fp64 weights); returned in fp32/fp64.

    Args:
        weight: the base tensor in its own layout, e.g. (out, in) or (in, out) for Conv1D.
        ops: full replacements first, then LoRA deltas.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    acc = weight.to(dtype, copy=True)
    touched = False
    for op in ops:
        if op.full is not None:
            full, base = op.full.to(dtype), weight.to(dtype)
            if op.weight == 1 and not touched:
                acc = full.clone()
            else:
                acc += op.weight * (full - base)
        else:
            delta = op.module.delta(dtype).reshape(acc.shape)
            acc += delta if op.weight == 1 else op.weight * delta
        touched = True
    return acc


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
                    config[key] = DTYPE_CONFIG_NAMES[dtype]
            (folder / entry.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(entry, folder / entry.name)
        copied.append(entry.name)
    return copied, skipped


def merge(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | str | None = None,
    shard_size: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Write base + Σ wᵢ·ΔWᵢ of the adapters as a full model (PEFT ``merge_and_unload`` without loading a model).

    Args:
        base: a model folder (sharded or not) or a single checkpoint file.
        adapters: PEFT folders/files and kohya files.
        weights: one per adapter (default 1 each).
        dtype: output dtype of floating tensors ("fp32", "fp16", "bf16" or a torch dtype); default the base's.
        shard_size: re-split the output into shards of at most this many bytes (output is then a folder).
        progress: called as (done, total, tensor name) after each tensor.
    Returns:
        MergeResult: files written, tensors changed, adapter modules applied, files copied.

    Example:
        >>> merge("fixtures/llama-base", ["fixtures/llama-lora-peft"], "out/merged")
    """
    if not adapters:
        raise LoratoolsError("give at least one adapter to merge")
    weights = [1.0] * len(adapters) if not weights else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise LoratoolsError(f"got {len(weights)} weights for {len(adapters)} adapters; give one --weight per adapter")
    if isinstance(dtype, str):
        if dtype not in OUTPUT_DTYPES:
            raise LoratoolsError(f"unknown dtype {dtype!r}; choose {', '.join(OUTPUT_DTYPES)}")
        dtype = OUTPUT_DTYPES[dtype]
    check_output(out, [base, *adapters], force)
    with open_checkpoint(base) as index:
        ops = plan_merge(index, adapters, weights)
        specs: dict[str, list[TensorSpec]] = {}
        for info in index.tensors.values():
            out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            specs.setdefault(_output_file(info.file.name), []).append(TensorSpec(info.name, info.shape, out_dtype))
        done = 0

        def produce(spec: TensorSpec) -> torch.Tensor:
            nonlocal done
            tensor = index.get(spec.name)
            if spec.name in ops:
                tensor = apply_ops(tensor, ops[spec.name])
            done += 1
            if progress:
                progress(done, len(index), spec.name)
            return tensor.to(spec.dtype)

        all_specs = [spec for group in specs.values() for spec in group]
        metadata = {
            **index.metadata,
            "loratools_operation": "merge",
            "loratools_inputs": json.dumps([str(base), *map(str, adapters)]),
            "loratools_parameters": json.dumps({"weights": weights}),
        }
        as_folder = index.path.is_dir() or shard_size is not None
        copied: list[str] = []
        skipped: list[str] = []
        with atomic_output(out, [base, *adapters], force, folder=as_folder) as tmp:
            if as_folder:
                shards = shard_layout(all_specs, shard_size) if shard_size is not None else specs
                write_sharded_model(tmp, shards, produce, metadata)
                files = list(shards)
                if index.path.is_dir():
                    copied, skipped = _copy_extras(index, tmp, dtype)
            else:
                stream_safetensors(tmp, all_specs, produce, metadata)
                files = [Path(out).name]
    return MergeResult(
        out=Path(out),
        files=files,
        dtype=", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in all_specs})),
        tensors=len(all_specs),
        changed=len(ops),
        modules=sum(1 for group in ops.values() for op in group if op.module is not None),
        replaced=sum(1 for group in ops.values() for op in group if op.full is not None),
        copied=copied,
        skipped=skipped,
    )
