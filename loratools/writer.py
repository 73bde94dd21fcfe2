"""Atomic output: everything is written to a temporary sibling, then renamed into place.

Rules every command follows through `atomic_output`:
- an existing output is refused unless ``force=True`` (then it is replaced only after the new one is complete);
- an output equal to, inside, or containing an input is refused, even with force;
- on any error the temporary file or folder is removed: nothing half-written is left behind.
Every safetensors file written records its provenance (`provenance`: command, inputs, parameters) and
``loratools_version`` in its ``__metadata__``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.checkpoint import SAFETENSORS_DTYPES
from loratools.errors import LoratoolsError, OutputError
from loratools.version import __version__

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
PROVENANCE_KEYS = ("loratools_command", "loratools_inputs", "loratools_parameters", "loratools_version")


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """Validate an output path against existing files and the inputs; returns it resolved."""
    out_path = Path(out).resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if out_path == inp or inp in out_path.parents or out_path in inp.parents:
            raise OutputError(f"{out}: output would overwrite or sit inside input {given}; choose another -o path")
    if out_path.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it or choose another -o path")
    if out_path.parent.exists() and not out_path.parent.is_dir():
        raise OutputError(f"{out}: parent {out_path.parent} is not a folder")
    return out_path


@contextlib.contextmanager
def atomic_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False, folder: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` when the block succeeds, remove it otherwise.

    Args:
        out: final file or folder path.
        inputs: paths that must not be overwritten or written into.
        force: replace an existing `out`.
        folder: create the temporary path as an empty folder (else the caller creates the file).
    """
    out_path = check_output(out, inputs, force)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.loratools-tmp-{os.getpid()}")
    _remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if out_path.exists():
            old = out_path.with_name(f".{out_path.name}.loratools-old-{os.getpid()}")
            os.replace(out_path, old)
            os.replace(tmp, out_path)
            _remove(old)
        else:
            os.replace(tmp, out_path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def provenance(
    command: str, inputs: Iterable[str | os.PathLike], parameters: Mapping[str, object] | None = None
) -> dict[str, str]:
    """The provenance every written file records, under the PROVENANCE_KEYS (`inspect` shows them).

    Args:
        command: the loratools command that wrote the file (``extract``, ``merge`` …).
        inputs: the files it read, in order.
        parameters: the settings that shaped the result (JSON-encoded, keys sorted).
    Returns:
        safetensors metadata strings; the writer adds ``loratools_version``.
    """
    metadata = {"loratools_command": command, "loratools_inputs": json.dumps([str(p) for p in inputs])}
    if parameters:
        metadata["loratools_parameters"] = json.dumps(dict(parameters), sort_keys=True, default=str)
    return metadata


def _with_version(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``format: pt`` (what safetensors' torch loader expects), the caller's strings and ``loratools_version``."""
    return dict(sorted({"format": "pt", **(metadata or {}), "loratools_version": __version__}.items()))


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors with provenance metadata, byte-for-byte deterministic.

    The safetensors library orders ``__metadata__`` by a randomly seeded hash map, so the same inputs would
    give different bytes in different processes; this writer sorts metadata and tensor names instead and
    streams one tensor at a time. Call it inside `atomic_output`.
    """
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    stream_safetensors(path, specs, lambda spec: tensors[spec.name], metadata)


MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written, known by name, shape and dtype before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def stream_safetensors(
    path: Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file from its header up front, asking `produce` for one tensor at a time.

    Peak memory is one tensor, however large the file. Tensors are written in name order and metadata is
    sorted, so the bytes are deterministic.

    Args:
        specs: what the file holds; `produce(spec)` must return a tensor of exactly that shape and dtype.
        metadata: extra ``__metadata__`` strings (provenance is added).
    """
    ordered = sorted(specs, key=lambda spec: spec.name)
    header: dict[str, object] = {"__metadata__": _with_version(metadata)}
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for spec in ordered:
            tensor = produce(spec).detach().to("cpu")
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(
                    f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, header says {spec.shape} {spec.dtype}"
                )
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def shard_layout(specs: Iterable[TensorSpec], max_bytes: int) -> dict[str, list[TensorSpec]]:
    """Split tensors, in the given order, into shards of at most `max_bytes` (a larger tensor gets its own).

    Returns:
        file name -> specs: ``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors``.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return {MODEL_WEIGHTS: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups)}


def write_sharded_model(
    folder: Path,
    shards: dict[str, list[TensorSpec]],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write a Hugging Face weight layout into `folder`: each shard, plus ``model.safetensors.index.json``
    (``{"metadata": {"total_size": …}, "weight_map": {tensor: file}}``) when there is more than one.

    Returns:
        the weight map, tensor name -> file name.
    """
    weight_map = {spec.name: file for file, specs in shards.items() for spec in specs}
    for file, specs in shards.items():
        stream_safetensors(folder / file, specs, produce, metadata)
    if len(shards) > 1:
        total = sum(spec.nbytes for specs in shards.values() for spec in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``5GB`` (10⁹), ``2GiB`` (2³⁰), ``500MB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in SIZE_UNITS or float(match.group(1)) * SIZE_UNITS[unit] < 1:
        raise LoratoolsError(f"shard size {text!r} is not a size; write it like 5GB, 2GiB or 500MB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def write_json(path: str | os.PathLike, data: object, *, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """Write a JSON document (a ``--report``) atomically, refusing inputs and existing files as `atomic_output`."""
    with atomic_output(path, inputs, force) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
