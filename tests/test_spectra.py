"""Spectrum statistics: the exact factor spectrum against dense SVD, and each summary number by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import LoraModule
from loratools.cli.render import sparkline
from loratools.spectral import (
    effective_rank,
    module_singular_values,
    spectrum_stats,
    stable_rank,
    top_energy_fraction,
)
from tests.helpers import lora_modules

# any kind and dtype; the rank may exceed min(rows, cols) (then the spectrum is shorter); alphas tied to the rank too
MODULES = lora_modules(dtypes=(torch.float32, torch.float16, torch.bfloat16), sizes=(1, 12), ranks=(1, 9),
                       alphas=lambda rank: st.sampled_from([1.0, 8.0, 0.5 * rank]), rslora=(False, True))


def entropy_rank(values: list[float]) -> float:
    """exp(−Σ p log p) with p = σ / Σσ over the nonzero σ, by a plain loop (0 for an all-zero spectrum)."""
    total = math.fsum(values)
    if total == 0:
        return 0.0
    return math.exp(-math.fsum(v / total * math.log(v / total) for v in values if v > 0))


@settings(max_examples=30, deadline=None)
@given(MODULES)
def test_factor_spectrum_equals_svdvals_of_dense_delta(module):
    # ΔW by hand from the factors, as the LoRA matrix (transposing embedding/conv1d changes no singular value)
    b, a = module.B.double().reshape(module.B.shape[0], -1), module.A.double().reshape(module.A.shape[0], -1)
    scale = module.alpha / (math.sqrt(module.rank) if module.rslora else module.rank)
    expected = torch.linalg.svdvals(scale * b @ a)
    got = module_singular_values(module)
    k = min(module.rank, *expected.shape)
    assert got.dtype == torch.float32 and got.shape == (k,)
    assert torch.all(got[:-1] >= got[1:])
    tol = 1e-4 * float(expected[0]) + 1e-6
    torch.testing.assert_close(got.double(), expected[:k], atol=tol, rtol=1e-4)
    assert all(float(v) <= tol for v in expected[k:])  # nothing beyond the rank


def test_factor_spectrum_keeps_small_singular_values_and_handles_zero_factors():
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(300, 8, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 8, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -6, 8, dtype=torch.float64)  # six decades
    module = LoraModule("m", v.T.float(), (u * s).float(), alpha=8.0)
    expected = torch.linalg.svdvals(module.delta(torch.float64))[:8]
    got = module_singular_values(module).double()
    assert float((got - expected).abs().max()) <= 1e-6 * float(expected[0])
    untrained = LoraModule("z", torch.randn(4, 10, generator=gen), torch.zeros(6, 4), alpha=4.0)  # PEFT's B = 0
    assert torch.equal(module_singular_values(untrained), torch.zeros(4))


def test_effective_rank_uses_sigma_over_sum_of_sigma():
    # p = (3, 1) / 4; exp(-(0.75 ln 0.75 + 0.25 ln 0.25))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_stable_rank_and_top_energy():
    s = torch.tensor([4.0, 2.0, 2.0, 1.0])  # energy 16 + 4 + 4 + 1 = 25
    assert stable_rank(s) == pytest.approx(25 / 16)
    assert stable_rank(s, total_energy=50.0) == pytest.approx(50 / 16)
    assert top_energy_fraction(s, 1) == pytest.approx(16 / 25)
    assert top_energy_fraction(s, 2, total_energy=50.0) == pytest.approx(20 / 50)
    assert stable_rank(torch.zeros(2)) == 0.0 and top_energy_fraction(torch.zeros(2), 1) == 0.0


def test_spectrum_stats_top_quarter_rounds_up_the_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])  # rank 5: top quarter is ceil(5/4) = 2 values
    stats = spectrum_stats(s, rank=5)
    assert stats.norm == pytest.approx(4.0)
    assert stats.sigma1 == 3.0
    assert stats.top_quarter_energy == pytest.approx(13 / 16)
    assert stats.stable_rank == pytest.approx(16 / 9)
    # p = (3, 2, 1, 1, 1) / 8
    expected = math.exp(-(3 / 8 * math.log(3 / 8) + 2 / 8 * math.log(2 / 8) + 3 * (1 / 8 * math.log(1 / 8))))
    assert stats.effective_rank == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_flat_spectrum_of_k_values_has_effective_rank_k(k):
    s = torch.full((k,), 0.37)
    assert effective_rank(s) == pytest.approx(k, rel=1e-12)
    assert spectrum_stats(s, rank=k).effective_rank == pytest.approx(k, rel=1e-12)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_one_nonzero_value_has_effective_rank_one(k):
    s = torch.zeros(k)
    s[0] = 2.5
    assert effective_rank(s) == 1.0
    assert spectrum_stats(s, rank=k).effective_rank == 1.0
    assert spectrum_stats(torch.zeros(k), rank=k).effective_rank == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 100.0)), min_size=1, max_size=16), st.integers(1, 16))
def test_effective_rank_is_exp_of_the_entropy_of_sigma_over_its_sum(values, rank):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    expected = entropy_rank(values)
    assert effective_rank(s) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert spectrum_stats(s, rank=rank).effective_rank == pytest.approx(expected, rel=1e-9, abs=1e-12)
    nonzero = sum(v > 0 for v in values)  # from 1 (one direction) to the count of nonzero values (flat)
    assert effective_rank(s) == 0.0 if nonzero == 0 else 1 - 1e-9 <= effective_rank(s) <= nonzero + 1e-9


def test_sparkline_is_log_scaled_and_resampled():
    assert sparkline(torch.tensor([1.0, 1e-1, 1e-2, 1e-3])) == "█▆▃▁"
    assert sparkline(torch.tensor([1.0, 1.0])) == "██"
    assert sparkline(torch.zeros(3)) == "▁▁▁"
    assert sparkline(torch.tensor([])) == ""
    long = sparkline(torch.logspace(0, -3, 64), width=16)
    assert len(long) == 16 and long[0] == "█" and long[-1] == "▁"
