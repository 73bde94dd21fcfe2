"""Pytest setup: paths to the committed fixtures, the hypothesis profiles, a CLI runner fixture.

Helpers that tests call (strategies, checks, model builders, `run_cli`) live in tests/helpers.py."""

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
