"""convert: PEFT ↔ kohya with identical deltas (hypothesis round trips and the fixtures), names, bad input."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_commands import convert
from loratools.adapter_files import load_adapter, save_adapter
from loratools.errors import FormatError
from tests.helpers import LLAMA_BASE, LLAMA_PEFT, SD_BASE, SD_KOHYA, adapters, assert_same_deltas, lora_modules, run_cli

NAMESPACES = ("unet.down_blocks.{i}.proj", "text_encoder.layers.{i}.q_proj", "model.layers.{i}.mlp.up_proj")


# linear or 3×3 conv2d layers (both layouts kohya holds), fp32, integer alphas, under three namespaces
PEFT_ADAPTERS = adapters(
    lora_modules(kinds=("linear", "conv2d"), sizes=(1, 6), ranks=(1, 4), kernels=(3,),
                 alphas=st.integers(1, 64).map(float)),
    names=NAMESPACES, count=(1, 3),
)


@settings(max_examples=30, deadline=None)
@given(PEFT_ADAPTERS, st.booleans())
def test_peft_to_kohya_to_peft_preserves_deltas(adapter, rslora):
    adapter.modules = {n: LoraModule(n, m.A, m.B, m.alpha, m.kind, rslora=rslora) for n, m in adapter.modules.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_adapter(adapter, tmp / "peft")
        convert(tmp / "peft", tmp / "k.safetensors", format="kohya")
        kohya = load_adapter(tmp / "k.safetensors")
        assert kohya.format == "kohya"
        convert(tmp / "k.safetensors", tmp / "back", format="peft")
        back = load_adapter(tmp / "back")
    assert_same_deltas(kohya, adapter)
    assert_same_deltas(back, adapter)


def test_kohya_fixture_round_trips_through_peft_byte_for_byte(tmp_path):
    run_cli("convert", SD_KOHYA, "-o", tmp_path / "peft", "--format", "peft", "--base", SD_BASE)
    peft = load_adapter(tmp_path / "peft")
    assert sorted(peft.modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "unet.down_blocks.0.attentions.0.proj_in",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.resnets.0.conv1",
    ]
    result = run_cli("convert", tmp_path / "peft", "-o", tmp_path / "k.safetensors", "--format", "kohya")
    assert "wrote" in result.output and "kohya, 4 modules" in result.output
    original, back = load_file(str(SD_KOHYA)), load_file(str(tmp_path / "k.safetensors"))
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_llama_peft_to_kohya_and_back(tmp_path):
    run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "k.safetensors", "--format", "kohya", "--prefix", "lora_te_")
    keys = load_file(str(tmp_path / "k.safetensors"))
    assert all(k.startswith("lora_te_model_layers_") for k in keys)
    run_cli("convert", tmp_path / "k.safetensors", "-o", tmp_path / "back", "--format", "peft")
    assert_same_deltas(load_adapter(tmp_path / "back"), load_adapter(LLAMA_PEFT))


def test_kohya_names_without_a_base_are_an_error_naming_the_fix(tmp_path):
    result = run_cli("convert", SD_KOHYA, "-o", tmp_path / "p", "--format", "peft", expect=2)
    assert "4 kohya module name(s)" in result.output and "pass --base" in result.output
    result = run_cli("convert", SD_KOHYA, "-o", tmp_path / "p", "--format", "peft", "--base", LLAMA_BASE, expect=2)
    assert "match no tensor of" in result.output
    assert not (tmp_path / "p").exists()


def test_layouts_kohya_cannot_hold_are_refused(tmp_path):
    embedding = LoraModule("model.embed_tokens", torch.randn(2, 10), torch.randn(4, 2), 2.0, "embedding")
    save_adapter(Adapter({embedding.name: embedding}), tmp_path / "emb")
    with pytest.raises(FormatError, match="no embedding layout"):
        convert(tmp_path / "emb", tmp_path / "k.safetensors", format="kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_convert_dtype_output_rules_and_json(tmp_path):
    result = run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "h.safetensors", "--format", "kohya", "--dtype", "fp16",
                     "--json")
    assert '"format": "kohya"' in result.output
    assert load_adapter(tmp_path / "h.safetensors").dtype == torch.float16
    result = run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "h.safetensors", "--format", "kohya", expect=2)
    assert "already exists; pass --force" in result.output
    run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "h.safetensors", "--format", "kohya", "--force")
    assert load_adapter(tmp_path / "h.safetensors").dtype == torch.float32
    result = run_cli("convert", LLAMA_PEFT, "-o", LLAMA_PEFT / "x", "--format", "peft", expect=2)
    assert "overwrite or sit inside input" in result.output
