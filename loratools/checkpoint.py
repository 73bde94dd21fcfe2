"""Read checkpoints lazily: an index of every tensor's name, shape and dtype from headers; tensors on demand.

Opens a Hugging Face model folder (``model.safetensors``, or shards with ``model.safetensors.index.json``,
or ``pytorch_model.bin`` with or without its index), a folder of ``*.safetensors`` shards without an index,
or a single ``.safetensors`` / ``.bin`` file. ``.bin`` files are loaded with
``torch.load(weights_only=True, mmap=True)`` only: nothing is unpickled beyond tensors and plain containers,
and tensor data stays in the page cache until asked for.

Example:
    >>> with open_checkpoint("fixtures/llama-base") as ckpt:
    ...     w = ckpt.get("model.layers.0.self_attn.q_proj.weight")   # (64, 64) float32
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loratools.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_WEIGHTS = "model.safetensors"  # what a Hugging Face folder of one shard holds (and what merge writes)
SAFETENSORS_INDEX = SAFETENSORS_WEIGHTS + ".index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = (SAFETENSORS_WEIGHTS, "pytorch_model.bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024
PREFETCH_CHUNK = 8 * 1024 * 1024  # bytes per read of the read-ahead thread


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from headers only.

    ``offset`` is the byte offset of the tensor's data in a safetensors file (None for .bin files).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Everything is checked from the header and the file size before any tensor is read or allocated: entries
    must be well-formed, offsets must lie in the file, run forwards, match their shape and dtype, and tile the
    data section without overlaps or gaps (what the safetensors library itself requires).

    Returns:
        (tensors by name, ``__metadata__`` strings). Raises CheckpointError for a truncated or corrupt file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (claims {header_len} bytes, file has {size})"
                )
            raw = handle.read(header_len)
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a weight file") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (corrupt safetensors header: {_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _header_metadata(path, header.pop("__metadata__", None))
    data_size = size - 8 - header_len
    tensors = {name: _header_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_layout(path, tensors, data_size)
    return {name: TensorInfo(name, info.shape, info.dtype, path, 8 + header_len + (info.offset or 0))
            for name, info in tensors.items()}, metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _header_metadata(path: Path, metadata: object) -> dict[str, str]:
    """``__metadata__`` as strings; CheckpointError when it is not an object of strings (the format's rule)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    return dict(metadata)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    """One header entry as a TensorInfo whose `offset` is relative to the data section (fixed up by the caller)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry; the file is corrupt")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {entry['dtype'][:20]!r}, which loratools does not read"
            f" ({', '.join(SAFETENSORS_DTYPES)}); convert the file"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a corrupt shape in the header; the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r} has corrupt data_offsets in the header; the file is corrupt")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{path}: corrupt header, tensor {name!r} ends (byte {end}) before it begins ({begin})")
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated file, tensor {name!r} ends at byte {end} of a {data_size}-byte data section;"
            " re-download or re-save the checkpoint"
        )
    if end - begin != math.prod(shape) * dtype.itemsize:  # so no shape can claim more bytes than the file has
        raise CheckpointError(f"{path}: corrupt header, tensor {name!r} has {end - begin} bytes for shape {tuple(shape)}")
    return TensorInfo(name, tuple(shape), dtype, path, begin)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors must tile the data section: no overlap, no gap, nothing after the last one."""
    position, previous = 0, None
    for info in sorted(tensors.values(), key=lambda i: (i.offset or 0, i.nbytes)):
        begin = info.offset or 0
        if begin < position:
            raise CheckpointError(f"{path}: corrupt header, tensors {previous!r} and {info.name!r} overlap")
        if begin > position:
            raise CheckpointError(f"{path}: corrupt header, {begin - position} unaccounted bytes before tensor"
                                  f" {info.name!r}")
        position, previous = begin + info.nbytes, info.name
    if position != data_size:
        raise CheckpointError(
            f"{path}: {data_size - position} bytes after the last tensor (data section {data_size} bytes);"
            " the file is corrupt or not what its header says"
        )


class TensorIndex:
    """Every tensor of a checkpoint by name, read from headers; `get` loads one tensor at a time.

    Attributes:
        path: what was opened (file or folder).
        files: the weight files, in shard order.
        tensors: TensorInfo by name, in file order.
        metadata: safetensors ``__metadata__`` of the first file (empty for .bin).
        config: ``config.json`` next to the weights, when present.
    """

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None):
        self.path = path
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._handles: dict[Path, Any] = {}  # safe_open handles, or the state dicts of .bin files
        self._reader: ThreadPoolExecutor | None = None
        for number, file in enumerate(files):
            found, metadata = self._read_file_index(file)
            if number == 0:
                self.metadata = metadata
            for name, info in found.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} appears in both {self.tensors[name].file.name} and {file.name};"
                        " remove the stale shard"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            self._check_weight_map(weight_map)
        config_path = (path if path.is_dir() else path.parent) / "config.json"
        self.config: dict | None = None
        if path.is_dir() and config_path.is_file():
            self.config = read_model_config(config_path)

    def _read_file_index(self, file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        if file.suffix == ".safetensors":
            return read_safetensors_header(file)
        state = _load_bin(file)
        self._handles[file] = state
        return {n: TensorInfo(n, tuple(t.shape), t.dtype, file) for n, t in state.items()}, {}

    def _check_weight_map(self, weight_map: dict[str, str]) -> None:
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise CheckpointError(
                    f"{self.path}: the index maps {name!r} to {shard}, but that shard does not hold it;"
                    " the index and the shards are out of step"
                )

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Name, shape, dtype and file of one tensor (no data read)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor, in its stored dtype, on the CPU."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            if isinstance(handle, dict):
                return handle[name]
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for bad data
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None

    def prefetch(self, name: str) -> None:
        """Start reading one tensor's bytes in a background thread, so that a later `get` finds them in the OS
        page cache instead of waiting for the disk; a no-op for .bin files (already mapped by torch.load).

        Reading ahead this way overlaps the disk with the caller's computation (the thread waits on the disk
        with the GIL released); a plain read is used because the OS's own read-ahead hint gains nothing here
        (README, performance).
        """
        info = self.info(name)
        if info.offset is None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="loratools-read-ahead")
        self._reader.submit(_read_through, info.file, info.offset, info.nbytes)

    def nbytes(self) -> int:
        """Total tensor bytes, from headers."""
        return sum(info.nbytes for info in self.tensors.values())

    def close(self) -> None:
        """Release file handles; reads ahead not yet started are dropped, a running one is waited for."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        self._handles.clear()

    def __enter__(self) -> TensorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_through(file: Path, offset: int, nbytes: int) -> None:
    """Read `nbytes` of `file` from `offset` into a scratch buffer and drop them: the OS page cache keeps them.

    Errors are ignored: this only warms the cache, and the real read reports any problem.
    """
    scratch = memoryview(bytearray(min(nbytes, PREFETCH_CHUNK)))
    try:
        with open(file, "rb", buffering=0) as handle:
            handle.seek(offset)
            while nbytes > 0:
                got = handle.readinto(scratch[: min(len(scratch), nbytes)])
                if not got:
                    return
                nbytes -= got
    except OSError:
        return


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise CheckpointError(
            f"{file}: refused to unpickle ({first_line}); only plain tensor state dicts load safely,"
            " convert the file to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return state


def read_model_config(config_path: Path) -> dict:
    """``config.json`` of a model folder; CheckpointError when it is not a JSON object."""
    try:
        config = json.loads(config_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({_first_line(exc)}); repair or remove it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object; repair or remove it")
    return config


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: tensor names to plain file names inside the index's folder.

    Raises CheckpointError for invalid JSON, a missing or malformed ``weight_map``, and shard paths that are
    absolute, contain ``..`` or a folder (an index must not send the reader outside its folder).
    """
    try:
        index = json.loads(index_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index, not JSON ({_first_line(exc)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: not a valid shard index (needs a 'weight_map' object of file names)")
    for name, shard in weight_map.items():
        if not shard or os.path.basename(shard) != shard or shard in (".", ".."):
            raise CheckpointError(
                f"{index_path}: maps {name!r} to {shard!r}, which is not a file name in the index's folder"
                " (absolute paths, '..' and subfolders are refused); fix the index"
            )
    return weight_map


def _files_from_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    folder = index_path.parent
    weight_map = read_weight_map(index_path)
    files = []
    for shard in sorted(set(weight_map.values())):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: lists shard {shard}, which is missing from {folder}")
        files.append(shard_path)
    return files, weight_map


def open_checkpoint(path: str | os.PathLike) -> TensorIndex:
    """Index a checkpoint file or folder; raises CheckpointError naming the file and what is wrong.

    Folder lookup order: ``model.safetensors.index.json`` (or any one ``*.safetensors.index.json``, as
    diffusers names them), ``model.safetensors``, ``pytorch_model.bin.index.json`` (or any one
    ``*.bin.index.json``), ``pytorch_model.bin``, then every ``*.safetensors`` file as shards.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError(f"{path}: unknown weight file type; expected .safetensors or .bin")
        return TensorIndex(path, [path])
    if (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path}: this is a PEFT adapter folder, not a model checkpoint; pass the model folder")
    for preferred, pattern, single in ((SAFETENSORS_INDEX, "*.safetensors.index.json", SINGLE_FILES[0]),
                                       (BIN_INDEX, "*.bin.index.json", SINGLE_FILES[1])):
        indexes = [path / preferred] if (path / preferred).is_file() else sorted(
            p for p in path.glob(pattern) if p.is_file())
        if len(indexes) > 1:
            names = ", ".join(i.name for i in indexes)
            raise CheckpointError(f"{path}: several shard indexes ({names}); pass the weight file to use")
        if indexes:
            files, weight_map = _files_from_index(indexes[0])
            return TensorIndex(path, files, weight_map)
        if (path / single).is_file():
            return TensorIndex(path, [path / single])
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return TensorIndex(path, shards)
    raise CheckpointError(
        f"{path}: folder holds no weights (looked for {SAFETENSORS_INDEX}, model.safetensors,"
        f" {BIN_INDEX}, pytorch_model.bin, *.safetensors)"
    )
