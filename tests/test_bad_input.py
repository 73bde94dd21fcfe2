"""Every command, every bad input: exit 2, one line on stderr naming the file (and tensor or key), no traceback,
no output and no temporaries left behind, inputs untouched. ``--debug`` keeps the traceback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests import bad_inputs as bad
from tests.bad_inputs import Inputs, make_inputs, snapshot
from tests.helpers import assert_one_line_error, run_cli

COMMANDS: dict[str, Callable[[Inputs], list[object]]] = {
    "extract": lambda p: ["extract", p.base, p.tuned, "-o", p.out, "--rank", "2"],
    "inspect": lambda p: ["inspect", p.adapter],
    "spectrum": lambda p: ["spectrum", p.base, p.tuned, "--ranks", "1,2"],
    "verify": lambda p: ["verify", p.base, p.tuned, p.adapter],
    "merge": lambda p: ["merge", p.base, p.adapter, "-o", p.out],
    "combine": lambda p: ["combine", p.adapter, p.adapter2, "-o", p.out],
    "rescale": lambda p: ["rescale", p.adapter, "-o", p.out, "--scale", "0.5"],
    "resize": lambda p: ["resize", p.adapter, "-o", p.out, "--rank", "1"],
    "convert": lambda p: ["convert", p.adapter, "-o", p.out, "--format", "kohya"],
}
READS_CHECKPOINT = ("extract", "spectrum", "verify", "merge")
READS_ADAPTER = ("inspect", "verify", "merge", "combine", "rescale", "resize", "convert")
WRITES = ("extract", "merge", "combine", "rescale", "resize", "convert")

# name -> (builder, roles, substrings the message must hold besides the file name)
FILE_CASES = {
    "missing path": (bad.missing, ("checkpoint", "adapter"), ()),
    "empty folder": (bad.empty_folder, ("checkpoint", "adapter"), ()),
    "folder with only a config": (bad.config_only, ("checkpoint", "adapter"), ()),
    "not safetensors bytes": (bad.garbage, ("checkpoint", "adapter"), ()),
    "truncated file": (bad.truncated, ("checkpoint", "adapter"), ()),
    "header length overruns": (bad.header_overrun, ("checkpoint", "adapter"), ()),
    "offsets run backwards": (bad.offsets_backwards, ("checkpoint", "adapter"), ("net.proj.weight",)),
    "overlapping tensors": (bad.offsets_overlap, ("checkpoint", "adapter"), ("net.",)),
    "gap between tensors": (bad.offsets_gap, ("checkpoint", "adapter"), ("net.",)),
    "shape claims 4 TB": (bad.huge_shape, ("checkpoint", "adapter"), ("net.proj.weight",)),
    "unknown dtype": (bad.bad_dtype, ("checkpoint", "adapter"), ("net.proj.weight",)),
    "header not an object": (bad.header_not_object, ("checkpoint", "adapter"), ()),
    "metadata not an object": (bad.metadata_not_object, ("checkpoint", "adapter"), ("__metadata__",)),
    "duplicate tensors across shards": (bad.duplicate_across_shards, ("checkpoint",), ("net.proj.weight",)),
    "index names a missing shard": (bad.index_missing_shard, ("checkpoint",), ("model-00009-of-00009",)),
    "index path outside its folder": (bad.index_parent_path, ("checkpoint",), ("../x.safetensors",)),
    "index absolute path": (bad.index_absolute_path, ("checkpoint",), ("x.safetensors",)),
    "index weight_map not an object": (bad.index_not_object, ("checkpoint",), ("weight_map",)),
    "index not JSON": (bad.index_not_json, ("checkpoint",), ("index.json",)),
    "config.json not an object": (bad.model_config_not_object, ("checkpoint",), ("config.json",)),
    "NaN in a tensor": (bad.nan_tensor, ("checkpoint",), ("net.proj.weight",)),
    "adapter folder with only a config": (bad.adapter_config_only, ("adapter",), ()),
    "A without B": (bad.a_without_b, ("adapter",), ("net.fc",)),
    "mismatched ranks": (bad.ranks_mismatched, ("adapter",), ("net.fc",)),
    "rank-0 factors": (bad.rank_zero_tensors, ("adapter",), ("net.fc",)),
    "Inf in a factor": (bad.nan_factor, ("adapter",), ("net.fc",)),
    "config not an object": (bad.config_not_object, ("adapter",), ("adapter_config.json",)),
    "config not JSON": (bad.config_not_json, ("adapter",), ("adapter_config.json",)),
    "lora_alpha is text": (bad.alpha_is_text, ("adapter",), ("lora_alpha", "sixteen")),
    "lora_alpha is NaN": (bad.alpha_not_finite, ("adapter",), ("lora_alpha",)),
    "r is 0": (bad.r_zero, ("adapter",), ("'r'",)),
    "r is negative": (bad.r_negative, ("adapter",), ("'r'",)),
    "r is text": (bad.r_is_text, ("adapter",), ("'r'",)),
    "r disagrees with the tensors": (bad.r_disagrees, ("adapter",), ("net.", "r=8", "rank 2")),
    "rank_pattern disagrees": (bad.rank_pattern_disagrees, ("adapter",), ("net.fc", "4", "rank 2")),
    "rank_pattern is a list": (bad.rank_pattern_is_list, ("adapter",), ("rank_pattern",)),
    "alpha_pattern value a list": (bad.alpha_pattern_bad_value, ("adapter",), ("alpha_pattern", "net.fc")),
    "pattern not a regex": (bad.pattern_bad_regex, ("adapter",), ("rank_pattern", "net.(fc")),
    "flag is text": (bad.flag_is_text, ("adapter",), ("use_rslora",)),
    "target_modules an object": (bad.target_modules_object, ("adapter",), ("target_modules",)),
    "kohya alpha NaN": (bad.kohya_alpha(torch.tensor(float("nan"))), ("adapter",), ("lora_unet_net_fc",)),
    "kohya alpha not a scalar": (bad.kohya_alpha(torch.ones(3)), ("adapter",), ("lora_unet_net_fc",)),
    "embedded config not JSON": (bad.embedded_config_not_json, ("adapter",), ("loratools_adapter_config",)),
}


def _cases() -> list:
    params = []
    for case, (_, roles, _) in FILE_CASES.items():
        commands = set()
        if "checkpoint" in roles:
            commands |= set(READS_CHECKPOINT)
        if "adapter" in roles:
            commands |= set(READS_ADAPTER)
        params += [pytest.param(case, command, id=f"{command}-{case}") for command in sorted(commands)]
    return params


@pytest.fixture(scope="module")
def good_inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("good")).root


def fresh_inputs(good: Path, folder: Path) -> Inputs:
    """A copy of the good inputs in `folder` (builders edit copies, never the shared originals)."""
    import shutil

    shutil.copytree(good, folder, dirs_exist_ok=True, symlinks=True)
    return Inputs(folder, folder / "base.safetensors", folder / "tuned.safetensors", folder / "adapter",
                  folder / "adapter2", folder / "out")


@pytest.mark.parametrize(("case", "command"), _cases())
def test_bad_input_is_one_line_exit_2(tmp_path, good_inputs, case, command):
    builder, roles, expected = FILE_CASES[case]
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    bad_path = builder(tmp_path / "in")
    if "checkpoint" in roles and command in READS_CHECKPOINT:
        inputs.base = bad_path
    else:
        inputs.adapter = bad_path
    before = snapshot(tmp_path)
    result = run_cli(*COMMANDS[command](inputs), expect=None)
    assert_one_line_error(result, bad_path.name, *expected)
    assert snapshot(tmp_path) == before  # inputs untouched, no output, no temporaries


def test_debug_keeps_the_traceback(tmp_path, good_inputs):
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    inputs.adapter = bad.alpha_is_text(tmp_path / "in")
    result = run_cli("--debug", *COMMANDS["inspect"](inputs), expect=None)
    assert result.exit_code != 0 and result.exception is not None
    assert "sixteen" in str(result.exception)


# ---- outputs ---------------------------------------------------------------------------------------------------


def _exists(inputs: Inputs) -> tuple[str, ...]:
    inputs.out.mkdir()
    (inputs.out / "keep.txt").write_text("mine")
    return ("already exists", "--force")


def _inside_input(inputs: Inputs) -> tuple[str, ...]:
    inputs.out = inputs.adapter / "nested"
    return ("inside input",)


def _is_input(inputs: Inputs) -> tuple[str, ...]:
    inputs.out = inputs.adapter
    return ("inside input",)


def _inside_base(inputs: Inputs) -> tuple[str, ...]:
    inputs.out = inputs.base / "nested"
    return ("inside input",)


def _is_base(inputs: Inputs) -> tuple[str, ...]:
    inputs.out = inputs.tuned
    return ("inside input",)


def _symlink(inputs: Inputs) -> tuple[str, ...]:
    target = inputs.root / "shared-blob"
    target.write_text("blob")
    inputs.out.symlink_to(target)
    return ("already exists",)


def _dangling_symlink(inputs: Inputs) -> tuple[str, ...]:
    inputs.out.symlink_to(inputs.root / "gone")
    return ("already exists",)


def _parent_is_a_file(inputs: Inputs) -> tuple[str, ...]:
    (inputs.root / "afile").write_text("x")
    inputs.out = inputs.root / "afile" / "out"
    return ("not a folder",)


def _grandparent_is_a_file(inputs: Inputs) -> tuple[str, ...]:
    (inputs.root / "afile").write_text("x")
    inputs.out = inputs.root / "afile" / "deeper" / "out"
    return ("afile",)


OUTPUT_CASES = {
    "exists": _exists,
    "inside an input": _inside_input,
    "is an input": _is_input,
    "is a symlink": _symlink,
    "is a dangling symlink": _dangling_symlink,
    "parent is a file": _parent_is_a_file,
    "grandparent is a file": _grandparent_is_a_file,
}


@pytest.mark.parametrize("command", WRITES)
@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_bad_output_is_one_line_exit_2(tmp_path, good_inputs, command, case):
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    make = OUTPUT_CASES[case]
    if command == "extract":  # its inputs are the checkpoints, not the adapter
        make = {_inside_input: _inside_base, _is_input: _is_base}.get(make, make)
    expected = make(inputs)
    before = snapshot(tmp_path)
    result = run_cli(*COMMANDS[command](inputs), expect=None)
    assert_one_line_error(result, inputs.out.name, *expected)
    assert snapshot(tmp_path) == before


def test_unwritable_folder_is_one_line(tmp_path, good_inputs, monkeypatch):
    """Root ignores file modes, so a folder that refuses writes is simulated where files are opened."""
    import builtins

    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "w" in str(mode) and ".loratools-tmp-" in str(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    before = snapshot(tmp_path)
    result = run_cli(*COMMANDS["convert"](inputs), expect=None)
    stderr = assert_one_line_error(result, "out", "Permission denied")
    assert "Errno" not in stderr or "13" in stderr
    assert snapshot(tmp_path) == before


# ---- ranks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["0", "-3"])
@pytest.mark.parametrize("command", ["extract", "resize", "combine"])
def test_rank_zero_or_negative_is_refused(tmp_path, good_inputs, command, rank):
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    args = [a for a in COMMANDS[command](inputs) if a not in ("--rank", "1", "2")]
    if command == "combine":
        args += ["--method", "svd"]
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli(*args, "--rank", rank, expect=None), "--rank", rank)
    assert snapshot(tmp_path) == before


def test_spectrum_rank_zero_is_refused(tmp_path, good_inputs):
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    assert_one_line_error(run_cli("spectrum", inputs.base, inputs.tuned, "--ranks", "0,2", expect=None), "--ranks")


def test_rank_larger_than_the_layer_is_clamped_and_said(tmp_path, good_inputs):
    """FORMATS.md: a layer smaller than the rank asked is clamped to min(out, in), with a warning, not an error."""
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    result = run_cli("extract", inputs.base, inputs.tuned, "-o", inputs.out, "--rank", "64", "-q", expect=None)
    assert result.exit_code == 0, result.output
    assert "clamped to min(out, in)" in result.stderr
    resized = run_cli("resize", inputs.adapter, "-o", tmp_path / "r", "--rank", "64", "-q", expect=None)
    assert resized.exit_code == 0, resized.output


def test_stray_oserror_is_one_line(tmp_path, good_inputs, monkeypatch):
    """An OSError that escapes the library (here: reading an input fails) is one line at the CLI boundary."""
    import loratools.checkpoint

    inputs = fresh_inputs(good_inputs, tmp_path / "in")

    def failing(path: Path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(loratools.checkpoint, "read_safetensors_header", failing)
    assert_one_line_error(run_cli(*COMMANDS["spectrum"](inputs), expect=None), "Input/output error", "base.safetensors")


def test_no_traceback_for_a_folder_named_like_a_weight_file(tmp_path, good_inputs):
    inputs = fresh_inputs(good_inputs, tmp_path / "in")
    (tmp_path / "in" / "weird").mkdir()
    (tmp_path / "in" / "weird" / "model-00001.safetensors").mkdir()
    inputs.base = tmp_path / "in" / "weird"
    assert_one_line_error(run_cli(*COMMANDS["spectrum"](inputs), expect=None), "weird")
    assert os.path.isdir(tmp_path / "in" / "weird" / "model-00001.safetensors")
