"""Adapter files in, adapter file out: combine, rescale, resize and convert (the math lives in `algebra`).

Each function loads its inputs, calls one algebra function, writes atomically with `save_adapter` (never over
an input, never over an existing output without ``force``) and returns an `AdapterResult` for the CLI.

Decisions:
- The output format defaults to the (first) input's format (`formats.default_format`): kohya stays kohya,
  diffusers stays diffusers (PEFT when its names are not pipeline names such as ``unet.…``), PEFT stays
  PEFT; `format_reason` says which rule chose it. ``format`` (and `convert`) overrides it.
- Adapters holding modules this tool cannot use (LoHa, LoKr, DoRA …) are refused rather than silently
  written without them.
- Every written file records ``loratools_operation`` and ``loratools_inputs`` in its safetensors metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratools.adapter import Adapter
from loratools.adapter_files import load_adapter, save_adapter
from loratools.algebra import LayerReport, combine_adapters, rescale_adapter, resize_adapter
from loratools.checkpoint import open_checkpoint
from loratools.errors import FormatError
from loratools.formats import KOHYA_PREFIXES, default_format, pipeline_names, resolve_kohya_names
from loratools.linalg import RankPolicy
from loratools.progress import Progress
from loratools.writer import atomic_output, check_output

PathLike = str | os.PathLike


@dataclass
class AdapterResult:
    """What an adapter operation wrote: path, format, size, per-layer reports and notes."""

    out: Path
    format: str
    modules: int
    parameters: int
    ranks: list[int]
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format_reason: str = ""

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "format": self.format,
            "modules": self.modules,
            "parameters": self.parameters,
            "ranks": sorted(set(self.ranks)),
            "max_error": self.max_error,
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": self.notes,
            "format_reason": self.format_reason,
        }


def load_usable(path: PathLike) -> Adapter:
    """`load_adapter`, refusing adapters with modules of an unsupported type (they would be dropped)."""
    adapter = load_adapter(path)
    if adapter.unsupported:
        kinds = sorted(set(adapter.unsupported.values()))
        names = ", ".join(sorted(adapter.unsupported)[:4]) + (" ..." if len(adapter.unsupported) > 4 else "")
        raise FormatError(
            f"{path}: {len(adapter.unsupported)} module(s) of a type loratools cannot use ({', '.join(kinds)}):"
            f" {names}; they would be lost, so nothing was written"
        )
    return adapter


def _provenance(operation: str, inputs: Sequence[PathLike], **params: object) -> dict[str, str]:
    metadata = {"loratools_operation": operation, "loratools_inputs": json.dumps([str(p) for p in inputs])}
    if params:
        metadata["loratools_parameters"] = json.dumps(params, sort_keys=True, default=str)
    return metadata


def _write(
    adapter: Adapter,
    out: PathLike,
    chosen: tuple[str, str],
    inputs: Sequence[PathLike],
    force: bool,
    dtype: torch.dtype | None,
    metadata: dict[str, str],
    layers: list[LayerReport] = (),
    prefix: str | None = None,
    names: dict[str, str] | None = None,
) -> AdapterResult:
    format, reason = chosen  # from _output_format
    path = save_adapter(
        adapter, out, format, inputs=inputs, force=force, dtype=dtype, kohya_prefix=prefix, metadata=metadata,
        names=names,
    )
    written = adapter.to(dtype) if dtype is not None else adapter
    return AdapterResult(path, format, len(adapter.modules), written.num_parameters(), adapter.ranks, list(layers),
                         list(adapter.notes), reason)


def _output_format(adapter: Adapter, format: str | None) -> tuple[str, str]:
    """(format, why): `format` when given, else the input adapter's (`default_format`)."""
    if format is not None:
        return format, f"{format}: given with --format"
    return default_format(list(adapter.modules), adapter_format=adapter.format)


def combine(
    adapters: Sequence[PathLike],
    out: PathLike,
    weights: Sequence[float] | None = None,
    method: str = "concat",
    policy: RankPolicy | None = None,
    format: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> AdapterResult:
    """Write Σ wᵢ·ΔWᵢ of several adapter files as one adapter (see `algebra.combine_adapters`).

    Args:
        adapters: PEFT folders/files and kohya files, in any mix.
        weights: one per adapter (default 1 each).
        method: "concat" (exact, ranks add) or "svd" (recompressed; `policy`, default each layer's largest rank).
        format: "peft", "kohya" or "diffusers" (default: the first adapter's).
    Example:
        >>> combine(["style", "subject"], "both", weights=[0.7, 1.0], method="svd", policy=RankPolicy("rank", 16))
    """
    loaded = [load_usable(path) for path in adapters]
    combined, layers = combine_adapters(loaded, weights, method, policy, dtype, progress)
    metadata = _provenance("combine", adapters, method=method, weights=list(weights or []),
                           policy=policy.__dict__ if policy else None)
    return _write(combined, out, _output_format(loaded[0], format), adapters, force, None, metadata, layers)


def rescale(
    adapter: PathLike,
    out: PathLike,
    scale: float | None = None,
    alpha: float | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    format: str | None = None,
) -> AdapterResult:
    """Write the adapter with every delta times `scale`, or with alpha set to `alpha` and deltas unchanged.

    `format`: "peft", "kohya" or "diffusers" (default: the input's).
    """
    loaded = load_usable(adapter)
    rescaled = rescale_adapter(loaded, scale=scale, alpha=alpha)
    metadata = _provenance("rescale", [adapter], scale=scale, alpha=alpha)
    return _write(rescaled, out, _output_format(loaded, format), [adapter], force, dtype, metadata)


def resize(
    adapter: PathLike,
    out: PathLike,
    policy: RankPolicy,
    dtype: torch.dtype | None = None,
    force: bool = False,
    report: PathLike | None = None,
    progress: Progress | None = None,
    format: str | None = None,
) -> AdapterResult:
    """Write the adapter with each module optimally truncated to the rank `policy` chooses, scale preserved.

    Args:
        report: also write the result (per-layer ranks and errors) as JSON to this path.
        format: "peft", "kohya" or "diffusers" (default: the input's).
    """
    if report is not None:  # refuse a bad report path before the adapter is written, not after
        check_output(report, [adapter, out], force)
    loaded = load_usable(adapter)
    resized, layers = resize_adapter(loaded, policy, progress)
    metadata = _provenance("resize", [adapter], policy=policy.__dict__)
    result = _write(resized, out, _output_format(loaded, format), [adapter], force, dtype, metadata, layers)
    if report is not None:
        with atomic_output(report, [adapter, out], force) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def convert(
    adapter: PathLike,
    out: PathLike,
    format: str,
    prefix: str | None = None,
    base: PathLike | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> AdapterResult:
    """Write the adapter in another format with identical deltas.

    Args:
        format: "peft", "kohya" or "diffusers".
        prefix: kohya key prefix (default: chosen from each module's namespace).
        base: the model the adapter is for; resolves kohya stems to the dotted module names PEFT and diffusers
            need, and gives kohya / diffusers keys the base's diffusers pipeline names (`pipeline_names`).
    """
    loaded = load_usable(adapter)
    names = None
    if base is not None:
        with open_checkpoint(base) as index:
            loaded = resolve_kohya_names(loaded, list(index.tensors))
            names = pipeline_names(list(index.tensors), index.config)
    stems = sorted(n for n in loaded.modules if n.startswith(KOHYA_PREFIXES))
    if format in ("peft", "diffusers") and stems:
        where = f"match no tensor of {base}" if base is not None else "need the model to be resolved"
        raise FormatError(
            f"{adapter}: {len(stems)} kohya module name(s) {where} ({', '.join(stems[:3])}"
            f"{' ...' if len(stems) > 3 else ''}); pass --base with the model the adapter was made for"
        )
    metadata = _provenance("convert", [adapter], format=format, prefix=prefix)
    return _write(loaded, out, _output_format(loaded, format), [adapter], force, dtype, metadata, prefix=prefix,
                  names=names)
