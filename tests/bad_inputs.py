"""Tiny good inputs and the bad inputs built from them, shared by the hardening tests (no test functions here).

`Inputs` is a folder holding a base / tuned pair of small fp32 checkpoints and two PEFT adapters for them;
the builders below write one broken variant each and return its path.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import save_adapter

SHAPES = {"net.proj.weight": (8, 6), "net.fc.weight": (6, 8), "net.norm.weight": (6,)}


@dataclass
class Inputs:
    """Paths of a tiny good input set; `out` is where commands write (absent at first)."""

    root: Path
    base: Path
    tuned: Path
    adapter: Path
    adapter2: Path
    out: Path


def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def tiny_adapter(seed: int = 1, rank: int = 2) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(name, torch.randn(rank, cols, generator=gen), torch.randn(rows, rank, generator=gen), 4.0)
        for name, (rows, cols) in (("net.proj", (8, 6)), ("net.fc", (6, 8)))
    }
    return Adapter(modules)


def make_inputs(root: Path) -> Inputs:
    """Write the good inputs under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    base = base_state()
    tuned = dict(base)
    gen = torch.Generator().manual_seed(5)
    for name in ("net.proj.weight", "net.fc.weight"):
        rows, cols = SHAPES[name]
        tuned[name] = base[name] + torch.randn(rows, 2, generator=gen) @ torch.randn(2, cols, generator=gen)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    save_adapter(tiny_adapter(1), root / "adapter")
    save_adapter(tiny_adapter(2), root / "adapter2")
    return Inputs(root, root / "base.safetensors", root / "tuned.safetensors", root / "adapter", root / "adapter2",
                  root / "out")


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or link target / 'dir') of everything under `root`, links not followed."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temporaries(root: Path) -> list[str]:
    """Names of loratools temporaries anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".loratools-" in p.name)


# ---- raw safetensors -------------------------------------------------------------------------------------------


def raw_safetensors(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors file from a header object (any JSON) and raw data bytes, with no validation."""
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data)
    return path


def two_tensor_header(first: tuple[int, int], second: tuple[int, int]) -> dict:
    return {
        "net.proj.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": list(first)},
        "net.fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": list(second)},
    }


# ---- broken files, each (folder) -> path of the bad input --------------------------------------------------------


def garbage(folder: Path) -> Path:
    path = folder / "bad.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 3)
    return path


def truncated(folder: Path) -> Path:
    good = folder / "good.safetensors"
    save_file(base_state(), str(good))
    data = good.read_bytes()
    good.unlink()
    path = folder / "bad.safetensors"
    path.write_bytes(data[: len(data) - 40])
    return path


def header_overrun(folder: Path) -> Path:
    return raw_safetensors(folder / "bad.safetensors", {"__metadata__": {}}, header_len=1 << 40)


def offsets_backwards(folder: Path) -> Path:
    return raw_safetensors(folder / "bad.safetensors", two_tensor_header((16, 0), (16, 32)), bytes(32))


def offsets_overlap(folder: Path) -> Path:
    return raw_safetensors(folder / "bad.safetensors", two_tensor_header((0, 16), (8, 24)), bytes(32))


def offsets_gap(folder: Path) -> Path:
    return raw_safetensors(folder / "bad.safetensors", two_tensor_header((0, 16), (24, 40)), bytes(40))


def huge_shape(folder: Path) -> Path:
    """A 4 TB tensor claimed by a 100-byte file."""
    header = {"net.proj.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}
    return raw_safetensors(folder / "bad.safetensors", header, bytes(16))


def bad_dtype(folder: Path) -> Path:
    header = {"net.proj.weight": {"dtype": "Q4_K", "shape": [2, 2], "data_offsets": [0, 16]}}
    return raw_safetensors(folder / "bad.safetensors", header, bytes(16))


def header_not_object(folder: Path) -> Path:
    return raw_safetensors(folder / "bad.safetensors", [1, 2, 3])


def metadata_not_object(folder: Path) -> Path:
    return raw_safetensors(folder / "bad.safetensors", {"__metadata__": ["a"], **two_tensor_header((0, 16), (16, 32))},
                           bytes(32))


def nan_tensor(folder: Path) -> Path:
    state = base_state()
    state["net.proj.weight"][1, 2] = math.nan
    path = folder / "bad.safetensors"
    save_file(state, str(path))
    return path


def empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def config_only(folder: Path) -> Path:
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model" / "adapter_config.json").unlink(missing_ok=True)
    return folder / "model"


def missing(folder: Path) -> Path:
    return folder / "nowhere" / "model.safetensors"


def _shards(folder: Path) -> Path:
    model = folder / "model"
    model.mkdir()
    state = base_state()
    save_file({"net.proj.weight": state["net.proj.weight"]}, str(model / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in state.items() if k != "net.proj.weight"},
              str(model / "model-00002-of-00002.safetensors"))
    return model


def duplicate_across_shards(folder: Path) -> Path:
    model = _shards(folder)
    save_file({"net.proj.weight": torch.zeros(8, 6)}, str(model / "model-00003-of-00003.safetensors"))
    return model


def _index(model: Path, weight_map: object) -> Path:
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def index_missing_shard(folder: Path) -> Path:
    model = _shards(folder)
    return _index(model, {"net.proj.weight": "model-00001-of-00002.safetensors",
                          "net.fc.weight": "model-00009-of-00009.safetensors"})


def index_parent_path(folder: Path) -> Path:
    model = _shards(folder)
    save_file(base_state(), str(folder / "x.safetensors"))
    return _index(model, {"net.proj.weight": "../x.safetensors"})


def index_absolute_path(folder: Path) -> Path:
    model = _shards(folder)
    save_file(base_state(), str(folder / "x.safetensors"))
    return _index(model, {"net.proj.weight": str((folder / "x.safetensors").resolve())})


def index_not_object(folder: Path) -> Path:
    return _index(_shards(folder), ["model-00001-of-00002.safetensors"])


def index_not_json(folder: Path) -> Path:
    model = _shards(folder)
    (model / "model.safetensors.index.json").write_bytes(b"\xff\xfe{not json")
    return model


def model_config_not_object(folder: Path) -> Path:
    model = _shards(folder)
    (model / "config.json").write_text("[1, 2]")
    return model


# ---- broken adapters ---------------------------------------------------------------------------------------------


def _peft_folder(folder: Path, adapter: Adapter | None = None) -> Path:
    path = folder / "lora"
    save_adapter(adapter or tiny_adapter(), path)
    return path


def _edit_config(path: Path, **changes: object) -> Path:
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return path


def adapter_config_only(folder: Path) -> Path:
    path = _peft_folder(folder)
    (path / "adapter_model.safetensors").unlink()
    return path


def _edit_tensors(path: Path, edit) -> Path:
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    return path


def a_without_b(folder: Path) -> Path:
    return _edit_tensors(_peft_folder(folder), lambda s: s.pop("base_model.model.net.fc.lora_B.weight"))


def ranks_mismatched(folder: Path) -> Path:
    def edit(state: dict) -> None:
        state["base_model.model.net.fc.lora_B.weight"] = torch.ones(6, 3)
    return _edit_tensors(_peft_folder(folder), edit)


def rank_zero_tensors(folder: Path) -> Path:
    def edit(state: dict) -> None:
        state["base_model.model.net.fc.lora_A.weight"] = torch.ones(0, 8)
        state["base_model.model.net.fc.lora_B.weight"] = torch.ones(6, 0)
    path = _edit_tensors(_peft_folder(folder), edit)
    return _edit_config(path, rank_pattern={"net.fc": 0})


def nan_factor(folder: Path) -> Path:
    def edit(state: dict) -> None:
        state["base_model.model.net.fc.lora_A.weight"][0, 0] = math.inf
    return _edit_tensors(_peft_folder(folder), edit)


def config_not_object(folder: Path) -> Path:
    path = _peft_folder(folder)
    (path / "adapter_config.json").write_text('["r", 8]')
    return path


def config_not_json(folder: Path) -> Path:
    path = _peft_folder(folder)
    (path / "adapter_config.json").write_text('{"r": 8,')
    return path


def alpha_is_text(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), lora_alpha="sixteen")


def alpha_not_finite(folder: Path) -> Path:
    path = _peft_folder(folder)
    config_path = path / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"lora_alpha": 4', '"lora_alpha": NaN'))
    return path


def r_zero(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), r=0)


def r_negative(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), r=-2)


def r_is_text(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), r="2")


def r_disagrees(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), r=8)


def rank_pattern_disagrees(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), rank_pattern={"fc": 4})


def rank_pattern_is_list(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), rank_pattern=["net.fc", 4])


def alpha_pattern_bad_value(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), alpha_pattern={"net.fc": [1]})


def pattern_bad_regex(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), rank_pattern={"net.(fc": 2})


def flag_is_text(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), use_rslora="yes")


def target_modules_object(folder: Path) -> Path:
    return _edit_config(_peft_folder(folder), target_modules={"net.fc": True})


def kohya_alpha(value: torch.Tensor):
    def make(folder: Path) -> Path:
        state = {}
        for name, module in tiny_adapter().modules.items():
            stem = "lora_unet_" + name.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = module.A
            state[f"{stem}.lora_up.weight"] = module.B
            state[f"{stem}.alpha"] = torch.tensor(2.0)
        state["lora_unet_net_fc.alpha"] = value
        path = folder / "kohya.safetensors"
        save_file(state, str(path))
        return path
    return make


def embedded_config_not_json(folder: Path) -> Path:
    path = folder / "bare.safetensors"
    save_adapter(tiny_adapter(), path)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    metadata["loratools_adapter_config"] = "{broken"
    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path
