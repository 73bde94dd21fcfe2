"""Interop with the real client: adapters written here load in PEFT and give the logits our deltas predict."""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import load_adapter, save_adapter
from tests.helpers import LLAMA_BASE, LLAMA_PEFT, llama_from, logits, peft_logits


def logits_with_deltas(adapter: Adapter) -> torch.Tensor:
    """Logits of the base model with every delta added by hand (and full tensors swapped in)."""
    model = llama_from(LLAMA_BASE)
    state = model.state_dict()
    for name, module in adapter.modules.items():
        state[name + ".weight"] = state[name + ".weight"] + module.delta()
    for name, tensor in adapter.full.items():
        state[name] = tensor.float()
    model.load_state_dict(state)
    return logits(model)


def test_fixture_adapter_loads_in_peft():
    pytest.importorskip("peft")
    adapter = load_adapter(LLAMA_PEFT)
    torch.testing.assert_close(peft_logits(LLAMA_BASE, LLAMA_PEFT), logits_with_deltas(adapter), rtol=0, atol=1e-5)


def mixed_adapter() -> Adapter:
    """Mixed ranks and alphas, an embedding LoRA, and a full lm_head (modules_to_save)."""
    gen = torch.Generator().manual_seed(7)
    base = {}
    specs = {
        "model.layers.0.self_attn.q_proj": (64, 64, 2, 4.0),
        "model.layers.0.self_attn.k_proj": (32, 64, 5, 5.0),
        "model.layers.1.mlp.down_proj": (64, 128, 3, 1.5),
        "model.layers.1.mlp.up_proj": (128, 64, 2, 4.0),
    }
    for name, (out, inp, r, alpha) in specs.items():
        base[name] = LoraModule(name, 0.1 * torch.randn(r, inp, generator=gen), 0.1 * torch.randn(out, r, generator=gen), alpha)
    base["model.embed_tokens"] = LoraModule(
        "model.embed_tokens", 0.1 * torch.randn(3, 256, generator=gen), 0.1 * torch.randn(64, 3, generator=gen), 6.0, "embedding"
    )
    full = {"lm_head.weight": 0.02 * torch.randn(256, 64, generator=gen)}
    return Adapter(base, base_model=str(LLAMA_BASE), full=full, config={"task_type": "CAUSAL_LM"})


def test_written_adapter_with_mixed_ranks_embedding_and_full_tensor_loads_in_peft(tmp_path):
    pytest.importorskip("peft")
    adapter = mixed_adapter()
    out = save_adapter(adapter, tmp_path / "mixed", format="peft")
    expected = logits_with_deltas(adapter)
    got = peft_logits(LLAMA_BASE, out)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - logits(llama_from(LLAMA_BASE))).abs().max() > 1e-2  # the adapter does something


def test_bare_peft_file_keeps_alpha(tmp_path):
    adapter = mixed_adapter()
    out = save_adapter(adapter, tmp_path / "mixed.safetensors", format="peft")
    back = load_adapter(out)
    assert back.notes == []
    for name, module in adapter.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), module.delta())
