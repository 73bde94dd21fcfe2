"""ΔW = tuned − base, streamed one layer pair at a time, and the comparison of tensors that are not LoRA layers.

Used by every command that reads a base / tuned pair (extract, spectrum, verify): `layer_deltas` yields each
planned layer's ΔW as its 2-D LoRA matrix with ‖ΔW‖²_F, reading the next pairs ahead from disk; `tensor_change`
compares two tensors whole. A non-finite ΔW is an error naming the checkpoint and file that hold it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from loratools.adapter import lora_matrix
from loratools.checkpoint import TensorIndex
from loratools.errors import CheckpointError
from loratools.linalg import frobenius_energy
from loratools.plan import LayerPair

SUB_CHUNK = 1 << 20  # elements per block when subtracting the base
READ_AHEAD_BYTES = 256 * 1024 * 1024  # stored bytes of upcoming pairs asked of the OS ahead of their use


@dataclass(frozen=True)
class LayerDelta:
    """One layer's ΔW = tuned − base as its LoRA matrix.

    Attributes:
        pair: the planned layer.
        matrix: (rows, cols) = ``pair.matrix_shape``, in the requested dtype and device.
        energy: ‖ΔW‖²_F (float64); 0 for an unchanged layer.
    """

    pair: LayerPair
    matrix: torch.Tensor
    energy: float


def layer_delta(
    base: TensorIndex,
    tuned: TensorIndex,
    pair: LayerPair,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    workspace: torch.Tensor | None = None,
    base_tensor: torch.Tensor | None = None,
) -> LayerDelta:
    """One pair's ΔW = tuned − base as its LoRA matrix, formed in `dtype` whatever the stored dtypes.

    Memory: one (rows, cols) matrix, new or a view of `workspace` (1-D, in `dtype` on `device`, at least
    rows·cols long); the stored tensors are memory-mapped pages, never written. `base_tensor`: the base's
    tensor already read (a fleet reads it once for every fine-tune), else it is read here. Reusing a workspace saves
    most of the time: a fresh matrix of this size is zero-filled page by page by the OS, which costs several
    times the copy itself.

    Raises:
        CheckpointError naming the tensor and the file when ΔW holds inf or nan.
    """
    stored_tuned = tuned.get(pair.tensor)
    if workspace is None:
        delta = stored_tuned.to(device=device, dtype=dtype, copy=True)
    else:
        delta = workspace[: stored_tuned.numel()].view(stored_tuned.shape).copy_(stored_tuned)
    stored = (base.get(pair.tensor) if base_tensor is None else base_tensor).to(device=device)
    for part, subtrahend in zip(delta.view(-1).split(SUB_CHUNK), stored.view(-1).split(SUB_CHUNK), strict=True):
        part.sub_(subtrahend)  # in blocks: a mixed-dtype sub_ makes a converted copy of its whole operand
    matrix = lora_matrix(delta, pair.kind)
    energy = frobenius_energy(matrix)
    if not math.isfinite(energy):
        raise non_finite_error(pair.tensor, base, tuned)
    return LayerDelta(pair, matrix, energy)


def layer_deltas(
    base: TensorIndex,
    tuned: TensorIndex,
    pairs: list[LayerPair],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    reuse: bool = False,
) -> Iterator[LayerDelta]:
    """Yield `layer_delta` for each pair in turn: one ΔW in memory at a time if the caller drops each one.

    While a ΔW is being used, the next pair's tensors are read ahead from disk (`TensorIndex.prefetch`).

    Args:
        base, tuned: open checkpoints; pairs: from `plan_extract` (``plan.pairs``).
        reuse: form every ΔW in one workspace sized for the largest pair; each yielded matrix is then
            overwritten by the next, so use (or copy) it before asking for the next one.

    Example:
        >>> with open_checkpoint("base") as b, open_checkpoint("tuned") as t:
        ...     for d in layer_deltas(b, t, plan_extract(b, t).pairs, reuse=True):
        ...         print(d.pair.module, tuple(d.matrix.shape), d.energy ** 0.5)
    """
    workspace = None
    if reuse and pairs:
        workspace = torch.empty(max(math.prod(p.shape) for p in pairs), dtype=dtype, device=device)
    sizes = [base.info(p.tensor).nbytes + tuned.info(p.tensor).nbytes for p in pairs]
    asked = 1  # pairs[1:asked] have been read ahead; the first is read when needed
    for number, pair in enumerate(pairs):
        # keep the next pair, and more within READ_AHEAD_BYTES of stored data, on its way from disk
        asked = max(asked, number + 1)
        while asked < len(pairs) and (asked == number + 1 or sum(sizes[number + 1:asked]) < READ_AHEAD_BYTES):
            base.prefetch(pairs[asked].tensor)
            tuned.prefetch(pairs[asked].tensor)
            asked += 1
        yield layer_delta(base, tuned, pair, dtype=dtype, device=device, workspace=workspace)


def non_finite_error(tensor: str, base: TensorIndex, tuned: TensorIndex) -> CheckpointError:
    """The error for a non-finite ΔW of `tensor`, naming the checkpoint and file that hold the nan/inf."""
    for index in (tuned, base):
        if not bool(torch.isfinite(index.get(tensor)).all()):
            return CheckpointError(
                f"{tensor}: non-finite values (nan or inf) in {index.path} ({index.info(tensor).file.name}); "
                "the checkpoint is corrupt or overflowed: repair it, or leave the tensor out with --exclude"
            )
    return CheckpointError(f"{tensor}: tuned − base overflows (non-finite ΔW); leave the tensor out with --exclude")


@dataclass(frozen=True)
class TensorChange:
    """How one tensor differs between the checkpoints (compared whole, in float64).

    Attributes:
        max_abs_change: max |tuned − base|; rel_change: ‖tuned − base‖_F / ‖base‖_F (inf when base is zero).
    """

    name: str
    shape: tuple[int, ...]
    max_abs_change: float
    rel_change: float

    def to_json(self) -> dict:
        return dict(asdict(self), shape=list(self.shape))


def tensor_change(base: TensorIndex, tuned: TensorIndex, name: str) -> TensorChange | None:
    """Compare one tensor of both checkpoints; None when the values are equal (across dtypes: an fp32 base
    equals a bf16 tuned tensor holding the same values)."""
    return tensor_change_of(name, base.get(name), tuned.get(name))


def tensor_change_of(name: str, b: torch.Tensor, t: torch.Tensor) -> TensorChange | None:
    """`tensor_change` of two tensors already read (base `b`, tuned `t`, same shape)."""
    if torch.equal(b, t):
        return None
    diff = t.double() - b.double()
    norm = float(b.double().norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return TensorChange(name, tuple(b.shape), max_abs, float(diff.norm()) / norm if norm else math.inf)
