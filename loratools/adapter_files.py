"""Adapter files on disk: a PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``), a bare PEFT
safetensors file, a kohya / ComfyUI / diffusers-style single file, a diffusers folder
(``pytorch_lora_weights.safetensors``, as ``pipeline.save_lora_weights`` writes it), a llama.cpp GGUF LoRA file
(``formats.gguf``; recognised by its magic bytes).

Decisions:
- A bare PEFT file written here carries its ``adapter_config.json`` contents in the safetensors metadata key
  ``loratools_adapter_config``, so alpha survives without a config file. When reading a bare file without it,
  an ``adapter_config.json`` beside the file is used; otherwise alpha = rank is assumed and noted.
- The output layout follows the path: a path ending in ``.safetensors`` is a single file, anything else a
  PEFT folder (diffusers: a folder holding ``pytorch_lora_weights.safetensors``). kohya and GGUF are always a
  single file.
- GGUF needs the base model's ``config.json`` (llama.cpp's architecture, block and head counts): from ``base``, or
  the adapter's ``base_model_name_or_path`` when that is a local folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratools.adapter import Adapter
from loratools.checkpoint import open_checkpoint, read_model_config
from loratools.dtypes import DType, check_dtype_format, dtype_name, resolve_dtype
from loratools.errors import CheckpointError, FormatError
from loratools.formats import (
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHTS,
    NAME_MAP_KEY,
    PEFT_CONFIG_KEY,
    parse,
    render_diffusers,
    render_kohya,
    render_peft,
)
from loratools.formats.gguf import BASE_MODEL_KEY, GgufBase, parse_gguf, render_gguf, write_gguf
from loratools.formats.gguf_file import GGUF_MAGIC, read_gguf_header, read_gguf_tensor
from loratools.version import __version__
from loratools.writer import atomic_output, write_safetensors

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"


def check_format(format: str) -> str:
    """`format` if loratools can write it, else FormatError naming the choices."""
    if format not in WRITABLE_FORMATS:
        raise FormatError(f"--format {format!r}: choose one of {', '.join(WRITABLE_FORMATS)}")
    return format


def adapter_weights_path(path: Path) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) for an adapter folder or file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        for weights in (*PEFT_WEIGHTS, DIFFUSERS_WEIGHTS):
            if (path / weights).is_file():
                config = path / PEFT_CONFIG
                return path / weights, config if config.is_file() else None
        raise CheckpointError(f"{path}: folder holds no {', '.join(PEFT_WEIGHTS)} or {DIFFUSERS_WEIGHTS};"
                              " is it an adapter folder?")
    sibling = path.parent / PEFT_CONFIG
    return path, sibling if sibling.is_file() and path.name in PEFT_WEIGHTS else None


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as file:
            return file.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def base_config(base: str | os.PathLike | None) -> tuple[dict, str] | None:
    """(config.json contents, its path) of a base model folder or of the folder holding a base file; None when
    `base` is None, not a local path, or has no config.json."""
    if base is None or not Path(base).exists():
        return None
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    config = folder / "config.json"
    return (read_model_config(config), str(config)) if config.is_file() else None


def load_adapter(
    path: str | os.PathLike, *, format: str | None = None, base: str | os.PathLike | None = None,
    any_row_order: bool = False,
) -> Adapter:
    """Read a PEFT folder or file, a kohya file, a diffusers-style file or a GGUF file into an Adapter (format
    detected).

    Args:
        base: the base model (folder or file with a config.json beside it); for a GGUF adapter it checks the
            architecture and gives the head counts that restore q/k row order.
        any_row_order: GGUF only: accept q/k rows in llama.cpp's order when no head counts are known (for
            spectra and norms, which do not depend on row order).
    Raises CheckpointError for unreadable files and FormatError for invalid keys.
    """
    weights, config_path = adapter_weights_path(Path(path))
    if is_gguf(weights):
        header = read_gguf_header(weights)
        found = base_config(base)
        layout = GgufBase.from_config(*found) if found else None
        return parse_gguf(header, lambda name: read_gguf_tensor(header, name), base=layout,
                          any_row_order=any_row_order)
    config = None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"{config_path}: not valid JSON ({exc})") from None
    with open_checkpoint(weights) as index:
        state = {name: index.get(name) for name in index}
        metadata = index.metadata
    adapter = parse(state, format=format, config=config, metadata=metadata, source=str(path))
    if adapter.format == "peft" and adapter.modules and "lora_alpha" not in adapter.config:
        adapter.notes.append("no adapter_config.json: alpha = rank assumed (scale 1.0)")
    return adapter


def load_usable(path: str | os.PathLike, *, structured: bool = False, base: str | os.PathLike | None = None
                ) -> Adapter:
    """`load_adapter`, refusing adapters with modules of an unsupported type (an operation would drop them), and
    LoHa / LoKr / DoRA modules unless `structured` (the caller handles them). `base`: as for `load_adapter`."""
    adapter = load_adapter(path, base=base)
    if adapter.structured and not structured:
        kinds = sorted({m.type_name for m in adapter.structured.values()})
        raise FormatError(f"{path}: {len(adapter.structured)} {'/'.join(kinds)} module(s), which this command takes"
                          " only as plain LoRA: turn them into LoRA first with `loratools convert` (or `merge` them)")
    if adapter.unsupported:
        kinds = sorted(set(adapter.unsupported.values()))
        names = ", ".join(sorted(adapter.unsupported)[:4]) + (" ..." if len(adapter.unsupported) > 4 else "")
        raise FormatError(
            f"{path}: {len(adapter.unsupported)} module(s) of a type loratools cannot use ({', '.join(kinds)}):"
            f" {names}; they would be lost, so nothing was written"
        )
    return adapter


@dataclass(frozen=True)
class WriteRequest:
    """What a format writer needs beyond the adapter: where, what it must not overwrite, and naming hints.

    Attributes:
        out: the output path; a ``.safetensors`` suffix means a single file, anything else a folder.
        inputs: paths the output must not overwrite or sit inside.
        force: replace an existing output.
        metadata: extra safetensors metadata strings (`writer.provenance` of the operation).
        kohya_prefix: the kohya key prefix for names that have none (kohya only).
        names: module name -> diffusers pipeline name (`formats.pipeline_names`), for kohya and diffusers keys.
        base: the base model (GGUF: its config.json gives llama.cpp's architecture and names).
        dtype: GGUF only: the stored type (``fp32``, ``fp16``, ``bf16``, ``q8_0``; None: the factors' dtype).
    """

    out: Path
    inputs: Sequence[str | os.PathLike] = ()
    force: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    kohya_prefix: str | None = None
    names: dict[str, str] | None = None
    base: str | os.PathLike | None = None
    dtype: DType | None = None


def _write_kohya(adapter: Adapter, request: WriteRequest) -> None:
    tensors, kohya_meta = render_kohya(adapter, prefix=request.kohya_prefix, pipeline=request.names)
    with atomic_output(request.out, request.inputs, request.force) as tmp:
        write_safetensors(tensors, tmp, {**kohya_meta, **request.metadata})


def _write_diffusers(adapter: Adapter, request: WriteRequest) -> None:
    tensors = render_diffusers(adapter, request.names)
    # scales are folded into B: alpha metadata read from a diffusers file would now be wrong
    dropped = (NAME_MAP_KEY, PEFT_CONFIG_KEY, DIFFUSERS_METADATA_KEY)
    diffusers_meta = {**{k: v for k, v in adapter.metadata.items() if k not in dropped}, **request.metadata}
    folder = request.out.suffix != ".safetensors"
    with atomic_output(request.out, request.inputs, request.force, folder=folder) as tmp:
        write_safetensors(tensors, tmp / DIFFUSERS_WEIGHTS if folder else tmp, diffusers_meta)


def _write_peft(adapter: Adapter, request: WriteRequest) -> None:
    tensors, config = render_peft(adapter)
    extra = dict(request.metadata)
    if request.out.suffix == ".safetensors":
        with atomic_output(request.out, request.inputs, request.force) as tmp:
            write_safetensors(tensors, tmp, {**extra, PEFT_CONFIG_KEY: json.dumps(config, sort_keys=True)})
        return
    with atomic_output(request.out, request.inputs, request.force, folder=True) as tmp:
        write_safetensors(tensors, tmp / PEFT_WEIGHTS[0], extra)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


GGUF_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # torch dtype name -> GGUF type


def _write_gguf(adapter: Adapter, request: WriteRequest) -> None:
    found = base_config(request.base if request.base is not None else adapter.base_model)
    if found is None:
        given = f"{request.base} has no config.json" if request.base is not None else "no --base given"
        raise FormatError(f"{request.out}: a GGUF adapter needs the base model's config.json (llama.cpp's"
                          f" architecture and tensor names), {given}; pass --base with the base model's folder")
    layout = GgufBase.from_config(*found)
    tensors, alpha = render_gguf(adapter, layout)
    stored = "q8_0" if request.dtype == "q8_0" else \
        GGUF_TYPES.get(dtype_name(resolve_dtype(request.dtype, quantized=True) or adapter.dtype or torch.float32), "f32")
    metadata = {**request.metadata, "loratools_version": __version__}
    if adapter.base_model:
        metadata[BASE_MODEL_KEY] = adapter.base_model
    with atomic_output(request.out, request.inputs, request.force) as tmp:
        adapter.notes.extend(write_gguf(tensors, tmp, base=layout, alpha=alpha, dtype=stored,
                                        metadata=metadata))


# format name -> its writer: a new output format is one entry here (and its module in `formats`).
WRITERS: dict[str, Callable[[Adapter, WriteRequest], None]] = {
    "peft": _write_peft,
    "kohya": _write_kohya,
    "diffusers": _write_diffusers,
    "gguf": _write_gguf,
}
WRITABLE_FORMATS = tuple(WRITERS)


def save_adapter(
    adapter: Adapter,
    out: str | os.PathLike,
    *,
    format: str = "peft",
    inputs: Sequence[str | os.PathLike] = (),
    force: bool = False,
    dtype: DType | None = None,
    kohya_prefix: str | None = None,
    metadata: Mapping[str, str] | None = None,
    names: dict[str, str] | None = None,
    base: str | os.PathLike | None = None,
) -> Path:
    """Write `adapter` atomically as a PEFT folder / file, a kohya file or a diffusers folder / file; returns the
    written path.

    Args:
        format: one of WRITABLE_FORMATS ("peft", "kohya", "diffusers", "gguf").
        inputs: paths the output must not overwrite or sit inside.
        dtype: cast factors (not kohya alphas) to this dtype first; GGUF: the stored type, ``q8_0`` included,
            applied after each module's scale is folded into B.
        metadata: extra safetensors metadata strings (`writer.provenance` of the operation).
        names: module name -> diffusers pipeline name (`formats.pipeline_names`), for kohya and diffusers keys.
        base: the base model folder (GGUF: its config.json; default the adapter's base_model when local).
    """
    check_format(format)
    check_dtype_format(dtype, format)
    cast = resolve_dtype(dtype, quantized=True)
    if cast is not None and format != "gguf":
        adapter = adapter.to(cast)
    request = WriteRequest(Path(out), inputs, force, dict(metadata or {}), kohya_prefix, names, base, dtype)
    WRITERS[format](adapter, request)
    return request.out
