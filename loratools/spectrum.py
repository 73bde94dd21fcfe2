"""`spectrum BASE TUNED`: what rank a LoRA of this fine-tune needs, from the spectra of the true deltas.

For every layer pair (`plan.plan_extract`), ΔW = tuned − base is read, one pair at a time, as its 2-D LoRA
matrix (`deltas.layer_deltas`); its energy ‖ΔW‖²_F is summed exactly (float64) and its top k singular values
come from a seeded randomized SVD (`rsvd.randomized_svd`), or all of them with an exact SVD. The energy beyond the top k (the tail)
is ‖ΔW‖²_F − Σ_{i<k} σ_i², measured as ‖ΔW − U_k Σ_k V_kᵀ‖²_F (the same number without the cancellation that
subtracting two nearly equal energies suffers), so the error of every truncation up to k is known without the
rest of the spectrum: ‖ΔW − ΔW_r‖²_F = Σ_{r≤i<k} σ_i² + tail.

Decisions:
- k = min(max(num_singular_values, largest swept rank), out, in): every swept rank is covered by the computed
  values.
- The overall error weights layers by ‖ΔW‖²_F: √(Σ_l ‖ΔW_l − ΔW_l,r‖²_F / Σ_l ‖ΔW_l‖²_F), the error of the
  whole set of deltas as one vector (`linalg.pooled_rel_error`).
- Mismatched shapes are listed, never an error: the command reports and writes nothing.
- Adapter size at rank r counts min(r, out, in)·(out + in) parameters per layer, in the tuned checkpoint's
  dtype (what ``extract`` writes by default).
- ``max_error`` E: a layer's rank is the smallest r with error ≤ E; ``energy`` F: the smallest r keeping
  Σ_{i<r} σ_i² ≥ F·‖ΔW‖²_F (error ≤ √(1 − F)). None when k values are not enough. The global rank is the
  smallest r ≤ k whose overall error meets the same bound; ``max_layer_rank`` is the rank at which every
  layer meets it on its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from loratools.checkpoint import open_checkpoint
from loratools.deltas import LayerDelta, TensorChange, layer_deltas, tensor_change
from loratools.dtypes import dtype_name
from loratools.errors import LoratoolsError
from loratools.linalg import pooled_rel_error, residual_energy
from loratools.options import Selection, SvdSettings, check_policy_value
from loratools.plan import Pairing, plan_extract
from loratools.progress import Progress
from loratools.rsvd import compute_dtype, randomized_svd, svd_device

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
        num_singular_values: k, the singular values computed per layer (fewer on smaller layers).
        exact: whether every layer's spectrum is complete (exact SVD).
        itemsize: bytes per parameter of the tuned checkpoint's dtype.
        bound: the recommendation's error bound (``max_error``, or √(1 − energy)), None when not asked.
        criterion: "max_error" or "energy" with its value, for display.
        unchanged: number of tensors equal in base and tuned (layers and whole tensors).
        changed_whole: changed tensors that cannot be a LoRA (norms, biases, ...).
        pairing: names in one checkpoint only, and shape mismatches (listed, not compared).
    """

    layers: list[LayerSpectrum]
    ranks: list[int]
    num_singular_values: int
    exact: bool
    itemsize: int
    dtype: str
    bound: float | None = None
    criterion: tuple[str, float] | None = None
    unchanged: int = 0
    changed_whole: list[TensorChange] = field(default_factory=list)
    pairing: Pairing = field(default_factory=Pairing)

    @property
    def notes(self) -> list[str]:
        """Warnings for the user: none (everything is in the report)."""
        return []

    def _params(self, ranks: Sequence[int]) -> int:
        return sum(min(r, *layer.shape) * sum(layer.shape) for r, layer in zip(ranks, self.layers, strict=True))

    def overall_error(self, rank: int) -> float | None:
        """The ‖ΔW‖²-weighted error of truncating every layer at `rank` (None when a layer's values stop short)."""
        errors = [layer.rel_error(rank) for layer in self.layers]
        if any(e is None for e in errors):
            return None
        return pooled_rel_error((e * e * layer.total_energy, layer.total_energy)
                                for e, layer in zip(errors, self.layers, strict=True) if e is not None)

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
        found = [rank for rank in per_layer.values() if rank is not None]
        known = len(found) == len(per_layer)
        params = self._params(found) if known else None
        global_rank = next(
            (r for r in range(1, self.num_singular_values + 1) if (e := self.overall_error(r)) is not None
             and e <= self.bound * (1 + TOLERANCE)),
            None,
        )
        return {
            "criterion": self.criterion[0],
            "value": self.criterion[1],
            "per_layer": per_layer,
            "params": params,
            "bytes": params * self.itemsize if params is not None else None,
            "max_layer_rank": max(found, default=0) if known else None,
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
            "num_singular_values": self.num_singular_values,
            "exact": self.exact,
            "dtype": self.dtype,
            "full_delta_params": sum(layer.shape[0] * layer.shape[1] for layer in self.layers),
            "unchanged": self.unchanged,
            "changed_whole": [change.name for change in self.changed_whole],
            **self.pairing.to_json(),
        }
        return {"layers": layers, "sweep": self.sweep(), "recommendation": rec, "summary": summary}


def _bound(max_error: float | None, energy: float | None) -> tuple[float | None, tuple[str, float] | None]:
    if max_error is not None and energy is not None:
        raise LoratoolsError("give one of --max-error and --energy, not both")
    if max_error is not None:
        check_policy_value("max_error", max_error)
        return max_error, ("max_error", max_error)
    if energy is not None:
        check_policy_value("energy", energy)
        return math.sqrt(1 - energy), ("energy", energy)
    return None, None


def rank_spectrum(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    num_singular_values: int = 128,
    max_error: float | None = None,
    energy: float | None = None,
    selection: Selection = Selection(),
    svd: SvdSettings = SvdSettings(),
    progress: Progress | None = None,
) -> SpectrumReport:
    """The leading spectra of every true delta tuned − base, streamed one layer pair at a time.

    Args:
        ranks: ranks to sweep (each ≥ 1).
        num_singular_values: how many singular values to compute per layer (raised to max(ranks)); all of
            them with ``svd.exact``.
        max_error, energy: at most one; the bound per-layer and global rank recommendations must meet.
        selection: include / exclude patterns, as for ``extract``; mismatched shapes are always listed.
        svd: randomized or exact SVD, seed, precision and device (`SvdSettings`).
        progress: called as ``progress(done, total, tensor_name)`` after each tensor.
    Returns:
        A SpectrumReport; each layer holds S (k,) with k = min(max(num_singular_values, max(ranks)), rows, cols).
    Example:
        >>> report = rank_spectrum("fixtures/llama-base", "fixtures/llama-tuned", ranks=[4, 8], energy=0.99)
        >>> report.recommendation()["global_rank"]
        4
    """
    ranks = sorted(set(int(r) for r in ranks))
    if not ranks or ranks[0] < 1:
        raise LoratoolsError(f"--ranks {','.join(map(str, ranks))}: give ranks ≥ 1, e.g. --ranks 4,8,16,32,64")
    if num_singular_values < 1:
        raise LoratoolsError(f"--singular-values {num_singular_values} must be ≥ 1")
    bound, criterion = _bound(max_error, energy)
    k = max(num_singular_values, ranks[-1])
    device = svd_device(svd)
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        plan = plan_extract(base_index, tuned_index, selection=replace(selection, skip_mismatched=True))
        dtype = tuned_index.info(plan.pairs[0].tensor).dtype if plan.pairs else torch.float32
        report = SpectrumReport(
            [], ranks, k, svd.exact, dtype.itemsize, dtype_name(dtype), bound, criterion, pairing=plan.pairing,
        )
        todo = len(plan.pairs) + len(plan.whole)
        # as extract reads them: one ΔW at a time in one reused workspace, the next pairs read ahead
        deltas = layer_deltas(base_index, tuned_index, plan.pairs, dtype=compute_dtype(svd), device=device, reuse=True)
        for done, delta in enumerate(deltas, 1):
            pair = delta.pair
            if delta.energy == 0:
                report.unchanged += 1
            else:
                report.layers.append(_layer_spectrum(delta, k, svd.for_layer(pair.module)))
            if progress is not None:
                progress(done, todo, pair.tensor)
        for done, whole in enumerate(plan.whole, len(plan.pairs) + 1):
            change = tensor_change(base_index, tuned_index, whole.tensor)
            if change is None:
                report.unchanged += 1
            else:
                report.changed_whole.append(change)
            if progress is not None:
                progress(done, todo, whole.tensor)
    return report


def _layer_spectrum(delta: LayerDelta, k: int, svd: SvdSettings) -> LayerSpectrum:
    """The top-k (or full) spectrum of one layer's (rows, cols) ΔW."""
    matrix, pair = delta.matrix, delta.pair
    full = min(matrix.shape)
    if svd.exact:  # singular values only: several times faster than the full SVD with its vectors
        s, tail = torch.linalg.svdvals(matrix.to(compute_dtype(svd))), 0.0
    else:
        U, s, Vh = randomized_svd(matrix, min(k, full), settings=svd, total_energy=delta.energy)
        tail = 0.0 if len(s) == full else residual_energy(matrix, U * s, Vh)
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    return LayerSpectrum(pair.module, pair.tensor, pair.kind, shape, s.float().cpu(), delta.energy, len(s) == full, tail)
