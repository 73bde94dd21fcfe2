"""Atomic writes: refuse to overwrite, refuse to write inside an input, leave nothing behind on failure."""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import save_adapter
from loratools.errors import OutputError
from loratools.writer import atomic_output


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
