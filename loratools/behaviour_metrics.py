"""The forward passes behind ``--behaviour``: the token windows every model runs on, and the per-position metrics
of a model against the tuned model's kept outputs.

Causal LMs: the tuned model's log-probs at every position that predicts a next token, (N, vocab) float32 on the
CPU (bounded by ``max_tokens``); each other model gives per-position KL(tuned ‖ model) =
Σ_v p_tuned(v)·(log p_tuned(v) − log p_model(v)), top-1 agreement (argmax equal) and the negative
log-likelihood of the text's next tokens (perplexity). Encoders: the tuned model's last hidden states (N, hidden)
and mean-pooled window embeddings (W, hidden); each other model gives per-token 1 − cosine and the pooled
cosine. Windows are right-padded into batches with an attention mask; padded positions are never compared.
Metrics are computed CHUNK_ROWS positions at a time, so their temporaries stay small beside the batch's logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratools.errors import LoratoolsError, ModelError, ShapeError
from loratools.options import BehaviourOptions
from loratools.progress import Progress

RANDOM_LENGTH = 128  # tokens per random sequence (less when the context is shorter)
CHUNK_ROWS = 256  # positions compared at a time


@dataclass
class TokenWindows:
    """The token sequences every model runs on: (L,) int64 each, L ≤ the model's context."""

    windows: list[torch.Tensor]
    source: str
    notes: list[str] = field(default_factory=list)


def token_windows(options: BehaviourOptions, tokenizer: object | None, *, vocab_size: int, context: int | None,
                  minimum: int = 2) -> TokenWindows:
    """Tokenize ``options.texts`` into windows of at most `context` tokens (≥ `minimum` each), ``max_tokens`` in
    all; without texts, seeded random sequences (the notes say so).

    Raises:
        ModelError: texts but no tokenizer, or token ids beyond `vocab_size`; LoratoolsError: a text too short.
    """
    if not options.texts:
        length = min(context or RANDOM_LENGTH, RANDOM_LENGTH, options.max_tokens)
        count = max(1, options.max_tokens // length)
        gen = torch.Generator().manual_seed(options.seed)
        ids = torch.randint(0, vocab_size, (count, length), generator=gen)
        source = f"{count} random token sequences of {length} tokens, seed {options.seed}"
        why = "" if tokenizer is not None else " (the model folders hold no tokenizer)"
        note = f"no --text{why}: {source} stand in for text; give --text FILE for figures on your own text"
        return TokenWindows(list(ids), source, [note])
    if tokenizer is None:
        raise ModelError(f"{options.texts[0]}: neither model folder holds a tokenizer (tokenizer.json …), so --text"
                         " cannot be tokenized; add the tokenizer files to TUNED, or leave out --text to measure on"
                         " seeded random tokens")
    result = TokenWindows([], f"{len(options.texts)} text file(s)")
    budget = options.max_tokens
    for number, path in enumerate(options.texts):
        tokens = _tokenize(path, tokenizer, vocab_size, minimum)
        step = context or len(tokens)
        if len(tokens) > step:
            result.notes.append(f"{path}: {len(tokens)} tokens, longer than the model's context of {context}: split"
                                f" into {math.ceil(len(tokens) / step)} windows")
        if len(tokens) > budget:
            result.notes.append(f"{path}: cut to {budget} of its {len(tokens)} tokens (--max-tokens"
                                f" {options.max_tokens})")
        tokens = tokens[:budget]
        budget -= len(tokens)
        result.windows += [piece for piece in torch.tensor(tokens).split(step) if len(piece) >= minimum]
        if budget < minimum:
            skipped = options.texts[number + 1:]
            if skipped:
                result.notes.append(f"--max-tokens {options.max_tokens} reached: {len(skipped)} text file(s) not"
                                    f" used ({', '.join(skipped)})")
            break
    result.source += f", {sum(len(w) for w in result.windows)} tokens in {len(result.windows)} window(s)"
    return result


def _tokenize(path: str, tokenizer: object, vocab_size: int, minimum: int) -> list[int]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoratoolsError(f"{path}: cannot read the text ({exc}); give a UTF-8 text file") from None
    ids = list(tokenizer(text)["input_ids"])  # type: ignore[operator]
    if len(ids) < minimum:
        raise LoratoolsError(f"{path}: {len(ids)} token(s); a text needs at least {minimum}")
    if max(ids) >= vocab_size:
        raise ModelError(f"{path}: token id {max(ids)} is beyond the model's vocabulary of {vocab_size}; the tokenizer"
                         " does not belong to this model")
    return ids


@dataclass(frozen=True)
class Behaviour:
    """One model next to the tuned model on the same positions.

    Attributes:
        label: "tuned", "base", "adapter", "rank 8" …
        gap: mean KL(tuned ‖ model) in nats (causal), or mean 1 − cosine of the hidden states (encoder).
        gap_p95: the 95th percentile of the per-position gap.
        top1_agreement: share of positions whose most likely next token is the tuned model's (causal).
        perplexity: exp(mean negative log-likelihood of the text's next tokens) (causal).
        pooled_cosine: mean cosine of the mean-pooled embeddings of each window (encoder).
    """

    label: str
    gap: float
    gap_p95: float
    top1_agreement: float | None = None
    perplexity: float | None = None
    pooled_cosine: float | None = None

    def to_json(self) -> dict:
        if self.pooled_cosine is None:
            return {"label": self.label, "kl_mean": self.gap, "kl_p95": self.gap_p95,
                    "top1_agreement": self.top1_agreement, "perplexity": self.perplexity}
        return {"label": self.label, "hidden_cosine_mean": 1 - self.gap, "hidden_cosine_p5": 1 - self.gap_p95,
                "pooled_cosine_mean": self.pooled_cosine}



@dataclass
class _Outputs:
    """One window's outputs at its compared positions (views into the batch's output, in the model's dtype):
    rows (n, vocab) logits or (n, hidden) states; targets (n,) next tokens (causal)."""

    rows: torch.Tensor
    targets: torch.Tensor | None


def _chunks(out: _Outputs) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(rows, targets) in float32, CHUNK_ROWS positions at a time: temporaries stay a few × CHUNK_ROWS × vocab."""
    for start in range(0, len(out.rows), CHUNK_ROWS):
        targets = out.targets[start:start + CHUNK_ROWS] if out.targets is not None else None
        yield out.rows[start:start + CHUNK_ROWS].float(), targets


@dataclass
class TunedOutputs:
    """What is kept of the tuned model: `values` (N, vocab) log-probs (causal) or (N, hidden) last hidden states
    (encoder) at the compared positions, float32 on the CPU; `pooled` (W, hidden) mean-pooled states (encoder)."""

    values: torch.Tensor
    pooled: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.pooled) if t is not None)


class ModelRunner:
    """Runs models over the windows batch by batch, counting progress across every pass."""

    def __init__(self, windows: TokenWindows, kind: str, options: BehaviourOptions, passes: int,
                 progress: Progress | None):
        self.windows, self.kind, self.options, self.progress = windows.windows, kind, options, progress
        self.batches = math.ceil(len(self.windows) / options.batch_size)
        self.total, self.done = passes * self.batches, 0

    def outputs(self, model: torch.nn.Module, label: str) -> Iterator[_Outputs]:
        """Each window's outputs, batch by batch (one batch of outputs in memory: batch × window × vocab)."""
        device, size = torch.device(self.options.device), self.options.batch_size
        for start in range(0, len(self.windows), size):
            batch = self.windows[start:start + size]
            lengths = [len(w) for w in batch]
            ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, window in enumerate(batch):
                ids[i, :len(window)], mask[i, :len(window)] = window, 1
            with torch.inference_mode():
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for i, (n, window) in enumerate(zip(lengths, batch, strict=True)):
                if self.kind == "causal":
                    yield _Outputs(out.logits[i, :n - 1], window[1:].to(device))
                else:
                    yield _Outputs(out.last_hidden_state[i, :n], None)
            del out
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total, label)

    def reference(self, model: torch.nn.Module) -> tuple[TunedOutputs, Behaviour]:
        """Run the tuned model and keep its outputs in one buffer allocated once (N rows, N known from the
        windows); its own row: gap 0 and its perplexity."""
        causal = self.kind == "causal"
        rows = sum(len(w) - 1 if causal else len(w) for w in self.windows)
        kept: TunedOutputs | None = None
        offset, nll = 0, 0.0
        for number, out in enumerate(self.outputs(model, "tuned")):
            width = out.rows.shape[-1]
            if kept is None:
                kept = TunedOutputs(torch.empty(rows, width), None if causal else torch.empty(len(self.windows), width))
            if kept.pooled is not None:
                kept.pooled[number] = out.rows.float().mean(0).cpu()
            for chunk, targets in _chunks(out):
                values = chunk
                if targets is not None:
                    values = torch.log_softmax(chunk, dim=-1)
                    nll -= float(values.gather(1, targets[:, None]).double().sum())
                kept.values[offset:offset + len(values)] = values.cpu()
                offset += len(values)
        assert kept is not None  # there is at least one window
        if causal:
            return kept, Behaviour("tuned", 0.0, 0.0, 1.0, math.exp(nll / rows))
        return kept, Behaviour("tuned", 0.0, 0.0, pooled_cosine=1.0)

    def compare(self, model: torch.nn.Module, reference: TunedOutputs, label: str) -> Behaviour:
        """Run `model` and compare it with the tuned model's kept outputs, position by position."""
        gaps: list[torch.Tensor] = []
        pooled: list[float] = []
        offset, agree, nll = 0, 0, 0.0
        for number, out in enumerate(self.outputs(model, label)):
            if out.rows.shape[-1] != reference.values.shape[-1]:
                raise ShapeError(f"{label}: outputs of width {out.rows.shape[-1]}, the tuned model's are"
                                 f" {reference.values.shape[-1]} wide (vocabulary or hidden size differs); compare"
                                 " models of one architecture")
            if reference.pooled is not None:
                mean = out.rows.float().mean(0)
                pooled.append(float(torch.cosine_similarity(mean, reference.pooled[number].to(mean.device), dim=0)))
            for chunk, targets in _chunks(out):
                ref = reference.values[offset:offset + len(chunk)].to(chunk.device)
                offset += len(chunk)
                if targets is None:
                    gaps.append((1 - torch.cosine_similarity(chunk, ref, dim=-1)).double().cpu())
                    continue
                log_probs = torch.log_softmax(chunk, dim=-1)
                probs = ref.exp()
                gaps.append(torch.where(probs > 0, probs * (ref - log_probs), 0.0).sum(-1).double().cpu())
                agree += int((log_probs.argmax(-1) == ref.argmax(-1)).sum())
                nll -= float(log_probs.gather(1, targets[:, None]).double().sum())
        gap = torch.cat(gaps).clamp_min(0)
        mean_gap, p95 = float(gap.mean()), float(torch.quantile(gap, 0.95))
        if self.kind == "causal":
            return Behaviour(label, mean_gap, p95, agree / len(gap), math.exp(nll / len(gap)))
        return Behaviour(label, mean_gap, p95, pooled_cosine=sum(pooled) / len(pooled))
