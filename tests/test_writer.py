"""The writer: atomic outputs (refuse to overwrite or write inside an input, nothing left behind on failure),
the streaming safetensors writer, shard layout and sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import save_adapter
from loratools.errors import LoratoolsError, OutputError
from loratools.writer import TensorSpec, atomic_output, parse_size, shard_layout, stream_safetensors


def tiny_adapter() -> Adapter:
    return Adapter({"m.q": LoraModule("m.q", torch.ones(2, 3), torch.ones(4, 2), 2.0)})


def test_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "a"
    save_adapter(tiny_adapter(), out)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already exists; pass --force"):
        save_adapter(tiny_adapter(), out)
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_force_replaces_completely(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_adapter(tiny_adapter(), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_refuses_to_touch_an_input_even_with_force(tmp_path, where):
    inp = tmp_path / "model"
    inp.mkdir()
    (inp / "model.safetensors").write_bytes(b"x")
    out = {"same": inp, "inside": inp / "adapter", "parent": tmp_path}[where]
    with pytest.raises(OutputError, match="overwrite or sit inside input"):
        save_adapter(tiny_adapter(), out, inputs=[inp], force=True)
    assert (inp / "model.safetensors").read_bytes() == b"x"


def test_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(RuntimeError), atomic_output(out, folder=True) as tmp:
        (tmp / "half.bin").write_bytes(b"1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failure_with_force_keeps_the_old_output(tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(out, force=True) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_creates_missing_parent_folders(tmp_path):
    out = save_adapter(tiny_adapter(), tmp_path / "deep" / "er" / "a.safetensors", format="kohya")
    assert out.is_file()


def test_same_adapter_gives_identical_bytes(tmp_path):
    one = save_adapter(tiny_adapter(), tmp_path / "one")
    two = save_adapter(tiny_adapter(), tmp_path / "two")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_stream_writer_round_trips_and_checks_what_it_is_given(tmp_path):
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "half": torch.randn(4).half(),
        "flag": torch.tensor([True, False]),
    }
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    stream_safetensors(tmp_path / "x.safetensors", specs, lambda s: tensors[s.name], {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="header says"):
        stream_safetensors(tmp_path / "y.safetensors", specs, lambda s: tensors[s.name].float())


def test_shard_layout_and_sizes():
    specs = [TensorSpec(f"t{i}", (10,), torch.float32) for i in range(5)]  # 40 bytes each
    assert list(shard_layout(specs, 1000)) == ["model.safetensors"]
    layout = shard_layout(specs, 80)
    assert list(layout) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [len(v) for v in layout.values()] == [2, 2, 1]
    assert [len(v) for v in shard_layout(specs, 10).values()] == [1] * 5  # too big: one tensor per shard
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024
    for bad in ("five", "3XB", "0"):
        with pytest.raises(LoratoolsError, match="is not a size"):
            parse_size(bad)
