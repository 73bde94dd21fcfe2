"""diffusers is the judge for converted LyCORIS files: a LoHa / LoKr made by lycoris-lora's own network on a tiny
diffusers UNet, converted to a plain LoRA, loads through diffusers' `load_lora_weights`; its fused weights equal
base + the converted ΔW, and the converted ΔW is the truncated SVD of LyCORIS's own ΔW (``get_weight``) with
the error the report gives."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from loratools.adapter_files import load_adapter
from tests.helpers import FIXTURES, fixture_script, run_cli

diffusers = pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (dev extra) is the judge for LyCORIS files")

from tests.test_diffusers import SD1_UNET, SDPipe, fused, make_models  # noqa: E402

RANK = 3  # below the exact rank of the LoHa linears (16) and of the LoKr convs: the truncation is real


def lycoris_weights(path, unet) -> dict[str, torch.Tensor]:
    """LyCORIS's own ΔW of every module of the file, as a LoRA matrix (out, in·kh·kw), by kohya name."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    network, _ = create_lycoris_from_weights(1.0, str(path), copy.deepcopy(unet))
    with torch.no_grad():
        return {m.lora_name: m.get_weight(m.shape).reshape(m.shape[0], -1) for m in network.loras}


@pytest.mark.slow
@pytest.mark.parametrize("algo, options", [
    ("loha", dict(linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1)),
    ("lokr", dict(linear_dim=2, linear_alpha=2, conv_dim=2, conv_alpha=1, factor=4)),
])
def test_converted_unet_lycoris_loads_in_diffusers(tmp_path, algo, options):
    unet, text_encoder = make_models(SD1_UNET)
    unet.save_pretrained(tmp_path / "base")
    state = fixture_script(FIXTURES / "make_lycoris_fixtures.py").lycoris_state(unet, "lora_unet", torch.Generator().manual_seed(3), algo=algo, **options)
    save_file(state, str(tmp_path / "lycoris.safetensors"))
    judge = lycoris_weights(tmp_path / "lycoris.safetensors", unet)

    out = tmp_path / "lora.safetensors"
    result = run_cli("convert", tmp_path / "lycoris.safetensors", "-o", out, "--format", "diffusers",
                     "--base", tmp_path / "base", "--rank", RANK, "--json", "-q")
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["conversion"]["layers"]}
    converted = load_adapter(out)
    assert {"lora_unet_" + n.removeprefix("unet.").replace(".", "_") for n in converted.modules} == set(judge)
    assert any(m.kind == "conv2d" for m in converted.modules.values())
    assert any(layer["rank"] < layer["exact_rank"] for layer in layers.values())

    pipe = SDPipe(copy.deepcopy(unet), copy.deepcopy(text_encoder))
    pipe.load_lora_weights(str(out))
    got = fused(pipe.unet)
    want = dict(unet.state_dict())
    for name, module in converted.modules.items():
        key = name.removeprefix("unet.") + ".weight"
        want[key] = want[key] + module.delta().reshape(want[key].shape)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert float((got[key] - value).norm()) <= 1e-5 * max(float(value.norm()), 1e-12), key

    for name, module in converted.modules.items():
        stem = "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
        original = judge[stem].double()
        ours = module.delta(torch.float64).reshape(original.shape)
        sigma = torch.linalg.svdvals(original)
        error = float((original - ours).norm() / original.norm())
        assert module.rank == layers[stem]["rank"]
        assert error == pytest.approx(float(sigma[module.rank:].norm() / sigma.norm()), rel=1e-3, abs=1e-6)
        assert error == pytest.approx(layers[stem]["rel_error"], rel=1e-3, abs=1e-6)
