"""A real fine-tune for the behaviour tests: a tiny Llama trained on a token pattern its base does not know."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits  # 62 characters: ids 2 … 63
PATTERN_SEED = 5


@dataclass(frozen=True)
class FineTune:
    """base/ and tuned/ folders (each with a character tokenizer), the pattern's next-token map and a text."""

    base: Path
    tuned: Path
    successor: torch.Tensor  # (64,) next token id of the pattern, for ids 2 … 63
    text: Path


def char_tokenizer():
    """A character-level fast tokenizer: ids 0 <unk>, 1 <s>, then one id per character of CHARS."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>")


def pattern(successor: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """(len(starts), length) sequences that follow `successor` from each start id."""
    ids = [starts]
    for _ in range(length - 1):
        ids.append(successor[ids[-1]])
    return torch.stack(ids, 1)


def make_finetune(folder: Path, *, steps: int = 40) -> FineTune:
    """Save a random tiny Llama (hidden 32, 2 layers, vocab 64, context 64) as base/, train every parameter
    (norms too) `steps` Adam steps on sequences where each token is followed by a fixed random successor, and
    save the result as tuned/. The base predicts the pattern no better than chance; the tuned model learns it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tokenizer = char_tokenizer()
    base, tuned = folder / "base", folder / "tuned"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    gen = torch.Generator().manual_seed(PATTERN_SEED)
    successor = torch.zeros(64, dtype=torch.long)
    successor[2:] = torch.randperm(62, generator=gen) + 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = pattern(successor, torch.randint(2, 64, (16,), generator=gen), 24)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    text = folder / "pattern.txt"
    text.write_text(pattern_text(successor, 60))
    return FineTune(base, tuned, successor, text)


def pattern_text(successor: torch.Tensor, length: int, start: int = 2) -> str:
    """`length` characters that follow the pattern from token id `start`."""
    return "".join(CHARS[i - 2] for i in pattern(successor, torch.tensor([start]), length)[0].tolist())
