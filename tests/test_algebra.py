"""combine / rescale / resize: identities checked against dense deltas and a full SVD (hypothesis), and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_commands import combine, resize
from loratools.adapter_files import load_adapter, save_adapter
from loratools.algebra import (
    combine_adapters,
    concat_modules,
    recompress_modules,
    rescale_adapter,
    rescale_module,
    resize_module,
    set_alpha,
)
from loratools.errors import FormatError, LoratoolsError, OutputError, ShapeError
from loratools.options import RankPolicy
from tests.helpers import (
    LLAMA_BASE,
    LLAMA_PEFT,
    SD_BASE,
    SD_KOHYA,
    layers,
    llama_from,
    logits,
    lora_modules,
    peft_logits,
    random_module,
    rel,
    run_cli,
)

SETTINGS = settings(max_examples=30, deadline=None)
F64 = torch.float64
ALPHAS = st.floats(0.25, 32)


@st.composite
def modules_of_one_layer(draw, max_count: int = 3) -> list[LoraModule]:
    """1..max_count random fp64 modules (own rank, alpha, rsLoRA flag) of one drawn layer: summable deltas."""
    module = lora_modules(layer=draw(layers(sizes=(1, 7))), ranks=(1, 5), alphas=ALPHAS, rslora=(False, True),
                          dtypes=(F64,))
    return draw(st.lists(module, min_size=1, max_size=max_count))


weights = st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3)


def dense_optimal_error(delta: torch.Tensor, kind: str, rank: int) -> float:
    """Eckart–Young error of the best rank-`rank` approximation, from a full SVD of the dense LoRA matrix."""
    matrix = delta.T if kind in ("embedding", "conv1d") else delta.reshape(delta.shape[0], -1)
    s = torch.linalg.svdvals(matrix.double())
    total = float((s * s).sum())
    return (float((s[rank:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0


# ---- combine ----------------------------------------------------------------------------------------------


@SETTINGS
@given(modules_of_one_layer(), st.lists(weights, min_size=3, max_size=3))
def test_concat_delta_is_the_weighted_sum(modules, ws):
    ws = ws[: len(modules)]
    combined = concat_modules(modules, ws)
    exact = sum(w * m.delta(F64) for m, w in zip(modules, ws, strict=True))
    torch.testing.assert_close(combined.delta(F64), exact, rtol=1e-10, atol=1e-10)
    assert combined.rank == sum(m.rank for m in modules)
    assert abs(combined.scale - modules[0].scale) <= 1e-12 * abs(modules[0].scale)


@SETTINGS
@given(modules_of_one_layer(max_count=1))
def test_combining_one_adapter_with_weight_one_reproduces_it(modules):
    module = modules[0]
    adapter = Adapter({module.name: module})
    for method in ("concat", "svd"):
        combined, reports = combine_adapters([adapter], weights=[1.0], method=method)
        out = combined.modules[module.name]
        torch.testing.assert_close(out.delta(F64), module.delta(F64), rtol=1e-9, atol=1e-9)
        assert reports[0].error <= 1e-6
    combined, _ = combine_adapters([adapter], weights=[1.0], method="concat")
    if not module.rslora:
        out = combined.modules[module.name]
        assert torch.equal(out.A, module.A) and torch.equal(out.B, module.B) and out.alpha == module.alpha


@SETTINGS
@given(modules_of_one_layer(), st.lists(weights, min_size=3, max_size=3), st.integers(1, 8))
def test_svd_recompression_error_is_the_optimal_error_of_the_exact_sum(modules, ws, rank):
    ws = ws[: len(modules)]
    module, report = recompress_modules(modules, ws, RankPolicy("rank", rank))
    exact = sum(w * m.delta(F64) for m, w in zip(modules, ws, strict=True))
    assert report.rank_in == sum(m.rank for m in modules)
    assert module.rank == report.rank_out <= rank
    optimal = dense_optimal_error(exact, module.kind, module.rank)
    assert report.error == pytest.approx(optimal, abs=1e-6)
    assert rel(module.delta(F64), exact) == pytest.approx(optimal, abs=1e-6)


def test_combine_covers_different_module_sets():
    shape = (6, 5)
    a1 = Adapter({n: random_module(n, "linear", *shape, 2, alpha=4.0, seed=i, dtype=F64) for i, n in enumerate("xy")})
    a2 = Adapter({n: random_module(n, "linear", *shape, 3, alpha=3.0, seed=10 + i, dtype=F64) for i, n in enumerate("yz")})
    combined, reports = combine_adapters([a1, a2], weights=[0.5, 2.0])
    assert list(combined.modules) == ["x", "y", "z"]
    torch.testing.assert_close(combined.modules["x"].delta(F64), 0.5 * a1.modules["x"].delta(F64))
    torch.testing.assert_close(combined.modules["z"].delta(F64), 2.0 * a2.modules["z"].delta(F64))
    exact_y = 0.5 * a1.modules["y"].delta(F64) + 2.0 * a2.modules["y"].delta(F64)
    torch.testing.assert_close(combined.modules["y"].delta(F64), exact_y)
    assert [r.rank_out for r in reports] == [2, 5, 3]


def test_combine_refuses_what_it_cannot_do():
    a = Adapter({"x": random_module("x", "linear", 4, 4, 2, alpha=2.0, seed=0, dtype=F64)})
    b = Adapter({"x": random_module("x", "conv2d", 4, 4, 2, alpha=2.0, seed=1, dtype=F64)})
    with pytest.raises(ShapeError, match="different models"):
        combine_adapters([a, b])
    with pytest.raises(LoratoolsError, match="choose concat or svd"):
        combine_adapters([a, a], method="average")  # factor-wise averaging is not the sum of the deltas
    with pytest.raises(LoratoolsError, match="2 weights for 1 adapters"):
        combine_adapters([a], weights=[1.0, 2.0])
    full = Adapter({}, full={"head.weight": torch.ones(2)})
    with pytest.raises(FormatError, match="without the base model"):
        combine_adapters([full], weights=[0.5])


# ---- rescale ----------------------------------------------------------------------------------------------


@SETTINGS
@given(modules_of_one_layer(max_count=1), st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3), st.floats(0.5, 64))
def test_rescale_scales_deltas_and_alpha_keeps_them(modules, scale, alpha):
    module = modules[0]
    scaled = rescale_module(module, scale)
    torch.testing.assert_close(scaled.delta(F64), scale * module.delta(F64), rtol=1e-10, atol=1e-12)
    assert torch.equal(scaled.A, module.A) and torch.equal(scaled.B, module.B)
    realpha = set_alpha(module, alpha)
    assert realpha.alpha == alpha
    torch.testing.assert_close(realpha.delta(F64), module.delta(F64), rtol=1e-10, atol=1e-12)


def test_rescale_adapter_rules():
    adapter = Adapter({"x": random_module("x", "linear", 3, 3, 2, alpha=2.0, dtype=F64)}, full={"h.weight": torch.ones(2)})
    scaled = rescale_adapter(adapter, scale=3.0)
    assert scaled.full["h.weight"].equal(torch.ones(2)) and "kept unscaled" in scaled.notes[-1]
    for bad in ({"scale": 0.0}, {"alpha": 0.0}, {"scale": float("nan")}):
        with pytest.raises(LoratoolsError, match="not usable"):
            rescale_adapter(adapter, **bad)
    with pytest.raises(LoratoolsError, match="exactly one"):
        rescale_adapter(adapter, scale=2.0, alpha=2.0)


# ---- resize -----------------------------------------------------------------------------------------------


@SETTINGS
@given(modules_of_one_layer(max_count=1))
def test_resize_to_its_own_rank_is_itself(modules):
    module = modules[0]
    resized, report = resize_module(module, RankPolicy("rank", module.rank))
    torch.testing.assert_close(resized.delta(F64), module.delta(F64), rtol=1e-9, atol=1e-9)
    rows, cols = module.factors()[0].shape[0], module.factors()[1].shape[1]
    assert resized.rank == report.rank_out == min(module.rank, rows, cols)
    assert report.error <= 1e-6


policies = st.one_of(
    st.builds(RankPolicy, st.just("rank"), st.integers(1, 6)),
    st.builds(RankPolicy, st.just("energy"), st.floats(0.05, 1.0)),
    st.builds(RankPolicy, st.just("max_error"), st.floats(0.0, 0.95)),
    st.builds(RankPolicy, st.just("sv_ratio"), st.floats(1.0, 100.0)),
)


@SETTINGS
@given(modules_of_one_layer(max_count=1), policies)
def test_resize_error_is_the_optimal_truncation_error_of_the_dense_delta(modules, policy):
    module = modules[0]
    resized, report = resize_module(module, policy)
    dense = module.delta(F64)
    optimal = dense_optimal_error(dense, module.kind, resized.rank)
    assert report.error == pytest.approx(optimal, abs=1e-6)
    assert rel(resized.delta(F64), dense) == pytest.approx(optimal, abs=1e-6)
    assert resized.alpha / resized.rank == pytest.approx(module.scale, rel=1e-12)  # scale preserved
    if policy.kind == "max_error":
        assert report.error <= policy.value + 1e-6
    if policy.kind == "rank":
        assert resized.rank <= policy.value


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_zero_or_negative_rank_is_refused(tmp_path, rank):
    result = run_cli("resize", LLAMA_PEFT, "-o", tmp_path / "out", "--rank", rank, expect=2)
    assert f"--rank {rank}" in result.output and "whole number ≥ 1" in result.output
    result = run_cli("combine", LLAMA_PEFT, "-o", tmp_path / "c", "--method", "svd", "--rank", rank, expect=2)
    assert "whole number ≥ 1" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_resize_cli_table_report_and_format(tmp_path):
    report = tmp_path / "report.json"
    result = run_cli("resize", SD_KOHYA, "-o", tmp_path / "small.safetensors", "--rank", "2", "--report", report)
    assert "4 → 2" in result.output and "max relative error" in result.output
    data = json.loads(report.read_text())
    assert data["format"] == "kohya" and len(data["layers"]) == 4
    assert {layer["rank_out"] for layer in data["layers"]} == {2}
    original, small = load_adapter(SD_KOHYA), load_adapter(tmp_path / "small.safetensors")
    assert small.format == "kohya" and small.dtype == torch.float16
    for layer in data["layers"]:
        name = layer["name"]
        optimal = dense_optimal_error(original.modules[name].delta(), original.modules[name].kind, 2)
        assert layer["error"] == pytest.approx(optimal, abs=1e-5)
        assert rel(small.modules[name].delta(), original.modules[name].delta()) == pytest.approx(
            optimal, abs=2e-3)  # fp16 factors
    result = run_cli("resize", LLAMA_PEFT, "-o", tmp_path / "e", "--energy", "0.98", "--json")
    assert json.loads(result.output)["ranks"] == [3]


def test_resize_file_function_progress(tmp_path):
    calls = []
    resize(LLAMA_PEFT, tmp_path / "r", policy=RankPolicy("rank", 2), progress=lambda *a: calls.append(a))
    assert len(calls) == 14 and calls[-1][:2] == (14, 14)


# ---- combine files ----------------------------------------------------------------------------------------


def test_combine_cli_concat_and_svd(tmp_path):
    original = load_adapter(LLAMA_PEFT)
    run_cli("combine", LLAMA_PEFT, LLAMA_PEFT, "-o", tmp_path / "half", "-w", "0.25", "-w", "0.75")
    half = load_adapter(tmp_path / "half")
    assert half.ranks == [8] * 14
    for name, module in original.modules.items():
        torch.testing.assert_close(half.modules[name].delta(), module.delta(), rtol=1e-5, atol=1e-7)
    result = run_cli("combine", LLAMA_PEFT, tmp_path / "half", "-o", tmp_path / "svd", "--method", "svd", "--json")
    assert json.loads(result.output)["ranks"] == [8]  # default: each layer's largest input rank
    result = run_cli("combine", LLAMA_PEFT, tmp_path / "half", "-o", tmp_path / "svd", "--method", "svd", "--rank", "4",
                     "--json", "--force")
    data = json.loads(result.output)
    assert data["ranks"] == [4] and data["max_error"] < 1e-5  # 2ΔW has rank 4: exact
    svd = load_adapter(tmp_path / "svd")
    for name, module in original.modules.items():
        torch.testing.assert_close(svd.modules[name].delta(), 2 * module.delta(), rtol=1e-4, atol=1e-6)


def test_combine_mixes_kohya_and_peft(tmp_path):
    run_cli("convert", SD_KOHYA, "-o", tmp_path / "peft", "--format", "peft", "--base", SD_BASE)
    kohya = load_adapter(SD_KOHYA)
    for first, second, out, fmt in ((SD_KOHYA, tmp_path / "peft", "k.safetensors", "kohya"),
                                    (tmp_path / "peft", SD_KOHYA, "p", "peft")):
        result = combine([first, second], tmp_path / out, weights=[1.0, 0.5])
        assert result.format == fmt and result.modules == 4
        both = load_adapter(tmp_path / out)
        for stem, module in kohya.modules.items():
            name = next(n for n in both.modules if n.replace(".", "_").endswith(stem.split("_", 2)[2]))
            torch.testing.assert_close(both.modules[name].delta(), 1.5 * module.delta(), rtol=1e-3, atol=1e-4)
    result = run_cli("combine", LLAMA_PEFT, SD_KOHYA, "-o", tmp_path / "x", expect=2)
    assert "kohya module names must be resolved" in result.output
    result = run_cli("combine", SD_KOHYA, LLAMA_PEFT, "-o", tmp_path / "y.safetensors")
    assert "18 modules" in result.output


def test_combine_output_rules(tmp_path):
    run_cli("combine", LLAMA_PEFT, "-o", tmp_path / "c")
    result = run_cli("combine", LLAMA_PEFT, "-o", tmp_path / "c", expect=2)
    assert "already exists; pass --force" in result.output
    result = run_cli("combine", LLAMA_PEFT, "-o", LLAMA_PEFT, "--force", expect=2)
    assert "overwrite or sit inside input" in result.output
    result = run_cli("combine", LLAMA_PEFT, "-o", tmp_path / "d", "--rank", "2", expect=2)
    assert "apply to --method svd" in result.output


def test_rescale_cli(tmp_path):
    run_cli("rescale", SD_KOHYA, "-o", tmp_path / "s.safetensors", "--scale", "0.5")
    run_cli("rescale", LLAMA_PEFT, "-o", tmp_path / "a", "--alpha", "1")
    original, scaled = load_adapter(SD_KOHYA), load_adapter(tmp_path / "s.safetensors")
    for name, module in original.modules.items():
        torch.testing.assert_close(scaled.modules[name].delta(), 0.5 * module.delta())
    realpha = load_adapter(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_alpha"] == 1
    for name, module in load_adapter(LLAMA_PEFT).modules.items():
        torch.testing.assert_close(realpha.modules[name].delta(), module.delta(), rtol=1e-6, atol=1e-8)
    result = run_cli("rescale", LLAMA_PEFT, "-o", tmp_path / "b", expect=2)
    assert "exactly one of --scale or --alpha" in result.output


@pytest.mark.parametrize("option", [("--scale", "-0.5"), ("--alpha", "3")])
def test_rescaled_adapter_loads_in_peft_and_matches_a_merge(tmp_path, option):
    pytest.importorskip("peft")
    run_cli("rescale", LLAMA_PEFT, "-o", tmp_path / "r", *option)
    run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", tmp_path / "m", "--weight", "-0.5" if option[0] == "--scale" else "1")
    with_peft = peft_logits(LLAMA_BASE, tmp_path / "r")
    torch.testing.assert_close(with_peft, logits(llama_from(tmp_path / "m")), rtol=0, atol=1e-4)
    assert not torch.allclose(with_peft, logits(llama_from(LLAMA_BASE)), atol=1e-3)


def test_written_adapters_record_provenance(tmp_path):
    save_adapter(load_adapter(LLAMA_PEFT), tmp_path / "in.safetensors")
    run_cli("rescale", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors", "--scale", "2")
    metadata = load_adapter(tmp_path / "out.safetensors").metadata
    assert metadata["loratools_command"] == "rescale"
    assert json.loads(metadata["loratools_parameters"])["scale"] == 2.0


def test_resize_refuses_an_existing_report_before_writing_the_adapter(tmp_path):
    report = tmp_path / "report.json"
    report.write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        resize(SD_KOHYA, tmp_path / "r.safetensors", policy=RankPolicy("rank", 2), report=report)
    assert report.read_text() == "keep me" and not (tmp_path / "r.safetensors").exists()
