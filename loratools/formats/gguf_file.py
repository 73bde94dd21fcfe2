"""GGUF files read safely: a bounds-checked header reader and tensor loader, without the ``gguf`` package.

A GGUF file is ``GGUF`` · version (u32) · tensor count (u64) · key-value count (u64) · key-values · tensor
infos (name, dims in ggml order, type, offset) · padding to ``general.alignment`` · tensor data. Every count,
string length, dimension and offset is checked against the bytes the file really has before anything is read
or allocated, so a hostile header claiming terabytes fails with one line and allocates nothing; tensors are
copied out of a read-only memory map one at a time.

Decisions:
- Versions 2 and 3, little-endian only (what llama.cpp writes on every common machine).
- Arrays longer than ARRAY_KEEP entries (a model's vocabulary) are skipped, kept as ``GgufArray(type, count)``:
  an adapter's metadata never needs them, and a model file is then recognised without building them.
- Tensor types read: F32, F16, BF16 and Q8_0 (dequantized to float32); any other type is a FormatError.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.errors import CheckpointError, FormatError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
ARRAY_KEEP = 4096
# value type id -> struct format of the fixed-size scalar types
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# smallest encoding of one entry, for count checks before a loop: key-value (empty key, u8 value), tensor info
MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8


@dataclass(frozen=True)
class TensorType:
    """A ggml tensor type: its name, bytes per block and elements per block."""

    name: str
    block_bytes: int
    block_size: int


TENSOR_TYPES = {0: TensorType("F32", 4, 1), 1: TensorType("F16", 2, 1), 30: TensorType("BF16", 2, 1),
                8: TensorType("Q8_0", 34, 32)}
TENSOR_TYPE_IDS = {t.name: i for i, t in TENSOR_TYPES.items()}


@dataclass(frozen=True)
class GgufArray:
    """A long metadata array that was skipped, not read: its element type id and length."""

    type: int
    count: int


@dataclass(frozen=True)
class GgufTensor:
    """Where one tensor lives: torch-order `shape` (ggml dims reversed), type id, absolute byte range."""

    name: str
    shape: tuple[int, ...]
    type: int
    start: int
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A validated GGUF header: version, metadata values and tensor infos (in file order)."""

    path: Path
    version: int
    metadata: dict[str, object]
    tensors: dict[str, GgufTensor]


class _Cursor:
    """Reads little-endian values from a buffer, refusing any read past its end with a CheckpointError."""

    def __init__(self, buffer: mmap.mmap | bytes, path: Path) -> None:
        self.buffer, self.path, self.pos, self.size = buffer, path, 0, len(buffer)

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: truncated or corrupt GGUF header ({what} at byte {self.pos},"
                               f" file has {self.size}); re-download or re-export the file")

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, type_id: int, what: str) -> object:
        fmt = SCALARS[type_id]
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar(4, what))  # type: ignore[call-overload]

    def u64(self, what: str) -> int:
        return int(self.scalar(10, what))  # type: ignore[call-overload]

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        start = self.take(length, f"{what} of {length} bytes")
        try:
            return bytes(self.buffer[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, type_id: int, what: str, depth: int = 0) -> object:
        if type_id in SCALARS:
            return self.scalar(type_id, what)
        if type_id == STRING:
            return self.string(what)
        if type_id != ARRAY or depth > 0:
            raise self.fail(f"{what} has unknown value type {type_id}")
        item_type, count = self.u32(f"{what} array type"), self.u64(f"{what} array length")
        smallest = struct.calcsize(SCALARS[item_type]) if item_type in SCALARS else 8
        if item_type not in SCALARS and item_type != STRING:
            raise self.fail(f"{what} is an array of unknown type {item_type}")
        if count * smallest > self.size - self.pos:
            raise self.fail(f"{what} claims {count} entries")
        if count > ARRAY_KEEP:
            if item_type == STRING:
                for _ in range(count):
                    self.take(self.u64(f"{what} entry length"), f"{what} entry")
            else:
                self.take(count * smallest, what)
            return GgufArray(item_type, count)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Read and validate the header of the GGUF file at `path` (no tensor data is read).

    Raises:
        CheckpointError: not a GGUF file, unsupported version, truncated or corrupt header, a count, size or
            offset beyond the file's end, overlapping or misaligned tensor data.
    """
    path = Path(path)
    with _mapped(path) as buffer:
        return _parse_header(_Cursor(buffer, path))


def _mapped(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < len(GGUF_MAGIC) + 4 + 8 + 8:
                raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF header; is it a GGUF file?")
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_header(cur: _Cursor) -> GgufHeader:
    if bytes(cur.buffer[:4]) != GGUF_MAGIC:
        raise CheckpointError(f"{cur.path}: not a GGUF file (no GGUF magic); pass a .gguf adapter")
    cur.pos = 4
    version = cur.u32("version")
    if version not in GGUF_VERSIONS:
        raise CheckpointError(f"{cur.path}: GGUF version {version} is not supported (expected 2 or 3;"
                              " a big-endian file reads as a huge version)")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key-value count")
    if n_kv * MIN_KV_BYTES > cur.size - cur.pos:
        raise CheckpointError(f"{cur.path}: GGUF header claims {n_kv} key-values, more than its"
                              f" {cur.size} bytes can hold; the file is corrupt")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string("key")
        if key in metadata:
            raise cur.fail(f"key {key!r} repeated")
        metadata[key] = cur.value(cur.u32(f"{key} type"), key)
    if n_tensors * MIN_TENSOR_INFO_BYTES > cur.size - cur.pos:
        raise CheckpointError(f"{cur.path}: GGUF header claims {n_tensors} tensors, more than its"
                              f" {cur.size} bytes can hold; the file is corrupt")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GgufTensor] = {}
    end = data_start
    for name, shape, type_id, offset in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} repeated")
        nbytes = _nbytes(cur, name, shape, type_id)
        if offset % alignment or offset < end - data_start or data_start + offset + nbytes > cur.size:
            raise CheckpointError(
                f"{cur.path}: tensor {name} claims bytes {offset}..{offset + nbytes} of the data section, outside"
                f" the file's {max(cur.size - data_start, 0)} data bytes (or misaligned / overlapping); the file is"
                " truncated or corrupt")
        tensors[name] = GgufTensor(name, shape, type_id, data_start + offset, nbytes)
        end = data_start + offset + nbytes
    return GgufHeader(cur.path, version, metadata, tensors)


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.u32(f"{name} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
    ggml_dims = [cur.u64(f"{name} dimension") for _ in range(n_dims)]
    return name, tuple(reversed(ggml_dims)), cur.u32(f"{name} type"), cur.u64(f"{name} offset")


def _nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], type_id: int) -> int:
    kind = TENSOR_TYPES.get(type_id)
    if kind is None:
        raise FormatError(f"{cur.path}: tensor {name} has ggml type {type_id}; loratools reads"
                          f" {', '.join(t.name for t in TENSOR_TYPES.values())} (re-export with --dtype f16)")
    if shape[-1] % kind.block_size:
        raise cur.fail(f"tensor {name} row of {shape[-1]} is not a whole number of {kind.name} blocks")
    return math.prod(shape) // kind.block_size * kind.block_bytes


def read_gguf_tensor(header: GgufHeader, name: str) -> torch.Tensor:
    """The tensor `name` of a validated header, as float32 (Q8_0 dequantized) or its stored float dtype.

    Returns: a tensor of `header.tensors[name].shape` (torch order: ggml's dims reversed), owning its memory.
    """
    info = header.tensors[name]
    with _mapped(header.path) as buffer:
        if info.start + info.nbytes > len(buffer):
            raise CheckpointError(f"{header.path}: shrank while being read (tensor {name}); read it again")
        raw = bytearray(buffer[info.start:info.start + info.nbytes])
    kind = TENSOR_TYPES[info.type]
    if kind.name == "Q8_0":
        blocks = torch.frombuffer(raw, dtype=torch.uint8).reshape(-1, kind.block_bytes) if raw else \
            torch.empty(0, kind.block_bytes, dtype=torch.uint8)
        scales = blocks[:, :2].contiguous().view(torch.float16).float()
        values = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (values * scales).reshape(info.shape)
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind.name]
    if not raw:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(info.shape)
