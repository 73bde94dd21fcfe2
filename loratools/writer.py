"""Atomic output: everything is written to a temporary sibling, then renamed into place.

Rules every command follows through `atomic_output`:
- an existing output is refused unless ``force=True`` (then it is replaced only after the new one is complete);
- an output equal to, inside, or containing an input is refused, even with force;
- on any error the temporary file or folder is removed: nothing half-written is left behind;
- any OSError while writing (a full disk, a folder that cannot be written) is an OutputError naming the output;
- a symbolic link at the output path is replaced, never written through (a Hugging Face cache's shared blobs);
- the rename into place is one ``renameat2`` call (no-clobber, or an atomic swap with ``force``) where the
  filesystem has it, so a kill at any moment leaves the previous output or the new one, never neither; what a
  killed run leaves (``.<name>.loratools-tmp-<pid>`` / ``-old-<pid>`` of a dead pid) is cleaned up by the next
  write to that output.
Every safetensors file written records its provenance (`provenance`: command, inputs, parameters) and
``loratools_version`` in its ``__metadata__``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.checkpoint import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS
from loratools.errors import LoratoolsError, OutputError
from loratools.version import __version__

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
PROVENANCE_KEYS = ("loratools_command", "loratools_inputs", "loratools_parameters", "loratools_version")


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """Validate an output path against existing files and the inputs; returns it absolute.

    The returned path has its folder resolved but its last component kept as given: when `out` is a symbolic
    link, the link is what gets replaced (with `force`), never the file or folder it points to.
    """
    out_path = output_path(out)
    for given in inputs:
        for inp in {output_path(given), Path(given).resolve()}:
            if out_path == inp or inp in out_path.parents or out_path in inp.parents:
                raise OutputError(f"{out}: output would overwrite or sit inside input {given}; choose another -o path")
    if os.path.lexists(out_path) and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it or choose another -o path")
    _check_folder(out, out_path)
    return out_path


def output_path(out: str | os.PathLike) -> Path:
    """`out` made absolute with its folder resolved and its last component not followed (it may be a link)."""
    path = Path(os.path.abspath(out))
    return path.parent.resolve() / path.name if path.name else path


def _check_folder(out: str | os.PathLike, out_path: Path) -> None:
    """OutputError when the nearest existing ancestor of `out_path` is not a folder (nothing could be created)."""
    ancestor = out_path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        what = "parent" if ancestor == out_path.parent else "ancestor"
        raise OutputError(f"{out}: {what} {ancestor} is not a folder; choose another -o path")


TMP_MARK = ".loratools-tmp-"
OLD_MARK = ".loratools-old-"


@contextlib.contextmanager
def atomic_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False, folder: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` when the block succeeds, remove it otherwise.

    Guarantees: `out` is either absent, the previous output (with `force`) or the complete new one, at every
    moment, even if the process is killed (the swap is one ``renameat2`` call where the filesystem has it);
    a symbolic link at `out` is replaced, its target never written; any OSError (a full disk, a folder that
    cannot be written) becomes an OutputError naming `out`; temporaries of earlier runs killed before they could
    clean up (`remove_stale_temporaries`) are removed first.

    Args:
        out: final file or folder path.
        inputs: paths that must not be overwritten or written into.
        force: replace an existing `out`.
        folder: create the temporary path as an empty folder (else the caller creates the file).
    """
    out_path = check_output(out, inputs, force=True)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_path)
    except OSError as exc:
        raise write_error(out, exc) from exc
    if os.path.lexists(out_path) and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it or choose another -o path")
    tmp = out_path.with_name(f".{out_path.name}{TMP_MARK}{os.getpid()}")
    try:
        _remove(tmp)
        if folder:
            tmp.mkdir()
        yield tmp
        _commit(tmp, out_path, force, out)
    except LoratoolsError:
        raise
    except OSError as exc:
        raise write_error(out, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            _remove(tmp)


def write_error(out: str | os.PathLike, exc: OSError) -> OutputError:
    """The one-line error for an OSError met while writing `out` (errno text, the file if it is not ours, a fix)."""
    text = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno and exc.strerror else str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename and TMP_MARK not in str(exc.filename) else ""
    hints = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
             errno.EACCES: "choose a folder you can write", errno.EPERM: "choose a folder you can write",
             errno.EROFS: "choose a folder you can write"}
    hint = hints.get(exc.errno or 0, "check the -o path")
    return OutputError(f"{out}: cannot write: {text}{where}; {hint}; no partial output was left")


def _commit(tmp: Path, out: Path, force: bool, shown: str | os.PathLike) -> None:
    """Move the finished `tmp` to `out` in one step: never over an existing `out` without `force`; with `force`
    the two are swapped atomically (the old output is left at `tmp` for the caller to remove)."""
    try:
        if _rename2(tmp, out, RENAME_NOREPLACE):
            return
    except FileExistsError:
        if not force:
            raise OutputError(f"{shown}: already exists (another process wrote it meanwhile); pass --force to"
                              " replace it or choose another -o path") from None
        if _rename2(tmp, out, RENAME_EXCHANGE):
            return
    if not os.path.lexists(out):  # no renameat2 here: plain renames
        os.replace(tmp, out)
    elif not force:
        raise OutputError(f"{shown}: already exists; pass --force to replace it or choose another -o path")
    elif not (tmp.is_dir() or (out.is_dir() and not out.is_symlink())):
        os.replace(tmp, out)  # files and links: one atomic rename
    else:
        old = out.with_name(f".{out.name}{OLD_MARK}{os.getpid()}")
        try:
            os.replace(out, old)
            os.replace(tmp, out)
        except BaseException:  # an error or a signal between the renames: put the previous output back
            if os.path.lexists(old) and not os.path.lexists(out):
                os.replace(old, out)
            raise
        _remove(old)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``: True when done, False when this system or filesystem lacks it;
    other failures raise OSError (FileExistsError for RENAME_NOREPLACE onto an existing path)."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def remove_stale_temporaries(out: Path) -> list[str]:
    """Remove the temporaries that runs killed before they could clean up left beside `out`.

    Only names of our own pattern (``.<name>.loratools-tmp-<pid>``, ``.<name>.loratools-old-<pid>``) whose
    process is no longer alive are touched. An ``-old-`` entry with no `out` beside it is a previous output
    whose replacement was killed halfway: it is renamed back to `out` instead of being removed.

    Returns:
        the names handled.
    """
    prefix = f".{out.name}.loratools-"
    handled = []
    for entry in sorted(out.parent.iterdir()):
        kind, _, pid = entry.name[len(prefix):].partition("-") if entry.name.startswith(prefix) else ("", "", "")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not os.path.lexists(out):
            os.replace(entry, out)
        else:
            _remove(entry)
        handled.append(entry.name)
    return handled


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        return {SAFETENSORS_WEIGHTS: groups[0]}
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
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
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
