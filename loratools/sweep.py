"""`spectrum BASE TUNED`: what rank a LoRA of this fine-tune needs, from the spectra of the true deltas.

For every layer pair (`plan.plan_extract`), ΔW = tuned − base is read, one pair at a time, as its 2-D LoRA
matrix; its energy ‖ΔW‖²_F is summed exactly (float64) and its top k singular values come from a seeded
randomized SVD (`linalg.randomized_svd`), or all of them with ``exact``. The energy beyond the top k (the tail)
is ‖ΔW‖²_F − Σ_{i<k} σ_i², measured as ‖ΔW − U_k Σ_k V_kᵀ‖²_F (the same number without the cancellation that
subtracting two nearly equal energies suffers), so the error of every truncation up to k is known without the
rest of the spectrum: ‖ΔW − ΔW_r‖²_F = Σ_{r≤i<k} σ_i² + tail.

Decisions:
- k = min(max(max_rank, largest swept rank), out, in): every swept rank is covered by the computed values.
- The overall error weights layers by ‖ΔW‖²_F: √(Σ_l ‖ΔW_l − ΔW_l,r‖²_F / Σ_l ‖ΔW_l‖²_F), the error of the
  whole set of deltas as one vector.
- Adapter size at rank r counts min(r, out, in)·(out + in) parameters per layer, in the tuned checkpoint's
  dtype (what ``extract`` writes by default).
- ``target_error`` E: a layer's rank is the smallest r with error ≤ E; ``energy`` F: the smallest r keeping
  Σ_{i<r} σ_i² ≥ F·‖ΔW‖²_F (error ≤ √(1 − F)). None when k values are not enough. The global rank is the
  smallest r ≤ k whose overall error meets the same bound; ``max_layer_rank`` is the rank at which every
  layer meets it on its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loratools.checkpoint import open_checkpoint
from loratools.errors import LoratoolsError
from loratools.extract import LayerDelta, layer_deltas
from loratools.linalg import randomized_svd, residual_energy
from loratools.plan import plan_extract
from loratools.progress import Progress

DEFAULT_RANKS = (4, 8, 16, 32, 64)
TOLERANCE = 1e-12  # relative slack on error bounds, as `linalg.choose_rank`


@dataclass
class LayerSpectrum:
    """The leading spectrum of one true delta.

    Attributes:
        name: the module path; tensor: the weight's name; kind: linear, conv2d, embedding or conv1d.
        shape: (rows, cols) of the LoRA matrix (out, in), (out, in·kh·kw) or (dim, num).
        singular_values: (k,) float32, descending; all min(rows, cols) of them when `complete`.
        total_energy: ‖ΔW‖²_F, exact.
        tail: ‖ΔW‖²_F − Σ σ_i² over the computed values (measured; 0 when `complete`).
    """

    name: str
    tensor: str
    kind: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    total_energy: float
    complete: bool
    tail: float = 0.0

    @property
    def tail_energy(self) -> float:
        """Share of ‖ΔW‖²_F beyond the computed singular values (0 when complete)."""
        return self.tail / self.total_energy if self.total_energy > 0 else 0.0

    def errors(self) -> torch.Tensor:
        """(k + 1,) float64 relative errors of the rank-0 … rank-k truncations (Eckart–Young), from the tails."""
        squares = self.singular_values.double() ** 2
        residual = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)]) + self.tail
        if self.total_energy <= 0:
            return torch.zeros_like(residual)
        return (residual / self.total_energy).clamp(0, 1).sqrt()

    def rel_error(self, rank: int) -> float | None:
        """‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F; 0 from min(rows, cols) on; None beyond the computed values."""
        if rank >= min(self.shape):
            return 0.0
        if rank >= len(self.singular_values) + 1:
            return None
        return float(self.errors()[rank])

    def rank_for(self, max_error: float) -> int | None:
        """The smallest rank with relative error ≤ max_error, or None when the computed values do not reach it."""
        hits = torch.nonzero(self.errors() <= max_error * (1 + TOLERANCE))
        if len(hits):
            return int(hits[0])
        return min(self.shape) if self.complete else None


@dataclass
class SpectrumReport:
    """Spectra of every changed layer, and what they say about the rank an adapter needs.

    Attributes:
        layers: changed layer pairs in natural name order.
        ranks: the swept ranks.
        bound: the recommendation's error bound (``target_error``, or √(1 − energy)), None when not asked.
        criterion: "target_error" or "energy" with its value, for display.
        itemsize: bytes per parameter of the tuned checkpoint's dtype.
        unchanged: tensor names equal in base and tuned (layers and whole tensors).
        changed_whole: (name, shape) of changed tensors that cannot be a LoRA (norms, biases, ...).
    """

    layers: list[LayerSpectrum]
    ranks: list[int]
    max_rank: int
    exact: bool
    itemsize: int
    dtype: str
    bound: float | None = None
    criterion: tuple[str, float] | None = None
    unchanged: int = 0
    changed_whole: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def _params(self, ranks: Sequence[int]) -> int:
        return sum(min(r, *layer.shape) * sum(layer.shape) for r, layer in zip(ranks, self.layers, strict=True))

    def overall_error(self, rank: int) -> float | None:
        """The ‖ΔW‖²-weighted error of truncating every layer at `rank` (None when a layer's values stop short)."""
        total = sum(layer.total_energy for layer in self.layers)
        errors = [layer.rel_error(rank) for layer in self.layers]
        if any(e is None for e in errors):
            return None
        if total == 0:
            return 0.0
        residual = sum(e * e * layer.total_energy for e, layer in zip(errors, self.layers, strict=True))
        return math.sqrt(residual / total)

    def sweep(self) -> list[dict]:
        """One row per swept rank: ``{"rank", "rel_error", "params", "bytes"}``."""
        rows = []
        for rank in self.ranks:
            params = self._params([rank] * len(self.layers))
            rows.append({"rank": rank, "rel_error": self.overall_error(rank), "params": params,
                         "bytes": params * self.itemsize})
        return rows

    def recommendation(self) -> dict | None:
        """Per-layer ranks and one global rank meeting the bound; None when no target was given.

        Returns:
            ``{"criterion", "value", "per_layer": {name: rank or None}, "params", "bytes", "max_layer_rank",
            "global_rank", "global_rel_error"}`` (params / bytes of the per-layer choice, None if incomplete).
        """
        if self.bound is None or self.criterion is None:
            return None
        per_layer = {layer.name: layer.rank_for(self.bound) for layer in self.layers}
        known = None not in per_layer.values()
        params = self._params(list(per_layer.values())) if known else None
        global_rank = next(
            (r for r in range(1, self.max_rank + 1) if (e := self.overall_error(r)) is not None
             and e <= self.bound * (1 + TOLERANCE)),
            None,
        )
        return {
            "criterion": self.criterion[0],
            "value": self.criterion[1],
            "per_layer": per_layer,
            "params": params,
            "bytes": params * self.itemsize if params is not None else None,
            "max_layer_rank": max(per_layer.values(), default=0) if known else None,
            "global_rank": global_rank,
            "global_rel_error": self.overall_error(global_rank) if global_rank is not None else None,
        }

    def to_json(self) -> dict:
        """``{"layers": [...], "sweep": [...], "recommendation": {...} | null, "summary": {...}}``."""
        rec = self.recommendation()
        layers = [
            {
                "name": layer.name,
                "tensor": layer.tensor,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "norm": math.sqrt(layer.total_energy),
                "singular_values": layer.singular_values.tolist(),
                "complete": layer.complete,
                "tail_energy": layer.tail_energy,
                "rel_errors": {str(r): layer.rel_error(r) for r in self.ranks},
                "recommended_rank": rec["per_layer"][layer.name] if rec else None,
            }
            for layer in self.layers
        ]
        summary = {
            "layers": len(self.layers),
            "max_rank": self.max_rank,
            "exact": self.exact,
            "dtype": self.dtype,
            "full_delta_params": sum(layer.shape[0] * layer.shape[1] for layer in self.layers),
            "unchanged": self.unchanged,
            "changed_whole": [name for name, _ in self.changed_whole],
            "only_in_base": self.only_in_base,
            "only_in_tuned": self.only_in_tuned,
            "mismatched": self.mismatched,
        }
        return {"layers": layers, "sweep": self.sweep(), "recommendation": rec, "summary": summary}


def _bound(target_error: float | None, energy: float | None) -> tuple[float | None, tuple[str, float] | None]:
    if target_error is not None and energy is not None:
        raise LoratoolsError("give one of --target-error and --energy, not both")
    if target_error is not None:
        if not 0 <= target_error < 1:
            raise LoratoolsError(f"--target-error {target_error} is out of range; it must be a fraction in [0, 1)")
        return target_error, ("target_error", target_error)
    if energy is not None:
        if not 0 < energy <= 1:
            raise LoratoolsError(f"--energy {energy} is out of range; it must be a fraction in (0, 1]")
        return math.sqrt(1 - energy), ("energy", energy)
    return None, None


def rank_spectrum(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    max_rank: int = 128,
    exact: bool = False,
    target_error: float | None = None,
    energy: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> SpectrumReport:
    """The leading spectra of every true delta tuned − base, streamed one layer pair at a time.

    Args:
        ranks: ranks to sweep (each ≥ 1).
        max_rank: how many singular values to compute per layer (raised to max(ranks)); ignored with `exact`.
        exact: compute the full spectrum with ``torch.linalg.svdvals`` instead of a randomized SVD.
        target_error, energy: at most one; the bound per-layer and global rank recommendations must meet.
        include, exclude: tensor patterns, as for ``extract`` (`plan.matches`).
        device: where the SVDs run ("cpu", "cuda").
        progress: called as ``progress(done, total, tensor_name)`` after each tensor.
    Returns:
        A SpectrumReport; each layer holds S (k,) with k = min(max(max_rank, max(ranks)), rows, cols).
    Example:
        >>> report = rank_spectrum("fixtures/llama-base", "fixtures/llama-tuned", ranks=[4, 8], energy=0.99)
        >>> report.recommendation()["global_rank"]
        4
    """
    ranks = sorted(set(int(r) for r in ranks))
    if not ranks or ranks[0] < 1:
        raise LoratoolsError(f"--ranks {','.join(map(str, ranks))}: give ranks ≥ 1, e.g. --ranks 4,8,16,32,64")
    if max_rank < 1:
        raise LoratoolsError(f"--max-rank {max_rank} must be ≥ 1")
    bound, criterion = _bound(target_error, energy)
    k = max(max_rank, ranks[-1])
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        plan = plan_extract(base_index, tuned_index, include=include, exclude=exclude, skip_mismatched=True)
        dtype = tuned_index.info(plan.pairs[0].tensor).dtype if plan.pairs else torch.float32
        report = SpectrumReport(
            [], ranks, k, exact, dtype.itemsize, str(dtype).removeprefix("torch."), bound, criterion,
            only_in_base=plan.only_in_base, only_in_tuned=plan.only_in_tuned,
            mismatched=[name for name, _, _ in plan.mismatched],
        )
        todo = len(plan.pairs) + len(plan.whole)
        # as extract reads them: one ΔW at a time in one reused workspace, the next pairs read ahead
        deltas = layer_deltas(base_index, tuned_index, plan.pairs, device=device, reuse=True)
        for done, delta in enumerate(deltas, 1):
            pair = delta.pair
            if delta.energy == 0:
                report.unchanged += 1
            else:
                report.layers.append(_layer_spectrum(pair.module, pair.tensor, pair.kind, delta, k, exact, seed))
            if progress is not None:
                progress(done, todo, pair.tensor)
        for done, whole in enumerate(plan.whole, len(plan.pairs) + 1):
            b, t = base_index.get(whole.tensor), tuned_index.get(whole.tensor)
            if torch.equal(b, t):
                report.unchanged += 1
            else:
                report.changed_whole.append((whole.tensor, tuple(b.shape)))
            if progress is not None:
                progress(done, todo, whole.tensor)
    return report


def _layer_spectrum(
    name: str, tensor: str, kind: str, delta: LayerDelta, k: int, exact: bool, seed: int
) -> LayerSpectrum:
    """The top-k (or full) spectrum of one layer's (rows, cols) ΔW."""
    matrix = delta.matrix
    full = min(matrix.shape)
    if exact:
        s, tail = torch.linalg.svdvals(matrix), 0.0
    else:
        U, s, Vh = randomized_svd(matrix, min(k, full), seed=seed, total_energy=delta.energy)
        tail = 0.0 if len(s) == full else residual_energy(matrix, U * s, Vh)
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    return LayerSpectrum(name, tensor, kind, shape, s.float().cpu(), delta.energy, len(s) == full, tail)
