"""spectrum BASE TUNED: top singular values of the true deltas, rank sweep and recommendations vs a full SVD."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.errors import LoratoolsError
from loratools.options import SvdSettings
from loratools.spectrum import rank_spectrum
from tests.helpers import LLAMA_BASE, LLAMA_TUNED, SD_BASE, SD_TUNED, run_cli, write_pair_with_spectra


def dense_truncation_errors(base_path, tuned_path, tensor: str, transpose: bool = False) -> torch.Tensor:
    """(min(out, in) + 1,) relative errors of every truncation of the true delta, by a float64 full SVD."""
    base = load_file(str(base_path if base_path.is_file() else base_path / "model.safetensors"))
    tuned = load_file(str(tuned_path if tuned_path.is_file() else tuned_path / "model.safetensors"))
    delta = tuned[tensor].double() - base[tensor].double()
    delta = delta.T if transpose else delta.reshape(delta.shape[0], -1)
    s = torch.linalg.svdvals(delta)
    tails = torch.cat([(s**2).flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    return (tails / tails[0]).sqrt()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "randomized"])
def test_llama_sweep_errors_match_full_svd_truncations(exact):
    ranks = [1, 2, 4, 8]
    report = rank_spectrum(LLAMA_BASE, LLAMA_TUNED, ranks=ranks, num_singular_values=8, svd=SvdSettings(exact=exact))
    assert {layer.tensor for layer in report.layers} >= {"model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}
    assert len(report.layers) == 16  # 14 projections + embed_tokens + lm_head
    for layer in report.layers:
        expected = dense_truncation_errors(LLAMA_BASE, LLAMA_TUNED, layer.tensor, layer.kind == "embedding")
        assert len(layer.singular_values) == (min(layer.shape) if exact else 8)
        for r in ranks:
            tol = 1e-4 if exact else 2e-2  # the randomized top-8 sketch resolves the noise floor less sharply
            assert layer.rel_error(r) == pytest.approx(float(expected[r]), rel=tol, abs=1e-6)
        tail = 1 - float((layer.singular_values.double() ** 2).sum()) / layer.total_energy
        assert layer.tail_energy == pytest.approx(max(0.0, tail), abs=1e-6)
        # and against the dense SVD: the energy share beyond the values kept is expected[k]²
        true_tail = float(expected[len(layer.singular_values)]) ** 2
        assert layer.tail_energy == pytest.approx(true_tail, rel=1e-4 if exact else 2e-2, abs=1e-6)
    changed_whole = {change.name for change in report.changed_whole}
    assert "model.norm.weight" in changed_whole and "model.layers.0.input_layernorm.weight" in changed_whole


def test_sd_conv_layers_exact_rank_and_sizes():
    report = rank_spectrum(SD_BASE, SD_TUNED, ranks=[2, 4, 64], svd=SvdSettings(exact=True))
    by_name = {layer.name: layer for layer in report.layers}
    conv = by_name["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.kind == "conv2d" and conv.shape == (16, 72)
    expected = dense_truncation_errors(SD_BASE, SD_TUNED, "unet.down_blocks.0.resnets.0.conv1.weight")
    assert conv.rel_error(2) == pytest.approx(float(expected[2]), rel=1e-4)
    assert conv.rel_error(4) < 1e-6 and conv.rel_error(64) == 0.0  # the fixture's delta has rank 4
    sweep = {row["rank"]: row for row in report.sweep()}
    shapes = [layer.shape for layer in report.layers]
    for r in (2, 4, 64):
        assert sweep[r]["params"] == sum(min(r, *s) * (s[0] + s[1]) for s in shapes)
        assert sweep[r]["bytes"] == sweep[r]["params"] * 4  # fp32 checkpoint
    assert sweep[4]["rel_error"] < 1e-6 and sweep[2]["rel_error"] > 0.1
    assert report.changed_whole == [] and report.unchanged == 4  # biases are equal in base and tuned


SPECTRA = {
    "a.proj": [8.0, 4.0, 2.0, 1.0, 0.5, 0.25],  # energy 85.3125
    "b.proj": [1.0] * 8,  # flat: energy 8
}


def expected_error(values: list[float], r: int) -> float:
    return math.sqrt(sum(v * v for v in values[r:]) / sum(v * v for v in values))


def test_recommendations_per_layer_and_global(tmp_path):
    base, tuned = write_pair_with_spectra(tmp_path, SPECTRA)
    report = rank_spectrum(base, tuned, ranks=[1, 2, 4, 8], max_error=0.3, svd=SvdSettings(exact=True))
    rec = report.recommendation()
    # per layer: smallest r with error ≤ 0.3
    for name, values in SPECTRA.items():
        want = next(r for r in range(len(values) + 1) if expected_error(values, r) <= 0.3)
        assert rec["per_layer"][name] == want
    assert rec["per_layer"] == {"a.proj": 2, "b.proj": 8}
    assert rec["max_layer_rank"] == 8
    # one rank for all: smallest r with the ‖ΔW‖²-weighted overall error ≤ 0.3
    total = sum(sum(v * v for v in values) for values in SPECTRA.values())

    def overall(r):
        return math.sqrt(sum(expected_error(v, r) ** 2 * sum(x * x for x in v) for v in SPECTRA.values()) / total)

    assert rec["global_rank"] == next(r for r in range(1, 9) if overall(r) <= 0.3)
    assert rec["global_rel_error"] == pytest.approx(overall(rec["global_rank"]), rel=1e-5)
    assert rec["params"] == 2 * 44 + 8 * 44
    for row in report.sweep():
        assert row["rel_error"] == pytest.approx(overall(row["rank"]), rel=1e-5, abs=1e-6)

    by_energy = rank_spectrum(base, tuned, ranks=[4], energy=0.99, svd=SvdSettings(exact=True)).recommendation()
    assert by_energy["per_layer"]["a.proj"] == next(r for r in range(7) if expected_error(SPECTRA["a.proj"], r) ** 2 <= 0.01)


def test_target_beyond_max_rank_is_none_not_a_wrong_rank(tmp_path):
    base, tuned = write_pair_with_spectra(tmp_path, SPECTRA)
    rec = rank_spectrum(base, tuned, ranks=[2], num_singular_values=3, max_error=0.01).recommendation()
    assert rec["per_layer"]["b.proj"] is None and rec["max_layer_rank"] is None
    assert rec["global_rank"] is None
    with pytest.raises(LoratoolsError, match="one of"):
        rank_spectrum(base, tuned, max_error=0.1, energy=0.9)
    with pytest.raises(LoratoolsError, match="--ranks"):
        rank_spectrum(base, tuned, ranks=[0, 4])


def test_cli_json_and_table(tmp_path):
    data = json.loads(run_cli("spectrum", LLAMA_BASE, LLAMA_TUNED, "--ranks", "2,4", "--target-error", "0.05",
                              "--json").output)
    assert {"layers", "sweep", "recommendation", "summary"} <= set(data)
    layer = data["layers"][0]
    assert {"name", "tensor", "kind", "shape", "norm", "singular_values", "tail_energy", "rel_errors",
            "recommended_rank"} <= set(layer)
    assert set(layer["rel_errors"]) == {"2", "4"}
    assert [row["rank"] for row in data["sweep"]] == [2, 4]
    assert {"rank", "rel_error", "params", "bytes"} <= set(data["sweep"][0])
    assert {"per_layer", "global_rank", "max_layer_rank"} <= set(data["recommendation"])
    assert "model.norm.weight" in data["summary"]["changed_whole"]
    out = run_cli("spectrum", SD_BASE, SD_TUNED, "--ranks", "2,4", "--energy", "0.99").output
    assert "unet.down_blocks.0.resnets.0.conv1" in out and "global rank" in out


def test_cli_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "spectrum.png"
    run_cli("spectrum", SD_BASE, SD_TUNED, "--plot", png, "--quiet")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensors_with_equal_values_in_another_dtype_count_as_unchanged(tmp_path):
    weight = torch.randn(8, 6).bfloat16().float()  # values a bf16 checkpoint holds exactly
    bias = torch.randn(8).bfloat16().float()
    save_file({"blk.proj.weight": weight, "blk.proj.bias": bias}, str(tmp_path / "base.safetensors"))
    save_file({"blk.proj.weight": weight + 0.5, "blk.proj.bias": bias.bfloat16()}, str(tmp_path / "tuned.safetensors"))
    report = rank_spectrum(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", ranks=[2])
    assert report.unchanged == 1 and report.changed_whole == []
