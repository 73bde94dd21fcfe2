"""export-onnx: every export is run in onnxruntime BY THE TEST and compared with a merged model built
independently (PEFT ``merge_and_unload``, or base + deltas computed here from the adapter's raw tensors), not
only through the command's own verification report. Tiny models (hidden 32, 2 layers, vocab ≤ 128), one
export per module-scoped fixture."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import (
    LLAMA_BASE,
    LLAMA_PEFT,
    assert_one_line_error,
    llama_from,
    run_cli,
    save_tiny_gpt2,
    save_tiny_llama,
)
from tests.onnx_helpers import (
    causal_feeds,
    export,
    hf_greedy,
    initializer_shapes,
    ort_greedy,
    peft_adapter,
    peft_merged,
    session,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("onnxscript")

VOCAB = 64


# ---- Llama (GQA) + a PEFT and a kohya adapter with weights, with the KV cache ---------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = save_tiny_llama(root / "base")
    peft_adapter(base(), root / "peft", ["q_proj", "v_proj", "down_proj"], seed=1)
    generator = torch.Generator().manual_seed(2)
    kohya, deltas = {}, {}
    reference = base()
    for layer in range(2):
        for module in ("self_attn.o_proj", "mlp.up_proj"):
            weight = reference.get_submodule(f"model.layers.{layer}.{module}").weight
            down = torch.randn(3, weight.shape[1], generator=generator) * 0.3
            up = torch.randn(weight.shape[0], 3, generator=generator) * 0.3
            stem = f"lora_unet_model_layers_{layer}_{module.replace('.', '_')}"
            kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(6.0)}
            deltas[f"model.layers.{layer}.{module}.weight"] = up @ down * (6.0 / 3)
    save_file(kohya, str(root / "kohya.safetensors"))
    # the reference: base + 0.7·(PEFT deltas, from the raw tensors) + 0.5·(kohya deltas), built here
    peft_tensors = load_file(str(root / "peft" / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in peft_tensors.items():
            if ".lora_A." in key:
                b = peft_tensors[key.replace("lora_A", "lora_B")]
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                reference.get_parameter(name).add_(0.7 * (8 / 4) * (b @ a))
        for name, delta in deltas.items():
            reference.get_parameter(name).add_(0.5 * delta)
    report = export(root / "base", "-a", root / "peft", "-w", "0.7", "-a", root / "kohya.safetensors", "-w", "0.5",
                    "--with-past", "-o", root / "llama.onnx")
    return root, reference, report


def test_llama_adapters_match_independent_merge(llama):
    root, reference, report = llama
    assert report["verification"]["passed"] and report["merged_tensors"] == 6 + 4
    assert report["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert report["inputs"][3:] == ["past_key_values.0.key", "past_key_values.0.value",
                                    "past_key_values.1.key", "past_key_values.1.value"]
    assert report["outputs"] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert report["opset"] >= 18
    sess = session(root / "llama.onnx")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    past = {i.name: np.zeros((2, 2, 0, 8), np.float32) for i in sess.get_inputs() if i.name.startswith("past_")}
    logits = sess.run(["logits"], {**causal_feeds(ids), **past})[0]
    with torch.no_grad():
        expected = reference(ids).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    base = transformers.LlamaForCausalLM.from_pretrained(str(root / "base")).eval()
    with torch.no_grad():
        assert np.abs(base(ids).logits.numpy() - expected).max() > 1e-2  # the adapters did change the model


def test_llama_greedy_generation_with_cache_equals_transformers(llama):
    root, reference, _ = llama
    sess = session(root / "llama.onnx")
    prompt = torch.tensor([[5, 17, 33, 8, 40, 12]])
    assert ort_greedy(sess, prompt.numpy(), 12) == hf_greedy(reference, prompt, 12)


# ---- Qwen2: q/k/v biases, tied embeddings, bf16 sharded checkpoint, PEFT adapter --------------------------------


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(0, 0.5)  # biases that matter
    model.to(torch.bfloat16).save_pretrained(str(root / "base"), max_shard_size="40KB")
    assert (root / "base" / "model.safetensors.index.json").exists()
    load = lambda: transformers.Qwen2ForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()  # noqa: E731
    peft_adapter(load(), root / "peft", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], seed=4)
    reference = peft_merged(load(), root / "peft")
    report = export(root / "base", "-a", root / "peft", "-o", root / "qwen2.onnx")
    return root, reference, report


def test_qwen2_bf16_sharded_tied_with_adapter(qwen2):
    root, reference, report = qwen2
    assert report["verification"]["passed"] and report["source_dtype"] == "bfloat16" and report["dtype"] == "fp32"
    assert report["inputs"] == ["input_ids", "attention_mask", "position_ids"] and report["outputs"] == ["logits"]
    sess = session(root / "qwen2.onnx")
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(6))
    logits = sess.run(["logits"], causal_feeds(ids))[0]
    assert logits.dtype == np.float32
    with torch.no_grad():
        expected = reference(ids).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    shapes = initializer_shapes(root / "qwen2.onnx")
    assert sum(s in ((96, 32), (32, 96)) for s in shapes) == 1, "tied embedding stored more than once"
    names = {i.name for i in onnx.load(str(root / "qwen2.onnx")).graph.initializer}
    assert "model.layers.0.self_attn.q_proj.bias" in names


# ---- GPT-2 (Conv1D, fan_in_fan_out) + PEFT, with the KV cache ----------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    load = save_tiny_gpt2(root / "base")
    peft_adapter(load(), root / "peft", ["c_attn", "c_fc", "attn.c_proj"], seed=8, fan_in_fan_out=True)
    reference = peft_merged(load(), root / "peft")
    report = export(root / "base", "-a", root / "peft", "--with-past", "-o", root / "gpt2.onnx")
    return root, reference, report


def test_gpt2_conv1d_adapter_and_generation(gpt2):
    root, reference, report = gpt2
    assert report["verification"]["passed"] and report["verification"]["generation"]["passed"]
    sess = session(root / "gpt2.onnx")
    ids = torch.randint(0, 80, (2, 6), generator=torch.Generator().manual_seed(9))
    past = {i.name: np.zeros((2, 4, 0, 8), np.float32) for i in sess.get_inputs() if i.name.startswith("past_")}
    logits = sess.run(["logits"], {**causal_feeds(ids), **past})[0]
    with torch.no_grad():
        expected = reference(ids).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    prompt = torch.tensor([[3, 14, 15, 9, 2]])
    assert ort_greedy(sess, prompt.numpy(), 10) == hf_greedy(reference, prompt, 10)


# ---- BERT encoder + PEFT ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(10)
    transformers.BertModel(config).save_pretrained(str(root / "base"))
    load = lambda: transformers.BertModel.from_pretrained(str(root / "base")).eval()  # noqa: E731
    peft_adapter(load(), root / "peft", ["query", "value"], seed=11)
    reference = peft_merged(load(), root / "peft")
    report = export(root / "base", "-a", root / "peft", "-o", root / "bert.onnx")
    return root, reference, report


def test_bert_encoder_with_adapter(bert):
    root, reference, report = bert
    assert report["kind"] == "encoder" and report["verification"]["passed"]
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["outputs"] == ["last_hidden_state"]
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(12))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    types = torch.zeros(3, 10, dtype=torch.long)
    types[:, 5:] = 1
    hidden = session(root / "bert.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                                    "token_type_ids": types.numpy()})[0]
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state.numpy()
    valid = mask.numpy().astype(bool)
    np.testing.assert_allclose(hidden[valid], expected[valid], atol=1e-4, rtol=0)


def test_failed_verification_exits_2_and_leaves_nothing(bert, tmp_path):
    root = bert[0]
    out = tmp_path / "fail" / "model.onnx"
    result = run_cli("export-onnx", root / "base", "-o", out, "--atol", "1e-12", "-q", expect=2)
    assert_one_line_error(result, "verification failed", "last_hidden_state")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    result = run_cli("export-onnx", root / "base", "-o", out, "--atol", "1e-12", "--keep-on-fail", "-q", expect=2)
    assert_one_line_error(result, "verification failed", "kept")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]


# ---- the fixture Llama: external data, fp16, int8 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_llama_logits():
    ids = torch.arange(2 * 12).reshape(2, 12) % 250 + 3
    with torch.no_grad():
        return ids, llama_from(LLAMA_BASE)(ids).logits.numpy()


def test_external_data_flag(tmp_path, fixture_llama_logits):
    out = tmp_path / "ext" / "llama.onnx"
    report = export(LLAMA_BASE, "-o", out, "--external-data")
    assert report["external_data"] and report["verification"]["passed"]
    data = out.with_name("llama.onnx.data")
    assert sorted(report["files"]) == ["llama.onnx", "llama.onnx.data"] and data.exists()
    graph = onnx.load(str(out), load_external_data=False)
    inline = [i.name for i in graph.graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL and len(i.raw_data) >= 1024]
    assert inline == [] and data.stat().st_size > 200_000 and out.stat().st_size < data.stat().st_size / 2
    ids, expected = fixture_llama_logits
    np.testing.assert_allclose(session(out).run(["logits"], causal_feeds(ids))[0], expected, atol=1e-4, rtol=0)
    # --force over it without external data leaves no orphan .data file
    export(LLAMA_BASE, "-o", out, "--force", "--no-verify")
    assert not data.exists() and sorted(p.name for p in out.parent.iterdir()) == ["llama.onnx"]


def test_fp16(tmp_path, fixture_llama_logits):
    out = tmp_path / "llama16.onnx"
    report = export(LLAMA_BASE, "-o", out, "--dtype", "fp16")
    verification = report["verification"]
    assert verification["precision"] == "fp16" and verification["passed"] and verification["atol"] == 2e-2
    dtypes = {i.data_type for i in onnx.load(str(out)).graph.initializer if len(i.dims) == 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    ids, expected = fixture_llama_logits
    logits = session(out).run(["logits"], causal_feeds(ids))[0]
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=2e-2, rtol=0)


def test_int8_reports_agreement(tmp_path, fixture_llama_logits):
    out = tmp_path / "llama8.onnx"
    report = export(LLAMA_BASE, "-o", out, "--quantize", "int8")
    logits_metrics = report["verification"]["outputs"][0]
    assert report["quantize"] == "int8" and report["verification"]["passed"]
    assert logits_metrics["name"] == "logits" and logits_metrics["top1"] is not None
    assert logits_metrics["cosine"] > 0.99 and logits_metrics["max_abs_diff"] > 0
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert report["files"]["llama8.onnx"] < 0.6 * (LLAMA_BASE / "model.safetensors").stat().st_size
    ids, expected = fixture_llama_logits
    logits = session(out).run(["logits"], causal_feeds(ids))[0]
    cosine = float((logits * expected).sum() / np.linalg.norm(logits) / np.linalg.norm(expected))
    assert cosine > 0.99


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------------------------


def test_folder_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    result = run_cli("export-onnx", tmp_path / "model", "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "no config.json")
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_architecture(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuchLM"]}))
    result = run_cli("export-onnx", folder, "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "no-such-arch", "transformers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_adapter_for_another_model(bert, tmp_path):
    result = run_cli("export-onnx", LLAMA_BASE, "-a", bert[0] / "peft", "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "match no tensor")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    result = run_cli("export-onnx", LLAMA_BASE, "-o", out, expect=2)
    assert_one_line_error(result, "already exists", "--force")
    assert out.read_text() == "keep me"


def test_missing_extras_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    result = run_cli("export-onnx", LLAMA_BASE, "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "pip install 'loratools[export]'")


def test_symlinked_output_is_replaced_not_written_through(bert, tmp_path):
    target = tmp_path / "blob"
    target.write_text("a shared blob")
    link = tmp_path / "model.onnx"
    link.symlink_to(target)
    run_cli("export-onnx", bert[0] / "base", "-o", link, "--force", "--no-verify", "-q")
    assert not link.is_symlink() and link.stat().st_size > 1000
    assert target.read_text() == "a shared blob"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "model.onnx"]


def test_output_inside_the_model_folder_is_refused(bert):
    root = bert[0]
    before = sorted(p.name for p in (root / "base").iterdir())
    result = run_cli("export-onnx", root / "base", "-o", root / "base" / "model.onnx", expect=2)
    assert_one_line_error(result, "inside input")
    assert sorted(p.name for p in (root / "base").iterdir()) == before


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(bert, tmp_path, monkeypatch):
    import errno

    import loratools.export.runtime as runtime

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime, "save_ir", no_space)
    result = run_cli("export-onnx", bert[0] / "base", "-o", tmp_path / "out" / "m.onnx", expect=2)
    assert_one_line_error(result, "No space left on device", "m.onnx")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("command", ["merge-onnx", "export-adapter"])
def test_onnx_commands_without_the_export_extra_are_one_line(command, monkeypatch, tmp_path):
    """onnx_ir comes with the export extra (onnxscript): without it, one line with the install command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx_ir" else real(name, *a))
    graph = LLAMA_PEFT / "adapter_config.json"  # any existing file: the check comes before the graph is read
    args = (["merge-onnx", graph, "--base", LLAMA_BASE, "-a", LLAMA_PEFT] if command == "merge-onnx"
            else ["export-adapter", LLAMA_PEFT, "--onnx", graph])
    result = run_cli(*args, "-o", tmp_path / "out", expect=2)
    assert result.stderr == f"error: {command} needs onnx_ir: pip install 'loratools[export]'\n"
    assert list(tmp_path.iterdir()) == []
