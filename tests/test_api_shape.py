"""The package's shape, held: keyword-only public API, one result protocol, one dtype convention, one set of
provenance keys, argument rules in the library, and the same `-q` / `--json` on every command."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import loratools
from loratools.adapter_commands import combine, rescale
from loratools.errors import LoratoolsError
from loratools.merging import merge
from loratools.options import RankPolicy
from loratools.writer import PROVENANCE_KEYS
from tests.helpers import LLAMA_BASE, LLAMA_PEFT, LLAMA_TUNED, SD_BASE, SD_KOHYA, SD_TUNED, run_cli

PUBLIC_FUNCTIONS = sorted(n for n in loratools.__all__ if inspect.isfunction(getattr(loratools, n)))
MAX_PARAMETERS = 12  # more travel together: group them in an option dataclass


def test_the_public_api_is_what_all_lists():
    assert "export_adapter" in PUBLIC_FUNCTIONS and "merge_onnx" in PUBLIC_FUNCTIONS and len(PUBLIC_FUNCTIONS) > 15
    for name in loratools.__all__:
        assert getattr(loratools, name) is not None, name


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_functions_are_keyword_only_after_their_paths(name):
    parameters = list(inspect.signature(getattr(loratools, name)).parameters.values())
    leading = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert parameters[: len(leading)] == leading and 1 <= len(leading) <= 3, name
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[len(leading):]), name
    assert len(parameters) <= MAX_PARAMETERS, f"{name} takes {len(parameters)} parameters"


def test_the_formats_the_cli_offers_are_the_writers():
    from loratools.adapter_files import WRITABLE_FORMATS
    from loratools.options import ADAPTER_FORMATS

    assert WRITABLE_FORMATS == ADAPTER_FORMATS


@pytest.mark.parametrize("code", ["import loratools.cli", "import loratools",
                                  "from loratools.cli import cli; cli(['--help'], standalone_mode=False)",
                                  "from loratools.cli import cli; cli(['extract', '--help'], standalone_mode=False)"])
def test_the_command_line_and_the_package_load_without_torch(code):
    """``loratools --help`` and ``import loratools`` stay light: torch (and onnx) load when a command runs."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_every_result_has_to_json_and_notes(tmp_path):
    results = [
        loratools.extract(LLAMA_BASE, LLAMA_TUNED, tmp_path / "a", policy=RankPolicy("rank", 2)),
        loratools.rank_spectrum(LLAMA_BASE, LLAMA_TUNED, ranks=[2]),
        loratools.verify_adapter(LLAMA_BASE, LLAMA_TUNED, LLAMA_PEFT),
        loratools.inspect_adapter(LLAMA_PEFT),
        loratools.merge(LLAMA_BASE, [LLAMA_PEFT], tmp_path / "m"),
        loratools.rescale(LLAMA_PEFT, tmp_path / "r", scale=2.0),
    ]
    for result in results:
        assert isinstance(result.notes, list)
        json.dumps(result.to_json())  # plain JSON, nothing left to a default encoder


def test_dtype_names_and_torch_dtypes_are_the_same_request(tmp_path):
    merge(SD_BASE, [SD_KOHYA], tmp_path / "by-name.safetensors", dtype="bf16")
    merge(SD_BASE, [SD_KOHYA], tmp_path / "by-dtype.safetensors", dtype=torch.bfloat16)
    by_name = (tmp_path / "by-name.safetensors").read_bytes()
    by_dtype = (tmp_path / "by-dtype.safetensors").read_bytes()
    assert by_name.replace(b"by-name", b"by-dtype") == by_dtype
    with pytest.raises(LoratoolsError, match="--dtype"):
        merge(SD_BASE, [SD_KOHYA], tmp_path / "x.safetensors", dtype=torch.int8)


def test_argument_rules_live_in_the_library(tmp_path):
    with pytest.raises(LoratoolsError, match="concat"):
        combine([SD_KOHYA], tmp_path / "c.safetensors", method="concat", policy=RankPolicy("rank", 2))
    with pytest.raises(LoratoolsError, match="exactly one"):
        rescale(SD_KOHYA, tmp_path / "r.safetensors", scale=2.0, alpha=1.0)
    with pytest.raises(LoratoolsError, match="--precision"):
        loratools.SvdSettings(precision="fp16")
    with pytest.raises(LoratoolsError, match="--embeddings"):
        loratools.Selection(embeddings="sometimes")
    assert not list(tmp_path.iterdir())


def test_every_written_file_records_the_same_provenance_keys(tmp_path):
    written = {
        "extract": (["extract", SD_BASE, SD_TUNED, "-o", tmp_path / "e.safetensors", "--format", "kohya"],
                    tmp_path / "e.safetensors"),
        "merge": (["merge", SD_BASE, SD_KOHYA, "-o", tmp_path / "m.safetensors"], tmp_path / "m.safetensors"),
        "combine": (["combine", SD_KOHYA, SD_KOHYA, "-o", tmp_path / "c.safetensors"], tmp_path / "c.safetensors"),
        "rescale": (["rescale", SD_KOHYA, "-o", tmp_path / "s.safetensors", "--scale", "2"], tmp_path / "s.safetensors"),
        "resize": (["resize", SD_KOHYA, "-o", tmp_path / "r.safetensors", "--rank", "1"], tmp_path / "r.safetensors"),
        "convert": (["convert", LLAMA_PEFT, "-o", tmp_path / "k.safetensors", "--format", "kohya"],
                    tmp_path / "k.safetensors"),
    }
    for command, (args, path) in written.items():
        run_cli(*args, "-q")
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert set(PROVENANCE_KEYS) <= set(metadata), command
        assert metadata["loratools_command"] == command
        assert json.loads(metadata["loratools_inputs"])[0] == str(args[1])
        assert isinstance(json.loads(metadata["loratools_parameters"]), dict)
    shown = run_cli("inspect", tmp_path / "r.safetensors").stdout
    assert "loratools_command" in shown and "resize" in shown


LAYER = "down_blocks"  # in the name of every layer of the SD fixtures: present in each per-layer row


@pytest.mark.parametrize("args", [
    ["extract", SD_BASE, SD_TUNED, "-o", "{tmp}/e.safetensors", "--format", "kohya"],
    ["inspect", SD_KOHYA],
    ["spectrum", SD_BASE, SD_TUNED, "--ranks", "2"],
    ["verify", SD_BASE, SD_TUNED, SD_KOHYA],
    ["resize", SD_KOHYA, "-o", "{tmp}/r.safetensors", "--rank", "1"],
], ids=lambda args: args[0])
def test_quiet_means_summary_only_on_every_command(tmp_path, args):
    def invoke(*extra: str) -> str:
        concrete = [str(a).format(tmp=tmp_path) for a in args]
        return run_cli(*concrete, "--force", *extra).stdout if args[0] in ("extract", "resize") else \
            run_cli(*concrete, *extra).stdout

    full, quiet = invoke(), invoke("-q")
    assert LAYER in full and LAYER not in quiet
    assert quiet.strip() and quiet.splitlines()[-1] in full  # the summary is the same text
    assert isinstance(json.loads(invoke("--json")), dict)


def test_renamed_flags_keep_their_old_spelling_hidden():
    new = json.loads(run_cli("spectrum", SD_BASE, SD_TUNED, "--ranks", "2", "--max-error", "0.3",
                             "--singular-values", "4", "--json").stdout)
    old = json.loads(run_cli("spectrum", SD_BASE, SD_TUNED, "--ranks", "2", "--target-error", "0.3",
                             "--max-rank", "4", "--json").stdout)
    assert new == old and new["recommendation"]["criterion"] == "max_error"
    help_text = run_cli("spectrum", "--help").stdout
    assert "--max-error" in help_text and "--target-error" not in help_text and "--max-rank" not in help_text
    clash = run_cli("spectrum", SD_BASE, SD_TUNED, "--max-error", "0.3", "--target-error", "0.2", expect=2)
    assert "old name" in clash.stderr
