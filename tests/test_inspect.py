"""inspect: adapters written by PEFT itself and by kohya tools, checked against dense references."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.errors import LoratoolsError
from loratools.inspection import inspect_adapter
from tests.helpers import LLAMA_PEFT, SD_BASE, SD_KOHYA, SD_TUNED, run_cli, tiny_random_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def peft_adapter(tmp_path, **lora_kwargs):
    """Save a PEFT adapter of a tiny random Llama (B ≠ 0); return (folder, {module name: PEFT's own ΔW})."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model = tiny_random_llama(seed=0)
    lora = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **lora_kwargs)
    wrapped = peft.get_peft_model(model, lora)
    folder = tmp_path / "peft-adapter"
    wrapped.save_pretrained(str(folder), save_embedding_layers=True)
    deltas = {}
    for name, layer in wrapped.base_model.model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            deltas[name] = layer.get_delta_weight("default").detach()
    return folder, deltas


def test_inspect_peft_adapter_matches_peft_deltas(tmp_path):
    folder, deltas = peft_adapter(tmp_path, r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    report = inspect_adapter(folder)
    assert report.format == "peft"
    assert {m.name for m in report.modules} == set(deltas)
    assert report.rank_histogram == {2: 2, 4: 13}
    assert report.alpha is None and report.scale is None  # q_proj and v_proj differ
    assert set(report.full) == {"model.embed_tokens.weight"}  # PEFT saves the embedding when it is a target
    for row in report.modules:
        dense = deltas[row.name]
        assert row.shape == tuple(dense.shape)
        expected = torch.linalg.svdvals(dense.double())[: row.rank]
        torch.testing.assert_close(row.singular_values.double(), expected, atol=1e-5 * float(expected[0]), rtol=1e-4)
        assert row.stats.norm == pytest.approx(float(torch.linalg.norm(dense.double())), rel=1e-4)
    by_name = {m.name: m for m in report.modules}
    assert by_name["model.embed_tokens"].kind == "embedding"
    assert by_name["model.layers.0.self_attn.q_proj"].rank == 2
    assert by_name["model.layers.1.self_attn.v_proj"].scale == pytest.approx(3 / 4)
    assert by_name["model.layers.0.mlp.up_proj"].scale == pytest.approx(2.0)


def test_inspect_peft_fixture_spectrum_is_the_known_one():
    report = inspect_adapter(LLAMA_PEFT)
    assert report.num_modules == 14 and report.rank_histogram == {4: 14}
    assert report.alpha == 8 and report.scale == 2
    for row in report.modules:  # the fixture's deltas have singular values 0.25 · 2^-i
        torch.testing.assert_close(row.singular_values, torch.tensor([0.25, 0.125, 0.0625, 0.03125]))
        assert row.stats.stable_rank == pytest.approx(85 / 64, rel=1e-4)  # Σ_{i<4} 4^-i = 85/64
        assert row.stats.top_quarter_energy == pytest.approx(1 / (85 / 64), rel=1e-4)


def test_inspect_kohya_file_with_conv_layers_matches_the_true_deltas():
    report = inspect_adapter(SD_KOHYA)
    assert report.format == "kohya" and report.base_model == "tiny-sd"
    assert report.dtypes == ["float16"]
    assert report.file_size == SD_KOHYA.stat().st_size
    summary = report.metadata_summary()
    assert summary["ss_network_module"] == "networks.lora" and summary["ss_base_model_version"] == "sd_v1"
    assert report.rank_histogram == {2: 1, 4: 3}
    assert report.alpha is None and report.scale == 0.5
    base, tuned = load_file(str(SD_BASE)), load_file(str(SD_TUNED))
    kinds = {}
    for row in report.modules:
        module = row.name.split("_", 2)[2]  # lora_unet_down_blocks_0_... -> the dotted base name, via the stem
        weight = next(k for k in base if k.endswith(".weight") and k[:-7].replace(".", "_").endswith(module))
        delta = (tuned[weight] - base[weight]).double()
        assert row.shape == tuple(delta.shape)
        expected = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[: row.rank]
        torch.testing.assert_close(row.singular_values.double(), expected, atol=1e-5 * float(expected[0]), rtol=1e-4)
        kinds[row.shape] = row.kind
    assert kinds[(16, 8, 3, 3)] == "conv2d" and kinds[(32, 32)] == "linear"


def test_sort_filter_top():
    by_norm = inspect_adapter(SD_KOHYA, sort="norm")
    norms = [m.stats.norm for m in by_norm.modules]
    assert norms == sorted(norms, reverse=True)
    assert [m.rank for m in inspect_adapter(SD_KOHYA, sort="rank").modules] == [4, 4, 4, 2]
    mlp = inspect_adapter(LLAMA_PEFT, pattern=r"mlp\.(up|down)", top=3)
    assert [m.name for m in mlp.modules] == [
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"
    ]
    assert mlp.num_modules == 14  # the header still describes the whole adapter
    with pytest.raises(LoratoolsError, match="matches none"):
        inspect_adapter(LLAMA_PEFT, pattern="nothing_like_this")
    with pytest.raises(LoratoolsError, match="not a valid regular expression"):
        inspect_adapter(LLAMA_PEFT, pattern="(")


def test_unsupported_modules_are_reported_not_a_crash(tmp_path):
    state = load_file(str(SD_KOHYA))
    metadata = {"ss_network_module": "lycoris.kohya"}
    loha = "lora_unet_mid_block_attentions_0_proj_out"
    for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        state[f"{loha}.{part}"] = torch.randn(4, 4)
    state[f"{loha}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path), metadata)
    report = inspect_adapter(path)
    assert report.unsupported == {loha: "LoHa"}
    assert report.num_modules == 4
    out = run_cli("inspect", path).output
    assert loha in out and "LoHa" in out


def test_dora_adapter_from_peft_is_reported(tmp_path):
    folder, _ = peft_adapter(tmp_path, r=4, lora_alpha=8, use_dora=True)
    report = inspect_adapter(folder)
    assert report.unsupported and set(report.unsupported.values()) == {"DoRA magnitude"}
    assert "model.layers.0.self_attn.q_proj" in report.unsupported
    data = json.loads(run_cli("inspect", folder, "--json").stdout)
    assert data["summary"]["unsupported"] == report.unsupported


def test_cli_table_and_metadata():
    out = run_cli("inspect", SD_KOHYA).output
    assert "kohya" in out and "tiny-sd" in out and "ss_network_module" in out
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in out and "conv2d" in out and "(16, 8, 3, 3)" in out
    stored_format = re.compile(r"^\s*format\s+pt\s*$", re.MULTILINE)  # a metadata key outside the summary
    assert not stored_format.search(out) and "--metadata" in out
    assert stored_format.search(run_cli("inspect", SD_KOHYA, "--metadata").output)


def test_cli_json_has_documented_fields():
    data = json.loads(run_cli("inspect", LLAMA_PEFT, "--json", "--sort", "norm", "--top", "5").stdout)
    assert {"format", "base_model", "metadata", "modules", "summary"} <= set(data)
    assert data["format"] == "peft" and data["base_model"] == "fixtures/llama-base"
    assert len(data["modules"]) == 5 and data["summary"]["modules"] == 14
    row = data["modules"][0]
    assert {"name", "kind", "shape", "rank", "alpha", "scale", "norm", "singular_values"} <= set(row)
    assert row["rank"] == 4 and len(row["singular_values"]) == 4 and row["scale"] == 2.0
    assert row["norm"] == pytest.approx((0.25**2 + 0.125**2 + 0.0625**2 + 0.03125**2) ** 0.5, rel=1e-5)


def test_cli_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "spectra.png"
    run_cli("inspect", LLAMA_PEFT, "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = run_cli("inspect", LLAMA_PEFT, "--plot", tmp_path / "x.png", expect=2)
    assert "matplotlib" in result.output and "loratools[plot]" in result.output
    assert not (tmp_path / "x.png").exists()


def test_plot_groups_by_module_type_and_merges_beyond_the_limit(tmp_path):
    pytest.importorskip("matplotlib")
    from loratools.plot import MAX_GROUPS, module_group, plot_spectra

    assert module_group("base_model.model.model.layers.31.mlp.down_proj") == "mlp.down_proj"
    assert module_group("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0") == "attn1_to_out"
    assert module_group("lm_head") == "lm_head"
    spectra = [(f"model.layers.{i % 3}.kind{i}", torch.tensor([2.0, 1.0]), 5.0) for i in range(MAX_GROUPS + 3)]
    png = plot_spectra(spectra, tmp_path / "many.png", "many types")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(LoratoolsError, match="does not exist"):
        plot_spectra(spectra, tmp_path / "missing" / "x.png")
