"""Randomized truncated SVD and rank policies, checked against torch.linalg.svd and the policies' definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.errors import LoratoolsError
from loratools.linalg import frobenius_energy, residual_energy
from loratools.options import RankPolicy, SvdSettings
from loratools.rsvd import MAX_POWER_ITERS, low_rank, orthonormal_basis, randomized_svd


def with_spectrum(rows: int, cols: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(rows, cols) float32 matrix U·diag(s)·Vᵀ with random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.T).float()


def optimal_error(M: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(M.double())
    return float((s[rank:] ** 2).sum().sqrt() / s.norm())


def measured_error(M: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    return float((M.double() - left.double() @ right.double()).norm() / M.double().norm())


# ---- exact recovery and near-optimality ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (64, 500), (40, 30)])
def test_rank_r_matrix_is_recovered_exactly(shape):
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(shape[0], 5, generator=gen) @ torch.randn(5, shape[1], generator=gen)
    result = low_rank(M, RankPolicy("rank", 5))
    left, right = result.factors()
    assert result.rank == 5
    assert measured_error(M, left, right) < 1e-5
    assert result.rel_error < 1e-5


def test_randomized_svd_matches_full_svd_on_leading_triplets():
    M = with_spectrum(400, 300, 0.8 ** torch.arange(300.0))
    U, S, Vh = randomized_svd(M, 8)
    ref = torch.linalg.svdvals(M.double())[:8]
    assert U.shape == (400, 8) and S.shape == (8,) and Vh.shape == (8, 300)
    torch.testing.assert_close(S.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(8), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(80, 220),
    cols=st.integers(80, 220),
    rank=st.integers(1, 24),
    decay=st.floats(0.0, 3.0),
    floor=st.floats(0.0, 0.2),
    geometric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_randomized_error_is_within_one_percent_of_optimal(rows, cols, rank, decay, floor, geometric, seed):
    k = min(rows, cols)
    i = torch.arange(1, k + 1, dtype=torch.float64)
    # a power law, or a geometric decay (base 0.9 … 1: slow, where power iterations converge slowest), + a floor
    s = ((1 - decay / 30) ** i if geometric else i**-decay) + floor
    M = with_spectrum(rows, cols, s, seed)
    result = low_rank(M, RankPolicy("rank", rank), settings=SvdSettings(seed=seed))
    left, right = result.factors()
    error = measured_error(M, left, right)
    assert error <= 1.01 * optimal_error(M, rank) + 1e-6
    assert result.rel_error == pytest.approx(error, rel=1e-3, abs=1e-6)  # the reported error is the true one


@pytest.mark.parametrize("rank_of_y", [32, 5], ids=["well-conditioned", "rank-deficient"])
def test_orthonormal_basis_spans_y_even_when_y_is_rank_deficient(rank_of_y):
    gen = torch.Generator().manual_seed(2)
    Y = torch.randn(500, rank_of_y, generator=gen) @ torch.randn(rank_of_y, 32, generator=gen)
    Q, R = orthonormal_basis(Y)  # rank-deficient Y: CholeskyQR2 fails, Householder QR takes over
    torch.testing.assert_close(Q.T @ Q, torch.eye(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q @ R, Y, atol=1e-4 * float(Y.abs().max()), rtol=0)
    assert torch.equal(R, R.triu())


def test_adaptive_power_iterations_run_longer_where_convergence_is_slow():
    i = torch.arange(1, 301, dtype=torch.float64)
    fast = with_spectrum(400, 300, 0.7**i)  # σ₁₇/σ₁ ≈ 0.003: any sketch captures the top 16 at once
    slow = with_spectrum(400, 300, i**-0.3 + 0.05)  # near-equal values around rank 16: 1.06× the optimum at q = 0
    runs = {name: low_rank(M, RankPolicy("rank", 16)) for name, M in (("fast", fast), ("slow", slow))}
    assert 1 <= runs["fast"].power_iters < runs["slow"].power_iters <= MAX_POWER_ITERS
    for name, M in (("fast", fast), ("slow", slow)):
        assert measured_error(M, *runs[name].factors()) <= 1.01 * optimal_error(M, 16)
    assert low_rank(slow, RankPolicy("rank", 16), settings=SvdSettings(power_iters=0)).power_iters == 0  # a fixed count is kept


# ---- rank policies against their definitions on the full spectrum --------------------------------------------

SPECTRUM = 0.93 ** torch.arange(150, dtype=torch.float64)  # distinct, slowly decaying: ranks 20..60 need a grown sketch


def definition_rank(s: torch.Tensor, kind: str, value: float) -> int:
    """The rank each policy's definition asks for, by a plain loop over the full spectrum."""
    energies = [float(x) ** 2 for x in s]
    total = sum(energies)
    for k in range(len(s) + 1):
        kept = sum(energies[:k])
        if kind == "energy" and kept >= value * total:
            return k
        if kind == "max_error" and math.sqrt(max(total - kept, 0) / total) <= value:
            return k
        if kind == "sv_ratio" and (k == len(s) or float(s[k]) < float(s[0]) / value):
            return k
        if kind == "threshold" and (k == len(s) or float(s[k]) <= value):
            return k
    raise AssertionError("unreachable")


def value_for_rank(s: torch.Tensor, kind: str, k: int) -> float:
    """A policy value that lies mid-way between what rank k-1 and rank k would need."""
    e = (s**2).cumsum(0) / (s**2).sum()
    if kind == "energy":
        return float((e[k - 2] + e[k - 1]) / 2)
    if kind == "max_error":
        return float(((1 - e[k - 2]).sqrt() + (1 - e[k - 1]).sqrt()) / 2)
    cut = float((s[k - 1] * s[k]).sqrt())
    return float(s[0]) / cut if kind == "sv_ratio" else cut


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("kind", ["energy", "max_error", "sv_ratio", "threshold"])
@pytest.mark.parametrize("target", [3, 25, 60])
def test_dynamic_policy_picks_the_rank_of_its_definition(kind, target, exact):
    M = with_spectrum(300, 200, SPECTRUM, seed=target)
    s = torch.linalg.svdvals(M.double())
    value = value_for_rank(s, kind, target)
    assert definition_rank(s, kind, value) == target
    result = low_rank(M, RankPolicy(kind, value, max_rank=128), settings=SvdSettings(exact=exact))
    assert result.rank == target


def test_dynamic_policy_is_capped_by_max_rank():
    M = with_spectrum(300, 200, SPECTRUM)
    assert low_rank(M, RankPolicy("energy", 1.0, max_rank=10)).rank == 10


def test_dynamic_policy_keeps_everything_when_asked_on_a_small_layer():
    M = with_spectrum(30, 20, torch.linspace(1, 0.5, 20))
    result = low_rank(M, RankPolicy("energy", 1.0, max_rank=128))
    assert result.rank == 20 and result.rel_error < 1e-5


def test_dynamic_policy_grows_the_sketch_without_a_full_svd(monkeypatch):
    M = with_spectrum(500, 400, SPECTRUM)
    seen = []
    real_svd = torch.linalg.svd

    def recording_svd(A, *args, **kwargs):
        seen.append(tuple(A.shape))
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    result = low_rank(M, RankPolicy("energy", 0.999, max_rank=128))
    assert result.rank > 40
    assert len(seen) >= 2, "the sketch should have grown at least once"
    assert all(min(shape) < 400 for shape in seen), seen


def test_fixed_rank_above_the_layer_is_clamped():
    M = torch.randn(12, 7)
    result = low_rank(M, RankPolicy("rank", 16))
    assert result.rank == 7 and result.clamped
    assert not low_rank(M, RankPolicy("rank", 7)).clamped
    assert result.rel_error < 1e-5


@pytest.mark.parametrize("policy", [RankPolicy("rank", 4), RankPolicy("energy", 0.9), RankPolicy("threshold", 0.0)])
def test_all_zero_matrix_has_rank_zero(policy):
    result = low_rank(torch.zeros(20, 10), policy)
    left, right = result.factors()
    assert result.rank == 0 and left.shape == (20, 0) and right.shape == (0, 10)
    assert result.rel_error == 0.0 and result.energy == 1.0


# ---- precision, determinism, reports ----------------------------------------------------------------------------


def test_same_seed_same_bits_and_precision_follows_dtype():
    M = with_spectrum(300, 200, SPECTRUM).to(torch.bfloat16)
    a = low_rank(M, RankPolicy("rank", 8), settings=SvdSettings(seed=3))
    b = low_rank(M, RankPolicy("rank", 8), settings=SvdSettings(seed=3))
    assert torch.equal(a.factors()[0], b.factors()[0]) and torch.equal(a.factors()[1], b.factors()[1])
    assert a.factors()[0].dtype == torch.float32
    assert low_rank(M, RankPolicy("rank", 8), settings=SvdSettings(precision="fp64")).factors()[0].dtype == torch.float64


def test_exact_reports_the_eckart_young_optimum():
    M = with_spectrum(120, 90, SPECTRUM[:90])
    result = low_rank(M, RankPolicy("rank", 10), settings=SvdSettings(exact=True))
    assert result.optimal_rel_error == pytest.approx(optimal_error(M, 10), rel=1e-4)
    assert result.rel_error == pytest.approx(result.optimal_rel_error, rel=1e-3)
    assert low_rank(M, RankPolicy("rank", 10)).optimal_rel_error is None


def test_energies_are_measured_in_float64():
    M = torch.full((3000, 3), 1e20)  # the square of each entry overflows float32
    assert frobenius_energy(M) == pytest.approx(9000 * 1e40)
    assert residual_energy(torch.eye(3), torch.eye(3), torch.eye(3)) == 0.0
    assert not math.isfinite(frobenius_energy(torch.tensor([[1.0, float("nan")]])))


def test_non_finite_matrix_is_refused():
    with pytest.raises(LoratoolsError, match="non-finite"):
        low_rank(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), RankPolicy("rank", 1))


def test_frobenius_energy_is_accurate_on_large_matrices():
    # torch's float32 norm of a 4096×4096 matrix is off by ~0.1%; every reported error is derived from this.
    # 1e-7 keeps reported errors exact to ~1e-5 relative even where 1 − Σσ²/‖M‖² is as small as 0.05².
    M = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(3)) * 3 + 1
    exact = float((M.double() ** 2).sum())
    assert abs(frobenius_energy(M) - exact) <= 1e-7 * exact
