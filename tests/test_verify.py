"""verify: per-layer errors against a direct dense computation, exact pairs, coverage both ways, JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.adapter_files import load_adapter, save_adapter
from loratools.options import SvdSettings
from loratools.verify import verify_adapter
from tests.helpers import LLAMA_BASE, LLAMA_PEFT, LLAMA_TUNED, SD_BASE, SD_KOHYA, SD_TUNED, run_cli, tiny_random_llama


def dense_reference(base: dict, tuned: dict, adapter) -> dict[str, tuple[float, float]]:
    """{module: (‖ΔW − scale·B·A‖/‖ΔW‖, best rank-r error)} computed densely in float64 with a full SVD."""
    out = {}
    for name, module in adapter.modules.items():
        delta = (tuned[name + ".weight"].double() - base[name + ".weight"].double())
        approx = module.delta(torch.float64)
        norm = torch.linalg.norm(delta)
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        out[name] = (float(torch.linalg.norm(delta - approx) / norm), float(s[module.rank :].norm() / norm))
    return out


@pytest.mark.parametrize("exact", [False, True], ids=["randomized", "exact"])
def test_llama_peft_errors_equal_dense_computation(exact):
    report = verify_adapter(LLAMA_BASE, LLAMA_TUNED, LLAMA_PEFT, svd=SvdSettings(exact=exact))
    adapter = load_adapter(LLAMA_PEFT)
    expected = dense_reference(load_file(str(LLAMA_BASE / "model.safetensors")),
                               load_file(str(LLAMA_TUNED / "model.safetensors")), adapter)
    assert {layer.name for layer in report.layers} == set(expected)
    for layer in report.layers:
        rel, optimal = expected[layer.name]
        assert layer.rank == 4
        assert layer.rel_error == pytest.approx(rel, rel=1e-4)
        assert layer.optimal_rel_error == pytest.approx(optimal, rel=1e-4 if exact else 1e-3)
        assert 0.005 < optimal <= layer.rel_error  # the fixture adds full-rank noise beyond the rank-4 delta
    # coverage: norms, embeddings and lm_head changed but the adapter does not touch them
    untouched = {change.name for change in report.uncovered}
    assert "model.embed_tokens.weight" in untouched and "lm_head.weight" in untouched
    assert "model.layers.0.input_layernorm.weight" in untouched and "model.norm.weight" in untouched
    assert not any(name.endswith("q_proj.weight") for name in untouched)
    assert report.unmatched == {}


def test_exact_pair_is_zero_error_with_kohya_conv_layers():
    report = verify_adapter(SD_BASE, SD_TUNED, SD_KOHYA)
    assert len(report.layers) == 4
    assert {layer.kind for layer in report.layers} == {"conv2d", "linear"}
    assert "unet.down_blocks.0.resnets.0.conv1" in {layer.name for layer in report.layers}  # kohya stems resolved
    for layer in report.layers:
        assert layer.rel_error < 1e-6
        assert layer.optimal_rel_error < 1e-5
    assert report.uncovered == [] and report.unmatched == {}
    summary = report.summary()
    assert summary["rel_error"] < 1e-6 and summary["layers"] == 4


def test_adapter_modules_without_a_matching_tensor(tmp_path):
    adapter = load_adapter(LLAMA_PEFT)
    modules = dict(adapter.modules)
    q = modules.pop("model.layers.1.self_attn.q_proj")
    modules["model.layers.9.self_attn.q_proj"] = dataclasses.replace(q, name="model.layers.9.self_attn.q_proj")
    k = modules["model.layers.1.self_attn.k_proj"]  # (32, 64) in the model; make the adapter claim (64, 64)
    modules["model.layers.1.self_attn.k_proj"] = dataclasses.replace(k, B=torch.zeros(64, k.rank))
    path = save_adapter(dataclasses.replace(adapter, modules=modules), tmp_path / "odd")
    report = verify_adapter(LLAMA_BASE, LLAMA_TUNED, path)
    assert set(report.unmatched) == {"model.layers.9.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    assert "no tensor" in report.unmatched["model.layers.9.self_attn.q_proj"]
    assert "(64, 64)" in report.unmatched["model.layers.1.self_attn.k_proj"]
    untouched = {change.name for change in report.uncovered}
    assert {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"} <= untouched
    assert len(report.layers) == 12


def test_cli_json_has_documented_fields():
    data = json.loads(run_cli("verify", LLAMA_BASE, LLAMA_TUNED, LLAMA_PEFT, "--json").stdout)
    assert {"layers", "summary"} <= set(data)
    assert len(data["layers"]) == 14
    for layer in data["layers"]:
        assert {"name", "rank", "rel_error", "optimal_rel_error"} <= set(layer)
        assert 0 < layer["optimal_rel_error"] <= layer["rel_error"] < 0.1
    summary = data["summary"]
    assert {"layers", "rel_error", "optimal_rel_error", "uncovered", "unmatched"} <= set(summary)
    assert math.isfinite(summary["rel_error"]) and "lm_head.weight" in summary["uncovered"]


def test_cli_table_names_layers_and_coverage():
    out = run_cli("verify", SD_BASE, SD_TUNED, SD_KOHYA).output
    assert "unet.down_blocks.0.resnets.0.conv1" in out and "overall" in out
    out = run_cli("verify", LLAMA_BASE, LLAMA_TUNED, LLAMA_PEFT).output
    assert "model.layers.0.self_attn.q_proj" in out and "lm_head.weight" in out


def test_exact_pair_made_by_peft_merge_and_unload(tmp_path):
    """PEFT itself makes the pair: base model, adapter (embedding included), and the merged model."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model = tiny_random_llama(seed=1)
    model.save_pretrained(str(tmp_path / "base"))
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           init_lora_weights=False, rank_pattern={"down_proj": 2})
    wrapped = peft.get_peft_model(model, lora)
    wrapped.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=True)
    wrapped.merge_and_unload().save_pretrained(str(tmp_path / "tuned"))
    report = verify_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", svd=SvdSettings(exact=True))
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds["model.embed_tokens"] == "embedding" and len(kinds) == 7
    for layer in report.layers:
        assert layer.rel_error < 1e-5, layer.name
    assert report.uncovered == [] and report.unmatched == {} and report.unchanged > 0


def test_tensors_in_one_checkpoint_only_are_listed(tmp_path):
    tuned = load_file(str(SD_TUNED))
    del tuned["unet.down_blocks.0.resnets.0.conv1.bias"]
    tuned["unet.added.weight"] = torch.ones(4, 4)
    path = tmp_path / "tuned.safetensors"
    save_file(tuned, str(path))
    report = verify_adapter(SD_BASE, path, SD_KOHYA)
    assert report.pairing.only_in_base == ["unet.down_blocks.0.resnets.0.conv1.bias"]
    assert report.pairing.only_in_tuned == ["unet.added.weight"]
    assert len(report.layers) == 4 and report.summary()["rel_error"] < 1e-6
    out = run_cli("verify", SD_BASE, path, SD_KOHYA).output
    assert "tensors only in base (1)" in out and "unet.added.weight" in out


def test_non_finite_values_are_one_error_line_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    tuned = load_file(str(SD_TUNED))
    name = "unet.down_blocks.0.attentions.0.proj_in.weight"
    tuned[name][0, 0, 0, 0] = float("nan")
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    for args in (["verify", SD_BASE, tmp_path / "tuned.safetensors", SD_KOHYA],
                 ["spectrum", SD_BASE, tmp_path / "tuned.safetensors"]):
        result = run_cli(*args, expect=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "non-finite" in lines[0] and "tuned.safetensors" in lines[0]
