"""GGUF adapters without llama.cpp: round trips, gguf's own reader as the judge of what we write, refusals, and a
hostile header that must fail in one line without allocating what it claims (tests/test_gguf_llama_cpp.py runs
the files in llama.cpp)."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools.adapter_files import load_adapter, save_adapter
from loratools.errors import LoratoolsError
from loratools.formats.gguf_file import read_gguf_header
from tests.gguf_helpers import peft_adapter, save_tiny_base
from tests.helpers import LLAMA_BASE, LLAMA_PEFT, LLAMA_TUNED, SD_BASE, assert_same_deltas, run_cli, save_tiny_gpt2

gguf = pytest.importorskip("gguf")


def one_line_error(result, *needles: str) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fixture_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    run_cli("convert", LLAMA_PEFT, "-o", out, "--format", "gguf", "--base", LLAMA_BASE, "-q")
    return out


def test_metadata_and_names_as_llama_cpp_reads_them(fixture_gguf):
    reader = gguf.GGUFReader(str(fixture_gguf))
    fields = {k: reader.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                       "adapter.lora.alpha", "loratools_command")}
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0, "loratools_command": "convert"}
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4) and shapes["blk.0.attn_q.weight.lora_b"] == (4, 64)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (128, 4) and len(shapes) == 28


def test_round_trip_keeps_every_delta(fixture_gguf, tmp_path):
    """PEFT -> GGUF -> PEFT: equal deltas (q/k rows restored from the recorded head counts), also via the CLI."""
    original = load_adapter(LLAMA_PEFT)
    assert_same_deltas(load_adapter(fixture_gguf), original)
    run_cli("convert", fixture_gguf, "-o", tmp_path / "back", "--format", "peft", "-q")
    back = load_adapter(tmp_path / "back")
    assert_same_deltas(back, original)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_q_and_k_rows_follow_llama_cpp(fixture_gguf):
    """llama.cpp's converter permutes q/k rows for its rotary layout; our B rows are permuted the same way."""
    original = load_adapter(LLAMA_PEFT).modules["model.layers.0.self_attn.k_proj"]
    reader = gguf.GGUFReader(str(fixture_gguf))
    stored = next(np.array(t.data) for t in reader.tensors if t.name == "blk.0.attn_k.weight.lora_b")
    heads, rows = 2, original.B.shape[0]
    expected = original.B.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(rows, -1)
    np.testing.assert_allclose(stored, expected.numpy(), rtol=0, atol=0)
    assert not np.allclose(stored, original.B.numpy())


def test_scales_folded_into_b(tmp_path):
    """rsLoRA, alpha/rank patterns and mixed ranks: one file alpha, every delta exact under alpha / r."""
    base = tmp_path / "base"
    model = save_tiny_base(base, "qwen2")
    adapter = peft_adapter(model, tmp_path / "peft", seed=0, r=4, alpha=8, use_rslora=True,
                           rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    save_adapter(load_adapter(adapter), tmp_path / "a.gguf", format="gguf", base=base)
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    for name, module in load_adapter(adapter).modules.items():
        target = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]]
        key = f"blk.{name.split('.')[2]}.{target}.weight"
        b, a = stored[f"{key}.lora_b"], stored[f"{key}.lora_a"]
        torch.testing.assert_close(alpha / b.shape[1] * b @ a, module.delta(), rtol=1e-5, atol=1e-6)


def test_deterministic_bytes(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        run_cli("convert", LLAMA_PEFT, "-o", tmp_path / name, "--format", "gguf", "--base", LLAMA_BASE, "-q")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_extract_gguf_reports_what_llama_cpp_cannot_take(tmp_path):
    """Changed norms are reported, never written; the LoRA layers are the ones PEFT extraction gives."""
    result = run_cli("extract", LLAMA_BASE, LLAMA_TUNED, "-o", tmp_path / "x.gguf", "--format", "gguf", "--rank", "4",
                     "--json", "-q")
    report = json.loads(result.stdout)
    assert any("cannot be a LoRA" in note for note in report["summary"]["notes"])
    run_cli("extract", LLAMA_BASE, LLAMA_TUNED, "-o", tmp_path / "x-peft", "--rank", "4", "-q")
    assert_same_deltas(load_adapter(tmp_path / "x.gguf"), load_adapter(tmp_path / "x-peft"))
    refused = run_cli("extract", LLAMA_BASE, LLAMA_TUNED, "-o", tmp_path / "y.gguf", "--format", "gguf",
                      "--save-full", "norm", expect=2)
    one_line_error(refused, "whole tensors")
    assert not (tmp_path / "y.gguf").exists()


def test_q8_0_only_for_gguf(tmp_path):
    one_line_error(run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "x", "--format", "peft", "--dtype", "q8_0",
                           expect=2), "--format gguf")
    run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "q.gguf", "--format", "gguf", "--base", LLAMA_BASE,
            "--dtype", "q8_0", "-q")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.attn_q.weight.lora_b"] == "F16"
    close = load_adapter(tmp_path / "q.gguf").modules["model.layers.0.self_attn.q_proj"].delta()
    exact = load_adapter(LLAMA_PEFT).modules["model.layers.0.self_attn.q_proj"].delta()
    assert float((close - exact).norm() / exact.norm()) < 2e-2


def test_refusals_one_line_each(tmp_path):
    tied = tmp_path / "tied"
    model = save_tiny_base(tied, "qwen2", tie_word_embeddings=True)
    adapter = peft_adapter(model, tmp_path / "head", seed=0, targets=["q_proj", "lm_head"])
    one_line_error(run_cli("convert", adapter, "-o", tmp_path / "t.gguf", "--format", "gguf", "--base", tied,
                           expect=2), "lm_head", "tied embeddings", "nothing was written")
    one_line_error(run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "n.gguf", "--format", "gguf", "--base",
                           SD_BASE, expect=2), "has no config.json")
    gpt2 = tmp_path / "gpt2"
    save_tiny_gpt2(gpt2)
    one_line_error(run_cli("convert", LLAMA_PEFT, "-o", tmp_path / "g.gguf", "--format", "gguf", "--base", gpt2,
                           expect=2), "GPT2LMHeadModel", "no GGUF adapter mapping")
    assert not list(tmp_path.glob("*.gguf"))


def test_gguf_reading_errors(fixture_gguf, tmp_path):
    qwen = tmp_path / "qwen"
    save_tiny_base(qwen, "qwen2")
    one_line_error(run_cli("merge", qwen, fixture_gguf, "-o", tmp_path / "m", expect=2), "architecture 'llama'",
                   "'qwen2'")
    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_type("model")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(run_cli("inspect", model, expect=2), "not a LoRA adapter")
    data = fixture_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    one_line_error(run_cli("inspect", tmp_path / "cut.gguf", expect=2), "truncated or corrupt")
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    one_line_error(run_cli("inspect", tmp_path / "short.gguf", expect=2), "outside the file")


def hostile(n_tensors: int = 0, kv: bytes = b"", n_kv: int = 0, tensor_info: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensor_info


def gguf_string(text: str, claimed: int | None = None) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw


TB4 = 4 * 1024**4
HOSTILE = {
    "tensor count": hostile(n_tensors=TB4),
    "key-value count": hostile(n_kv=TB4),
    "string length": hostile(n_kv=1, kv=gguf_string("general.type", claimed=TB4)),
    "array length": hostile(n_kv=1, kv=gguf_string("a") + struct.pack("<IIQ", 9, 6, TB4)),
    "tensor dims": hostile(n_tensors=1, tensor_info=gguf_string("t.lora_a") + struct.pack("<IQQIQ", 2, 2**20, 2**20,
                                                                                          0, 0)),
    "offset": hostile(n_tensors=1, tensor_info=gguf_string("t.lora_a") + struct.pack("<IQIQ", 1, 8, 0, TB4)),
    "dimension count": hostile(n_tensors=1, tensor_info=gguf_string("t.lora_a") + struct.pack("<I", 2**31)),
}


@pytest.mark.parametrize("claim", list(HOSTILE))
def test_hostile_header_allocates_nothing(tmp_path, claim):
    path = tmp_path / "h.gguf"
    path.write_bytes(HOSTILE[claim] + bytes(64))
    tracemalloc.start()
    try:
        with pytest.raises(LoratoolsError) as caught:
            read_gguf_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    one_line_error(run_cli("inspect", path, expect=2))


def test_inspect_shows_the_peft_table(fixture_gguf):
    """inspect on the GGUF file: the same modules, ranks, alphas, scales, norms and exact spectra as the PEFT file."""
    def table(path) -> list[dict]:
        return json.loads(run_cli("inspect", path, "--json").stdout)["modules"]

    ours, peft = table(fixture_gguf), table(LLAMA_PEFT)
    assert [m["name"] for m in ours] == [m["name"] for m in peft]
    for got, want in zip(ours, peft, strict=True):
        for key, value in want.items():
            if isinstance(value, (float, list)):
                assert got[key] == pytest.approx(value, rel=1e-5), (want["name"], key)
            else:
                assert got[key] == value, (want["name"], key)


def test_adapter_commands_write_gguf(fixture_gguf, tmp_path):
    """rescale, resize and combine write GGUF (base from the adapter's base_model) and read GGUF inputs."""
    original = load_adapter(LLAMA_PEFT)
    run_cli("rescale", LLAMA_PEFT, "-o", tmp_path / "half.gguf", "--scale", "0.5", "--format", "gguf", "-q")
    half = load_adapter(tmp_path / "half.gguf")
    for name, module in original.modules.items():
        torch.testing.assert_close(half.modules[name].delta(), 0.5 * module.delta(), rtol=1e-5, atol=1e-7)
    run_cli("combine", fixture_gguf, LLAMA_PEFT, "-o", tmp_path / "sum.gguf", "-w", "1", "-w", "-1", "-q")
    assert all(float(m.delta().abs().max()) < 1e-6 for m in load_adapter(tmp_path / "sum.gguf").modules.values())
    run_cli("resize", fixture_gguf, "-o", tmp_path / "r2.gguf", "--rank", "2", "--base", LLAMA_BASE, "-q")
    assert set(load_adapter(tmp_path / "r2.gguf").ranks) == {2}
