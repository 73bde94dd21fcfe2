"""LoHa, LoKr and DoRA: read in their real layouts, exact spectra, true deltas against the libraries that define
them (lycoris-lora's own weight computation, PEFT's merge_and_unload), and conversion to plain LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.adapter import lora_matrix
from loratools.adapter_files import load_adapter
from loratools.errors import FormatError
from loratools.formats import kohya_stem
from loratools.structured_modules import LokrModule, structured_delta
from tests.helpers import FIXTURES, fixture_script, run_cli

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (dev extra) is the judge for LyCORIS files")
peft = pytest.importorskip("peft")

SD_BASE = FIXTURES / "sd-base.safetensors"
LLAMA_BASE = FIXTURES / "llama-base"
SD_LOHA = FIXTURES / "sd-loha-lycoris.safetensors"
SD_LOKR = FIXTURES / "sd-lokr-lycoris.safetensors"


def lycoris_deltas(path: Path) -> dict[str, torch.Tensor]:
    """LyCORIS's own ΔW (``get_weight``, what its forward adds) of every module of a kohya-style LyCORIS file,
    loaded by LyCORIS's loader onto the tiny SD model."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    model = fixture_script(FIXTURES / "make_lycoris_fixtures.py").tiny_sd(SD_BASE)
    deltas = {}
    for part, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te")):
        LycorisNetwork.apply_preset({"lora_prefix": prefix})
        network, _ = create_lycoris_from_weights(1.0, str(path), getattr(model, part))
        for module in network.loras:
            with torch.no_grad():
                deltas[module.lora_name] = module.get_weight(module.shape).reshape(module.shape[0], -1)
    return deltas


def peft_merged(adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(LLAMA_BASE), torch_dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def test_loha_delta_equals_lycoris_own_weight():
    adapter = load_adapter(SD_LOHA)
    judge = lycoris_deltas(SD_LOHA)
    assert set(judge) == set(adapter.structured)
    assert any(m.tucker for m in adapter.structured.values())  # hada_t1 / hada_t2 on the 3×3 conv
    for name, module in adapter.structured.items():
        torch.testing.assert_close(module.matrix(), judge[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_peft_merge_equals_merge_and_unload(kind):
    adapter = load_adapter(FIXTURES / f"llama-{kind}-peft")
    merged = peft_merged(FIXTURES / f"llama-{kind}-peft")
    base = load_file(str(LLAMA_BASE / "model.safetensors"))
    for name, module in adapter.structured.items():
        weight = base[name + ".weight"]
        ours = weight + structured_delta(module, weight)
        torch.testing.assert_close(ours, merged[name + ".weight"], rtol=1e-5, atol=1e-6)


def test_lycoris_lokr_delta_equals_lycoris_own_weight():
    """The text-encoder LoKr (both halves low-rank) through LyCORIS's loader; the U-Net's Tucker LoKr LyCORIS
    4.1.3 cannot load back (it reads the rank off lokr_w2_a), so it is checked against the network that made it
    in `test_lokr_tucker_equals_lycoris_network`."""
    adapter = load_adapter(SD_LOKR)
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    model = fixture_script(FIXTURES / "make_lycoris_fixtures.py").tiny_sd(SD_BASE)
    LycorisNetwork.apply_preset({"lora_prefix": "lora_te"})
    network, _ = create_lycoris_from_weights(1.0, str(SD_LOKR), model.text_encoder)
    for module in network.loras:
        with torch.no_grad():
            judge = module.get_weight(module.shape)
        torch.testing.assert_close(adapter.structured[module.lora_name].matrix(), judge, rtol=1e-6, atol=1e-7)


def test_lokr_tucker_equals_lycoris_network(tmp_path):
    from lycoris import LycorisNetwork, create_lycoris

    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1))
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    network = create_lycoris(conv, 1.0, linear_dim=1, linear_alpha=1, conv_dim=1, conv_alpha=0.5, algo="lokr",
                             use_tucker=True)
    network.apply_to()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    assert any(k.endswith("lokr_t2") for k in state)
    save_file(state, str(tmp_path / "lokr.safetensors"))
    module = next(iter(load_adapter(tmp_path / "lokr.safetensors").structured.values()))
    lyco = network.loras[0]
    with torch.no_grad():
        judge = lyco.get_weight(lyco.shape)
    assert module.base_shape == (16, 8, 3, 3)
    torch.testing.assert_close(module.matrix(), judge.reshape(16, -1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", [SD_LOKR, FIXTURES / "llama-lokr-peft"])
def test_lokr_exact_spectrum_equals_svdvals(path):
    """Full-rank halves (attn1.to_q: lokr_w1 and lokr_w2 full) and low-rank ones (lokr_w1_a/b, lokr_w2_a/b)."""
    adapter = load_adapter(path)
    kinds = set()
    for module in adapter.structured.values():
        assert isinstance(module, LokrModule)
        kinds.add((module.w1 is None, module.w2 is None))
        exact, method = module.svd(torch.float64)
        assert method == "kron"
        formed = torch.linalg.svdvals(module.matrix(torch.float64))
        k = len(exact.S)
        torch.testing.assert_close(exact.S, formed[:k], rtol=1e-9, atol=1e-12)
        assert float(formed[k:].abs().sum()) < 1e-12
    if path == SD_LOKR:
        assert (False, False) in kinds and (True, True) in kinds


def test_loha_convert_at_full_rank_reproduces_delta(tmp_path):
    out = tmp_path / "loha-lora.safetensors"
    run_cli("convert", SD_LOHA, "-o", out, "--format", "kohya", "--base", SD_BASE, "--rank", "16", "--json")
    converted = {kohya_stem(name): module for name, module in load_adapter(out).modules.items()}
    judge = lycoris_deltas(SD_LOHA)
    assert set(converted) == set(judge)
    for name, module in converted.items():
        delta = lora_matrix(module.delta(), module.kind)
        assert float((delta - judge[name]).norm() / judge[name].norm()) < 1e-5, name
    from safetensors import safe_open

    with safe_open(str(out), "pt") as written:  # a plain LoRA now: no LyCORIS network or algo in its metadata
        metadata = written.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and "ss_network_args" not in metadata
    conv = converted["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.kind == "conv2d" and tuple(conv.A.shape[1:]) == (8, 3, 3)


def test_dora_convert_error_within_optimum_and_loads_in_peft(tmp_path):
    out = tmp_path / "dora-lora"
    result = run_cli("convert", FIXTURES / "llama-dora-peft", "-o", out, "--format", "peft", "--base", LLAMA_BASE,
                     "--rank", "8")
    assert "× optimum" in result.output
    merged = peft_merged(FIXTURES / "llama-dora-peft")
    base = load_file(str(LLAMA_BASE / "model.safetensors"))
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(LLAMA_BASE), torch_dtype=torch.float32)
    lora = peft.PeftModel.from_pretrained(model, str(out)).merge_and_unload().state_dict()
    for name in load_adapter(FIXTURES / "llama-dora-peft").structured:
        true = merged[name + ".weight"] - base[name + ".weight"]
        approx = lora[name + ".weight"] - base[name + ".weight"]
        s = torch.linalg.svdvals(true.double())
        optimum = float((s[8:] ** 2).sum().sqrt() / s.norm())
        error = float((true - approx).norm() / true.norm())
        assert error <= 1.01 * optimum + 1e-6, (name, error, optimum)


def test_convert_notes_the_exact_rank(tmp_path):
    result = run_cli("convert", SD_LOKR, "-o", tmp_path / "o.safetensors", "--format", "kohya", "--rank", "2")
    assert "below the rank that would be exact" in result.output and "--rank 16" in result.output


# ---- bad input, one line each --------------------------------------------------------------------------------


def _one_line_error(*args) -> str:
    result = run_cli(*args, expect=2)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_dora_convert_without_base(tmp_path):
    line = _one_line_error("convert", FIXTURES / "llama-dora-peft", "-o", tmp_path / "x", "--format", "peft")
    assert "DoRA" in line and "--base" in line
    assert not (tmp_path / "x").exists()


def test_missing_factor(tmp_path):
    state = load_file(str(SD_LOHA))
    del state["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_b"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    line = _one_line_error("convert", tmp_path / "cut.safetensors", "-o", tmp_path / "o.safetensors",
                           "--format", "kohya")
    assert "hada_w2_b" in line and "proj_in" in line


def test_mismatched_kronecker_shapes(tmp_path):
    state = load_file(str(SD_LOKR))
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_b"
    state[key] = torch.zeros(2, 8)  # rank 2 against lokr_w2_a's rank 1
    save_file(state, str(tmp_path / "bad.safetensors"))
    line = _one_line_error("convert", tmp_path / "bad.safetensors", "-o", tmp_path / "o.safetensors",
                           "--format", "kohya")
    assert "LoKr factor shapes" in line and "self_attn_q_proj" in line


@pytest.mark.parametrize(("keys", "name"), [
    ({"lora_unet_x.a1.weight": (2, 4), "lora_unet_x.a2.weight": (4, 2), "lora_unet_x.b1.weight": (2, 4),
      "lora_unet_x.b2.weight": (4, 2), "lora_unet_x.alpha": ()}, "GLoRA"),
    ({"lora_unet_x.weight": (4,), "lora_unet_x.on_input": ()}, "(IA)³"),
    ({"lora_unet_x.oft_blocks": (2, 2, 2, 2), "lora_unet_x.rescale": (4, 1), "lora_unet_x.alpha": ()}, "BOFT"),
])
def test_unsupported_algorithm_is_named(tmp_path, keys, name):
    save_file({k: torch.ones(shape) for k, shape in keys.items()}, str(tmp_path / "a.safetensors"))
    line = _one_line_error("convert", tmp_path / "a.safetensors", "-o", tmp_path / "o.safetensors",
                           "--format", "kohya")
    assert name in line


def test_load_usable_refuses_structured_for_combine(tmp_path):
    with pytest.raises(FormatError, match="turn them into LoRA first"):
        from loratools.adapter_files import load_usable

        load_usable(SD_LOHA)


@pytest.mark.parametrize(("path", "base", "kind"), [
    (SD_LOHA, None, "LoHa"), (SD_LOKR, None, "LoKr"), (FIXTURES / "llama-loha-peft", None, "LoHa"),
    (FIXTURES / "llama-lokr-peft", None, "LoKr"), (FIXTURES / "llama-dora-peft", LLAMA_BASE, "DoRA"),
])
def test_inspect_shows_the_type_and_exact_spectrum(path, base, kind):
    args = ("--base", base) if base is not None else ()
    out = run_cli("inspect", path, *args).output
    assert "type" in out and kind in out
    import json

    rows = json.loads(run_cli("inspect", path, *args, "--json").stdout)["modules"]
    adapter = load_adapter(path)
    base_weights = load_file(str(LLAMA_BASE / "model.safetensors")) if base is not None else {}
    for row in rows:
        assert row["type"] == kind
        module = adapter.structured[row["name"]]
        weight = base_weights.get(row["name"] + ".weight")
        formed = torch.linalg.svdvals(structured_delta(module, weight).double())
        k = len(row["singular_values"])
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), formed[:k],
                                   rtol=1e-4, atol=1e-6)
        if kind == "DoRA":
            assert row["dora"]["direction_change"] > 0


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_merge_command_equals_peft(tmp_path, kind):
    run_cli("merge", LLAMA_BASE, FIXTURES / f"llama-{kind}-peft", "-o", tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    merged = peft_merged(FIXTURES / f"llama-{kind}-peft")
    for name in load_adapter(FIXTURES / f"llama-{kind}-peft").structured:
        torch.testing.assert_close(ours[name + ".weight"], merged[name + ".weight"], rtol=1e-5, atol=1e-6)


def test_merge_lycoris_loha_equals_lycoris_forward_delta(tmp_path):
    """LyCORIS's forward adds get_weight() once (so do ComfyUI and A1111); its merge_to in 4.1.3 applies
    alpha / r twice, which is not what any runtime does, so the judge is get_weight."""
    run_cli("merge", SD_BASE, SD_LOHA, "-o", tmp_path / "m.safetensors", "-w", "0.5")
    ours, base = load_file(str(tmp_path / "m.safetensors")), load_file(str(SD_BASE))
    stems = {"lora_unet_down_blocks_0_resnets_0_conv1": "unet.down_blocks.0.resnets.0.conv1.weight",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"}
    judge = lycoris_deltas(SD_LOHA)
    for stem, tensor in stems.items():
        delta = (ours[tensor] - base[tensor]).reshape(base[tensor].shape[0], -1)
        torch.testing.assert_close(delta, 0.5 * judge[stem], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_verify_with_a_structured_reference_equals_an_independent_computation(tmp_path, kind):
    """verify BASE TUNED ADAPTER with a LoHa / LoKr / DoRA adapter: the fine-tune is PEFT's merge plus noise, so
    the error is ‖noise‖-sized; judged by PEFT's merged ΔW and torch.linalg.svdvals of the fine-tune's ΔW."""
    from loratools.options import SvdSettings
    from loratools.verify import verify_adapter

    adapter_dir = FIXTURES / f"llama-{kind}-peft"
    merged = peft_merged(adapter_dir)
    base = load_file(str(LLAMA_BASE / "model.safetensors"))
    adapter = load_adapter(adapter_dir)
    generator = torch.Generator().manual_seed(0)
    tuned = dict(base)
    for name in adapter.structured:
        peft_delta = merged[name + ".weight"] - base[name + ".weight"]
        noise = torch.randn(peft_delta.shape, generator=generator) * 0.2 * peft_delta.std()
        tuned[name + ".weight"] = merged[name + ".weight"] + noise
    save_file(tuned, str(tmp_path / "tuned.safetensors"))

    report = verify_adapter(LLAMA_BASE, tmp_path / "tuned.safetensors", adapter_dir, svd=SvdSettings(exact=True))
    assert not report.unsupported and not report.unmatched and not report.uncovered
    assert {layer.name for layer in report.layers} == set(adapter.structured)
    config_rank = adapter.config["r"]
    for layer in report.layers:
        weight = base[layer.tensor].double()
        fine_tune = tuned[layer.tensor].double() - weight
        peft_delta = merged[layer.tensor].double() - weight
        rank = config_rank if kind == "dora" else int(torch.linalg.matrix_rank(peft_delta, rtol=1e-4))
        sigma = torch.linalg.svdvals(fine_tune)
        assert layer.type == {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}[kind]
        assert layer.rank == rank
        assert layer.rel_error == pytest.approx(float((fine_tune - peft_delta).norm() / fine_tune.norm()), rel=1e-3)
        assert layer.optimal_rel_error == pytest.approx(float(sigma[rank:].norm() / sigma.norm()), rel=1e-3, abs=1e-6)
