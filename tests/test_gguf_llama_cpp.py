"""GGUF adapters judged by llama.cpp itself: a tiny GQA Llama and a Qwen2, converted to GGUF by llama.cpp's own
convert_hf_to_gguf.py, run in llama-cpp-python with our adapter; the logits must equal the Hugging Face model
with the same adapter merged by PEFT (tolerance LOGITS_RTOL, docs/gguf.md). llama.cpp's own
convert_lora_to_gguf.py is the reference for tensor names and layout, and the counter-example for rsLoRA and
alpha_pattern adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.gguf_helpers import (
    hf_logits,
    llama_cpp_logits,
    llama_cpp_scripts,
    peft_adapter,
    peft_merged_logits,
    rel_err,
    run_converter,
    save_tiny_base,
)
from tests.helpers import run_cli

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the dev install builds it)")

LOGITS_RTOL = 2e-3  # f32 llama.cpp vs transformers, relative Frobenius error of the logits (measured ≤ 4e-4)
ADAPTER_MATTERS = 0.05  # each adapter moves the logits at least this much, so a dropped or wrong delta shows


@pytest.fixture(scope="module")
def scripts() -> Path:
    return llama_cpp_scripts()


@pytest.fixture(scope="module")
def bases(tmp_path_factory, scripts):
    """arch -> (HF folder, HF model, llama.cpp's f32 GGUF of it), each converted once, when first asked for."""
    built: dict[str, tuple] = {}

    def get(arch: str) -> tuple:
        if arch not in built:
            folder = tmp_path_factory.mktemp(arch) / "hf"
            model = save_tiny_base(folder, arch)
            model_gguf = folder.parent / "base.gguf"
            run_converter(scripts, "convert_hf_to_gguf.py", folder, "--outfile", model_gguf, "--outtype", "f32")
            built[arch] = folder, model, model_gguf
        return built[arch]

    return get


@pytest.fixture(params=["llama", "qwen2"])
def base(request, bases):
    """(HF folder, HF model, llama.cpp GGUF) of a tiny GQA Llama and of a Qwen2 (q/k/v biases, no q/k permute)."""
    return bases(request.param)


@pytest.fixture
def llama(bases):
    return bases("llama")


def to_gguf(adapter: Path, base: Path, out: Path, *extra: str) -> Path:
    run_cli("convert", adapter, "-o", out, "--format", "gguf", "--base", base, "-q", *extra)
    return out


def test_no_adapter_is_the_base(base):
    _, model, model_gguf = base
    assert rel_err(llama_cpp_logits(model_gguf), hf_logits(model)) < LOGITS_RTOL


def test_adapter_equals_peft_merge(base, tmp_path):
    """Every projection, lm_head and the token embeddings: llama.cpp with our GGUF = PEFT's merged model."""
    folder, model, model_gguf = base
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
               "embed_tokens"]
    adapter = peft_adapter(model, tmp_path / "peft", seed=1, targets=targets)
    expected = peft_merged_logits(model, adapter)
    assert rel_err(expected, hf_logits(model)) > ADAPTER_MATTERS
    ours = to_gguf(adapter, folder, tmp_path / "ours.gguf")
    assert rel_err(llama_cpp_logits(model_gguf, ours), expected) < LOGITS_RTOL


@pytest.mark.parametrize("kind", ["rslora", "alpha_pattern"])
def test_scales_upstream_gets_wrong(llama, scripts, tmp_path, kind):
    """rsLoRA and alpha_pattern: our file is right in llama.cpp; llama.cpp's own converter is not (docs/gguf.md)."""
    folder, model, model_gguf = llama
    options = {"rslora": {"use_rslora": True, "r": 8, "alpha": 16},
               "alpha_pattern": {"alpha_pattern": {"q_proj": 32, "down_proj": 2}}}[kind]
    adapter = peft_adapter(model, tmp_path / "peft", seed=2, **options)
    expected = peft_merged_logits(model, adapter)
    ours = llama_cpp_logits(model_gguf, to_gguf(adapter, folder, tmp_path / "ours.gguf"))
    run_converter(scripts, "convert_lora_to_gguf.py", adapter, "--base", folder, "--outfile", tmp_path / "up.gguf")
    upstream = llama_cpp_logits(model_gguf, tmp_path / "up.gguf")
    print(f"{kind}: ours {rel_err(ours, expected):.2e}, convert_lora_to_gguf.py {rel_err(upstream, expected):.2e}")
    assert rel_err(ours, expected) < LOGITS_RTOL
    assert rel_err(upstream, expected) > ADAPTER_MATTERS


def test_mixed_rank_extract(llama, tmp_path):
    """extract --energy --format gguf (ranks differ per layer) = the PEFT extraction merged by PEFT."""
    folder, model, model_gguf = llama
    tuned = tmp_path / "tuned"
    gen = torch.Generator().manual_seed(4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for number, (name, weight) in enumerate(state.items()):
        if name.endswith("proj.weight"):
            rank = 1 + number % 5
            low = torch.randn(weight.shape[0], rank, generator=gen) @ torch.randn(rank, weight.shape[1], generator=gen)
            weight += 0.02 * low
    tuned_model = type(model)(model.config)
    tuned_model.load_state_dict(state)
    tuned_model.save_pretrained(str(tuned))
    common = ["--energy", "0.999", "--max-rank", "8", "-q"]
    run_cli("extract", folder, tuned, "-o", tmp_path / "peft", *common)
    run_cli("extract", folder, tuned, "-o", tmp_path / "mixed.gguf", "--format", "gguf", *common)
    reader = gguf.GGUFReader(str(tmp_path / "mixed.gguf"))
    ranks = {int(t.shape[0]) for t in reader.tensors if t.name.endswith(".lora_b")}  # ggml order: (r, out)
    assert len(ranks) > 1
    expected = peft_merged_logits(model, tmp_path / "peft")
    assert rel_err(expected, hf_logits(model)) > ADAPTER_MATTERS
    assert rel_err(llama_cpp_logits(model_gguf, tmp_path / "mixed.gguf"), expected) < LOGITS_RTOL


def test_same_tensors_as_upstream_converter(llama, scripts, tmp_path):
    """A uniform-rank PEFT adapter (embeddings and lm_head too): our file carries the tensors llama.cpp's
    convert_lora_to_gguf.py writes, names, shapes and values, read back with gguf's own reader."""
    folder, model, _ = llama
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
    adapter = peft_adapter(model, tmp_path / "peft", seed=5, targets=targets)
    ours = gguf.GGUFReader(str(to_gguf(adapter, folder, tmp_path / "ours.gguf")))
    run_converter(scripts, "convert_lora_to_gguf.py", adapter, "--base", folder, "--outfile", tmp_path / "up.gguf")
    upstream = gguf.GGUFReader(str(tmp_path / "up.gguf"))
    mine = {t.name: np.array(t.data) for t in ours.tensors}
    theirs = {t.name: np.array(t.data) for t in upstream.tensors}
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * (7 * 2 + 2)
    for name, tensor in theirs.items():
        assert mine[name].shape == tensor.shape, name
        np.testing.assert_allclose(mine[name], tensor, rtol=1e-6, atol=1e-7, err_msg=name)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert ours.fields[key].contents() == upstream.fields[key].contents(), key


@pytest.mark.parametrize(("dtype", "tolerance"), [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 3e-2)])
def test_stored_dtypes_load_in_llama_cpp(llama, tmp_path, dtype, tolerance):
    folder, model, model_gguf = llama
    adapter = peft_adapter(model, tmp_path / "peft", seed=6, r=32)  # rank 32: q8_0 quantizes lora_b rows too
    expected = peft_merged_logits(model, adapter)
    cli_dtype = {"f16": "fp16", "bf16": "bf16", "q8_0": "q8_0"}[dtype]
    ours = to_gguf(adapter, folder, tmp_path / "ours.gguf", "--dtype", cli_dtype)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(ours)).tensors}
    assert types == {dtype.upper()}
    assert rel_err(llama_cpp_logits(model_gguf, ours), expected) < tolerance
