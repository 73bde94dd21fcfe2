"""Behavioural fidelity: does base + adapter behave like the fine-tune on the user's text? (`verify --behaviour`,
`spectrum --behaviour`).

Per position of the text, the tuned model is compared with base + adapter and with the base:
- causal LMs: KL(tuned ‖ model) of the next-token distributions (mean and 95th percentile), top-1 agreement
  with the tuned model, and each model's perplexity on the text;
- encoders (BERT family): cosine of the last hidden states per token (mean and 5th percentile) and of the
  mean-pooled embeddings per window.
The share of the fine-tune recovered is 1 − gap(adapted) / gap(base), with gap = mean KL for causal LMs and
mean (1 − cosine) of the hidden states for encoders: 1 reproduces the fine-tune's change, 0 is no better than
the base. These are a proxy on the given text, not a task benchmark.

Memory: one model at a time. The tuned model runs first and only what the metrics need is kept (log-probs of
the text's positions, or hidden states: a buffer of tokens × vocab (or hidden) floats, bounded by
``max_tokens``); it is freed, then the base is loaded once and every candidate adapter is merged into it in
place, run, and undone by reading the base tensors back from the checkpoint (exact; no second copy of the
weights). Peak ≈ one model + the buffer + one tensor.

Decisions:
- Text is tokenized with the tuned folder's tokenizer (else the base's); without ``texts``, seeded random token
  sequences stand in (said in the notes). Text longer than the model's context is split into windows of the
  context length; past ``max_tokens`` it is cut (both said in the notes).
- Changed tensors a LoRA cannot hold (norms, biases) and the adapter leaves out: one more pass adds them
  (from the tuned checkpoint) to the adapter, and the report says how much of the remaining gap they explain
  (for `spectrum`, at the largest swept rank).
- `spectrum` measures, per rank, the adapter ``extract --rank r`` would write with the same selection and SVD
  settings (`extract.extract_adapter`), cast to the dtype it would write.
"""

from __future__ import annotations

import gc
import math
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loratools.adapter import Adapter
from loratools.adapter_files import load_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.deltas import tensor_change
from loratools.dtypes import OUTPUT_DTYPES, dtype_name
from loratools.errors import LoratoolsError, ModelError, ShapeError
from loratools.extraction import extract_adapter
from loratools.hf_model import HfModel, auto_config, context_length, load_model, load_tokenizer, model_kind, read_config
from loratools.matching import match_adapter
from loratools.merging import apply_ops, plan_merge
from loratools.options import BehaviourOptions, RankPolicy, Selection, SvdSettings
from loratools.plan import plan_extract
from loratools.progress import Progress
from loratools.spectrum import DEFAULT_RANKS, SpectrumReport, rank_spectrum
from loratools.verify import VerifyReport, verify_adapter

PURPOSE = "--behaviour"
RANDOM_LENGTH = 128  # tokens per random sequence (less when the context is shorter)


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
        source = f"{count} random token sequences of {length} tokens (seed {options.seed})"
        why = "" if tokenizer is not None else " (the model folders hold no tokenizer)"
        note = f"no --text{why}: {source} stand in for text; give --text FILE for figures on your own text"
        return TokenWindows(list(ids), source, [note])
    if tokenizer is None:
        raise ModelError(f"{options.texts[0]}: neither model folder holds a tokenizer (tokenizer.json …), so --text"
                         " cannot be tokenized; add the tokenizer files to TUNED, or leave out --text to measure on"
                         " seeded random tokens")
    result = TokenWindows([], f"{len(options.texts)} text file(s)")
    budget = options.max_tokens
    for path in options.texts:
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
            skipped = options.texts[options.texts.index(path) + 1:]
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
class BehaviourReport:
    """The tuned model, the base and every candidate adapter, compared on the same text.

    Attributes:
        kind: "causal" or "encoder"; architecture: the transformers class.
        source: what the models ran on (text files or random tokens); positions: compared positions.
        tuned, base: the two ends; adapted: one row per candidate adapter, in the order given.
        left_out: changed tensors a LoRA cannot hold (norms, biases) that the adapter does not carry.
        with_left_out: the last candidate plus the left-out tensors (None when there are none).
        buffer_bytes: the tuned model's kept outputs; peak_rss_bytes: the process's peak resident memory.
    """

    kind: str
    architecture: str
    source: str
    positions: int
    dtype: str
    device: str
    tuned: Behaviour
    base: Behaviour
    adapted: list[Behaviour] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    with_left_out: Behaviour | None = None
    buffer_bytes: int = 0
    peak_rss_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def share(self, row: Behaviour) -> float | None:
        """Share of the fine-tune recovered: 1 − gap(row) / gap(base); None when tuned and base agree."""
        return 1 - row.gap / self.base.gap if self.base.gap > 0 else None

    def left_out_share(self) -> float | None:
        """How much of the last candidate's gap the left-out tensors account for (None without them)."""
        if self.with_left_out is None or not self.adapted or self.adapted[-1].gap <= 0:
            return None
        return 1 - self.with_left_out.gap / self.adapted[-1].gap

    def row(self, row: Behaviour) -> dict:
        """One model's metrics with its share recovered."""
        return {**row.to_json(), "share_recovered": self.share(row)}

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "architecture": self.architecture, "source": self.source, "positions": self.positions,
            "dtype": self.dtype, "device": self.device,
            "tuned": self.tuned.to_json(), "base": self.row(self.base),
            "adapted": [self.row(row) for row in self.adapted],
            "left_out": self.left_out,
            "with_left_out": self.row(self.with_left_out) if self.with_left_out is not None else None,
            "left_out_share_of_gap": self.left_out_share(),
            "buffer_bytes": self.buffer_bytes, "peak_rss_bytes": self.peak_rss_bytes,
        }


@dataclass
class _Outputs:
    """A batch's outputs at the compared positions: rows (n, vocab) logits or (n, hidden) states; targets (n,)
    next tokens (causal); pooled (windows, hidden) mean-pooled states (encoder)."""

    rows: torch.Tensor
    targets: torch.Tensor | None
    pooled: torch.Tensor | None


@dataclass
class _Reference:
    """What is kept of the tuned model: (N, vocab) log-probs or (N, hidden) states, and (W, hidden) pooled."""

    values: torch.Tensor
    pooled: torch.Tensor | None


class _Runner:
    """Runs models over the windows batch by batch, counting progress across every pass."""

    def __init__(self, windows: TokenWindows, kind: str, options: BehaviourOptions, passes: int,
                 progress: Progress | None):
        self.windows, self.kind, self.options, self.progress = windows.windows, kind, options, progress
        self.batches = math.ceil(len(self.windows) / options.batch_size)
        self.total, self.done = passes * self.batches, 0

    def outputs(self, model: torch.nn.Module, label: str) -> Iterator[_Outputs]:
        """Each batch's outputs at the compared positions, in float32 on the run's device."""
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
            if self.kind == "causal":
                logits = out.logits.float()
                yield _Outputs(torch.cat([logits[i, :n - 1] for i, n in enumerate(lengths)]),
                               torch.cat([w[1:] for w in batch]).to(device), None)
            else:
                hidden = out.last_hidden_state.float()
                yield _Outputs(torch.cat([hidden[i, :n] for i, n in enumerate(lengths)]), None,
                               torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)]))
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total, label)

    def reference(self, model: torch.nn.Module) -> tuple[_Reference, Behaviour]:
        """Run the tuned model; keep its log-probs (or states) on the CPU; its own row (gap 0, perplexity)."""
        values: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        nll = 0.0
        for out in self.outputs(model, "tuned"):
            if out.targets is not None:
                log_probs = torch.log_softmax(out.rows, dim=-1)
                nll -= float(log_probs.gather(1, out.targets[:, None]).double().sum())
                values.append(log_probs.cpu())
            else:
                values.append(out.rows.cpu())
                pooled.append(out.pooled.cpu() if out.pooled is not None else out.rows.new_zeros(0))
        reference = _Reference(torch.cat(values), torch.cat(pooled) if pooled else None)
        count = len(reference.values)
        if self.kind == "causal":
            return reference, Behaviour("tuned", 0.0, 0.0, 1.0, math.exp(nll / count))
        return reference, Behaviour("tuned", 0.0, 0.0, pooled_cosine=1.0)

    def compare(self, model: torch.nn.Module, reference: _Reference, label: str) -> Behaviour:
        """Run `model` and compare it with the reference, position by position."""
        gaps: list[torch.Tensor] = []
        pooled_cos: list[torch.Tensor] = []
        offset, pooled_offset, agree, nll = 0, 0, 0, 0.0
        for out in self.outputs(model, label):
            ref = reference.values[offset:offset + len(out.rows)].to(out.rows.device)
            if ref.shape != out.rows.shape:
                raise ShapeError(f"{label}: outputs of width {out.rows.shape[-1]}, the tuned model's are"
                                 f" {ref.shape[-1]} wide (vocabulary or hidden size differs); compare models of"
                                 " one architecture")
            offset += len(out.rows)
            if out.targets is not None:
                log_probs = torch.log_softmax(out.rows, dim=-1)
                probs = ref.exp()
                gaps.append(torch.where(probs > 0, probs * (ref - log_probs), 0.0).sum(-1).double().cpu())
                agree += int((log_probs.argmax(-1) == ref.argmax(-1)).sum())
                nll -= float(log_probs.gather(1, out.targets[:, None]).double().sum())
            else:
                gaps.append((1 - torch.cosine_similarity(out.rows, ref, dim=-1)).double().cpu())
                assert reference.pooled is not None and out.pooled is not None
                ref_pooled = reference.pooled[pooled_offset:pooled_offset + len(out.pooled)].to(out.pooled.device)
                pooled_offset += len(out.pooled)
                pooled_cos.append(torch.cosine_similarity(out.pooled, ref_pooled, dim=-1).double().cpu())
        gap = torch.cat(gaps).clamp_min(0)
        mean, p95 = float(gap.mean()), float(torch.quantile(gap, 0.95))
        if self.kind == "causal":
            return Behaviour(label, mean, p95, agree / len(gap), math.exp(nll / len(gap)))
        return Behaviour(label, mean, p95, pooled_cosine=float(torch.cat(pooled_cos).mean()))


Candidate = tuple[str, Callable[[], "Adapter | str | os.PathLike"]]
"""A label and a builder of the adapter (an Adapter or a path), called when its turn comes: one candidate adapter
in memory at a time."""


def measure_behaviour(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    candidates: Sequence[Candidate],
    *,
    options: BehaviourOptions = BehaviourOptions(),
    left_out: Sequence[str] = (),
    progress: Progress | None = None,
) -> BehaviourReport:
    """Run the tuned model, then the base with each candidate adapter merged in place, on the same windows.

    Args:
        base, tuned: Hugging Face model folders of one architecture (config.json + weights).
        candidates: (label, builder of the Adapter) in order; each adapter is merged into the loaded base,
            run, and undone (the base tensors are read back from the checkpoint).
        left_out: changed tensors to add from the tuned checkpoint on top of the last candidate, for one more
            pass that tells how much of its gap they explain.
        progress: called as ``progress(done, total, label)`` after every forward batch of every pass.
    Returns:
        A BehaviourReport: the causal rows hold KL(tuned ‖ model) per position (mean, p95) over (N, vocab)
        log-probs, top-1 agreement and perplexity; the encoder rows cosines of (N, hidden) states and of the
        (windows, hidden) mean-pooled embeddings.
    Raises:
        CheckpointError (no config.json), ModelError (no tokenizer for --text, an architecture that is
        neither a causal LM nor a text encoder, base and tuned of different architectures), ShapeError (an
        adapter made for another model).
    Example:
        >>> report = measure_behaviour("llama-base", "llama-tuned", [("adapter", lambda: load_adapter("lora"))])
        >>> report.share(report.adapted[0])
    """
    kind = check_pair(base, tuned)
    tuned_model = load_model(tuned, dtype=OUTPUT_DTYPES[options.dtype], device=options.device, purpose=PURPOSE)
    vocab = tuned_model.vocab_size
    tokenizer = load_tokenizer(tuned)
    if tokenizer is None:
        tokenizer = load_tokenizer(base)
    windows = token_windows(options, tokenizer, vocab_size=vocab, context=context_length(tuned_model.config),
                            minimum=2 if kind == "causal" else 1)
    runner = _Runner(windows, kind, options, 2 + len(candidates) + int(bool(left_out and candidates)), progress)
    reference, tuned_row = runner.reference(tuned_model.model)
    del tuned_model
    gc.collect()
    model = load_model(base, dtype=OUTPUT_DTYPES[options.dtype], device=options.device, purpose=PURPOSE)
    report = BehaviourReport(
        kind, model.architecture, windows.source, len(reference.values), dtype_name(OUTPUT_DTYPES[options.dtype]),
        options.device, tuned_row, runner.compare(model.model, reference, "base"), left_out=list(left_out),
        buffer_bytes=sum(t.numel() * t.element_size() for t in (reference.values, reference.pooled) if t is not None),
        notes=list(windows.notes),
    )
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        for number, (label, build) in enumerate(candidates, 1):
            changed = _merge_in_place(model, base_index, build())
            report.adapted.append(runner.compare(model.model, reference, label))
            if number == len(candidates) and left_out:
                changed += _copy_in_place(model, tuned_index, left_out)
                report.with_left_out = runner.compare(model.model, reference, f"{label} + {len(left_out)} left out")
            _copy_in_place(model, base_index, changed)  # undo: the base tensors as loaded, exactly
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def check_pair(base: str | os.PathLike, tuned: str | os.PathLike) -> str:
    """The kind both models share ("causal" or "encoder"), from config.json; ModelError when they differ or are
    neither (checked before any weight is read)."""
    described = []
    for folder in (base, tuned):
        config_dict = read_config(folder, purpose=PURPOSE)
        architectures = list(config_dict.get("architectures") or [])
        kind = model_kind(auto_config(folder, config_dict, purpose=PURPOSE), architectures, purpose=PURPOSE)
        described.append((kind, config_dict.get("model_type"), architectures))
    if described[0] != described[1]:
        raise ModelError(f"{tuned}: {described[1][1]} {described[1][2]}, but {base} is {described[0][1]}"
                         f" {described[0][2]}; compare a fine-tune with its own base model")
    return described[0][0]


def _parameter(model: HfModel, name: str, shape: tuple[int, ...]) -> torch.nn.Parameter:
    param = model.parameter(name)
    if param is None:
        raise ModelError(f"{name}: {model.architecture} has no such parameter; the checkpoint tensor is not part of"
                         " the model transformers builds (leave it out with --exclude)")
    if tuple(param.shape) != shape:
        raise ShapeError(f"{name}: {shape} in the checkpoint, {tuple(param.shape)} in {model.architecture}")
    return param


def _merge_in_place(model: HfModel, index: TensorIndex, adapter: Adapter | str | os.PathLike) -> list[str]:
    """W ← W + scale·B·A (and full replacements) for every tensor the adapter changes; the names changed."""
    ops = plan_merge(index, [adapter])
    with torch.no_grad():
        for name, contributions in ops.items():
            merged = apply_ops(index.get(name), contributions)
            _parameter(model, name, tuple(merged.shape)).copy_(merged)
    return list(ops)


def _copy_in_place(model: HfModel, index: TensorIndex, names: Sequence[str]) -> list[str]:
    """Copy the named tensors of `index` into the model's parameters (cast to their dtype and device)."""
    with torch.no_grad():
        for name in names:
            tensor = index.get(name)
            _parameter(model, name, tuple(tensor.shape)).copy_(tensor)
    return list(names)


@dataclass
class VerifyBehaviourReport:
    """`verify --behaviour`: the per-layer weight errors and the behaviour of base + adapter."""

    weights: VerifyReport
    behaviour: BehaviourReport

    @property
    def notes(self) -> list[str]:
        return self.weights.notes + self.behaviour.notes

    def to_json(self) -> dict:
        """``{"layers": [...], "summary": {...}, "behaviour": {...}}``."""
        return {**self.weights.to_json(), "behaviour": self.behaviour.to_json()}


def verify_behaviour(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    selection: Selection = Selection(),
    svd: SvdSettings = SvdSettings(),
    options: BehaviourOptions = BehaviourOptions(),
    progress: Progress | None = None,
) -> VerifyBehaviourReport:
    """`verify_adapter`, then the tuned model, the base and base + adapter run on the same text.

    Args:
        base, tuned: Hugging Face model folders; adapter: a PEFT folder or file, or a kohya file.
        selection, svd: as for `verify_adapter` (selection also limits the left-out tensors reported).
        options: the text, token budget, batch size, dtype and device of the forward passes.
        progress: called as ``progress(done, total, name)`` for the weight check, then for every forward batch.
    Returns:
        A VerifyBehaviourReport; ``behaviour.adapted[0]`` is base + adapter, ``behaviour.with_left_out`` also
        carries the changed norms / biases the adapter leaves out.
    Example:
        >>> report = verify_behaviour("fixtures/llama-base", "fixtures/llama-tuned", "fixtures/llama-lora-peft")
        >>> report.behaviour.share(report.behaviour.adapted[0])
    """
    check_pair(base, tuned)
    loaded = load_adapter(adapter)
    with open_checkpoint(base) as base_index:
        plan_merge(base_index, [adapter])  # an adapter for another model fails here, before any forward pass
    weights = verify_adapter(base, tuned, loaded, selection=selection, svd=svd, progress=progress)
    left_out = _left_out(base, tuned, selection, loaded)
    behaviour = measure_behaviour(base, tuned, [("adapter", lambda: adapter)], options=options, left_out=left_out,
                                  progress=progress)
    return VerifyBehaviourReport(weights, behaviour)


def _left_out(base: str | os.PathLike, tuned: str | os.PathLike, selection: Selection,
              adapter: Adapter | None) -> list[str]:
    """Changed tensors a LoRA cannot hold (norms, biases) that neither --save-full nor the adapter carries."""
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        plan = plan_extract(base_index, tuned_index, selection=replace(selection, skip_mismatched=True))
        covered = set(match_adapter(adapter, base_index).targets) if adapter is not None else set()
        return [whole.tensor for whole in plan.whole if not whole.save and whole.tensor not in covered
                and tensor_change(base_index, tuned_index, whole.tensor) is not None]


@dataclass
class SpectrumBehaviourReport:
    """`spectrum --behaviour`: weight error and behaviour per swept rank, and the smallest rank reaching `recover`.

    Attributes:
        spectrum: the spectra and the rank sweep (Eckart–Young errors).
        behaviour: ``adapted[i]`` is base + the adapter ``extract --rank ranks[i]`` writes.
        extracted_errors: rank -> the extracted adapter's overall relative weight error.
        recover: the share of the fine-tune the recommended rank must recover.
    """

    spectrum: SpectrumReport
    behaviour: BehaviourReport
    extracted_errors: dict[int, float]
    recover: float

    def rows(self) -> list[dict]:
        """One row per swept rank: weight errors, adapter size and behaviour side by side."""
        rows = []
        for sweep, row in zip(self.spectrum.sweep(), self.behaviour.adapted, strict=True):
            rank = sweep["rank"]
            behaviour = {k: v for k, v in self.behaviour.row(row).items() if k != "label"}
            rows.append({"rank": rank, "rel_error": self.extracted_errors[rank], "optimal_rel_error": sweep["rel_error"],
                         "params": sweep["params"], "bytes": sweep["bytes"], **behaviour})
        return rows

    def recommended_rank(self) -> int | None:
        """The smallest swept rank whose share recovered reaches `recover` (None when none does)."""
        return next((row["rank"] for row in self.rows() if (row["share_recovered"] or 0) >= self.recover), None)

    @property
    def notes(self) -> list[str]:
        notes = self.spectrum.notes + self.behaviour.notes
        if self.recommended_rank() is None and self.behaviour.adapted:
            best = max(self.rows(), key=lambda row: row["share_recovered"] or 0)
            notes.append(f"no swept rank recovers {self.recover:.0%} of the fine-tune (best: rank {best['rank']},"
                         f" {best['share_recovered'] or 0:.1%}); sweep larger --ranks"
                         + (", or keep the changed norms / biases with --save-full" if self.behaviour.left_out else ""))
        return notes

    def to_json(self) -> dict:
        """The spectrum's JSON plus ``"behaviour"``, ``"ranks"`` (side by side) and ``"recommended_rank"``."""
        return {**self.spectrum.to_json(), "behaviour": self.behaviour.to_json(), "ranks": self.rows(),
                "recover": self.recover, "recommended_rank": self.recommended_rank()}


def spectrum_behaviour(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    recover: float = 0.95,
    num_singular_values: int = 128,
    max_error: float | None = None,
    energy: float | None = None,
    selection: Selection = Selection(),
    svd: SvdSettings = SvdSettings(),
    options: BehaviourOptions = BehaviourOptions(),
    progress: Progress | None = None,
) -> SpectrumBehaviourReport:
    """`rank_spectrum`, then the behaviour of base + the adapter ``extract --rank r`` writes, for every rank.

    Args:
        ranks: the ranks to sweep; recover: the share of the fine-tune (0, 1] the recommendation must reach.
        num_singular_values, max_error, energy, selection, svd: as for `rank_spectrum`; selection and svd also as for `extract`
            (include / exclude, --save-full, --embeddings, seed …), so each rank's adapter is the one extract writes.
        options: the text and the forward passes (`BehaviourOptions`).
        progress: called as ``progress(done, total, name)`` for the spectra, then for every forward batch.
    Returns:
        A SpectrumBehaviourReport (`rows()`: weight error and behaviour per rank; `recommended_rank()`).
    Example:
        >>> report = spectrum_behaviour("fixtures/llama-base", "fixtures/llama-tuned", ranks=[2, 4, 8])
        >>> report.recommended_rank()
    """
    if not 0 < recover <= 1:
        raise LoratoolsError(f"--recover {recover} is out of range; it must be a share in (0, 1], e.g. 0.95")
    check_pair(base, tuned)
    spectrum = rank_spectrum(base, tuned, ranks=ranks, num_singular_values=num_singular_values, max_error=max_error,
                             energy=energy, selection=selection, svd=svd, progress=progress)
    errors: dict[int, float] = {}

    def extracted(rank: int) -> Callable[[], Adapter]:
        def build() -> Adapter:
            result = extract_adapter(base, tuned, policy=RankPolicy("rank", rank), selection=selection, svd=svd)
            errors[rank] = result.summary.rel_error
            assert result.adapter is not None
            return result.adapter.to(result.written_dtype)
        return build

    candidates = [(f"rank {rank}", extracted(rank)) for rank in spectrum.ranks]
    behaviour = measure_behaviour(base, tuned, candidates, options=options,
                                  left_out=_left_out(base, tuned, selection, None), progress=progress)
    return SpectrumBehaviourReport(spectrum, behaviour, errors, recover)
