"""Shared test fixtures: paths to the committed fixtures, a CLI runner, small model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LLAMA_BASE = FIXTURES / "llama-base"
LLAMA_TUNED = FIXTURES / "llama-tuned"
LLAMA_BASE_BF16 = FIXTURES / "llama-base-bf16"
LLAMA_TUNED_BF16 = FIXTURES / "llama-tuned-bf16"
LLAMA_PEFT = FIXTURES / "llama-lora-peft"
SD_BASE = FIXTURES / "sd-base.safetensors"
SD_TUNED = FIXTURES / "sd-tuned.safetensors"
SD_KOHYA = FIXTURES / "sd-lora-kohya.safetensors"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Property tests draw the same examples on every run: CI must not turn red on a rare draw nobody can reproduce.
# `pytest --hypothesis-profile=explore` searches with fresh random examples (explicit max_examples still apply).
settings.register_profile("loratools", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile("loratools")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run_cli(*args: str, expect: int = 0):
    """Invoke the loratools CLI in-process; assert the exit code; return the click Result."""
    from loratools.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, f"exit {result.exit_code}, expected {expect}\n{result.output}"
    return result


def llama_from(folder: Path):
    """Load a fixture Llama with transformers (fp32, eval mode)."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.eval()


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a fixed batch of token ids."""
    if ids is None:
        ids = torch.arange(2 * 12).reshape(2, 12) % 250 + 3
    with torch.no_grad():
        return model(ids).logits


def tiny_random_llama(seed: int):
    """A randomly initialised LlamaForCausalLM (hidden 32, 2 layers, GQA, vocab 64), seeded."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)
