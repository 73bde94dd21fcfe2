"""diffusers is the judge: adapters extracted from Stable Diffusion inputs load through diffusers' own
``load_lora_weights`` path, and the fused model equals the tuned one.

Tiny UNets (SD 1.x and SDXL shapes) and CLIP text encoders are built from configs; tuned = base + rank-2
deltas on every linear and conv layer; both are saved as diffusers folders or as original single files (the
test's own diffusers -> LDM/SGM renaming is checked against diffusers' single-file converter first).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from loratools.adapter_commands import convert, rescale  # noqa: E402
from loratools.adapter_files import load_adapter  # noqa: E402
from loratools.checkpoint import open_checkpoint  # noqa: E402
from loratools.extraction import extract  # noqa: E402
from loratools.formats import DIFFUSERS_WEIGHTS, default_format, pipeline_names  # noqa: E402
from loratools.matching import resolve_kohya_names  # noqa: E402
from loratools.merging import merge  # noqa: E402
from loratools.plan import Selection  # noqa: E402
from loratools.policies import RankPolicy  # noqa: E402
from loratools.writer import write_safetensors  # noqa: E402
from tests.helpers import (  # noqa: E402
    SD_BASE,
    SD_KOHYA,
    SD_TUNED,
    run_cli,
)

COMMON = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), cross_attention_dim=16,
              attention_head_dim=2, norm_num_groups=4)
SD1_UNET = dict(COMMON, layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SDXL_UNET = dict(COMMON, layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + 16)
CLIP = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
POLICY = RankPolicy("rank", 4)  # the deltas have rank 2: extraction is exact


class SDPipe(StableDiffusionLoraLoaderMixin):
    """What `load_lora_weights` needs of a pipeline: its components."""

    def __init__(self, unet, text_encoder, text_encoder_2=None):
        self.unet, self.text_encoder, self.text_encoder_2, self.hf_device_map = unet, text_encoder, text_encoder_2, None
        self.components = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


class SDXLPipe(StableDiffusionXLLoraLoaderMixin, SDPipe):
    pass


def make_models(unet_config: dict, encoders: tuple = (CLIPTextModel,)):
    torch.manual_seed(0)
    return [UNet2DConditionModel(**unet_config)] + [cls(CLIPTextConfig(**CLIP)) for cls in encoders]


def tuned_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` + a rank-2 delta on every linear and conv weight (embeddings unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.endswith(".weight") and param.dim() in (2, 4) and "embedding." not in name:
                delta = torch.randn(param.shape[0], 2, generator=gen) @ torch.randn(2, param[0].numel(), generator=gen)
                param += 0.05 * delta.view_as(param)
    return tuned


def fused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every loaded LoRA merged, under the plain (pre-LoRA) names."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        error = float((got[name] - value).norm()) / max(float(value.norm()), 1e-12)
        assert error <= 1e-5, (name, error)


def assert_matches(model: torch.nn.Module, tuned: torch.nn.Module) -> None:
    assert_states_close(fused(model), tuned.state_dict())


def unet_folders(folder, seed: int) -> tuple[UNet2DConditionModel, UNet2DConditionModel]:
    """A tiny SD1 UNet and a tuned copy, saved as diffusers folders `folder`/b and `folder`/t."""
    (unet,) = make_models(SD1_UNET, ())
    tuned = tuned_copy(unet, seed)
    unet.save_pretrained(folder / "b")
    tuned.save_pretrained(folder / "t")
    return unet, tuned


def load_and_check(pipe_cls, path, bases, tuneds) -> None:
    pipe = pipe_cls(*[copy.deepcopy(b) for b in bases])
    pipe.load_lora_weights(str(path))
    for model, tuned in zip([pipe.unet, pipe.text_encoder, pipe.text_encoder_2], tuneds, strict=False):
        assert_matches(model, tuned)


# ---- the test's own original-layout (LDM / SGM) single files -------------------------------------------------


def ldm_unet_names(config) -> dict[str, str]:
    """diffusers U-Net module prefix -> original prefix (the layout of the original single files)."""
    per, names = config.layers_per_block, {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                                          "time_embedding.linear_1": "time_embed.0",
                                          "time_embedding.linear_2": "time_embed.2",
                                          "add_embedding.linear_1": "label_emb.0.0",
                                          "add_embedding.linear_2": "label_emb.0.2",
                                          "mid_block.resnets.0": "middle_block.0",
                                          "mid_block.attentions.0": "middle_block.1",
                                          "mid_block.resnets.1": "middle_block.2"}
    for i, up_type in enumerate(config.up_block_types):
        for j in range(per):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.1"
        names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
        for j in range(per + 1):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (per + 1) + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (per + 1) + j}.1"
        names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (per + 1) + per}.{2 if 'Attn' in up_type else 1}.conv"
    return names


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_original(unet: UNet2DConditionModel, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    names = ldm_unet_names(unet.config)
    state = {}
    for key, value in unet.state_dict().items():
        prefix = max((p for p in names if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefix:
            rest = re.sub(r"^(\w+)", lambda m: RESNET.get(m.group(1), m.group(1)), rest)
        state[f"model.diffusion_model.{names[prefix]}.{rest}"] = value.clone()
    for space, encoder in encoders.items():
        state.update({f"{space}text_model.{k}": v.clone() for k, v in encoder.state_dict().items()})
    return state


@pytest.mark.parametrize("config", [SD1_UNET, SDXL_UNET], ids=["sd1", "sdxl"])
def test_the_tests_original_layout_is_diffusers_own(config):
    (unet,) = make_models(config, ())
    converted = convert_ldm_unet_checkpoint(to_original(unet, {}), dict(unet.config))
    assert converted.keys() == unet.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in unet.state_dict().items())


# ---- diffusers folders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [None, "diffusers"])
def test_diffusers_folders_extract_to_adapters_diffusers_applies_exactly(tmp_path, fmt):
    unet, te = make_models(SD1_UNET)
    tuned_unet, tuned_te = tuned_copy(unet, 1), tuned_copy(te, 2)
    for name, model in (("unet", unet), ("unet-tuned", tuned_unet), ("te", te), ("te-tuned", tuned_te)):
        model.save_pretrained(tmp_path / name)
    suffix = ".safetensors" if fmt is None else ""
    u = extract(tmp_path / "unet", tmp_path / "unet-tuned", tmp_path / f"u{suffix}", policy=POLICY, format=fmt)
    embeddings = "lora" if fmt is None else "skip"  # a defaulted kohya format skips them by itself
    t = extract(tmp_path / "te", tmp_path / "te-tuned", tmp_path / f"t{suffix}", policy=POLICY, format=fmt,
                selection=Selection(embeddings=embeddings))
    if fmt is None:
        assert u.summary.format == t.summary.format == "kohya"
        assert "diffusers UNet" in u.summary.format_reason and "CLIP text encoder" in t.summary.format_reason
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in load_file(tmp_path / "t.safetensors")
    else:
        assert (tmp_path / "u" / DIFFUSERS_WEIGHTS).is_file()
        keys = load_file(tmp_path / "t" / DIFFUSERS_WEIGHTS)
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    load_and_check(SDPipe, tmp_path / f"u{suffix}", [unet, te], [tuned_unet, te])
    load_and_check(SDPipe, tmp_path / f"t{suffix}", [unet, te], [unet, tuned_te])


def test_unet_adapter_loads_with_load_lora_adapter(tmp_path):
    unet, tuned = unet_folders(tmp_path, 3)
    extract(tmp_path / "b", tmp_path / "t", tmp_path / "a.safetensors", policy=POLICY, format="diffusers")
    model = copy.deepcopy(unet)
    model.load_lora_adapter(str(tmp_path / "a.safetensors"), prefix="unet")
    assert_matches(model, tuned)


# ---- original single files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [None, "diffusers"])
@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_single_file_checkpoints_extract_to_adapters_diffusers_applies_exactly(tmp_path, sdxl, fmt):
    unet, te = make_models(SDXL_UNET if sdxl else SD1_UNET)
    tuned_unet, tuned_te = tuned_copy(unet, 4), tuned_copy(te, 5)
    space = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    save_file(to_original(unet, {space: te}), tmp_path / "base.safetensors")
    save_file(to_original(tuned_unet, {space: tuned_te}), tmp_path / "tuned.safetensors")
    out = tmp_path / "lora.safetensors"
    result = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, policy=POLICY, format=fmt,
                     selection=Selection(embeddings="lora" if fmt is None else "skip"))
    if fmt is None:
        assert result.summary.format == "kohya"
        assert ("SGM" if sdxl else "LDM") in result.summary.format_reason
        assert not [n for n in result.summary.notes if "diffusers" in n]
        keys = load_file(out)
        assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight" in keys
        # the kohya file reads back with the checkpoint's own names, so it merges onto it
        assert "model.diffusion_model.input_blocks.0.0" in load_adapter(out).modules
    if sdxl:
        load_and_check(SDXLPipe, out, [unet, te, copy.deepcopy(te)], [tuned_unet, tuned_te])
    else:
        load_and_check(SDPipe, out, [unet, te], [tuned_unet, tuned_te])


def test_sdxl_second_text_encoder_names():
    names = pipeline_names([
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight",
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.weight",
        "conditioner.embedders.1.model.text_projection",
    ])
    assert names == {
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj":
            "text_encoder_2.text_model.encoder.layers.3.self_attn.out_proj",
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc": "text_encoder_2.text_model.encoder.layers.3.mlp.fc1",
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj":
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc2",
    }


def test_diffusers_format_refuses_layers_without_a_diffusers_name(tmp_path):
    base = {"model.diffusion_model.odd_block.proj.weight": torch.zeros(4, 4)}
    tuned = {"model.diffusion_model.odd_block.proj.weight": torch.ones(4, 4)}
    save_file(base, tmp_path / "b.safetensors")
    save_file(tuned, tmp_path / "t.safetensors")
    with pytest.raises(Exception, match="odd_block.proj: no diffusers name.*--format kohya"):
        extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "a", format="diffusers")
    result = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "a.safetensors")
    assert any("no diffusers name" in n and "odd_block.proj" in n for n in result.summary.notes)


# ---- reading, round trips, defaults ----------------------------------------------------------------------------


def deltas(adapter) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in adapter.modules.items()}


def assert_same_deltas(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name


def test_round_trips_diffusers_kohya_peft_keep_every_delta(tmp_path):
    with open_checkpoint(SD_BASE) as index:
        original = deltas(resolve_kohya_names(load_adapter(SD_KOHYA), list(index.tensors)))
    convert(SD_KOHYA, tmp_path / "d", format="diffusers", base=SD_BASE)
    read = load_adapter(tmp_path / "d")
    assert read.format == "diffusers" and not read.notes  # alpha = rank is the convention, not a guess
    assert_same_deltas(deltas(read), original)
    convert(tmp_path / "d", tmp_path / "k.safetensors", format="kohya")
    assert_same_deltas(deltas(load_adapter(tmp_path / "k.safetensors")), original)
    convert(tmp_path / "k.safetensors", tmp_path / "p", format="peft")
    convert(tmp_path / "p", tmp_path / "d2.safetensors", format="diffusers")
    assert_same_deltas(deltas(load_adapter(tmp_path / "p")), original)
    assert_same_deltas(deltas(load_adapter(tmp_path / "d2.safetensors")), original)
    written = rescale(tmp_path / "d2.safetensors", tmp_path / "half", scale=0.5)
    assert written.format == "diffusers" and "input adapter's format" in written.format_reason
    assert (tmp_path / "half" / DIFFUSERS_WEIGHTS).is_file()


def test_reads_alpha_from_diffusers_metadata(tmp_path):
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path / "d", unet_lora_layers={"x.lora_A.weight": a, "x.lora_B.weight": b, "y.lora_A.weight": a.clone(),
                                    "y.lora_B.weight": b.clone()},
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 8, "alpha_pattern": {"y": 1}, "target_modules": ["x", "y"]},
    )
    adapter = load_adapter(tmp_path / "d")
    assert torch.allclose(adapter.modules["unet.x"].delta(), 4 * b @ a)
    assert torch.allclose(adapter.modules["unet.y"].delta(), 0.5 * b @ a)
    rescale(tmp_path / "d", tmp_path / "same.safetensors", scale=1.0)  # scales folded into B, stale metadata dropped
    again = load_adapter(tmp_path / "same.safetensors")
    assert json.dumps(again.metadata).find("lora_adapter_metadata") < 0
    assert torch.allclose(again.modules["unet.x"].delta(), 4 * b @ a)


@pytest.mark.parametrize(("names", "config", "fmt", "why"), [
    (["down_blocks.0.resnets.0.conv1.weight"], {"_class_name": "UNet2DConditionModel"}, "kohya", "diffusers UNet"),
    (["model.diffusion_model.input_blocks.1.1.proj_in.weight", "cond_stage_model.transformer.text_model.x.weight"],
     None, "kohya", "LDM"),
    (["model.diffusion_model.input_blocks.1.1.proj_in.weight", "conditioner.embedders.0.transformer.x.weight"],
     None, "kohya", "SGM"),
    (["unet.down_blocks.0.resnets.0.conv1.weight"], None, "kohya", "diffusers UNet / text-encoder names"),
    (["encoder.layers.0.self_attn.q_proj.weight"], {"architectures": ["CLIPTextModel"]}, "kohya", "CLIP"),
    (["model.layers.0.self_attn.q_proj.weight"], {"architectures": ["LlamaForCausalLM"]}, "peft",
     "transformers model (LlamaForCausalLM)"),
    (["blocks.0.proj.weight"], None, "peft", "not a Stable Diffusion layout"),
])
def test_default_format_by_input(names, config, fmt, why):
    chosen, reason = default_format(names, config)
    assert chosen == fmt and why in reason


def test_default_format_for_adapters():
    assert default_format(["lora_unet_x"], adapter_format="kohya")[0] == "kohya"
    assert default_format(["unet.x", "text_encoder.y"], adapter_format="diffusers")[0] == "diffusers"
    assert default_format(["diffusion_model.x"], adapter_format="diffusers")[0] == "peft"
    assert default_format(["model.x"], adapter_format="peft")[0] == "peft"


def test_cli_prints_the_chosen_format(tmp_path):
    result = run_cli("extract", SD_BASE, SD_TUNED, "-o", tmp_path / "a.safetensors", "--quiet")
    assert "note: format kohya: the input is a checkpoint with diffusers UNet / text-encoder names" in result.output
    result = run_cli("extract", SD_BASE, SD_TUNED, "-o", tmp_path / "d", "--quiet", "--format", "diffusers")
    assert "note: format diffusers: given with --format" in result.output
    assert (tmp_path / "d" / DIFFUSERS_WEIGHTS).is_file()


# ---- merging Stable Diffusion adapters back: names matched through the pipeline layout ----------------------


def read_state(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as index:
        return {name: index.get(name) for name in index}


def test_a_diffusers_adapter_merges_into_a_bare_unet_folder(tmp_path):
    unet_folders(tmp_path, 6)
    extract(tmp_path / "b", tmp_path / "t", tmp_path / "a", policy=POLICY, format="diffusers")
    assert all(n.startswith("unet.") for n in load_file(tmp_path / "a" / DIFFUSERS_WEIGHTS))  # not the folder's names
    merge(tmp_path / "b", [tmp_path / "a"], tmp_path / "merged")
    assert_states_close(read_state(tmp_path / "merged"), read_state(tmp_path / "t"))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_a_third_party_kohya_file_with_diffusers_names_merges_into_a_single_file(tmp_path, sdxl):
    """kohya files made by other tools name single-file U-Net layers the diffusers way and carry no name map."""
    (unet,) = make_models(SDXL_UNET if sdxl else SD1_UNET, ())
    tuned = tuned_copy(unet, 7)
    save_file(to_original(unet, {}), tmp_path / "base.safetensors")
    save_file(to_original(tuned, {}), tmp_path / "tuned.safetensors")
    ours = tmp_path / "ours.safetensors"
    extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", ours, policy=POLICY, format="kohya")
    with open_checkpoint(ours) as index:
        stripped = {name: index.get(name) for name in index}
        metadata = {k: v for k, v in index.metadata.items() if k != "loratools_module_names"}
    assert any(key.startswith("lora_unet_down_blocks_") for key in stripped)
    write_safetensors(stripped, tmp_path / "third-party.safetensors", metadata)
    merge(tmp_path / "base.safetensors", [tmp_path / "third-party.safetensors"], tmp_path / "merged.safetensors")
    assert_states_close(read_state(tmp_path / "merged.safetensors"), read_state(tmp_path / "tuned.safetensors"))
