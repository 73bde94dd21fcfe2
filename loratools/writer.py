"""Atomic output: everything is written to a temporary sibling, then renamed into place.

Rules every command follows through `atomic_output`:
- an existing output is refused unless ``force=True`` (then it is replaced only after the new one is complete);
- an output equal to, inside, or containing an input is refused, even with force;
- on any error the temporary file or folder is removed: nothing half-written is left behind.
Every safetensors file written records ``loratools_version`` in its ``__metadata__``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from loratools import __version__
from loratools.checkpoint import SAFETENSORS_DTYPES
from loratools.errors import OutputError

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


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


def provenance(extra: dict[str, str] | None = None) -> dict[str, str]:
    """safetensors metadata: the caller's strings plus ``format: pt`` and ``loratools_version``."""
    metadata = {"format": "pt"}
    metadata.update(extra or {})
    metadata["loratools_version"] = __version__
    return metadata


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors with provenance metadata, byte-for-byte deterministic.

    The safetensors library orders ``__metadata__`` by a randomly seeded hash map, so the same inputs would
    give different bytes in different processes; this writer sorts metadata and tensor names instead and
    streams one tensor at a time. Call it inside `atomic_output`.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(provenance(metadata).items()))}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in sorted(tensors):
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            handle.write(flat.view(torch.uint8).numpy().tobytes())
