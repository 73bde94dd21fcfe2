"""merge: equals PEFT's merge_and_unload (Llama fp32 / bf16, GPT-2 Conv1D, embeddings, modules_to_save), the
kohya SD fixture merges into sd-tuned, dtype and shards of the output, file layout and bad input.
The writer's own tests (streaming, shard layout, sizes) are in test_writer.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import load_adapter, save_adapter
from loratools.checkpoint import open_checkpoint
from loratools.errors import ShapeError
from loratools.extraction import extract
from loratools.merging import merge
from loratools.options import RankPolicy
from tests.helpers import (
    LLAMA_BASE,
    LLAMA_BASE_BF16,
    LLAMA_PEFT,
    LLAMA_TUNED,
    SD_BASE,
    SD_KOHYA,
    SD_TUNED,
    llama_from,
    run_cli,
)


def read_model(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as index:
        return {name: index.get(name) for name in index}


def max_abs_diff(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert sorted(ours) == sorted(reference)
    return max(float((ours[k].double() - reference[k].double()).abs().max()) for k in reference)


def peft_merged_state(base_model, adapter_path) -> dict[str, torch.Tensor]:
    peft = pytest.importorskip("peft")
    merged = peft.PeftModel.from_pretrained(base_model, str(adapter_path)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# ---- PEFT parity ------------------------------------------------------------------------------------------


def test_merge_equals_peft_merge_and_unload_fp32(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "merged"
    result = run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", out)
    assert "merged 14 LoRA module(s)" in result.output
    reference = peft_merged_state(llama_from(LLAMA_BASE), LLAMA_PEFT)
    ours = read_model(out)
    assert max_abs_diff(ours, reference) <= 1e-6
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_text() == (LLAMA_BASE / "config.json").read_text()
    changed = [k for k in ours if not torch.equal(ours[k], read_model(LLAMA_BASE)[k])]
    assert len(changed) == 14


def test_merge_equals_peft_bf16_sharded(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "merged"
    run_cli("merge", LLAMA_BASE_BF16, LLAMA_PEFT, "-o", out)
    base_files = sorted(p.name for p in LLAMA_BASE_BF16.iterdir())
    assert sorted(p.name for p in out.iterdir()) == base_files
    ours = read_model(out)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    base_model = transformers.LlamaForCausalLM.from_pretrained(str(LLAMA_BASE_BF16), dtype=torch.bfloat16)
    reference = peft_merged_state(base_model, LLAMA_PEFT)
    adapter = load_adapter(LLAMA_PEFT)
    base = read_model(LLAMA_BASE_BF16)
    for name, tensor in ours.items():
        module = adapter.modules.get(name.removesuffix(".weight"))
        exact = base[name].float() + (module.delta() if module is not None else 0)
        assert torch.equal(tensor, exact.to(torch.bfloat16)), name  # one rounding of the fp32 sum
        ulp = torch.finfo(torch.bfloat16).eps * reference[name].float().abs().clamp_min(1e-30)
        assert bool(((tensor.float() - reference[name].float()).abs() <= ulp).all()), name


def test_merge_equals_peft_with_embedding_rslora_patterns_and_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"embed_tokens": 3},
        use_rslora=True,
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(llama_from(LLAMA_BASE), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.05)
            if "modules_to_save" in name:
                param.add_(0.01)
    model.save_pretrained(str(tmp_path / "adapter"))
    reference = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    assert "lm_head.weight" in adapter.full
    out = tmp_path / "merged"
    run_cli("merge", LLAMA_BASE, tmp_path / "adapter", "-o", out)
    ours = read_model(out)
    assert max_abs_diff(ours, reference) <= 1e-6
    assert torch.equal(ours["lm_head.weight"], reference["lm_head.weight"])  # replaced, not added


def test_merge_equals_peft_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2_config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(gpt2_config).save_pretrained(str(tmp_path / "base"))
    base_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")).eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = peft.get_peft_model(base_model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.05)
    model.save_pretrained(str(tmp_path / "adapter"))
    reference = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    adapter = load_adapter(tmp_path / "adapter")
    assert {m.kind for m in adapter.modules.values()} == {"conv1d"}
    out = tmp_path / "merged"
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", out)
    ours = read_model(out)
    assert sorted(ours) == sorted(read_model(tmp_path / "base"))
    attn = "transformer.h.0.attn.c_attn.weight"
    assert ours[attn].shape == (32, 96)  # Conv1D keeps its (in, out) layout
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
    assert not torch.equal(ours[attn], read_model(tmp_path / "base")[attn])


# ---- kohya, extract round trip, weights -------------------------------------------------------------------


def test_kohya_sd_fixture_merges_into_sd_tuned(tmp_path):
    out = tmp_path / "sd.safetensors"
    run_cli("merge", SD_BASE, SD_KOHYA, "-o", out)
    assert out.is_file()
    assert max_abs_diff(load_file(str(out)), load_file(str(SD_TUNED))) <= 1e-6


def test_merge_of_full_rank_extract_gives_tuned(tmp_path):
    adapter = tmp_path / "full-rank"
    extract(LLAMA_BASE, LLAMA_TUNED, adapter, policy=RankPolicy("rank", 128))
    loaded = load_adapter(adapter)
    covered = {f"{name}.weight" for name in loaded.modules} | set(loaded.full)
    assert {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)} <= covered
    out = tmp_path / "merged"
    merge(LLAMA_BASE, [adapter], out)
    base, tuned, ours = read_model(LLAMA_BASE), read_model(LLAMA_TUNED), read_model(out)
    for name, tensor in ours.items():
        if name in covered:
            torch.testing.assert_close(tensor, tuned[name], rtol=0, atol=1e-5)
        else:
            assert torch.equal(tensor, base[name]), name


def test_weights_scale_each_adapter(tmp_path):
    merge(LLAMA_BASE, [LLAMA_PEFT, LLAMA_PEFT], tmp_path / "twice", weights=[0.25, 0.75])
    merge(LLAMA_BASE, [LLAMA_PEFT], tmp_path / "once")
    assert max_abs_diff(read_model(tmp_path / "twice"), read_model(tmp_path / "once")) <= 1e-6
    merge(LLAMA_BASE, [LLAMA_PEFT], tmp_path / "zero", weights=[0])
    assert max_abs_diff(read_model(tmp_path / "zero"), read_model(LLAMA_BASE)) == 0


# ---- layout: dtype, shards, copied files, single files, .bin ----------------------------------------------


def test_dtype_and_shard_size_resplit_and_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "merged"
    result = run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", out, "--dtype", "bf16", "--shard-size", "100KB", "--json")
    report = json.loads(result.output)
    assert len(report["files"]) >= 2 and report["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(report["files"])
    assert all((out / f).stat().st_size <= 100_000 + 4096 for f in report["files"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = tmp_path / "fp32"
    merge(LLAMA_BASE, [LLAMA_PEFT], fp32)
    reference = {k: v.to(torch.bfloat16) for k, v in read_model(fp32).items()}
    assert max_abs_diff(read_model(out), reference) == 0
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_copies_non_weight_files_only(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(LLAMA_BASE, base)
    (base / "tokenizer.json").write_text("{}")
    (base / "generation_config.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"stale")
    (base / "original").mkdir()
    (base / ".cache").mkdir()
    result = merge(base, [LLAMA_PEFT], tmp_path / "out")
    assert result.copied == ["config.json", "generation_config.json", "tokenizer.json"]
    assert result.skipped == ["original", "pytorch_model.bin"]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]


def test_bin_base_gives_safetensors(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(LLAMA_BASE / "config.json", base)
    torch.save(read_model(LLAMA_BASE), base / "pytorch_model.bin")
    merge(base, [LLAMA_PEFT], tmp_path / "out")
    merge(LLAMA_BASE, [LLAMA_PEFT], tmp_path / "ref")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert max_abs_diff(read_model(tmp_path / "out"), read_model(tmp_path / "ref")) == 0


def test_progress_reports_every_tensor(tmp_path):
    calls = []
    merge(LLAMA_BASE_BF16, [LLAMA_PEFT], tmp_path / "out", progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, 22)) and {c[1] for c in calls} == {21}
    assert sorted(c[2] for c in calls) == sorted(read_model(LLAMA_BASE))


# ---- bad input --------------------------------------------------------------------------------------------


def test_adapter_for_another_model_names_the_tensor(tmp_path):
    wrong = Adapter({"model.layers.0.self_attn.q_proj": LoraModule(
        "model.layers.0.self_attn.q_proj", torch.randn(2, 32), torch.randn(64, 2), 2.0)})
    save_adapter(wrong, tmp_path / "wrong")
    result = run_cli("merge", LLAMA_BASE, tmp_path / "wrong", "-o", tmp_path / "out", expect=2)
    assert "model.layers.0.self_attn.q_proj.weight" in result.output and "another model" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong"]  # nothing written


def test_modules_matching_nothing_are_listed(tmp_path):
    result = run_cli("merge", SD_BASE, LLAMA_PEFT, "-o", tmp_path / "out.safetensors", expect=2)
    assert "14 adapter module(s) match no tensor" in result.output
    assert "model.layers.0.mlp.down_proj" in result.output


def test_output_rules(tmp_path):
    out = tmp_path / "out"
    merge(LLAMA_BASE, [LLAMA_PEFT], out)
    result = run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", out, expect=2)
    assert "already exists; pass --force" in result.output
    run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", out, "--force")
    result = run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", LLAMA_BASE, "--force", expect=2)
    assert "overwrite or sit inside input" in result.output
    result = run_cli("merge", LLAMA_BASE, LLAMA_PEFT, "-o", tmp_path / "x", "-w", "1", "-w", "2", expect=2)
    assert "2 weights for 1 adapters" in result.output
    with pytest.raises(ShapeError):
        merge(SD_BASE, [SD_KOHYA, LLAMA_PEFT], tmp_path / "y.safetensors")


def test_merge_equals_peft_when_linear_and_conv1d_layers_share_one_fan_in_fan_out_flag(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    # PEFT writes one fan_in_fan_out flag per adapter and decides per layer from the module class: GPT-2's
    # lm_head is a Linear among Conv1D layers. The base shapes must settle each layer's layout here too.
    torch.manual_seed(1)
    gpt2_config = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16, tie_word_embeddings=False
    )
    transformers.GPT2LMHeadModel(gpt2_config).save_pretrained(str(tmp_path / "base"))
    base_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")).eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = peft.get_peft_model(base_model, config)
    model.save_pretrained(str(tmp_path / "adapter"))
    reference = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged"
    run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", out)
    ours = read_model(out)
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
    assert float((ours["lm_head.weight"] - read_model(tmp_path / "base")["lm_head.weight"]).abs().max()) > 1e-3
