"""Pytest setup: environment, thread count and the hypothesis profiles.

Everything a test calls or imports (fixture paths, strategies, checks, model builders, `run_cli`) lives in
tests/helpers.py."""

from __future__ import annotations

import os

import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Property tests draw the same examples on every run: CI must not turn red on a rare draw nobody can reproduce.
# `pytest --hypothesis-profile=explore` searches with fresh random examples (explicit max_examples still apply).
settings.register_profile("loratools", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile("loratools")
