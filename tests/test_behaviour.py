"""verify / spectrum --behaviour on a real fine-tune made here: a tiny Llama trained on a pattern its base does not
know. Metrics are checked against transformers' own logits (torch.nn.functional.kl_div, argmax), base + adapter
against PEFT, and the encoder case against transformers' hidden states."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from loratools.behaviour import spectrum_behaviour, token_windows, verify_behaviour
from loratools.extraction import extract
from loratools.options import BehaviourOptions, RankPolicy, Selection, SvdSettings
from tests.behaviour_helpers import FineTune, char_tokenizer, make_finetune, pattern, pattern_text
from tests.helpers import LLAMA_BASE, LLAMA_PEFT, LLAMA_TUNED, assert_one_line_error, make_gpt2_pair, run_cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NORMS = Selection(save_full=("*norm*",))


@pytest.fixture(scope="module")
def finetune(tmp_path_factory) -> FineTune:
    return make_finetune(tmp_path_factory.mktemp("finetune"))


def llama(folder) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def with_adapter(base, adapter) -> torch.nn.Module:
    """base + adapter, loaded by PEFT (the judge) and merged."""
    return peft.PeftModel.from_pretrained(llama(base), str(adapter)).merge_and_unload().eval()


def test_the_finetune_learned_a_pattern_the_base_does_not_know(finetune):
    ids = pattern(finetune.successor, torch.arange(2, 64, 5), 20)
    with torch.no_grad():
        tuned = llama(finetune.tuned)(ids).logits.argmax(-1)[:, :-1]
        base = llama(finetune.base)(ids).logits.argmax(-1)[:, :-1]
    assert (tuned == ids[:, 1:]).float().mean() > 0.95
    assert (base == ids[:, 1:]).float().mean() < 0.2


@pytest.mark.slow
def test_share_recovered_rises_with_rank_and_reaches_one_at_full_rank(finetune):
    options = BehaviourOptions(texts=(str(finetune.text),))
    report = spectrum_behaviour(finetune.base, finetune.tuned, ranks=[2, 8, 16, 32], selection=NORMS, options=options)
    shares = [row["share_recovered"] for row in report.rows()]
    assert shares == sorted(shares) and shares[0] < 0.5
    assert shares[-1] > 0.999  # rank 32 = min(out, in) of every layer, norms saved whole: the fine-tune itself
    full, base = report.behaviour.adapted[-1], report.behaviour.base
    assert base.gap > 1000 * full.gap and base.gap > 1.0  # KL(tuned ‖ base) ≫ KL(tuned ‖ adapted)
    assert report.behaviour.left_out == []
    assert report.recommended_rank() == next(row["rank"] for row in report.rows() if row["share_recovered"] >= 0.95)
    errors = [row["rel_error"] for row in report.rows()]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5
    assert report.behaviour.tuned.perplexity < 1.2 < 30 < base.perplexity


def test_high_rank_adapter_reproduces_greedy_tokens(finetune, tmp_path):
    extract(finetune.base, finetune.tuned, tmp_path / "lora", policy=RankPolicy("rank", 16), selection=NORMS)
    prompt = pattern(finetune.successor, torch.tensor([7, 30, 51]), 6)
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    tuned = llama(finetune.tuned).generate(prompt, **kwargs)
    adapted = with_adapter(finetune.base, tmp_path / "lora").generate(prompt, **kwargs)
    base = llama(finetune.base).generate(prompt, **kwargs)
    assert torch.equal(adapted, tuned)
    assert torch.equal(tuned, pattern(finetune.successor, prompt[:, 0], 26))  # the tuned model follows the pattern
    assert not torch.equal(base, tuned)


def test_metrics_equal_a_direct_computation_from_transformers_logits(finetune, tmp_path):
    extract(finetune.base, finetune.tuned, tmp_path / "lora", policy=RankPolicy("rank", 8))
    report = verify_behaviour(finetune.base, finetune.tuned, tmp_path / "lora",
                              options=BehaviourOptions(texts=(str(finetune.text),), batch_size=1)).behaviour
    ids = torch.tensor([char_tokenizer()(finetune.text.read_text())["input_ids"]])
    with torch.no_grad():
        tuned = F.log_softmax(llama(finetune.tuned)(ids).logits[0, :-1], -1)
        models = {"base": llama(finetune.base), "adapter": with_adapter(finetune.base, tmp_path / "lora")}
        rows = {"base": report.base, "adapter": report.adapted[0]}
        for label, model in models.items():
            logits = model(ids).logits[0, :-1]
            kl = F.kl_div(F.log_softmax(logits, -1), tuned, log_target=True, reduction="none").sum(-1)
            row = rows[label]
            assert row.gap == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7), label
            assert row.gap_p95 == pytest.approx(float(torch.quantile(kl.double(), 0.95)), rel=1e-4, abs=1e-7), label
            assert row.top1_agreement == float((logits.argmax(-1) == tuned.argmax(-1)).double().mean()), label
            nll = F.cross_entropy(logits, ids[0, 1:])
            assert row.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4), label
    assert report.positions == ids.shape[1] - 1
    assert report.share(report.adapted[0]) == pytest.approx(1 - report.adapted[0].gap / report.base.gap)
    # the norms changed too: no LoRA holds them; adding them back closes part of the gap
    assert len(report.left_out) == 5 and report.with_left_out is not None
    assert report.with_left_out.gap < report.adapted[0].gap


def test_encoder_hidden_and_pooled_cosines(tmp_path):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=40)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for linear in (layer.attention.self.query, layer.attention.self.value):
                linear.weight += torch.randn(32, 2, generator=gen) @ torch.randn(2, 32, generator=gen) * 0.3
    model.save_pretrained(tmp_path / "tuned")
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", policy=RankPolicy("rank", 2),
            svd=SvdSettings(exact=True))
    options = BehaviourOptions(max_tokens=200, batch_size=2)
    report = verify_behaviour(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", options=options).behaviour
    assert report.kind == "encoder" and any("random token" in note for note in report.notes)
    windows = token_windows(options, None, vocab_size=50, context=40, minimum=1).windows
    ids = torch.stack(windows)
    with torch.no_grad():
        tuned = model(ids).last_hidden_state
        base = transformers.BertModel.from_pretrained(str(tmp_path / "base")).eval()(ids).last_hidden_state
    cos = F.cosine_similarity(tuned, base, dim=-1).flatten().double()
    assert 1 - report.base.gap == pytest.approx(float(cos.mean()), rel=1e-5)
    assert 1 - report.base.gap_p95 == pytest.approx(float(torch.quantile(cos, 0.05)), rel=1e-5)
    pooled = F.cosine_similarity(tuned.mean(1), base.mean(1), dim=-1)
    assert report.base.pooled_cosine == pytest.approx(float(pooled.mean()), rel=1e-5)
    assert report.base.gap > 1e-3 and report.adapted[0].gap < 1e-6  # the rank-2 adapter is the exact delta
    assert report.share(report.adapted[0]) > 0.999


@pytest.mark.slow
def test_cli_spectrum_behaviour_table_json_and_plot(finetune, tmp_path):
    args = ["spectrum", finetune.base, finetune.tuned, "--behaviour", "--ranks", "4,32", "--save-full", "*norm*",
            "--text", finetune.text, "--recover", "0.99"]
    data = json.loads(run_cli(*args, "--json").stdout)
    assert [row["rank"] for row in data["ranks"]] == [4, 32] and data["recommended_rank"] == 32
    assert data["behaviour"]["base"]["share_recovered"] == 0
    shown = run_cli(*args, "-q", "--plot", tmp_path / "curves.png").stdout
    assert "recommended rank to recover 99% of the fine-tune: 32" in shown and "not a task benchmark" in shown
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_no_tokenizer_falls_back_to_random_tokens_only_without_text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("hello")
    result = run_cli("verify", LLAMA_BASE, LLAMA_TUNED, LLAMA_PEFT, "--behaviour", "--text", text, expect=None)
    assert_one_line_error(result, "text.txt", "tokenizer", "leave out --text")
    result = run_cli("verify", LLAMA_BASE, LLAMA_TUNED, LLAMA_PEFT, "--behaviour", "--max-tokens", "256", "--json")
    assert "random token sequences" in result.stderr and "no tokenizer" in result.stderr
    assert json.loads(result.stdout)["behaviour"]["positions"] == 2 * 127


def test_text_longer_than_the_context_is_split(finetune, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(pattern_text(finetune.successor, 150))
    extract(finetune.base, finetune.tuned, tmp_path / "lora", policy=RankPolicy("rank", 4))
    result = run_cli("verify", finetune.base, finetune.tuned, tmp_path / "lora", "--behaviour", "--text", text,
                     "--json")
    assert "long.txt: 150 tokens, longer than the model's context of 64: split into 3 windows" in result.stderr
    assert json.loads(result.stdout)["behaviour"]["positions"] == 63 + 63 + 21


def test_adapter_for_another_model_is_one_line(finetune):
    result = run_cli("verify", finetune.base, finetune.tuned, LLAMA_PEFT, "--behaviour", expect=None)
    assert_one_line_error(result, "llama-lora-peft", "another model")


@pytest.mark.parametrize("kind", ["t5", "vit"])
def test_a_model_that_is_neither_causal_nor_a_text_encoder_is_one_line(tmp_path, kind):
    if kind == "t5":  # encoder-decoder
        config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
        expected = ("t5", "encoder-decoder", "causal LMs")
    else:  # reads pixel values
        config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, image_size=8, patch_size=4)
        transformers.ViTModel(config).save_pretrained(tmp_path / "base")
        expected = ("vit", "pixel_values", "not token ids")
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    result = run_cli("spectrum", tmp_path / "base", tmp_path / "tuned", "--behaviour", expect=None)
    assert_one_line_error(result, *expected)


def test_gpt2_conv1d_layers_merge_in_their_own_layout(tmp_path):
    base, tuned = make_gpt2_pair(tmp_path, delta_rank=3)
    options = BehaviourOptions(max_tokens=128)
    report = spectrum_behaviour(base, tuned, ranks=[1, 3], selection=Selection(save_full=("*ln_f*",)),
                                options=options)
    low, exact = report.behaviour.adapted
    assert report.behaviour.architecture == "GPT2LMHeadModel" and report.behaviour.left_out == []
    assert report.behaviour.share(low) < 0.99 < report.behaviour.share(exact)  # rank 3 is the planted delta
