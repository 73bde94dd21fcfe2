"""genai_config.json from config dicts (pure), and the one-line refusals of ``export-onnx --genai`` that come
before any export: no tokenizer, an architecture onnxruntime-genai does not know, a model that is no causal LM,
an adapter name given twice, an existing folder; and nothing half-written when a step fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.errors import CheckpointError, ExportError, LoratoolsError
from loratools.export.genai_bundle import BundleOptions, ServedAdapter
from loratools.export.genai_config import MODEL_TYPES, genai_config, model_type, search_defaults, token_ids
from tests.helpers import assert_one_line_error, run_cli

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 128, "head_dim": 16,
         "bos_token_id": 1, "eos_token_id": 2}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_head": 4, "n_layer": 3, "vocab_size": 80,
        "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}


def graph_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    present = [f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def test_llama_config():
    inputs, outputs = graph_names(2)
    written = genai_config(LLAMA, None, inputs=[*inputs, "model.layers.0.self_attn.q_proj.lora_A.weight"],
                           outputs=outputs)
    model = written["model"]
    assert model["type"] == "llama" and model["context_length"] == 128 and model["vocab_size"] == 256
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 2)
    assert model["decoder"]["head_size"] == 16 and model["decoder"]["num_key_value_heads"] == 2
    assert model["decoder"]["inputs"] == {
        "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    assert written["search"] == {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
                                 "max_length": 128, "past_present_share_buffer": False, "temperature": 1.0,
                                 "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def test_gpt2_spellings_and_generic_decoder_type():
    inputs, outputs = graph_names(3)
    model = genai_config(GPT2, {}, inputs=inputs, outputs=outputs)["model"]
    assert model["type"] == "decoder"  # the runtime's "gpt2" type wants one combined past tensor per layer
    decoder = model["decoder"]
    assert (decoder["hidden_size"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["num_hidden_layers"], decoder["head_size"]) == (32, 4, 4, 3, 8)
    assert model["context_length"] == 64


def test_token_ids_follow_the_generation_config():
    assert token_ids(LLAMA, {"eos_token_id": [2, 7, 2], "pad_token_id": 0}) == {
        "bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0}
    assert token_ids({"eos_token_id": [5]}, {}) == {"eos_token_id": 5, "pad_token_id": 5}
    assert token_ids({}, {}) == {}


def test_search_defaults_from_the_generation_config():
    search = search_defaults({"do_sample": True, "temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1},
                             context_length=512)
    assert search["do_sample"] is True and search["temperature"] == 0.6 and search["top_k"] == 20
    assert search["top_p"] == 1.0 and search["repetition_penalty"] == 1.1 and search["max_length"] == 512


@pytest.mark.parametrize("config, message", [
    ({**LLAMA, "architectures": ["FalconMambaForCausalLM"]}, "no onnxruntime-genai model type"),
    ({**LLAMA, "architectures": ["BertModel"]}, "not a causal LM"),
    ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "vocab_size"),
    ({**LLAMA, "num_hidden_layers": "2"}, "positive integer"),
])
def test_bad_configs(config, message):
    inputs, outputs = graph_names(2)
    with pytest.raises((ExportError, CheckpointError), match=message):
        genai_config(config, None, inputs=inputs, outputs=outputs)


def test_graph_without_the_kv_cache_is_refused():
    with pytest.raises(ExportError, match="past_key_values.0.key"):
        genai_config(LLAMA, None, inputs=["input_ids", "attention_mask"], outputs=["logits"])
    inputs, outputs = graph_names(3)
    with pytest.raises(ExportError, match="beyond the 2 layers"):
        genai_config(LLAMA, None, inputs=inputs, outputs=outputs)


def test_every_mapped_type_is_on_the_runtimes_list():
    runtime_llms = {"chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "gptoss", "granite",
                    "internlm2", "lfm2", "llama", "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3",
                    "phi3small", "qwen2", "qwen3", "smollm3"}  # onnxruntime-genai 0.18, ModelType::IsLLM
    assert set(MODEL_TYPES.values()) <= runtime_llms
    assert model_type({"architectures": ["Qwen2ForCausalLM"]}, label="x") == "qwen2"


def test_served_adapter_names():
    assert ServedAdapter.parse("out/chat-lora") == ServedAdapter("chat-lora", "out/chat-lora")
    assert ServedAdapter.parse("style=a/b.safetensors") == ServedAdapter("style", "a/b.safetensors")
    assert ServedAdapter.parse("x/style.safetensors").name == "style"
    with pytest.raises(LoratoolsError, match="given twice"):
        BundleOptions(serve=(ServedAdapter("a", "x"), ServedAdapter("a", "y")))


# ---- the CLI's refusals, before any export ---------------------------------------------------------------------


def fake_model(folder: Path, *, config: dict = LLAMA, tokenizer: bool = True) -> Path:
    """A model folder with a config (and a tokenizer.json) but no weights: every refusal here comes first."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    if tokenizer:
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    return folder


def refused(*args: str | Path) -> str:
    result = run_cli("export-onnx", *args, "--genai", expect=2)
    assert_one_line_error(result)
    return result.output


def test_no_tokenizer_names_the_fix(tmp_path):
    model = fake_model(tmp_path / "m", tokenizer=False)
    line = refused(model, "-o", tmp_path / "bundle")
    assert "--tokenizer" in line and "--no-tokenizer" in line
    assert not (tmp_path / "bundle").exists()
    wordpiece = fake_model(tmp_path / "w")
    (wordpiece / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    assert "WordPiece" in refused(wordpiece, "-o", tmp_path / "bundle")


def test_unknown_architecture_and_no_causal_lm(tmp_path):
    unknown = fake_model(tmp_path / "u", config={**LLAMA, "architectures": ["FalconMambaForCausalLM"]})
    assert "FalconMambaForCausalLM" in refused(unknown, "-o", tmp_path / "bundle")
    encoder = fake_model(tmp_path / "e", config={**LLAMA, "architectures": ["BertModel"]})
    assert "not a causal LM" in refused(encoder, "-o", tmp_path / "bundle")
    sizeless = fake_model(tmp_path / "s", config={k: v for k, v in LLAMA.items() if k != "vocab_size"})
    assert "vocab_size" in refused(sizeless, "-o", tmp_path / "bundle")  # before the export, which would need weights
    assert not (tmp_path / "bundle").exists()


def test_adapter_name_twice_and_existing_folder(tmp_path):
    model = fake_model(tmp_path / "m")
    (tmp_path / "a").mkdir()
    line = refused(model, "--lora-slots", "q_proj", "--serve", f"x={tmp_path / 'a'}", "--serve",
                   f"x={tmp_path / 'a'}", "-o", tmp_path / "bundle")
    assert "'x' given twice" in line
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("mine")
    assert "--force" in refused(model, "-o", tmp_path / "bundle")
    assert (tmp_path / "bundle" / "keep.txt").read_text() == "mine"


def test_nothing_half_written_when_a_step_fails(tmp_path, monkeypatch):
    import loratools.export.genai_bundle as genai_bundle

    model = fake_model(tmp_path / "m")

    def failing_export(model, out, **kwargs):  # writes part of the bundle, then fails as a real export can
        Path(out).write_bytes(b"half a graph")
        raise ExportError(f"{out}: verification failed")

    monkeypatch.setattr(genai_bundle, "export_onnx", failing_export)
    run_cli("export-onnx", model, "--genai", "-o", tmp_path / "out" / "bundle", expect=2)
    assert not (tmp_path / "out" / "bundle").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left either
