"""Pairing base and tuned tensors into extraction ops from names and shapes, and layer-kind detection."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from loratools import plan as plan_module
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import LoratoolsError, ShapeError
from loratools.options import Selection
from loratools.plan import Mismatch
from tests.helpers import LLAMA_BASE, LLAMA_TUNED, SD_BASE, SD_TUNED, make_gpt2_pair, write_checkpoint_pair

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plan_for(base, tuned, **options):
    from loratools.plan import plan_extract

    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        return plan_extract(b, t, selection=Selection(**options))


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    return make_gpt2_pair(tmp_path_factory.mktemp("gpt2"))


# ---- pairing -----------------------------------------------------------------------------------------------


def test_llama_pairs_every_projection_and_lists_norms_as_whole_tensors():
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED)
    kinds = {p.module: p.kind for p in plan.pairs}
    for layer in range(2):
        for proj in PROJECTIONS:
            part = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            assert kinds[f"model.layers.{layer}.{part}.{proj}"] == "linear"
    assert kinds["model.embed_tokens"] == "embedding"
    assert kinds["lm_head"] == "linear"
    assert len(plan.pairs) == 16
    whole = {w.tensor: w for w in plan.whole}
    assert set(whole) == {"model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert not any(w.save for w in whole.values())
    assert plan.task_type == "CAUSAL_LM"
    assert plan.pairing.only_in_base == plan.pairing.only_in_tuned == plan.pairing.mismatched == []


def test_pair_shapes_and_lora_matrix_shapes():
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED)
    by_module = {p.module: p for p in plan.pairs}
    embed = by_module["model.embed_tokens"]
    assert embed.shape == (256, 64) and embed.matrix_shape == (64, 256)
    down = by_module["model.layers.0.mlp.down_proj"]
    assert down.tensor == "model.layers.0.mlp.down_proj.weight" and down.matrix_shape == (64, 128)


def test_llama_kinds_come_from_heuristics_as_its_modeling_code_has_no_conv1d():
    pytest.importorskip("transformers")  # the modeling source is read from the installed transformers
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED)
    assert plan.kind_source == "name/shape heuristics (llama modeling code has no Conv1D layers)"


def test_heuristics_agree_with_transformers_on_llama(monkeypatch):
    pytest.importorskip("transformers")
    with monkeypatch.context() as patch:
        patch.setattr(plan_module, "_modeling_source_lacks_conv1d", lambda model_type: False)
        with_model = plan_for(LLAMA_BASE, LLAMA_TUNED)
    assert with_model.kind_source == "transformers: LlamaForCausalLM built on the meta device"
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED)
    assert "heuristics" in plan.kind_source and "transformers is not installed" in plan.kind_source
    assert [(p.module, p.kind) for p in plan.pairs] == [(p.module, p.kind) for p in with_model.pairs]
    assert [w.tensor for w in plan.whole] == [w.tensor for w in with_model.whole]


@pytest.mark.parametrize("mode", ["full", "skip"])
def test_embeddings_full_or_skip(mode):
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED, embeddings=mode)
    assert "model.embed_tokens" not in {p.module for p in plan.pairs}
    embed = next(w for w in plan.whole if w.tensor == "model.embed_tokens.weight")
    assert embed.save == (mode == "full")
    assert "--embeddings " + mode in embed.why


def test_save_full_pattern_marks_tensors_to_save_whole():
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED, save_full=["*norm*", "lm_head"])
    saved = {w.tensor for w in plan.whole if w.save}
    assert "model.norm.weight" in saved and "model.layers.1.input_layernorm.weight" in saved
    assert "lm_head.weight" in saved and "lm_head" not in {p.module for p in plan.pairs}


def test_include_and_exclude_select_modules():
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED, include=["*self_attn*"], exclude=["*.k_proj"])
    assert {p.module.rsplit(".", 1)[1] for p in plan.pairs} == {"q_proj", "v_proj", "o_proj"}
    assert plan.whole == []
    assert len(plan.excluded) == 21 - 6
    with pytest.raises(LoratoolsError, match="--include"):
        plan_for(LLAMA_BASE, LLAMA_TUNED, include=["nothing_like_this"])


def test_plain_words_match_as_substrings():
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED, include=["layers.1.mlp"])
    assert {p.module for p in plan.pairs} == {f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}


# ---- matching problems ----------------------------------------------------------------------------------------


def test_shape_mismatch_is_an_error_unless_skipped(tmp_path):
    base = {"embed.weight": torch.zeros(10, 4), "proj.weight": torch.zeros(4, 4)}
    tuned = {"embed.weight": torch.zeros(12, 4), "proj.weight": torch.ones(4, 4)}
    b, t = write_checkpoint_pair(tmp_path, base, tuned)
    with pytest.raises(ShapeError) as info:
        plan_for(b, t)
    message = str(info.value)
    assert "embed.weight" in message and "(10, 4)" in message and "(12, 4)" in message
    assert "--skip-mismatched" in message and str(t) in message
    plan = plan_for(b, t, skip_mismatched=True)
    assert plan.pairing.mismatched == [Mismatch("embed.weight", (10, 4), (12, 4))]
    assert [p.module for p in plan.pairs] == ["proj"]


def test_names_in_one_checkpoint_only_are_listed(tmp_path):
    base = {"a.weight": torch.zeros(4, 4), "old.weight": torch.zeros(4, 4)}
    tuned = {"a.weight": torch.ones(4, 4), "new.weight": torch.zeros(4, 4)}
    plan = plan_for(*write_checkpoint_pair(tmp_path, base, tuned))
    assert plan.pairing.only_in_base == ["old.weight"] and plan.pairing.only_in_tuned == ["new.weight"]
    assert [p.module for p in plan.pairs] == ["a"]


def test_checkpoints_with_no_common_names_are_refused(tmp_path):
    b, t = write_checkpoint_pair(tmp_path, {"a.weight": torch.zeros(2, 2)}, {"b.weight": torch.zeros(2, 2)})
    with pytest.raises(LoratoolsError, match="no tensor names in common"):
        plan_for(b, t)


# ---- layer kinds ------------------------------------------------------------------------------------------------


def test_sd_convolutions_linears_and_biases():
    plan = plan_for(SD_BASE, SD_TUNED)
    kinds = {p.module: p.kind for p in plan.pairs}
    assert kinds == {
        "unet.down_blocks.0.resnets.0.conv1": "conv2d",
        "unet.down_blocks.0.attentions.0.proj_in": "conv2d",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "linear",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "linear",
    }
    conv = next(p for p in plan.pairs if p.kind == "conv2d" and p.shape == (16, 8, 3, 3))
    assert conv.matrix_shape == (16, 72)
    assert all(w.tensor.endswith(".bias") and not w.save for w in plan.whole) and len(plan.whole) == 4
    assert "heuristics" in plan.kind_source and plan.task_type is None


@pytest.mark.parametrize("with_transformers", [True, False])
def test_gpt2_conv1d_layers_are_detected(gpt2_pair, with_transformers, monkeypatch):
    if not with_transformers:
        monkeypatch.setitem(sys.modules, "transformers", None)
    plan = plan_for(*gpt2_pair)
    kinds = {p.module: p.kind for p in plan.pairs}
    for layer in range(2):
        for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert kinds[f"transformer.h.{layer}.{module}"] == "conv1d", module
    assert kinds["transformer.wte"] == kinds["transformer.wpe"] == "embedding"
    c_attn = next(p for p in plan.pairs if p.module == "transformer.h.0.attn.c_attn")
    assert c_attn.shape == (32, 96) and c_attn.matrix_shape == (96, 32)
    assert plan.kind_source.startswith("transformers") == with_transformers
    assert plan.task_type == "CAUSAL_LM"


def test_conv1d_heuristic_reads_the_bias_shape(tmp_path):
    base = {
        "blk.fc.weight": torch.zeros(8, 24), "blk.fc.bias": torch.zeros(24),  # (in, out): transposed
        "blk.lin.weight": torch.zeros(24, 8), "blk.lin.bias": torch.zeros(24),  # (out, in): a Linear
        "other.fc.weight": torch.zeros(8, 8), "other.fc.bias": torch.zeros(8),  # square: follows its leaf name
    }
    plan = plan_for(*write_checkpoint_pair(tmp_path, base, base))
    assert {p.module: p.kind for p in plan.pairs} == {"blk.fc": "conv1d", "blk.lin": "linear", "other.fc": "conv1d"}
    assert "bias" in next(p for p in plan.pairs if p.module == "blk.fc").why


def test_layer_kinds_follow_the_module_types_of_the_architecture(monkeypatch):
    pytest.importorskip("transformers")
    from loratools.plan import layer_kinds

    monkeypatch.setattr(plan_module, "_modeling_source_lacks_conv1d", lambda model_type: False)
    kinds, source = layer_kinds({"model.norm.weight": (64,), "model.layers.0.self_attn.q_proj.weight": (64, 64)},
                                json.loads((LLAMA_BASE / "config.json").read_text()))
    assert kinds["model.norm.weight"][0] is None
    assert kinds["model.layers.0.self_attn.q_proj.weight"][0] == "linear"
    assert "LlamaForCausalLM" in source


def test_architectures_without_conv1d_skip_the_model_build():
    pytest.importorskip("transformers")
    from loratools.plan import _modeling_source_lacks_conv1d

    assert _modeling_source_lacks_conv1d("llama") and _modeling_source_lacks_conv1d("mistral")
    assert not _modeling_source_lacks_conv1d("gpt2")  # Conv1D: the model decides
    assert not _modeling_source_lacks_conv1d("some_remote_code_model")  # unknown: the model decides


# ---- names and shapes only --------------------------------------------------------------------------------------


def test_planning_reads_no_tensor_data(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"plan read tensor data for {name}")

    monkeypatch.setattr(TensorIndex, "get", refuse)
    plan = plan_for(LLAMA_BASE, LLAMA_TUNED, save_full=["*norm*"])
    assert [p["module"] for p in plan.to_json()["pairs"]][:3] == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj"]


def test_pairs_come_in_natural_order(tmp_path):
    base = {f"layers.{i}.proj.weight": torch.zeros(2, 2) for i in (10, 2, 1)}
    plan = plan_for(*write_checkpoint_pair(tmp_path, base, base))
    assert [p.module for p in plan.pairs] == ["layers.1.proj", "layers.2.proj", "layers.10.proj"]


def test_an_architecture_transformers_does_not_know_falls_back_to_heuristics():
    pytest.importorskip("transformers")
    from loratools.plan import layer_kinds

    kinds, source = layer_kinds({"blk.embed_tokens.weight": (10, 4), "blk.proj.weight": (4, 4)},
                                {"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"})
    assert "heuristics" in source and "no model class NoSuchModelForCausalLM" in source
    assert kinds["blk.embed_tokens.weight"][0] == "embedding" and kinds["blk.proj.weight"][0] == "linear"
