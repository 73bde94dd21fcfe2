"""onnxruntime-genai bundles (``export-onnx --genai``) and ``loratools generate``, judged by onnxruntime-genai
itself, transformers' ``generate`` and PEFT's merge; tokenizers (byte-level BPE with a chat template) are built
here, models are tiny random ones (a GQA Llama; a Qwen2 with biases and tied embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli, save_tiny_gpt2
from tests.onnx_helpers import export, peft_adapter, peft_merged

og = pytest.importorskip("onnxruntime_genai")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.slow

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "low rank adapters are small matrices", "tell me about LoRA adapters."]
VOCAB = 320
TEXTS = ["hello world", "Tell me about LoRA adapters.", "<|im_start|>user\nhi<|im_end|>", "ünïcödé ✓ 123"]


def save_tokenizer(folder: Path, tokenizer_class: str) -> None:
    """A byte-level BPE tokenizer trained on CORPUS, eos <|im_end|>, pad <|endoftext|>, with TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 24, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = tokenizer_class
    config_path.write_text(json.dumps(config, indent=2))


def chat_ids(folder: Path, text: str) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def hf_greedy(model, prompt: list[int], steps: int, eos: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def og_greedy(model, prompt: list[int], steps: int, adapters=None, name: str | None = None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    if name:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    """A GQA Llama with a sampling generation config and two eos ids, its bundle, and the export's JSON."""
    root = tmp_path_factory.mktemp("genai-llama")
    source = root / "llama"
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=96,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9,
                                                            eos_token_id=[2, 0], bos_token_id=1, pad_token_id=0)
    model.save_pretrained(str(source))
    save_tokenizer(source, "LlamaTokenizerFast")
    result = export("--genai", source, "-o", root / "bundle", "--verify-tokens", "12")
    return {"source": source, "bundle": root / "bundle", "result": result}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict:
    """A Qwen2 (q/k/v biases, tied embeddings) bundle with LoRA slots serving two PEFT adapters."""
    root = tmp_path_factory.mktemp("genai-qwen")
    source = root / "qwen"
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                      eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(source))
    save_tokenizer(source, "Qwen2Tokenizer")
    load = lambda: transformers.Qwen2ForCausalLM.from_pretrained(str(source)).eval()  # noqa: E731
    peft_adapter(load(), root / "chat", ["q_proj", "v_proj"], seed=2)
    peft_adapter(load(), root / "code", ["q_proj", "o_proj"], seed=3, r=6)
    result = export("--genai", source, "--lora-slots", "q_proj,v_proj,o_proj", "--serve", root / "chat",
                           "--serve", f"style={root / 'code'}", "-o", root / "bundle")
    return {"source": source, "bundle": root / "bundle", "result": result, "load": load,
            "adapters": {"chat": root / "chat", "style": root / "code"}}


def test_llama_bundle_generates_transformers_tokens(llama):
    result, bundle = llama["result"], llama["bundle"]
    assert sorted(result["files"]) == ["chat_template.jinja", "genai_config.json", "model.onnx", "tokenizer.json",
                                       "tokenizer_config.json"]
    check = result["verification"]
    assert check["passed"] and check["chat_template"] and check["tokenizer_agrees"]
    assert len(check["runs"]) == 1 and len(check["runs"][0]["genai"]) == 12
    # judged here again: the bundle's own tokenizer and chat template, onnxruntime-genai against transformers
    model = og.Model(str(bundle))
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "hello world"}]),
                                         add_generation_prompt=True)
    prompt = [int(t) for t in tokenizer.encode(text)]
    assert prompt == chat_ids(llama["source"], "hello world")
    reference = transformers.LlamaForCausalLM.from_pretrained(str(llama["source"])).eval()
    assert og_greedy(model, prompt, 20) == hf_greedy(reference, prompt, 20, eos=[2, 0])


def test_config_fields_are_the_models(llama, qwen):
    for case, kind in ((llama, "llama"), (qwen, "qwen2")):
        written = json.loads((case["bundle"] / "genai_config.json").read_text())
        config = json.loads((case["source"] / "config.json").read_text())
        model, decoder = written["model"], written["model"]["decoder"]
        assert model["type"] == kind
        assert model["context_length"] == config["max_position_embeddings"]
        assert model["vocab_size"] == config["vocab_size"]
        assert decoder["hidden_size"] == config["hidden_size"]
        assert decoder["num_attention_heads"] == config["num_attention_heads"]
        assert decoder["num_key_value_heads"] == config["num_key_value_heads"] == 2
        assert decoder["num_hidden_layers"] == config["num_hidden_layers"]
        assert decoder["head_size"] == config["hidden_size"] // config["num_attention_heads"]
        assert decoder["filename"] == "model.onnx"
        assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
        assert decoder["outputs"]["present_value_names"] == "present.%d.value"
        assert written["search"]["past_present_share_buffer"] is False
    llama_config = json.loads((llama["bundle"] / "genai_config.json").read_text())
    assert llama_config["model"]["eos_token_id"] == [2, 0]  # the generation config's list
    assert llama_config["model"]["bos_token_id"] == 1 and llama_config["model"]["pad_token_id"] == 0
    search = llama_config["search"]
    assert search["do_sample"] is True and search["temperature"] == 0.7 and search["top_p"] == 0.9
    qwen_config = json.loads((qwen["bundle"] / "genai_config.json").read_text())
    assert qwen_config["search"]["do_sample"] is False  # no generation config: greedy
    assert qwen_config["model"]["eos_token_id"] == 2 and qwen_config["model"]["pad_token_id"] == 2
    # the runtime reads the same values back
    tokenizer = og.Tokenizer(og.Model(str(llama["bundle"])))
    assert list(tokenizer.eos_token_ids) == [2, 0] and tokenizer.pad_token_id == 0


def test_bundle_tokenizer_encodes_like_the_source(llama, qwen):
    for case in (llama, qwen):
        source = transformers.AutoTokenizer.from_pretrained(str(case["source"]))
        tokenizer = og.Tokenizer(og.Model(str(case["bundle"])))
        for text in TEXTS:
            ids = [int(t) for t in tokenizer.encode(text)]
            assert ids == source(text)["input_ids"], text
            assert tokenizer.decode(ids) == source.decode(ids, skip_special_tokens=True)


def test_two_adapters_served_from_one_bundle(qwen):
    result, bundle = qwen["result"], qwen["bundle"]
    assert sorted(result["adapters"]) == ["chat", "style"]
    assert (bundle / "adapters" / "chat.onnx_adapter").is_file() and (bundle / "adapters" / "style.onnx_adapter").is_file()
    assert [run["adapter"] for run in result["verification"]["runs"]] == [None, "chat", "style"]
    assert result["verification"]["passed"]
    model = og.Model(str(bundle))
    adapters = og.Adapters(model)
    for name in ("chat", "style"):
        adapters.load(str(bundle / "adapters" / f"{name}.onnx_adapter"), name)
    prompt = chat_ids(qwen["source"], "tell me about adapters")
    base = hf_greedy(qwen["load"](), prompt, 16, eos=[2])
    expected = {name: hf_greedy(peft_merged(qwen["load"](), path), prompt, 16, eos=[2])
                for name, path in qwen["adapters"].items()}
    assert expected["chat"] != base and expected["style"] != base and expected["chat"] != expected["style"]
    for name in ("style", None, "chat", "style", None):  # switching per request, in one process
        got = og_greedy(model, prompt, 16, adapters, name)
        assert got == (expected[name] if name else base), name


def test_generate_streams_text_and_json(llama):
    bundle = llama["bundle"]
    as_json = json.loads(run_cli("generate", bundle, "--prompt", "hello world", "--chat", "--max-new-tokens", "10",
                                 "--greedy", "--json").stdout)
    prompt = chat_ids(llama["source"], "hello world")
    reference = transformers.LlamaForCausalLM.from_pretrained(str(llama["source"])).eval()
    assert as_json["tokens"] == hf_greedy(reference, prompt, 10, eos=[2, 0])
    assert as_json["prompt_tokens"] == len(prompt) and as_json["prefill_s"] > 0
    assert {"text", "tokens_per_s", "finish", "decode_s"} <= set(as_json)
    text = run_cli("generate", bundle, "--prompt", "hello world", "--chat", "--max-new-tokens", "10", "--greedy")
    assert as_json["text"] in text.stdout and "tokens/s" in text.stdout
    sampled = [json.loads(run_cli("generate", bundle, "--prompt", "hello", "--temperature", "1.5", "--top-p", "0.95",
                                  "--seed", str(seed), "--max-new-tokens", "12", "--json").stdout)["tokens"]
               for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_with_an_adapter(qwen):
    bundle = qwen["bundle"]
    prompt = chat_ids(qwen["source"], "hi")
    expected = hf_greedy(peft_merged(qwen["load"](), qwen["adapters"]["style"]), prompt, 8, eos=[2])
    out = json.loads(run_cli("generate", bundle, "--prompt", "hi", "--chat", "--adapter", "style",
                             "--max-new-tokens", "8", "--json").stdout)
    assert out["tokens"] == expected and out["adapter"] == "style"
    missing = run_cli("generate", bundle, "--prompt", "hi", "--adapter", "nope", expect=2)
    assert "nope" in missing.output and "chat, style" in missing.output


def test_gpt2_without_tokenizer_checked_by_onnxruntime_when_genai_is_missing(tmp_path, monkeypatch):
    """GPT-2 (Conv1D; the runtime's generic decoder type) bundled without a tokenizer. With onnxruntime-genai
    hidden, the export checks in onnxruntime only and one note says how to add the generation check; the
    bundle still runs in onnxruntime-genai as transformers does."""
    import loratools.export.genai_bundle as genai_bundle

    load = save_tiny_gpt2(tmp_path / "gpt2")
    monkeypatch.setattr(genai_bundle, "genai_installed", lambda: False)
    result = export("--genai", tmp_path / "gpt2", "--no-tokenizer", "-o", tmp_path / "bundle")
    assert result["verification"] is None and result["graph"]["verification"]["passed"]
    assert len(result["notes"]) == 1 and "pip install 'loratools[genai]'" in result["notes"][0]
    assert sorted(result["files"]) == ["genai_config.json", "model.onnx"]
    assert result["model_type"] == "decoder"
    model = og.Model(str(tmp_path / "bundle"))
    prompt = [5, 6, 7, 8]
    assert og_greedy(model, prompt, 12) == hf_greedy(load(), prompt, 12, eos=[1])
