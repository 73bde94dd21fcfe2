"""Shared test helpers: random LoRA modules and adapters (hypothesis), delta checks, small model builders.

Pytest fixtures and the paths of the committed fixtures live in conftest.py; everything a test calls lives here.
Helpers that need an optional dependency (transformers, peft) skip the calling test when it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratools.adapter import KINDS, Adapter, LoraModule

# ---- the committed fixtures ---------------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LLAMA_BASE = FIXTURES / "llama-base"
LLAMA_TUNED = FIXTURES / "llama-tuned"
LLAMA_BASE_BF16 = FIXTURES / "llama-base-bf16"
LLAMA_TUNED_BF16 = FIXTURES / "llama-tuned-bf16"
LLAMA_PEFT = FIXTURES / "llama-lora-peft"
SD_BASE = FIXTURES / "sd-base.safetensors"
SD_TUNED = FIXTURES / "sd-tuned.safetensors"
SD_KOHYA = FIXTURES / "sd-lora-kohya.safetensors"


def fixture_script(path: Path) -> ModuleType:
    """A fixtures/make_*.py script loaded as a module (its builders are what the committed fixtures came from)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- random LoRA modules and adapters ----------------------------------------------------------------------------


def random_module(name: str, kind: str, rows: int, cols: int, rank: int, *, kernel: int = 1, alpha: float = 1.0,
                  seed: int = 0, dtype: torch.dtype = torch.float32, rslora: bool = False) -> LoraModule:
    """A LoraModule with standard-normal factors (drawn in fp32 from `seed`, then cast to `dtype`).

    rows × cols is the LoRA matrix B·A: A is (rank, cols) or (rank, cols, kernel, kernel) for conv2d, B is
    (rows, rank) or (rows, rank, 1, 1). For embedding and conv1d the base weight is its transpose (cols, rows).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv2d":
        a = torch.randn(rank, cols, kernel, kernel, generator=gen)
        b = torch.randn(rows, rank, 1, 1, generator=gen)
    else:
        a, b = torch.randn(rank, cols, generator=gen), torch.randn(rows, rank, generator=gen)
    return LoraModule(name, a.to(dtype), b.to(dtype), alpha, kind, rslora=rslora)


@st.composite
def lora_modules(draw, *, kinds: Sequence[str] = KINDS, dtypes: Sequence[torch.dtype] = (torch.float32,),
                 sizes: tuple[int, int] = (1, 12), ranks: tuple[int, int] = (1, 6), kernels: Sequence[int] = (1, 3),
                 alphas: st.SearchStrategy[float] | Callable[[int], st.SearchStrategy[float]] = st.just(1.0), rslora: Sequence[bool] = (False,),
                 layer: tuple[str, int, int, int] | None = None, name: str = "m") -> LoraModule:
    """A `random_module` of a drawn kind, LoRA-matrix size (rows, cols in `sizes`), rank, kernel, alpha, dtype.

    `alphas` is a strategy, or a function of the drawn rank giving one (alphas tied to the rank).
    `layer` = (kind, rows, cols, kernel) fixes the adapted layer instead of drawing it (for modules that must
    fit one layer); rank, alpha, dtype and rslora are still drawn. The rank may exceed min(rows, cols).
    """
    if layer is None:
        kind = draw(st.sampled_from(kinds))
        rows, cols = draw(st.integers(*sizes)), draw(st.integers(*sizes))
        kernel = draw(st.sampled_from(kernels)) if kind == "conv2d" else 1
    else:
        kind, rows, cols, kernel = layer
    rank = draw(st.integers(*ranks))
    alpha = draw(alphas(rank) if callable(alphas) else alphas)
    return random_module(name, kind, rows, cols, rank, kernel=kernel, alpha=alpha, seed=draw(st.integers(0, 2**16)),
                         dtype=draw(st.sampled_from(dtypes)), rslora=draw(st.sampled_from(rslora)))


@st.composite
def layers(draw, *, kinds: Sequence[str] = KINDS, sizes: tuple[int, int] = (1, 12),
           kernels: Sequence[int] = (1, 3)) -> tuple[str, int, int, int]:
    """(kind, rows, cols, kernel) of one adapted layer, for `lora_modules(layer=...)`."""
    kind = draw(st.sampled_from(kinds))
    kernel = draw(st.sampled_from(kernels)) if kind == "conv2d" else 1
    return kind, draw(st.integers(*sizes)), draw(st.integers(*sizes)), kernel


@st.composite
def adapters(draw, modules: st.SearchStrategy[LoraModule] | None = None, *,
             names: Sequence[str] = ("model.layers.{i}.block.proj",), count: tuple[int, int] = (1, 4),
             dtypes: Sequence[torch.dtype] | None = None) -> Adapter:
    """An Adapter of `count` drawn modules; module i is named by a template drawn from `names`, formatted with i.

    With `dtypes`, one dtype is drawn for the whole adapter and every factor is cast to it.
    """
    modules = modules if modules is not None else lora_modules()
    dtype = draw(st.sampled_from(dtypes)) if dtypes is not None else None
    drawn = {}
    for i in range(draw(st.integers(*count))):
        name = draw(st.sampled_from(names)).format(i=i)
        module = dataclasses.replace(draw(modules), name=name)
        if dtype is not None:
            module = dataclasses.replace(module, A=module.A.to(dtype), B=module.B.to(dtype))
        drawn[name] = module
    return Adapter(drawn)


# ---- checks ------------------------------------------------------------------------------------------------------


def assert_same_deltas(actual: Adapter, expected: Adapter, *, same_layout: bool = False) -> None:
    """Both adapters hold the same module names with equal deltas (rtol 1e-6, atol 1e-7).

    same_layout: also require the same kind, rank and factor dtype for every module (a format round trip).
    """
    assert sorted(actual.modules) == sorted(expected.modules)
    for name, module in expected.modules.items():
        got = actual.modules[name]
        if same_layout:
            assert got.kind == module.kind and got.rank == module.rank, name
            assert got.A.dtype == module.A.dtype, name
        torch.testing.assert_close(got.delta(), module.delta(), rtol=1e-6, atol=1e-7)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64 (b is the reference)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- checkpoints on disk -----------------------------------------------------------------------------------------


def write_checkpoint_pair(folder: Path, base: dict[str, torch.Tensor],
                          tuned: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """Save `base` and `tuned` as folder/base.safetensors and folder/tuned.safetensors; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors"


def write_pair_with_spectra(folder: Path, spectra: dict[str, list[float]]) -> tuple[Path, Path]:
    """A base/tuned pair of (24, 20) linear layers `{name}.weight` whose deltas have exactly the given
    singular values (float64, random orthonormal singular vectors)."""
    gen = torch.Generator().manual_seed(3)
    base, tuned = {}, {}
    for name, values in spectra.items():
        u, _ = torch.linalg.qr(torch.randn(24, len(values), generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(20, len(values), generator=gen, dtype=torch.float64))
        w = torch.randn(24, 20, generator=gen, dtype=torch.float64)
        base[f"{name}.weight"] = w
        tuned[f"{name}.weight"] = w + (u * torch.tensor(values, dtype=torch.float64)) @ v.T
    return write_checkpoint_pair(folder, base, tuned)


def make_gpt2_pair(folder: Path, *, delta_rank: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """A tiny GPT-2 (HF Conv1D layers) saved by transformers, and a tuned copy = base + a rank-`delta_rank`
    delta on every Conv1D weight (in the model's (in, out) layout) + a changed final norm."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    base, tuned = folder / "gpt2-base", folder / "gpt2-tuned"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                n_in, n_out = module.weight.shape
                b = torch.randn(n_in, delta_rank, generator=gen) * 0.1
                a = torch.randn(delta_rank, n_out, generator=gen) * 0.1
                module.weight += b @ a
        model.transformer.ln_f.weight += 0.05
    model.save_pretrained(tuned)
    return base, tuned


# ---- the CLI and models ------------------------------------------------------------------------------------------


def run_cli(*args: object, expect: int | None = 0, group: Any = None):
    """Invoke the loratools CLI (or another click `group`) in-process and return the click Result.

    With `expect` an exit code, assert it (an exception escaping the command fails the test with its traceback);
    with ``expect=None`` return whatever happened, exceptions caught into ``result.exception``.
    """
    from loratools.cli import cli

    result = CliRunner().invoke(group or cli, [str(a) for a in args], catch_exceptions=expect is None)
    assert expect is None or result.exit_code == expect, f"exit {result.exit_code}, expected {expect}\n{result.output}"
    return result


def assert_one_line_error(result, *names: str) -> str:
    """A CLI failure as the guarantees want it: exit 2, one `error:` line on stderr naming every name, no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    stderr = result.stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in stderr, f"{name!r} not in {stderr!r}"
    return stderr


def cli_json(*args: object) -> dict:
    """Run a command with ``--json -q`` (exit 0) and return its JSON report."""
    return json.loads(run_cli(*args, "--json", "-q").stdout)


def llama_from(folder: Path):
    """Load a fixture Llama with transformers (fp32, eval mode)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.eval()


def tiny_random_llama(seed: int, *, max_positions: int = 32, **config: object):
    """A randomly initialised LlamaForCausalLM (hidden 32, 2 layers, GQA, vocab 64), seeded; `config` overrides."""
    transformers = pytest.importorskip("transformers")
    llama_config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=max_positions, **config,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config)


def save_tiny_llama(folder: Path, seed: int = 0) -> Callable[[], Any]:
    """Save `tiny_random_llama` (64 positions, bos 1, eos 2) to `folder`; returns a loader of fresh eval-mode copies."""
    transformers = pytest.importorskip("transformers")
    tiny_random_llama(seed, max_positions=64, bos_token_id=1, eos_token_id=2).save_pretrained(str(folder))
    return lambda: transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()


def save_tiny_gpt2(folder: Path, seed: int = 7) -> Callable[[], Any]:
    """Save a random GPT2LMHeadModel (Conv1D layers; n_embd 32, 2 layers, vocab 80) to `folder`; returns a loader
    of fresh eval-mode copies."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=64, bos_token_id=0,
                                     eos_token_id=1)
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))
    return lambda: transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a fixed batch of token ids."""
    if ids is None:
        ids = torch.arange(2 * 12).reshape(2, 12) % 250 + 3
    with torch.no_grad():
        return model(ids).logits


def peft_logits(base_folder: Path, adapter: Path) -> torch.Tensor:
    """Logits of the Llama in `base_folder` with the adapter at `adapter` loaded by PEFT."""
    peft = pytest.importorskip("peft")
    return logits(peft.PeftModel.from_pretrained(llama_from(base_folder), str(adapter)).eval())
