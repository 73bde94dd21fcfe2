"""Seeded randomized truncated SVD (Halko, Martinsson & Tropp 2011) with adaptive power iterations, and
`low_rank`: the truncation a rank policy asks for, with its exact error. Pure tensor math; no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratools.dtypes import PRECISIONS
from loratools.errors import LoratoolsError
from loratools.linalg import frobenius_energy, residual_energy
from loratools.options import RankPolicy, SvdSettings
from loratools.policies import choose_rank

FIRST_SKETCH = 32  # dynamic policies start with this many usable singular values, then double
MEASURE_BELOW = 0.05  # errors below this are measured from the residual; above, total − Σσ² is accurate enough
ORTHONORMAL_TOLERANCE = 1e-4  # largest |QᵀQ − I| entry accepted from CholeskyQR2 before Householder QR is used
POWER_GAIN = 0.005  # adaptive power iterations stop once what further ones would gain is below 0.5% of the error
MAX_POWER_ITERS = 6
FURTHER_GAINS = 10  # where gains do not shrink, what further power iterations could gain is taken as 10 more


def compute_dtype(settings: SvdSettings) -> torch.dtype:
    """The dtype ΔW is formed and factored in: float32 or float64 (``settings.precision``)."""
    return PRECISIONS[settings.precision]


def svd_device(settings: SvdSettings) -> torch.device:
    """``settings.device`` as a torch.device, checked to exist. Raises LoratoolsError with the fix."""
    try:
        device = torch.device(settings.device)
    except RuntimeError:
        raise LoratoolsError(f"--device {settings.device!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoratoolsError(
            f"--device {settings.device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu,"
            " or install a CUDA build of torch on a machine with a GPU"
        )
    return device


def describe_svd(settings: SvdSettings) -> str:
    """One line for reports, e.g. ``randomized SVD (fp32, oversample max(10, rank), adaptive …, seed 0)``."""
    if settings.exact:
        return f"exact SVD ({settings.precision})"
    over = "max(10, rank)" if settings.oversample is None else str(settings.oversample)
    iterations = (f"adaptive power iterations (1–{MAX_POWER_ITERS}, until more would gain < {POWER_GAIN:.1%})"
                  if settings.power_iters is None else f"{settings.power_iters} power iterations")
    return f"randomized SVD ({settings.precision}, oversample {over}, {iterations}, seed {settings.seed})"


def orthonormal_basis(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin QR of a tall Y (rows, w), w ≤ rows, by CholeskyQR2: Q (rows, w) orthonormal, R (w, w), Y = Q·R.

    Two rounds of Q ← Q·L⁻ᵀ with QᵀQ = L·Lᵀ cost two w×w Gram products and triangular solves: 3–5× faster
    than Householder QR on the (rows, 32) sketches of the randomized SVD, and one host sync on a GPU.
    CholeskyQR2 is exact to rounding while Y's condition number is below ~1/√eps (fp32: ~3000); past that (an
    exactly low-rank ΔW makes some sketch columns pure rounding noise) the Cholesky factorization fails or the
    result is visibly not orthonormal, and Householder QR is used instead. R is upper triangular in both cases
    (singular values of Y = those of R).
    """
    first = torch.linalg.cholesky_ex(Y.T @ Y).L
    Q = torch.linalg.solve_triangular(first.T, Y, upper=True, left=False)
    second = torch.linalg.cholesky_ex(Q.T @ Q).L
    Q = torch.linalg.solve_triangular(second.T, Q, upper=True, left=False)
    gram = Q.T @ Q
    gram.diagonal().sub_(1)
    if bool(gram.abs().max() <= ORTHONORMAL_TOLERANCE):  # False for nan, which a failed Cholesky leaves
        return Q, second.T @ first.T
    Q, R = torch.linalg.qr(Y)
    return Q, R


def _orthonormal_complement(Y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of Y's columns after projecting out span(Q) (twice, for stability)."""
    for _ in range(2 if Q.shape[1] else 0):
        Y = Y - Q @ (Q.T @ Y)
    return orthonormal_basis(Y)[0]


@dataclass(frozen=True)
class _Block:
    """A block of sketch columns: Y (rows, w) orthonormal, MtY = Mᵀ·Y (cols, w), and the power iterations run."""

    Y: torch.Tensor
    MtY: torch.Tensor
    power_iters: int


def _sketch_block(
    M: torch.Tensor, Q: torch.Tensor, width: int, watch: int, power_iters: int | None, outside: float,
    gen: torch.Generator,
) -> _Block:
    """`width` new orthonormal columns, orthogonal to Q (rows, k), spanning more of M's dominant range.

    With a fixed `power_iters`, that many power iterations. With None, adaptive: after each iteration the
    energy of M left outside span(Q) and the best rank-`watch` part of the new block is known exactly from the
    w×w factor R of Mᵀ·Y = Z·R (`outside` is M's energy outside span(Q)), and iterations stop as `_converged`
    decides: at least one, at most `MAX_POWER_ITERS`. Fine-tune-like spectra (a power law over a noise floor)
    take 2 and end within 0.05% of the Eckart–Young optimum at rank `watch`; slowly converging ones take more
    and stay within 1%.

    Mᵀ·Y doubles as the projection the final SVD needs: each iteration costs two passes over M, the whole
    block 2 + 2·iterations.
    """
    omega = torch.randn(M.shape[1], width, generator=gen, dtype=M.dtype).to(M.device)
    Y = _orthonormal_complement(M @ omega, Q)
    errors: list[float] = []
    done = 0
    while True:
        MtY = M.T @ Y
        if done == (MAX_POWER_ITERS if power_iters is None else power_iters):
            return _Block(Y, MtY, done)
        Z, R = orthonormal_basis(MtY)
        if power_iters is None:
            captured = torch.linalg.svdvals(R).double()[:watch]
            errors.append(math.sqrt(max(0.0, outside - float((captured * captured).sum()))))
            if _converged(errors):
                return _Block(Y, MtY, done)
        Y = _orthonormal_complement(M @ Z, Q)
        done += 1


def _converged(errors: list[float]) -> bool:
    """Whether adaptive power iterations can stop, given the errors after 0, 1, … iterations so far.

    Power iterations shrink the error roughly geometrically, so with the last two gains g₁, g₂ (ratio
    ρ = g₂/g₁) further iterations could still gain about g₂·ρ/(1 − ρ). Convergence can slow down (a fast drop
    while the large singular values settle, then a slow one among the near-equal values around rank k), so the
    estimate is never taken below one more gain g₂, and where gains do not shrink (ρ ≥ 1, as on nearly flat
    spectra with tiny, irregular gains) it is capped at `FURTHER_GAINS`·g₂. Stop once the estimate is below
    `POWER_GAIN` of the error, or when an iteration gains nothing (converged, or rounding noise on an exactly
    low-rank matrix). Needs at least one power iteration.
    """
    if len(errors) < 2:
        return False
    gain = errors[-2] - errors[-1]
    if gain <= 0:
        return True
    before = errors[-3] - errors[-2] if len(errors) > 2 else 0.0
    ratio = gain / before if before > 0 else math.inf
    further = ratio / (1 - ratio) if ratio < 1 else math.inf
    return gain * min(max(further, 1.0), FURTHER_GAINS) <= POWER_GAIN * errors[-1]


def _projected_svd(Q: torch.Tensor, MtQ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of Q·Qᵀ·M from orthonormal Q (rows, w) and MtQ = Mᵀ·Q (cols, w): U (rows, w), S (w,), Vh (w, cols).

    Factors the tall Mᵀ·Q rather than the wide Qᵀ·M: LAPACK is about twice as fast on it.
    """
    Ut, S, Vht = torch.linalg.svd(MtQ, full_matrices=False)
    return Q @ Vht.T, S, Ut.T


def _oversample(k: int, oversample: int | None) -> int:
    return max(10, k) if oversample is None else oversample


def randomized_svd(
    M: torch.Tensor,
    rank: int,
    *,
    settings: SvdSettings = SvdSettings(),
    total_energy: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets of M by a seeded randomized range finder (Halko, Martinsson & Tropp 2011).

    Sketches M with rank + oversample Gaussian columns, runs power iterations (`power_iters` of them, or
    adaptively: see `_sketch_block`), each followed by re-orthonormalization (CholeskyQR2), then takes the
    exact SVD of the small projected matrix Qᵀ·M. When the sketch would be as wide as the matrix, the exact
    SVD of M is taken instead (same cost).

    Args:
        M: (rows, cols), any floating dtype and device; computed in ``settings.dtype`` (float32 or float64).
        rank: how many triplets to return; clamped to min(rows, cols).
        settings: oversample, power iterations, seed (the Gaussian test matrix is drawn on the CPU, so results
            do not depend on the device) and precision; ``exact`` takes the full SVD. The device is M's.
        total_energy: ‖M‖²_F when the caller has it already (adaptive iterations need it; see `frobenius_energy`).
    Returns:
        U (rows, k), S (k,), Vh (k, cols) with k = min(rank, rows, cols), S descending.

    Example:
        >>> U, S, Vh = randomized_svd(torch.randn(512, 256), 16)
        >>> U.shape, S.shape, Vh.shape
        (torch.Size([512, 16]), torch.Size([16]), torch.Size([16, 256]))
    """
    M = M.to(compute_dtype(settings))
    k = min(rank, *M.shape)
    if settings.exact or k + _oversample(k, settings.oversample) >= min(M.shape):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    if settings.power_iters is None and total_energy is None:
        total_energy = frobenius_energy(M)
    block = _sketch_block(M, M.new_zeros(M.shape[0], 0), k + _oversample(k, settings.oversample), k,
                          settings.power_iters, total_energy or 0.0, torch.Generator().manual_seed(settings.seed))
    U, S, Vh = _projected_svd(block.Y, block.MtY)
    return U[:, :k], S[:k], Vh[:k]


@dataclass(frozen=True)
class LowRank:
    """A truncated SVD M ≈ U·diag(S[:rank])·Vh and what it leaves out.

    Attributes:
        U: (rows, rank) orthonormal columns.
        S: (k,) every leading singular value computed, k ≥ rank (all min(rows, cols) of them when `complete`).
        Vh: (rank, cols) orthonormal rows.
        rank: the rank kept.
        total_energy: ‖M‖²_F (float64, exact).
        rel_error: ‖M − U·diag(S)·Vh‖_F / ‖M‖_F (0 for an all-zero M): sqrt(1 − Σσ²/‖M‖²), exact for a
            projection, or measured from the residual when below 5% (where that difference cancels).
        complete: S holds the whole spectrum (exact SVD).
        clamped: a fixed rank above min(rows, cols) was asked for and lowered to it.
        power_iters: power iterations run (the most in any sketch block; 0 for an exact SVD).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    rank: int
    total_energy: float
    rel_error: float
    complete: bool
    clamped: bool = False
    power_iters: int = 0

    @property
    def energy(self) -> float:
        """Fraction of ‖M‖²_F kept: 1 − rel_error²."""
        return 1.0 - self.rel_error**2

    @property
    def optimal_rel_error(self) -> float | None:
        """Eckart–Young error of the best rank-`rank` approximation, sqrt(Σ_{i≥rank} σ_i² / ‖M‖²_F), summed over
        the tail (no cancellation); None unless the spectrum is complete."""
        if not self.complete:
            return None
        return math.sqrt(float((self.S[self.rank:].double() ** 2).sum()) / self.total_energy) if self.total_energy else 0.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (rows, rank), right (rank, cols)) with left·right = U·diag(S)·Vh, √S on each side."""
        root = self.S[: self.rank].sqrt()
        return self.U * root, root[:, None] * self.Vh


def low_rank(
    M: torch.Tensor,
    policy: RankPolicy,
    *,
    settings: SvdSettings = SvdSettings(),
    total_energy: float | None = None,
) -> LowRank:
    """The truncated SVD of M at the rank `policy` asks for, by randomized SVD (exact SVD with ``settings.exact``).

    Fixed ranks take one randomized sketch. Dynamic policies never fall back to a full SVD: the energy of M is
    known exactly, so the sketch grows (32, 64, 128 … usable singular values, capped by ``policy.max_rank``)
    until `choose_rank` can decide from the values captured so far. A captured value underestimates the true
    one, so energy and max-error policies may keep one extra rank but always meet their bound, which holds for
    the measured `rel_error`. A sketch as wide as the matrix is the exact SVD (small layers).

    Args:
        M: (rows, cols), any floating dtype and device; computed in ``settings.dtype`` (float32 or float64).
        policy: the rank policy; a fixed rank above min(rows, cols) is clamped (``clamped`` is set).
        settings: ``exact`` for a full SVD; else oversample (extra sketch columns beyond the usable ones),
            power iterations per sketch block (None: adaptive, `_sketch_block`) and the seed.
        total_energy: ‖M‖²_F when the caller has it already (see `frobenius_energy`).
    Returns:
        A LowRank; rank 0 with empty factors when M is all zeros.
    Raises:
        LoratoolsError when M holds inf or nan.

    Example:
        >>> result = low_rank(delta, RankPolicy("energy", 0.95))
        >>> B, A = result.factors()          # (rows, r), (r, cols)
    """
    M = M.to(compute_dtype(settings))
    rows, cols = M.shape
    full = min(rows, cols)
    total = frobenius_energy(M) if total_energy is None else float(total_energy)
    if not math.isfinite(total):
        raise LoratoolsError("the matrix holds non-finite values (inf or nan); a truncated SVD is undefined")
    clamped = policy.kind == "rank" and policy.value > full
    if total == 0:
        return LowRank(M.new_zeros(rows, 0), M.new_zeros(0), M.new_zeros(0, cols), 0, 0.0, 0.0, True, clamped)
    cap = min(int(policy.value), full) if policy.kind == "rank" else min(policy.max_rank, full)
    usable = cap if policy.kind == "rank" else min(FIRST_SKETCH, cap)
    gen = torch.Generator().manual_seed(settings.seed)
    Q, MtQ, outside, iterations = M.new_zeros(rows, 0), M.new_zeros(cols, 0), total, 0
    while True:
        width = usable + _oversample(usable, settings.oversample)
        if settings.exact or width >= full:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            rank = choose_rank(S, policy, total)
            return _finish(M, U, S, Vh, cap if rank is None else rank, total, True, clamped, iterations)
        # a fixed rank watches its leading `usable` values; a growing sketch watches the whole new block
        watch = usable if policy.kind == "rank" else width - Q.shape[1]
        block = _sketch_block(M, Q, width - Q.shape[1], watch, settings.power_iters, outside, gen)
        Q, MtQ = torch.cat([Q, block.Y], dim=1), torch.cat([MtQ, block.MtY], dim=1)
        iterations = max(iterations, block.power_iters)
        U, S, Vh = _projected_svd(Q, MtQ)
        rank = choose_rank(S[:usable], policy, total)
        if rank is not None:
            return _finish(M, U, S[:usable], Vh, rank, total, False, clamped, iterations)
        outside = total - float((S.double() ** 2).sum())
        usable = min(2 * usable, cap)


def _finish(
    M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, total: float, complete: bool,
    clamped: bool, power_iters: int,
) -> LowRank:
    """The LowRank with its error: U·diag(S)·Vh projects M on span(U), so ‖M − U·diag(S)·Vh‖² = ‖M‖² − Σσ_i²
    exactly; that difference cancels badly when the error is small, which is then measured directly."""
    U, Vh = U[:, :rank], Vh[:rank]
    result = LowRank(U, S, Vh, rank, total, 0.0, complete, clamped, power_iters)
    inferred = max(0.0, 1.0 - float((S[:rank].double() ** 2).sum()) / total)
    if inferred < MEASURE_BELOW**2:
        inferred = residual_energy(M, *result.factors()) / total
    return LowRank(U, S, Vh, rank, total, math.sqrt(min(1.0, inferred)), complete, clamped, power_iters)
