"""Helpers of the ONNX tests: onnxruntime sessions and feeds, greedy decoding both ways, random PEFT adapters,
the export CLI with --json, and the one-line-error check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers import run_cli

peft = pytest.importorskip("peft")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def causal_feeds(ids: torch.Tensor) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    return {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None].repeat(batch, 0),
    }


def ort_greedy(sess: ort.InferenceSession, prompt: np.ndarray, steps: int) -> list[int]:
    """Plain onnxruntime + numpy greedy decoding with the KV cache (what the README shows)."""
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    ids, tokens = prompt, []
    for _ in range(steps):
        length = len(tokens) + prompt.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.arange(length - ids.shape[1], length, dtype=np.int64)[None], **past}
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(names, feeds), strict=True))
        tokens.append(int(out["logits"][0, -1].argmax()))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        ids = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens


def hf_greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                             min_new_tokens=0, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, prompt.shape[1]:].tolist()


def peft_adapter(model, folder: Path, targets: list[str], seed: int, *, r: int = 4, alpha: float = 8,
                 **kwargs) -> None:
    """A PEFT adapter with random non-zero A and B (init_lora_weights=False), saved to `folder`."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kwargs)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # make the deltas large enough to matter
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    wrapped.save_pretrained(str(folder))


def peft_merged(base, folder: Path):
    return peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval()


def export(*args, expect: int = 0) -> dict | None:
    result = run_cli("export-onnx", *args, "--json", "-q", expect=expect)
    return json.loads(result.stdout) if expect == 0 else None


def initializer_shapes(path: Path) -> list[tuple[int, ...]]:
    return [tuple(i.dims) for i in onnx.load(str(path), load_external_data=False).graph.initializer]
