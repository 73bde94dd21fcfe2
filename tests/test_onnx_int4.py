"""export-onnx --quantize int4 (onnxruntime's MatMulNBits weight-only quantizer), plain and with LoRA slots.

Judges: onnxruntime runs every graph BY THE TEST and is compared with PEFT's ``merge_and_unload`` in PyTorch
(cosine, closer to the merged model than to the base with an adapter active and the other way round without),
numpy's matmul for a one-node graph, onnxruntime-genai's generator against the test's own onnxruntime greedy loop.
Tiny Llama (hidden 32, 2 layers, GQA, vocab 64); each export once per module.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from loratools.export.quantize import Int4Options, quantize_int4
from tests.helpers import LLAMA_BASE, assert_one_line_error, run_cli, save_tiny_llama
from tests.onnx_helpers import (
    causal_feeds,
    export,
    ort_greedy,
    peft_adapter,
    peft_merged,
    session,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

SLOTS = "q_proj,v_proj"
WEIGHT_MATMULS = 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
IDS = torch.arange(2 * 9).reshape(2, 9) % 61 + 3


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(IDS).logits.numpy()


def run_graph(path: Path, adapter: Path | None = None) -> np.ndarray:
    import onnxruntime as ort

    sess = session(path)
    past = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    options = ort.RunOptions()
    lora = ort.LoraAdapter()
    if adapter is not None:
        lora.Load(str(adapter))
        options.add_active_adapter(lora)
    return sess.run(["logits"], {**causal_feeds(IDS), **past}, options)[0]


def nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    load = save_tiny_llama(root / "base")
    peft_adapter(load(), root / "x", ["q_proj", "v_proj"], seed=1)
    plain = export(root / "base", "-a", root / "x", "--with-past", "--quantize", "int4", "-o", root / "int4.onnx")
    slotted = export(root / "base", "--lora-slots", SLOTS, "--with-past", "--quantize", "int4",
                     "-o", root / "slots.onnx")
    run_cli("export-adapter", root / "x", "--onnx", root / "slots.onnx", "-o", root / "x.onnx_adapter", "-q")
    return root, plain, slotted, {"merged": peft_merged(load(), root / "x"), "base": load()}


# ---- plain graph ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_weight_matmul_is_int4(tiny):
    root, report, _, _ = tiny
    graph = nodes(root / "int4.onnx")
    quantized = [n for n in graph if n.op_type == "MatMulNBits"]
    assert len(quantized) == WEIGHT_MATMULS == report["int4"]["quantized"]
    initializers = {i.name for i in onnx.load(str(root / "int4.onnx")).graph.initializer}
    assert not [n.name for n in graph if n.op_type == "MatMul" and n.input[1] in initializers]
    attributes = {a.name: helper.get_attribute_value(a) for a in quantized[0].attribute}
    assert (attributes["bits"], attributes["block_size"], attributes["accuracy_level"]) == (4, 32, 4)
    assert report["int4"]["options"] == {"block_size": 32, "symmetric": True, "accuracy_level": 4}
    weights = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(root / "int4.onnx")).graph.initializer)
    assert weights < 0.5 * report["fp32_bytes"]  # the embedding stays fp32; the rest is 4 bits + a scale per 32


@pytest.mark.slow
def test_int4_runs_close_to_the_merged_model(tiny):
    root, report, _, models = tiny
    got = run_graph(root / "int4.onnx")
    assert cosine(got, torch_logits(models["merged"])) > 0.98
    accuracy = report["accuracy"]
    assert report["verification"]["passed"] and accuracy["logits_cosine"] > 0.98
    assert 0.5 <= accuracy["top1"] <= 1.0 and accuracy["greedy_steps"] == 8
    assert 0 <= accuracy["greedy_matched"] <= 8


@pytest.mark.slow
def test_int4_bundle_generates_in_onnxruntime_genai(tiny, tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install onnxruntime-genai)")
    root = tiny[0]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("int4.onnx", "int4.onnx.data"):
        if (root / name).exists():
            (bundle / name).write_bytes((root / name).read_bytes())
    config = json.loads((root / "base" / "config.json").read_text())
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    decoder = {"filename": "int4.onnx", "head_size": config["hidden_size"] // config["num_attention_heads"],
               "hidden_size": config["hidden_size"], "num_attention_heads": config["num_attention_heads"],
               "num_hidden_layers": config["num_hidden_layers"], "num_key_value_heads": config["num_key_value_heads"],
               "inputs": names, "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                            "present_value_names": "present.%d.value"}}
    prompt = np.array([5, 9, 17, 33, 40], dtype=np.int32)
    expected = ort_greedy(session(root / "int4.onnx"), prompt[None].astype(np.int64), 8)
    eos = min(set(range(config["vocab_size"])) - set(expected))  # a stop token greedy decoding does not meet
    (bundle / "genai_config.json").write_text(json.dumps({
        "model": {"type": "llama", "bos_token_id": 1, "eos_token_id": eos, "pad_token_id": eos, "context_length": 64,
                  "vocab_size": config["vocab_size"], "decoder": decoder},
        "search": {"max_length": 64, "do_sample": False, "past_present_share_buffer": False}}))
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    assert tokens == expected


# ---- slotted graph: the base in int4, the LoRA branches in float ----------------------------------------------


@pytest.mark.slow
def test_lora_branch_stays_float(tiny):
    root, _, report, _ = tiny
    model = onnx.load(str(root / "slots.onnx"), load_external_data=False)
    slot_inputs = {i.name: i for i in model.graph.input if i.name.endswith((".lora_A.weight", ".lora_B.weight"))}
    assert len(slot_inputs) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    assert {i.type.tensor_type.elem_type for i in slot_inputs.values()} == {TensorProto.FLOAT}
    readers = [n for n in model.graph.node if set(n.input) & set(slot_inputs)]
    assert len(readers) == len(slot_inputs) and {n.op_type for n in readers} == {"MatMul"}
    assert sorted(report["int4"]["kept_float"]) == sorted(n.name for n in readers)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == WEIGHT_MATMULS


@pytest.mark.slow
def test_adapter_switches_an_int4_base(tiny):
    root, _, _, models = tiny
    merged, base = torch_logits(models["merged"]), torch_logits(models["base"])
    active, none = run_graph(root / "slots.onnx", root / "x.onnx_adapter"), run_graph(root / "slots.onnx")
    assert cosine(active, merged) > 0.98 and cosine(none, base) > 0.98
    assert np.abs(active - merged).max() < np.abs(active - base).max()
    assert np.abs(none - base).max() < np.abs(none - merged).max()


# ---- quantize_int4 on a one-node graph: options, accuracy against numpy, the root logger ----------------------


def one_matmul(path: Path, weight: np.ndarray) -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("options", [Int4Options(), Int4Options(block_size=16, symmetric=False),
                                     Int4Options(block_size=64, accuracy_level=1)])
def test_one_matmul_against_numpy(tmp_path, options):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    one_matmul(tmp_path / "f.onnx", weight)
    summary = quantize_int4(tmp_path / "f.onnx", tmp_path / "q.onnx", options=options, external=False)
    (node,) = nodes(tmp_path / "q.onnx")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "MatMulNBits" and summary.quantized == 1
    assert (attributes["block_size"], attributes["accuracy_level"]) == (options.block_size, options.accuracy_level)
    assert (len(node.input) == 4) == (not options.symmetric)  # zero points only when asymmetric
    got = session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    expected = x @ weight
    assert np.abs(got - expected).max() < 0.2 * np.abs(expected).max() and cosine(got, expected) > 0.99


def test_external_data_readable_like_the_graph(tmp_path):
    one_matmul(tmp_path / "f.onnx", np.ones((64, 48), np.float32))
    quantize_int4(tmp_path / "f.onnx", tmp_path / "q.onnx", external=True)
    graph, data = tmp_path / "q.onnx", tmp_path / "q.onnx.data"
    assert data.stat().st_size > 0 and data.stat().st_mode & 0o777 == graph.stat().st_mode & 0o777
    assert session(graph).run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 48)


@pytest.mark.slow
def test_root_logger_untouched_by_the_quantizer_import(tmp_path):
    """onnxruntime's quantizer calls logging.basicConfig(level=INFO) when first imported: a fresh process shows
    that quantize_int4 leaves the root logger's handlers and level as they were."""
    one_matmul(tmp_path / "f.onnx", np.ones((64, 48), np.float32))
    script = ("import logging, sys; from pathlib import Path; from loratools.export.quantize import quantize_int4;"
              f"quantize_int4(Path({str(tmp_path / 'f.onnx')!r}), Path({str(tmp_path / 'q.onnx')!r}), external=False);"
              "root = logging.getLogger(); print(len(root.handlers), root.level)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.stdout.split() == ["0", str(logging.WARNING)] and done.stderr == ""


def test_quantizer_logs_nothing(tmp_path, capfd, caplog):
    one_matmul(tmp_path / "f.onnx", np.ones((64, 48), np.float32))
    with caplog.at_level(logging.DEBUG):
        quantize_int4(tmp_path / "f.onnx", tmp_path / "q.onnx", external=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "" and not caplog.records


# ---- bad options: one line each, nothing written ------------------------------------------------------------


@pytest.mark.parametrize(("args", "needles"), [
    (("--quantize", "int4", "--block-size", "48"), ("--block-size 48", "16, 32, 64, 128 or 256")),
    (("--block-size", "64"), ("--quantize int4",)),
    (("--quantize", "int8", "--asymmetric"), ("--quantize int4",)),
    (("--quantize", "int4", "--accuracy-level", "7"), ("--accuracy-level 7",)),
    (("--quantize", "int4", "--dtype", "fp16"), ("--dtype fp16",)),
])
def test_bad_int4_options(tmp_path, args, needles):
    result = run_cli("export-onnx", LLAMA_BASE, "-o", tmp_path / "m.onnx", *args, expect=2)
    assert_one_line_error(result, *needles)
    assert list(tmp_path.iterdir()) == []


def test_cli_defaults_are_the_librarys():
    from loratools.cli.export import export_onnx_command
    from loratools.export.onnx_export import QUANTIZE

    params = {p.name: p for p in export_onnx_command.params}
    assert tuple(params["quantize"].type.choices) == QUANTIZE
    defaults = Int4Options()
    assert (params["block_size"].default, params["accuracy_level"].default) == (defaults.block_size,
                                                                               defaults.accuracy_level)
    assert params["asymmetric"].is_flag and defaults.symmetric  # the flag off gives the default
