"""Adapter files in, adapter file out: combine, rescale, resize and convert (the math lives in `algebra`).

Each function loads its inputs, calls one algebra function, writes atomically with `save_adapter` (never over
an input, never over an existing output without ``force``) and returns an `AdapterResult` for the CLI.

Decisions:
- The output format defaults to the (first) input's format (`formats.default_format`): kohya stays kohya,
  diffusers stays diffusers (PEFT when its names are not pipeline names such as ``unet.…``), PEFT stays
  PEFT; `format_reason` says which rule chose it. ``format`` (and `convert`) overrides it.
- Adapters holding modules this tool cannot use (LoHa, LoKr, DoRA …) are refused rather than silently
  written without them.
- Every written file records its provenance (`writer.provenance`: command, inputs, parameters).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from loratools.adapter import Adapter
from loratools.adapter_files import check_format, load_usable, save_adapter
from loratools.algebra import ModuleChange, combine_adapters, rescale_adapter, resize_adapter
from loratools.checkpoint import open_checkpoint
from loratools.dtypes import DType, resolve_dtype
from loratools.errors import FormatError
from loratools.formats import KOHYA_PREFIXES, default_format, pipeline_names
from loratools.matching import resolve_kohya_names
from loratools.options import RankPolicy
from loratools.progress import Progress
from loratools.rsvd import SvdSettings
from loratools.structured_convert import ConvertReport, plain_lora
from loratools.structured_modules import DoraModule
from loratools.writer import check_output, provenance, write_json

PathLike = str | os.PathLike


@dataclass
class AdapterResult:
    """What an adapter operation wrote: path, format, size, per-layer reports and notes."""

    out: Path
    format: str
    modules: int
    parameters: int
    ranks: list[int]
    layers: list[ModuleChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format_reason: str = ""
    conversion: ConvertReport | None = None

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "format": self.format,
            "modules": self.modules,
            "parameters": self.parameters,
            "ranks": sorted(set(self.ranks)),
            "max_error": self.max_error,
            "layers": [layer.to_json() for layer in self.layers],
            "notes": self.notes,
            "format_reason": self.format_reason,
            **({"conversion": self.conversion.to_json()} if self.conversion is not None else {}),
        }


def _write(
    adapter: Adapter,
    out: PathLike,
    *,
    chosen: tuple[str, str],
    inputs: Sequence[PathLike],
    force: bool,
    dtype: DType | None,
    metadata: dict[str, str],
    layers: Sequence[ModuleChange] = (),
    prefix: str | None = None,
    names: dict[str, str] | None = None,
    base: PathLike | None = None,
) -> AdapterResult:
    format, reason = chosen  # from _output_format
    path = save_adapter(adapter, out, format=format, inputs=inputs, force=force, dtype=dtype, kohya_prefix=prefix,
                        metadata=metadata, names=names, base=base)
    cast = resolve_dtype(dtype, quantized=True)
    written = adapter.to(cast) if cast is not None else adapter
    return AdapterResult(path, format, len(adapter.modules), written.num_parameters(), adapter.ranks, list(layers),
                         list(adapter.notes), reason)


def _output_format(adapter: Adapter, format: str | None) -> tuple[str, str]:
    """(format, why): `format` when given, else the input adapter's (`default_format`)."""
    if format is not None:
        return check_format(format), f"{format}: given with --format"
    return default_format(list(adapter.modules), adapter_format=adapter.format)


def combine(
    adapters: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Sequence[float] | None = None,
    method: str = "concat",
    policy: RankPolicy | None = None,
    format: str | None = None,
    dtype: DType | None = None,
    force: bool = False,
    base: PathLike | None = None,
    progress: Progress | None = None,
) -> AdapterResult:
    """Write Σ wᵢ·ΔWᵢ of several adapter files as one adapter (see `algebra.combine_adapters`).

    Args:
        adapters: PEFT folders/files and kohya files, in any mix.
        weights: one per adapter (default 1 each).
        method: "concat" (exact, ranks add) or "svd" (recompressed; `policy`, default each layer's largest rank).
        format: "peft", "kohya", "diffusers" or "gguf" (default: the first adapter's).
        dtype: the factors' dtype (default: the inputs' promoted dtype).
        base: the base model folder (reads GGUF inputs in Hugging Face row order; GGUF output: its config.json).
    Example:
        >>> combine(["style", "subject"], "both", weights=[0.7, 1.0], method="svd", policy=RankPolicy("rank", 16))
    """
    loaded = [load_usable(path, base=base) for path in adapters]
    combined, layers = combine_adapters(loaded, weights=weights, method=method, policy=policy,
                                        dtype=resolve_dtype(dtype, quantized=True), progress=progress)
    metadata = provenance("combine", adapters, {"method": method, "weights": list(weights or []),
                                                "policy": policy.describe() if policy else None})
    return _write(combined, out, chosen=_output_format(loaded[0], format), inputs=adapters, force=force, dtype=dtype,
                  metadata=metadata, layers=layers, base=base)


def rescale(
    adapter: PathLike,
    out: PathLike,
    *,
    scale: float | None = None,
    alpha: float | None = None,
    format: str | None = None,
    dtype: DType | None = None,
    force: bool = False,
    base: PathLike | None = None,
) -> AdapterResult:
    """Write the adapter with every delta times `scale`, or with alpha set to `alpha` and deltas unchanged
    (give exactly one); `format`: "peft", "kohya", "diffusers" or "gguf" (default: the input's); `base`: the base
    model folder (GGUF input or output)."""
    loaded = load_usable(adapter, base=base)
    rescaled = rescale_adapter(loaded, scale=scale, alpha=alpha)
    metadata = provenance("rescale", [adapter], {"scale": scale, "alpha": alpha})
    return _write(rescaled, out, chosen=_output_format(loaded, format), inputs=[adapter], force=force, dtype=dtype,
                  metadata=metadata, base=base)


def resize(
    adapter: PathLike,
    out: PathLike,
    *,
    policy: RankPolicy,
    format: str | None = None,
    dtype: DType | None = None,
    force: bool = False,
    report: PathLike | None = None,
    base: PathLike | None = None,
    progress: Progress | None = None,
) -> AdapterResult:
    """Write the adapter with each module optimally truncated to the rank `policy` chooses, scale preserved.

    Args:
        format: "peft", "kohya", "diffusers" or "gguf" (default: the input's).
        base: the base model folder (GGUF input or output).
        report: also write the result (per-layer ranks and errors) as JSON to this path; checked before the
            adapter is written.
    """
    if report is not None:
        check_output(report, [adapter, out], force)
    loaded = load_usable(adapter, structured=True, base=base)
    _refuse_dora_without_base(loaded, adapter, None)
    resized, layers = resize_adapter(replace(loaded, structured={}), policy=policy, progress=progress)
    conversion = None
    if loaded.structured:  # LoHa / LoKr: the best plain LoRA at the policy (exact spectra)
        converted, conversion = plain_lora(replace(loaded, modules={}), policy=policy, progress=progress)
        resized = replace(resized, modules={**resized.modules, **converted.modules})
    metadata = provenance("resize", [adapter], {"policy": policy.describe()})
    result = _write(resized, out, chosen=_output_format(loaded, format), inputs=[adapter], force=force, dtype=dtype,
                    metadata=metadata, layers=layers, base=base)
    result.conversion = conversion
    if report is not None:
        write_json(report, result.to_json(), inputs=[adapter, out], force=force)
    return result


def convert(
    adapter: PathLike,
    out: PathLike,
    *,
    format: str,
    prefix: str | None = None,
    base: PathLike | None = None,
    dtype: DType | None = None,
    force: bool = False,
    policy: RankPolicy | None = None,
    svd: SvdSettings = SvdSettings(),
    progress: Progress | None = None,
) -> AdapterResult:
    """Write the adapter in another format with identical deltas; LoHa, LoKr and DoRA modules become the best
    plain LoRA at `policy` (`structured_convert.plain_lora`: default, each layer's exact rank up to 128), with
    the error against the Eckart–Young optimum in ``result.conversion``.

    Args:
        format: "peft", "kohya", "diffusers" or "gguf".
        prefix: kohya key prefix (default: chosen from each module's namespace).
        base: the model the adapter is for; resolves kohya stems to the dotted module names PEFT and diffusers
            need, and gives kohya / diffusers keys the base's diffusers pipeline names (`pipeline_names`); for GGUF
            (in or out) its config.json gives llama.cpp's architecture, names and q/k row order. Required for DoRA
            (its ΔW = W' − W depends on W).
        policy: rank policy for LoHa / LoKr / DoRA modules (plain LoRA modules are copied as they are).
        svd: how a DoRA ΔW is factored (`rsvd.SvdSettings`).
    """
    check_format(format)
    loaded = load_usable(adapter, structured=True, base=base)
    if policy is not None and not loaded.structured:
        raise FormatError(f"{adapter}: rank options apply to LoHa / LoKr / DoRA modules and this adapter has none;"
                          " use `loratools resize` to change a LoRA's rank")
    _refuse_dora_without_base(loaded, adapter, base)
    names = None
    conversion = None
    if loaded.structured and base is None:
        loaded, conversion = plain_lora(loaded, policy=policy, svd=svd, progress=progress)
    if base is not None:
        with open_checkpoint(base) as index:
            loaded = resolve_kohya_names(loaded, index.tensors)
            names = pipeline_names(list(index.tensors), index.config)
            if loaded.structured:
                loaded, conversion = plain_lora(loaded, policy=policy, base=index, svd=svd, progress=progress)
    stems = sorted(n for n in loaded.modules if n.startswith(KOHYA_PREFIXES))
    if format in ("peft", "diffusers") and stems:
        where = f"match no tensor of {base}" if base is not None else "need the model to be resolved"
        raise FormatError(
            f"{adapter}: {len(stems)} kohya module name(s) {where} ({', '.join(stems[:3])}"
            f"{' ...' if len(stems) > 3 else ''}); pass --base with the model the adapter was made for"
        )
    metadata = provenance("convert", [adapter], {"format": format, "prefix": prefix,
                                                 "policy": policy.describe() if policy else None})
    result = _write(loaded, out, chosen=_output_format(loaded, format), inputs=[adapter], force=force, dtype=dtype,
                    metadata=metadata, prefix=prefix, names=names, base=base)
    result.conversion = conversion
    return result


def _refuse_dora_without_base(adapter: Adapter, path: PathLike, base: PathLike | None) -> None:
    """FormatError (one line) when `adapter` has DoRA modules and no base model is given."""
    dora = sorted(n for n, m in adapter.structured.items() if isinstance(m, DoraModule))
    if dora and base is None:
        raise FormatError(f"{path}: {len(dora)} DoRA module(s) (e.g. {dora[0]}): a DoRA delta is W' − W, which"
                          " depends on the base weight W; pass --base with the model the adapter was trained on"
                          " (use `loratools convert`)")
