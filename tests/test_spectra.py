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

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def lora_modules(draw) -> LoraModule:
    """A random module of any kind and dtype; rank may exceed min(out, in) (then the spectrum is shorter)."""
    kind = draw(st.sampled_from(["linear", "conv2d", "embedding", "conv1d"]))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    rows, cols, rank = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv2d":
        k = draw(st.sampled_from([1, 3]))
        a = torch.randn(rank, cols, k, k, generator=gen)
        b = torch.randn(rows, rank, 1, 1, generator=gen)
    else:
        a, b = torch.randn(rank, cols, generator=gen), torch.randn(rows, rank, generator=gen)
    alpha = draw(st.sampled_from([1.0, 8.0, 0.5 * rank]))
    return LoraModule("m", a.to(dtype), b.to(dtype), alpha, kind, rslora=draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(lora_modules())
def test_factor_spectrum_equals_svdvals_of_dense_delta(module):
    dense = module.delta(torch.float64)  # the base-layout ΔW: transposed for embedding/conv1d, 4-D for conv2d
    expected = torch.linalg.svdvals(dense.reshape(dense.shape[0], -1))
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
    assert stats.effective_rank == pytest.approx(effective_rank(s))


def test_sparkline_is_log_scaled_and_resampled():
    assert sparkline(torch.tensor([1.0, 1e-1, 1e-2, 1e-3])) == "█▆▃▁"
    assert sparkline(torch.tensor([1.0, 1.0])) == "██"
    assert sparkline(torch.zeros(3)) == "▁▁▁"
    assert sparkline(torch.tensor([])) == ""
    long = sparkline(torch.logspace(0, -3, 64), width=16)
    assert len(long) == 16 and long[0] == "█" and long[-1] == "▁"
