"""onnxruntime multi-LoRA (export-onnx --lora-slots, export-adapter) and merging into an existing ONNX model
(merge-onnx). Every check runs the graph in onnxruntime BY THE TEST and compares it with references built
independently: PEFT ``merge_and_unload``, base + deltas computed here from raw tensors, or an export of the merged
checkpoint. Tiny models (hidden 32, 2 layers), module-scoped fixtures, each export once."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import loratools
from tests.helpers import assert_one_line_error, cli_json, run_cli, save_tiny_gpt2, save_tiny_llama
from tests.onnx_helpers import causal_feeds, peft_adapter, peft_merged, session

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("onnxscript")

VOCAB = 64
SLOTS = "q_proj,v_proj,o_proj,down_proj,up_proj"


# ---- helpers -----------------------------------------------------------------------------------------------


def run_adapter(sess: ort.InferenceSession, feeds: dict, adapter: Path | None) -> dict[str, np.ndarray]:
    options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        options.add_active_adapter(lora)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds, options), strict=True))


def prefill_then_decode(sess, ids: torch.Tensor, adapter: Path | None, split: int) -> np.ndarray:
    """Logits of all positions: a prefill of ids[:, :split] with an empty cache, then ids[:, split:] on its cache."""
    batch = ids.shape[0]
    past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    first = run_adapter(sess, {**causal_feeds(ids[:, :split]), **past}, adapter)
    cache = {k.replace("present.", "past_key_values."): v for k, v in first.items() if k.startswith("present.")}
    total = ids.shape[1]
    feeds = {"input_ids": ids[:, split:].numpy(), "attention_mask": np.ones((batch, total), np.int64),
             "position_ids": np.arange(split, total, dtype=np.int64)[None].repeat(batch, 0), **cache}
    second = run_adapter(sess, feeds, adapter)
    return np.concatenate([first["logits"], second["logits"]], axis=1)


def torch_logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


# ---- Llama: three adapters (PEFT, PEFT with rsLoRA + rank/alpha patterns, kohya with mixed ranks) on one graph ---


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilora")
    load = save_tiny_llama(root / "base")
    peft_adapter(load(), root / "x", ["q_proj", "v_proj", "down_proj"], seed=1)
    peft_adapter(load(), root / "y", ["q_proj", "o_proj", "down_proj"], seed=2, r=6, alpha=5, use_rslora=True,
              rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})
    # kohya: ranks 3 and 5 by layer, on o_proj and up_proj; reference deltas computed here from the raw tensors
    generator = torch.Generator().manual_seed(3)
    kohya, reference_k = {}, load()
    for layer, rank in ((0, 3), (1, 5)):
        for module in ("self_attn.o_proj", "mlp.up_proj"):
            weight = reference_k.get_submodule(f"model.layers.{layer}.{module}").weight
            down = torch.randn(rank, weight.shape[1], generator=generator) * 0.3
            up = torch.randn(weight.shape[0], rank, generator=generator) * 0.3
            stem = f"lora_unet_model_layers_{layer}_{module.replace('.', '_')}"
            kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                      f"{stem}.alpha": torch.tensor(4.0)}
            with torch.no_grad():
                reference_k.get_parameter(f"model.layers.{layer}.{module}.weight").add_(up @ down * (4.0 / rank))
    save_file(kohya, str(root / "k.safetensors"))
    report = cli_json("export-onnx", root / "base", "--lora-slots", SLOTS, "--with-past", "-o", root / "base.onnx")
    adapters = {}
    for name, source in (("x", root / "x"), ("y", root / "y"), ("k", root / "k.safetensors")):
        extra = ("--verify", root / "base") if name != "k" else ()
        adapters[name] = cli_json("export-adapter", source, "--onnx", root / "base.onnx", "-o",
                                  root / f"{name}.onnx_adapter", *extra)
    references = {"x": peft_merged(load(), root / "x"), "y": peft_merged(load(), root / "y"), "k": reference_k,
                  None: load()}
    return root, report, adapters, references


def test_slotted_graph_interface(llama):
    root, report, _, _ = llama
    assert report["verification"]["passed"] and report["verification"]["generation"]["passed"]
    assert len(report["slots"]) == 10 and report["slots"][0] == "model.layers.0.self_attn.q_proj"
    graph = onnx.load(str(root / "base.onnx"))
    inputs = {i.name: i for i in graph.graph.input}
    a = inputs["model.layers.0.self_attn.q_proj.lora_A.weight"].type.tensor_type.shape.dim
    b = inputs["model.layers.0.mlp.down_proj.lora_B.weight"].type.tensor_type.shape.dim
    assert (a[0].dim_value, a[1].dim_param) == (32, "lora_r_0") and b[1].dim_value == 32
    assert b[0].dim_param.startswith("lora_r_") and b[0].dim_param != "lora_r_0"  # one rank axis per slot
    defaults = {i.name: tuple(i.dims) for i in graph.graph.initializer if i.name.endswith((".lora_A.weight", ".lora_B.weight"))}
    assert len(defaults) == 20
    assert defaults["model.layers.1.mlp.up_proj.lora_A.weight"] == (32, 0)
    assert defaults["model.layers.1.mlp.up_proj.lora_B.weight"] == (0, 48)


def test_two_adapters_one_session_with_cache(llama):
    """One session; each adapter in turn (and none) equals its merged model, prefill and decoding with the cache."""
    root, _, _, references = llama
    sess = session(root / "base.onnx")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    seen = []
    for name in ("x", None, "y", "k", "x"):
        got = prefill_then_decode(sess, ids, root / f"{name}.onnx_adapter" if name else None, split=6)
        expected = torch_logits(references[name], ids)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=str(name))
        seen.append(expected)
    assert np.abs(seen[0] - seen[1]).max() > 1e-2 and np.abs(seen[2] - seen[0]).max() > 1e-2  # adapters matter


def test_adapter_files_hold_every_slot_with_its_rank(llama):
    root, _, adapters, _ = llama
    graph_inputs = {i.name for i in onnx.load(str(root / "base.onnx"), load_external_data=False).graph.input}
    for name, report in adapters.items():
        params = ort.AdapterFormat.read_adapter(str(root / f"{name}.onnx_adapter")).get_parameters()
        assert set(params) == {n for n in graph_inputs if n.endswith((".lora_A.weight", ".lora_B.weight"))}
        assert all(v.numpy().dtype == np.float32 for v in params.values())
        assert report["dtype"] == "float32" and report["parameters"] == 20
    y = adapters["y"]["ranks"]
    assert y["model.layers.0.self_attn.q_proj"] == 6 and y["model.layers.0.self_attn.o_proj"] == 2
    assert y["model.layers.0.self_attn.v_proj"] == 0 and y["model.layers.1.mlp.up_proj"] == 0
    k = adapters["k"]["ranks"]
    assert k["model.layers.0.mlp.up_proj"] == 3 and k["model.layers.1.mlp.up_proj"] == 5
    empty = ort.AdapterFormat.read_adapter(str(root / "x.onnx_adapter")).get_parameters()
    assert empty["model.layers.0.self_attn.o_proj.lora_A.weight"].numpy().shape == (32, 0)
    assert adapters["x"]["verification"]["passed"] and adapters["x"]["verification"]["generation"]["passed"]
    assert adapters["y"]["verification"]["outputs"][0]["max_abs_diff"] < 1e-4


def test_scale_folded_into_b(llama):
    """B carries weight · alpha/√r (rsLoRA) · the alpha pattern: check one module against the raw PEFT tensors."""
    root, *_ = llama
    out = root / "y-half.onnx_adapter"
    cli_json("export-adapter", root / "y", "--onnx", root / "base.onnx", "-o", out, "-w", "0.5")
    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(out)).get_parameters().items()}
    raw = peft.utils.load_peft_weights(str(root / "y"))
    key = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = raw[f"{key}.lora_A.weight"], raw[f"{key}.lora_B.weight"]
    scale = 0.5 * 3 / np.sqrt(6)  # alpha_pattern down_proj: 3, rsLoRA, rank 6
    got_a = params["model.layers.1.mlp.down_proj.lora_A.weight"]
    got_b = params["model.layers.1.mlp.down_proj.lora_B.weight"]
    np.testing.assert_allclose(got_a, a.T.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(got_b, scale * b.T.numpy(), rtol=1e-6, atol=1e-7)


# ---- GPT-2: Conv1D slots (fan_in_fan_out adapters), with the cache --------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-multilora")
    load = save_tiny_gpt2(root / "base")
    peft_adapter(load(), root / "x", ["c_attn", "c_fc"], seed=8, fan_in_fan_out=True)
    peft_adapter(load(), root / "y", ["c_attn", "mlp.c_proj"], seed=9, r=3, fan_in_fan_out=True,
              rank_pattern={"h.1.attn.c_attn": 5})
    report = cli_json("export-onnx", root / "base", "--lora-slots", "*.c_attn,*.c_fc,*.c_proj", "--with-past",
                      "-o", root / "base.onnx")
    for name in ("x", "y"):
        cli_json("export-adapter", root / name, "--onnx", root / "base.onnx", "-o", root / f"{name}.onnx_adapter")
    references = {"x": peft_merged(load(), root / "x"), "y": peft_merged(load(), root / "y"), None: load()}
    return root, report, references


def test_gpt2_conv1d_slots(gpt2):
    root, report, references = gpt2
    assert report["verification"]["passed"] and len(report["slots"]) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    sess = session(root / "base.onnx")
    ids = torch.randint(0, 80, (2, 8), generator=torch.Generator().manual_seed(10))
    for name in ("y", None, "x"):
        got = prefill_then_decode(sess, ids, root / f"{name}.onnx_adapter" if name else None, split=5)
        np.testing.assert_allclose(got, torch_logits(references[name], ids), atol=1e-4, rtol=0, err_msg=str(name))


# ---- fp16 slots --------------------------------------------------------------------------------------------------


def test_fp16_slots_take_fp16_adapters(llama, tmp_path):
    root, _, _, references = llama
    graph = tmp_path / "base16.onnx"
    report = cli_json("export-onnx", root / "base", "--lora-slots", "q_proj,v_proj,down_proj", "--dtype", "fp16", "-o", graph)
    assert report["verification"]["passed"] and report["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    slot = next(i for i in onnx.load(str(graph)).graph.input if i.name.endswith("q_proj.lora_A.weight"))
    assert slot.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    adapter = cli_json("export-adapter", root / "x", "--onnx", graph, "-o", tmp_path / "x16.onnx_adapter",
                       "--verify", root / "base")
    assert adapter["dtype"] == "float16" and adapter["verification"]["passed"]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(11))
    got = run_adapter(session(graph), causal_feeds(ids), tmp_path / "x16.onnx_adapter")["logits"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch_logits(references["x"], ids), atol=2e-2, rtol=0)


# ---- merging adapters into an existing ONNX model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_export(llama):
    """The reference: export-onnx of base + x (merged in memory), and a plain export of the base (names lost)."""
    root = llama[0]
    cli_json("export-onnx", root / "base", "-a", root / "x", "-w", "0.5", "-o", root / "merged-x.onnx", "--no-verify")
    cli_json("export-onnx", root / "base", "-o", root / "plain.onnx", "--no-verify")
    return root


def _logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    return session(path).run(["logits"], causal_feeds(ids))[0]


def test_onnx_merge_by_value_on_renamed_initializers(merged_export, tmp_path):
    root = merged_export
    names = [i.name for i in onnx.load(str(root / "plain.onnx")).graph.initializer]
    assert "model.layers.0.self_attn.q_proj.weight" not in names  # the exporter renamed the Linear weights
    report = cli_json("merge-onnx", root / "plain.onnx", "--base", root / "base", "-a", root / "x",
                      "-w", "0.5", "-o", tmp_path / "m.onnx")
    assert report["by_value"] == 6 and report["by_name"] == 0 and report["verification"]["passed"]
    assert all(p["transposed"] for p in report["placements"])
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(12))
    np.testing.assert_allclose(_logits(tmp_path / "m.onnx", ids), _logits(root / "merged-x.onnx", ids),
                               atol=1e-4, rtol=0)


def test_onnx_merge_by_name_on_a_torch_export_with_external_data(merged_export, tmp_path):
    root = merged_export
    model = transformers.LlamaForCausalLM.from_pretrained(str(root / "base")).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits

    ids = torch.randint(0, VOCAB, (2, 5))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    feeds = causal_feeds(ids)
    program = torch.onnx.export(Logits(model), tuple(torch.from_numpy(v) for v in feeds.values()), dynamo=True,
                                optimize=False, verbose=False, input_names=list(feeds), output_names=["logits"],
                                dynamic_shapes=({0: batch, 1: seq},) * 3)
    source = tmp_path / "src" / "torch.onnx"
    source.parent.mkdir()
    program.save(str(source), external_data=True)
    assert "inner.model.layers.0.self_attn.q_proj.weight" in [i.name for i in onnx.load(str(source)).graph.initializer]
    report = cli_json("merge-onnx", source, "--base", root / "base", "-a", root / "x", "-w", "0.5",
                      "-o", tmp_path / "m.onnx")
    assert report["by_name"] == 6 and report["by_value"] == 0 and report["external_data"]
    assert (tmp_path / "m.onnx.data").exists()
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(13))
    np.testing.assert_allclose(_logits(tmp_path / "m.onnx", ids), _logits(root / "merged-x.onnx", ids),
                               atol=1e-4, rtol=0)


def test_onnx_merge_refuses_an_adapter_for_another_model(merged_export, gpt2, tmp_path):
    result = run_cli("merge-onnx", merged_export / "plain.onnx", "--base", merged_export / "base",
                     "-a", gpt2[0] / "x", "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "match no tensor")
    assert list(tmp_path.iterdir()) == []


def test_onnx_merge_tensors_not_in_the_graph(merged_export, gpt2, tmp_path):
    """The right base but a graph of another model: the changed tensors are listed, nothing written."""
    result = run_cli("merge-onnx", gpt2[0] / "base.onnx", "--base", merged_export / "base",
                     "-a", merged_export / "x", "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "in no initializer", "model.layers.0.self_attn.q_proj.weight")
    assert list(tmp_path.iterdir()) == []


# ---- errors: one line, exit 2, nothing written ----------------------------------------------------------------------


def test_adapter_module_without_a_slot(llama, tmp_path):
    root = llama[0]
    peft_adapter(transformers.LlamaForCausalLM.from_pretrained(str(root / "base")), tmp_path / "kq", ["k_proj"], seed=4)
    result = run_cli("export-adapter", tmp_path / "kq", "--onnx", root / "base.onnx", "-o", tmp_path / "a", expect=2)
    assert_one_line_error(result, "no LoRA slot", "model.layers.0.self_attn.k_proj")
    assert not (tmp_path / "a").exists()


def test_adapter_dtype_other_than_the_graphs(llama, tmp_path):
    root = llama[0]
    result = run_cli("export-adapter", root / "x", "--onnx", root / "base.onnx", "--dtype", "fp16",
                     "-o", tmp_path / "a", expect=2)
    assert_one_line_error(result, "model.layers.0.self_attn.q_proj", "float32", "fp16")


def test_adapter_shape_that_does_not_fit(llama, tmp_path):
    root = llama[0]
    folder = tmp_path / "bad"
    folder.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 16), f"{key}.lora_B.weight": torch.randn(32, 2)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["q_proj"]}))
    result = run_cli("export-adapter", folder, "--onnx", root / "base.onnx", "-o", tmp_path / "a", expect=2)
    assert_one_line_error(result, "model.layers.0.self_attn.q_proj", "(32, 16)", "another model")


def test_graph_without_slots(merged_export, tmp_path):
    result = run_cli("export-adapter", merged_export / "x", "--onnx", merged_export / "plain.onnx",
                     "-o", tmp_path / "a", expect=2)
    assert_one_line_error(result, "no LoRA slot inputs", "--lora-slots")


@pytest.mark.parametrize(("spec", "needles"), [
    ("embed_tokens", ("model.embed_tokens", "Embedding", "cannot take a LoRA slot")),
    ("no_such_proj", ("no_such_proj", "matches no")),
])
def test_bad_slot_specs(llama, tmp_path, spec, needles):
    result = run_cli("export-onnx", llama[0] / "base", "--lora-slots", spec, "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, *needles)
    assert list(tmp_path.iterdir()) == []


def test_quantized_slots_refused(llama, tmp_path):
    result = run_cli("export-onnx", llama[0] / "base", "--lora-slots", "q_proj", "--quantize", "int8",
                     "-o", tmp_path / "m.onnx", expect=2)
    assert_one_line_error(result, "--lora-slots", "int8")


def test_public_functions_keyword_only():
    for function in (loratools.export_adapter, loratools.merge_onnx):
        parameters = list(inspect.signature(function).parameters.values())
        assert [p.kind for p in parameters[:2]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
        assert all(p.kind is p.KEYWORD_ONLY for p in parameters[2:])
