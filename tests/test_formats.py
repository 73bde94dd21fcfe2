"""Adapter formats: write -> read round trips, detection, and every FormatError case."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from loratools import __version__
from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import load_adapter, save_adapter
from loratools.errors import FormatError
from loratools.formats import detect_format, kohya_stem, parse, render_kohya, render_peft
from loratools.matching import resolve_kohya_names
from tests.helpers import LLAMA_PEFT, SD_BASE, SD_KOHYA, adapters, assert_same_deltas, lora_modules, tiny_random_llama

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def format_adapters(kinds: tuple[str, ...]):
    """1..4 modules of the given kinds, one dtype drawn for the whole adapter (as a file holds one)."""
    modules = lora_modules(kinds=kinds, sizes=(1, 12), ranks=(1, 6), alphas=st.sampled_from([1.0, 4.0, 8.0, 2.5, 16.0]))
    return adapters(modules, names=("model.layers.{i}.block.proj",), count=(1, 4), dtypes=DTYPES)


def round_trip(tmp_path_factory, adapter: Adapter, fmt: str, filename: str) -> Adapter:
    """Save `adapter` as `fmt` to a fresh `filename`, load it back, and check every delta survived."""
    out = tmp_path_factory.mktemp("rt") / filename
    save_adapter(adapter, out, format=fmt)
    back = load_adapter(out)
    assert_same_deltas(back, adapter, same_layout=True)
    return back


@settings(max_examples=25, deadline=None)
@given(adapter=format_adapters(kinds=("linear", "conv2d", "embedding")))
def test_peft_folder_round_trip(tmp_path_factory, adapter):
    # PEFT has one fan_in_fan_out flag per adapter, so Conv1D layers are drawn in their own test below.
    assert round_trip(tmp_path_factory, adapter, "peft", "adapter").format == "peft"


@settings(max_examples=10, deadline=None)
@given(adapter=format_adapters(kinds=("conv1d",)))
def test_peft_round_trip_conv1d_sets_fan_in_fan_out(tmp_path_factory, adapter):
    back = round_trip(tmp_path_factory, adapter, "peft", "adapter.safetensors")
    assert back.config["fan_in_fan_out"] is True


@settings(max_examples=25, deadline=None)
@given(adapter=format_adapters(kinds=("linear", "conv2d")))
def test_kohya_round_trip(tmp_path_factory, adapter):
    assert round_trip(tmp_path_factory, adapter, "kohya", "adapter.safetensors").format == "kohya"


def test_kohya_file_layout_and_metadata(tmp_path):
    adapter = load_adapter(SD_KOHYA)
    out = save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys
    assert metadata["ss_training_comment"] == "loratools fixture"  # ss_* kept
    assert metadata["ss_network_dim"] == "Dynamic"  # ranks 2 and 4
    assert metadata["loratools_version"] == __version__


def test_fixture_kohya_has_conv_and_text_encoder():
    adapter = load_adapter(SD_KOHYA)
    kinds = {name: m.kind for name, m in adapter.modules.items()}
    assert kinds["lora_unet_down_blocks_0_resnets_0_conv1"] == "conv2d"
    assert adapter.modules["lora_unet_down_blocks_0_resnets_0_conv1"].A.shape[2:] == (3, 3)
    assert adapter.modules["lora_unet_down_blocks_0_attentions_0_proj_in"].A.shape[2:] == (1, 1)
    assert any(name.startswith("lora_te_") for name in adapter.modules)
    assert adapter.metadata["ss_base_model_version"] == "sd_v1"


def test_peft_files_carry_version_and_config(tmp_path):
    adapter = load_adapter(LLAMA_PEFT)
    out = save_adapter(adapter, tmp_path / "a", format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(adapter.modules)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["loratools_version"] == __version__


def test_mixed_ranks_write_rank_and_alpha_patterns():
    a = LoraModule("m.a", torch.randn(2, 5), torch.randn(5, 2), 4.0)
    b = LoraModule("m.b", torch.randn(3, 5), torch.randn(5, 3), 3.0)
    c = LoraModule("m.c", torch.randn(2, 5), torch.randn(5, 2), 4.0)
    tensors, config = render_peft(Adapter({"m.a": a, "m.b": b, "m.c": c}))
    assert config["r"] == 2 and config["lora_alpha"] == 4
    assert config["rank_pattern"] == {"m.b": 3} and config["alpha_pattern"] == {"m.b": 3}
    back = parse(tensors, config=config)
    assert back.modules["m.b"].scale == pytest.approx(1.0)


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["base_model.model.x.lora_A.weight"], "peft"),
        (["lora_unet_x.lora_down.weight", "lora_unet_x.alpha"], "kohya"),
        (["lora_te1_y.lora_A.weight"], "kohya"),
        (["diffusion_model.x.lora_A.weight", "diffusion_model.x.lora_B.weight"], "diffusers"),
        (["lora_unet_x.hada_w1_a"], "kohya"),
    ],
)
def test_detect_format(keys, expected):
    assert detect_format(keys) == expected


def test_detect_format_rejects_non_lora():
    with pytest.raises(FormatError, match="no LoRA keys found"):
        detect_format(["model.embed_tokens.weight"])


def lora_pair(rank=2, rows=4, cols=3):
    return torch.randn(rank, cols), torch.randn(rows, rank)


def test_a_without_b_is_listed():
    a, _ = lora_pair()
    with pytest.raises(FormatError, match="lora_unet_x has A, alpha but no B"):
        parse({"lora_unet_x.lora_down.weight": a, "lora_unet_x.alpha": torch.tensor(2.0)})


def test_b_without_a_is_listed():
    _, b = lora_pair()
    with pytest.raises(FormatError, match="x has B but no A"):
        parse({"base_model.model.x.lora_B.weight": b})


def test_rank_mismatch_is_listed():
    a, _ = lora_pair(rank=2)
    _, b = lora_pair(rank=3)
    with pytest.raises(FormatError, match="rank mismatch, A has 2 rows but B has 3 columns"):
        parse({"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b})


def test_unknown_keys_are_listed_not_dropped():
    a, b = lora_pair()
    state = {"lora_unet_x.lora_down.weight": a, "lora_unet_x.lora_up.weight": b, "lora_unet_x.mystery": a}
    with pytest.raises(FormatError, match=r"unknown keys: lora_unet_x\.mystery"):
        parse(state, source="odd.safetensors")


def test_unsupported_types_are_named_not_crashing():
    a, b = lora_pair()
    state = {
        "lora_unet_x.lora_down.weight": a,
        "lora_unet_x.lora_up.weight": b,
        "lora_unet_y.hada_w1_a": a,
        "lora_unet_y.hada_w1_b": b,
        "lora_unet_y.alpha": torch.tensor(1.0),
        "lora_unet_z.lokr_w1": a,
    }
    adapter = parse(state)
    assert set(adapter.modules) == {"lora_unet_x"}
    assert adapter.unsupported == {"lora_unet_y": "LoHa", "lora_unet_z": "LoKr"}
    assert any("unsupported" in note for note in adapter.notes)


def test_dora_module_is_unsupported():
    a, b = lora_pair()
    state = {
        "base_model.model.q.lora_A.weight": a,
        "base_model.model.q.lora_B.weight": b,
        "base_model.model.q.lora_magnitude_vector": torch.ones(4),
    }
    adapter = parse(state, config={"lora_alpha": 2, "r": 2})
    assert adapter.modules == {} and adapter.unsupported == {"q": "DoRA magnitude"}


def test_missing_kohya_alpha_means_scale_one():
    a, b = lora_pair(rank=4)
    adapter = parse({"lora_unet_x.lora_down.weight": a, "lora_unet_x.lora_up.weight": b})
    assert adapter.modules["lora_unet_x"].scale == 1.0
    assert any("alpha = rank assumed" in note for note in adapter.notes)


def test_rslora_scale_and_kohya_conversion():
    a, b = lora_pair(rank=4)
    config = {"lora_alpha": 8, "r": 4, "use_rslora": True}
    adapter = parse({"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b}, config=config)
    assert adapter.modules["x"].scale == pytest.approx(8 / 2)
    tensors, _ = render_kohya(adapter)
    assert float(tensors["lora_unet_x.alpha"]) == pytest.approx(16.0)  # alpha / r == 8 / sqrt(4)


def test_kohya_refuses_embedding_and_conv1d():
    a, b = lora_pair()
    for kind in ("embedding", "conv1d"):
        with pytest.raises(FormatError, match=f"kohya format has no {kind} layout"):
            render_kohya(Adapter({"e": LoraModule("e", a, b, 1.0, kind)}))


def test_kohya_stem_prefixes_from_namespace():
    assert kohya_stem("unet.down_blocks.0.conv") == "lora_unet_down_blocks_0_conv"
    assert kohya_stem("text_encoder.text_model.q_proj") == "lora_te_text_model_q_proj"
    assert kohya_stem("text_encoder.text_model.q_proj", sdxl=True) == "lora_te1_text_model_q_proj"
    assert kohya_stem("text_encoder_2.text_model.q_proj") == "lora_te2_text_model_q_proj"
    assert kohya_stem("model.layers.0.q_proj", prefix="lora_te_") == "lora_te_model_layers_0_q_proj"
    assert kohya_stem("lora_unet_already") == "lora_unet_already"


def test_resolve_kohya_names_against_base():
    from loratools.checkpoint import open_checkpoint

    adapter = load_adapter(SD_KOHYA)
    with open_checkpoint(SD_BASE) as base:
        resolved = resolve_kohya_names(adapter, list(base))
        for name, module in resolved.modules.items():
            assert name + ".weight" in base and module.name == name
            assert base.info(name + ".weight").shape == module.base_shape


def test_kohya_written_here_converts_back_to_dotted_names(tmp_path):
    adapter = resolve_kohya_names(load_adapter(SD_KOHYA), list(__import__("safetensors").safe_open(str(SD_BASE), "pt").keys()))
    out = save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    back = load_adapter(out)
    assert set(back.modules) == set(adapter.modules)
    assert_same_deltas(back, adapter, same_layout=True)


def test_peft_created_adapter_parses_to_identical_deltas(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model = tiny_random_llama(seed=0)
    config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.format == "peft"
    lora_layers = {name: mod for name, mod in peft_model.named_modules() if hasattr(mod, "get_delta_weight")}
    assert len(adapter.modules) == len(lora_layers) == 2 * 3 + 1
    for name, layer in lora_layers.items():
        ours = adapter.modules[name.removeprefix("base_model.model.")]
        torch.testing.assert_close(ours.delta(), layer.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    assert adapter.modules["model.layers.0.mlp.down_proj"].rank == 2
