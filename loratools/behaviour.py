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
weights). Peak ≈ one model + the buffer + one batch of outputs (batch × window × vocab) + one tensor.

Decisions:
- Text is tokenized with the tuned folder's tokenizer (else the base's); without ``texts``, seeded random token
  sequences stand in (said in the notes). Text longer than the model's context is split into windows of the
  context length; past ``max_tokens`` it is cut (both said in the notes).
- Changed tensors a LoRA cannot hold (norms, biases) and the adapter leaves out: one more pass adds them
  (from the tuned checkpoint) to the adapter, and the report says how much of the remaining gap they explain
  (for `spectrum`, at the largest swept rank).
- `spectrum` measures, per rank, the adapter ``extract --rank r`` would write with the same selection and SVD
  settings (`extraction.extract_adapter`), cast to the dtype it would write.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from loratools.adapter import Adapter
from loratools.adapter_files import load_adapter
from loratools.behaviour_metrics import Behaviour, ModelRunner, token_windows
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
    runner = ModelRunner(windows, kind, options, 2 + len(candidates) + int(bool(left_out and candidates)), progress)
    reference, tuned_row = runner.reference(tuned_model.model)
    del tuned_model
    gc.collect()
    model = load_model(base, dtype=OUTPUT_DTYPES[options.dtype], device=options.device, purpose=PURPOSE)
    report = BehaviourReport(
        kind, model.architecture, windows.source, len(reference.values), dtype_name(OUTPUT_DTYPES[options.dtype]),
        options.device, tuned_row, runner.compare(model.model, reference, "base"), left_out=list(left_out),
        buffer_bytes=reference.nbytes, notes=list(windows.notes),
    )
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        for number, (label, build) in enumerate(candidates, 1):
            if progress is not None:
                progress(runner.done, runner.total, f"{label}: preparing the adapter")
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
        num_singular_values, max_error, energy, selection, svd: as for `rank_spectrum`; selection and svd are
            also those of `extract` (include / exclude, --save-full, --embeddings, seed …), so each rank's adapter
            is the one ``extract --rank r`` writes.
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
            return result.adapter
        return build

    candidates = [(f"rank {rank}", extracted(rank)) for rank in spectrum.ranks]
    behaviour = measure_behaviour(base, tuned, candidates, options=options,
                                  left_out=_left_out(base, tuned, selection, None), progress=progress)
    return SpectrumBehaviourReport(spectrum, behaviour, errors, recover)
