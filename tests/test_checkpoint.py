"""Checkpoint reader: every layout it opens, and every bad input it must name."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import CheckpointError
from tests.helpers import LLAMA_BASE, LLAMA_BASE_BF16, SD_BASE


def reference_state(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or sharded folder, read by safetensors itself."""
    if path.is_file():
        return load_file(str(path))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.mark.parametrize("path", [LLAMA_BASE, LLAMA_BASE_BF16, SD_BASE], ids=["folder", "sharded-bf16", "file"])
def test_index_lists_every_tensor_and_loads_identical_data(path):
    expected = reference_state(path)
    with open_checkpoint(path) as ckpt:
        assert set(ckpt) == set(expected)
        for name, tensor in expected.items():
            info = ckpt.info(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
            assert torch.equal(ckpt.get(name), tensor)


def test_sharded_bf16_reads_both_shards_and_config():
    with open_checkpoint(LLAMA_BASE_BF16) as ckpt:
        assert len(ckpt.files) == 2
        assert {info.file for info in ckpt.tensors.values()} == set(ckpt.files)
        assert all(info.dtype == torch.bfloat16 for info in ckpt.tensors.values())
        assert ckpt.config["model_type"] == "llama"


def test_listing_reads_no_tensor_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    expected = sum(t.numel() * t.element_size() for t in reference_state(LLAMA_BASE).values())  # via safetensors
    monkeypatch.setattr(TensorIndex, "get", refuse)
    with open_checkpoint(LLAMA_BASE) as ckpt:
        assert ckpt.nbytes() == sum(i.nbytes for i in ckpt.tensors.values()) > 0
        assert ckpt.nbytes() == expected


def test_prefetch_reads_exactly_the_tensor_bytes_in_the_background(monkeypatch):
    from loratools import checkpoint

    read = []
    monkeypatch.setattr(checkpoint, "_read_through", lambda file, offset, nbytes: read.append((file, offset, nbytes)))
    with open_checkpoint(LLAMA_BASE_BF16) as ckpt:
        name = "model.layers.0.mlp.up_proj.weight"
        info = ckpt.info(name)
        ckpt.prefetch(name)
        raw = info.file.read_bytes()[info.offset : info.offset + info.nbytes]
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=info.dtype).view(info.shape), ckpt.get(name))
    assert read == [(info.file, info.offset, info.nbytes)]  # close() waited for the reader


def test_read_through_reads_to_the_end_and_ignores_a_vanished_file(tmp_path, monkeypatch):
    from loratools import checkpoint

    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 100)
    monkeypatch.setattr(checkpoint, "PREFETCH_CHUNK", 1000)
    chunks = []
    real_open = open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, offset):
            return self.handle.seek(offset)

        def readinto(self, buffer):
            got = self.handle.readinto(buffer)
            chunks.append(bytes(buffer[:got]))
            return got

    monkeypatch.setattr(checkpoint, "open", Recording, raising=False)  # only the module's own open
    checkpoint._read_through(data, 100, 2500)
    assert b"".join(chunks) == data.read_bytes()[100:2600] and len(chunks) == 3
    checkpoint._read_through(tmp_path / "gone", 0, 10)  # no error: the real read reports problems


def save_bin_folder(folder, state, shards: int = 1) -> None:
    folder.mkdir()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for n in range(shards):
        file = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[n::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_folder_loads_with_weights_only(tmp_path, shards):
    state = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5).to(torch.bfloat16)}
    save_bin_folder(tmp_path / "m", state, shards)
    with open_checkpoint(tmp_path / "m") as ckpt:
        assert set(ckpt) == set(state)
        for name, tensor in state.items():
            ckpt.prefetch(name)  # nothing to advise: .bin tensors are already mapped
            assert torch.equal(ckpt.get(name), tensor)


class Payload:
    """Stands for any non-tensor object a malicious pickle could carry."""


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        open_checkpoint(tmp_path / "m")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weights"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    data = (SD_BASE).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: truncated file, tensor '"):
        open_checkpoint(bad)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 5) + b"{not}", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_safetensors(tmp_path, payload, message):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(payload)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(bad)


def test_header_with_wrong_byte_count_is_corrupt(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="has 8 bytes for shape"):
        open_checkpoint(bad)


def copy_sharded(tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(LLAMA_BASE_BF16, folder)
    return folder


def test_index_pointing_at_missing_shard(tmp_path):
    folder = copy_sharded(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        open_checkpoint(folder)


def test_duplicate_tensor_across_shards(tmp_path):
    folder = copy_sharded(tmp_path)
    first = load_file(str(folder / "model-00001-of-00002.safetensors"))
    second = load_file(str(folder / "model-00002-of-00002.safetensors"))
    name = next(iter(first))
    second[name] = first[name]
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name}' appears in both"):
        open_checkpoint(folder)


def test_index_out_of_step_with_shards(tmp_path):
    folder = copy_sharded(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.ghost.weight"):
        open_checkpoint(folder)


def test_unknown_tensor_name(tmp_path):
    with open_checkpoint(SD_BASE) as ckpt, pytest.raises(CheckpointError, match="no tensor named 'x'"):
        ckpt.get("x")


def test_diffusers_style_index_name(tmp_path):
    folder = copy_sharded(tmp_path)
    (folder / "model.safetensors.index.json").rename(folder / "diffusion_pytorch_model.safetensors.index.json")
    with open_checkpoint(folder) as ckpt:
        assert len(ckpt.files) == 2 and len(ckpt) == len(open_checkpoint(LLAMA_BASE_BF16))


def test_adapter_folder_is_not_a_checkpoint():
    from tests.helpers import LLAMA_PEFT

    with pytest.raises(CheckpointError, match="PEFT adapter folder, not a model checkpoint"):
        open_checkpoint(LLAMA_PEFT)
