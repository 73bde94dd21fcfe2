"""Promises of the README's "Guarantees" section that are not about bad input: kohya extraction on an LLM,
symlinked outputs, byte-identical reruns of every writing command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.errors import FormatError
from loratools.extraction import extract
from loratools.options import RankPolicy, Selection
from tests.bad_inputs import make_inputs, snapshot
from tests.helpers import run_cli

# ---- kohya on an LLM: embeddings are decided by the data, not the plan --------------------------------------


def llm_pair(folder: Path, embeddings_change: bool) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(3)
    base = {
        "model.embed_tokens.weight": torch.randn(40, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen),
        "model.norm.weight": torch.ones(8),
    }
    tuned = dict(base)
    tuned["model.layers.0.self_attn.q_proj.weight"] = base["model.layers.0.self_attn.q_proj.weight"] + torch.outer(
        torch.randn(8, generator=gen), torch.randn(8, generator=gen))
    if embeddings_change:
        tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors"


def test_kohya_extract_ignores_unchanged_embeddings(tmp_path):
    base, tuned = llm_pair(tmp_path, embeddings_change=False)
    result = extract(base, tuned, tmp_path / "k.safetensors", format="kohya", policy=RankPolicy("rank", 1))
    assert [layer.name for layer in result.layers] == ["model.layers.0.self_attn.q_proj"]
    assert not result.changed and not any("embed_tokens" in note for note in result.notes)


def test_kohya_extract_reports_changed_embeddings_like_a_changed_norm(tmp_path):
    base, tuned = llm_pair(tmp_path, embeddings_change=True)
    report = tmp_path / "report.json"
    out = tmp_path / "k.safetensors"
    done = run_cli("extract", base, tuned, "-o", out, "--format", "kohya", "--rank", "1", "--report", report, "-q")
    assert "kohya format cannot hold" in done.stderr and "model.embed_tokens.weight" in done.stderr
    changed = json.loads(report.read_text())["changed_tensors"]
    assert [c["name"] for c in changed] == ["model.embed_tokens.weight"] and not changed[0]["saved"]
    assert "kohya has no embedding layout" in changed[0]["why"]
    assert not any("embed" in key for key in load_file(str(out)))


def test_kohya_extract_refuses_embeddings_named_by_include(tmp_path):
    base, tuned = llm_pair(tmp_path, embeddings_change=False)
    with pytest.raises(FormatError, match="embed_tokens.*--include 'embed_tokens'"):
        extract(base, tuned, tmp_path / "k.safetensors", format="kohya",
                selection=Selection(include=("embed_tokens", "q_proj")))
    assert not (tmp_path / "k.safetensors").exists()


# ---- symlinks are replaced, never written through -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_force_replaces_a_symlinked_output_not_its_target(tmp_path, kind):
    """A Hugging Face cache points snapshot names at shared blobs: writing through the link would corrupt them."""
    inputs = make_inputs(tmp_path / "in")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    target = blobs / "abc123"
    if kind == "folder":
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"shared")
        out = tmp_path / "snapshot" / "adapter"
    else:
        target.write_bytes(b"shared")
        out = tmp_path / "snapshot" / "adapter.safetensors"
    out.parent.mkdir()
    out.symlink_to(target)
    before = snapshot(blobs)
    run_cli("convert", inputs.adapter, "-o", out, "--format", "peft", "--force", "-q")
    assert snapshot(blobs) == before
    assert not out.is_symlink() and out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_output_through_a_symlinked_folder_inside_an_input_is_refused(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    (tmp_path / "alias").symlink_to(inputs.adapter)
    done = run_cli("rescale", inputs.adapter, "-o", tmp_path / "alias" / "x", "--scale", "2", expect=2)
    assert "inside input" in done.stderr


def test_input_given_through_a_symlink_is_not_replaced(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    link = tmp_path / "link.safetensors"
    run_cli("convert", inputs.adapter, "-o", tmp_path / "k.safetensors", "--format", "kohya", "-q")
    link.symlink_to(tmp_path / "k.safetensors")
    done = run_cli("rescale", link, "-o", link, "--scale", "2", "--force", expect=2)
    assert "inside input" in done.stderr and link.is_symlink()


# ---- determinism ------------------------------------------------------------------------------------------------


def files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_every_writing_command_is_byte_identical_on_rerun(tmp_path):
    """extract, merge, combine, resize, rescale and convert, each run twice into two outputs."""
    inputs = make_inputs(tmp_path / "in")
    commands = {
        "extract": ["extract", inputs.base, inputs.tuned, "--rank", "2"],
        "extract-kohya": ["extract", inputs.base, inputs.tuned, "--rank", "2", "--format", "kohya"],
        "merge": ["merge", inputs.base, inputs.adapter, inputs.adapter2, "-w", "0.5", "-w", "1"],
        "combine": ["combine", inputs.adapter, inputs.adapter2],
        "combine-svd": ["combine", inputs.adapter, inputs.adapter2, "--method", "svd", "--rank", "2"],
        "resize": ["resize", inputs.adapter, "--rank", "1"],
        "rescale": ["rescale", inputs.adapter, "--alpha", "3"],
        "convert": ["convert", inputs.adapter, "--format", "kohya"],
    }
    for name, args in commands.items():
        suffix = ".safetensors" if name in ("merge", "extract-kohya", "convert") else ""
        outputs = [tmp_path / name / f"run{i}{suffix}" for i in (1, 2)]
        for out in outputs:
            run_cli(*args, "-o", out, "-q")
        first, second = (files(out) for out in outputs)
        assert first and {k.replace("run1", "run2"): v for k, v in first.items()} == second, name


def test_plot_replaces_a_symlink_not_its_target(tmp_path):
    pytest.importorskip("matplotlib")
    inputs = make_inputs(tmp_path / "in")
    target = tmp_path / "shared.png"
    target.write_bytes(b"not mine")
    plot = tmp_path / "plot.png"
    plot.symlink_to(target)
    run_cli("inspect", inputs.adapter, "--plot", plot, "-q")
    assert target.read_bytes() == b"not mine" and not plot.is_symlink()
    assert plot.read_bytes().startswith(b"\x89PNG")
