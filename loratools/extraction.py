"""Extract a LoRA adapter from a base and a fine-tuned checkpoint: ΔW = tuned − base, truncated SVD per layer.

The flow: `plan_extract` pairs tensors from headers; `layer_deltas` streams one layer's ΔW at a time (only
that pair is in memory); `low_rank` factors it by randomized SVD (or exact SVD) at the rank the policy asks
for; the factors become an `Adapter`, written once at the end by `save_adapter`. Nothing here prints:
progress goes through a ``progress(done, total, name)`` callback, results come back as an `ExtractResult`.

Decisions:
- The factors split the singular values evenly (B = U·√S, A = √S·Vh), which keeps both in range for fp16/bf16.
- One ``lora_alpha`` for the whole adapter, equal to the most common rank (scale 1.0 for most modules); every
  other module's own scale is folded into its B. PEFT still gets ``rank_pattern`` for mixed ranks, but no
  ``alpha_pattern``, which llama.cpp's converter ignores.
- Each layer's sketch is seeded from ``--seed`` and the module name (`SvdSettings.for_layer`), so a layer's
  result does not depend on which other layers were selected; the Gaussian test matrices are drawn on the
  CPU, so cpu and cuda agree.
- Whole tensors (norms, biases, ...) are compared before any LoRA is computed, so conflicts (a bias saved whole
  on a module that also gets a LoRA, which PEFT cannot load) fail fast. A module saved whole carries all its
  parameters (PEFT's ``modules_to_save`` loading needs the unchanged bias next to a changed weight).
- A layer whose policy rank is 0 (e.g. ``--threshold`` above σ₁) is reported and left out of the adapter.
- Without ``format``, `formats.default_format` picks it from the base checkpoint (kohya for Stable Diffusion
  inputs, PEFT otherwise) and the summary says why. kohya and diffusers keys use each module's diffusers
  pipeline name (`formats.pipeline_names`: original single-file U-Nets renamed to the diffusers layout), which
  every Stable Diffusion loader maps; layers without one are named in a note.
- kohya and diffusers files have no embedding or Conv1D layout. Such layers are compared whole instead: left
  out when unchanged, listed in the warnings and the report when changed (like a changed norm). Only a layer
  the user named with an ``--include`` pattern is an error. The decision follows the data, not the plan: an
  LLM's unchanged ``embed_tokens`` does not stop a kohya extraction.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from loratools.adapter import Adapter, LoraModule
from loratools.adapter_files import check_format, save_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.deltas import LayerDelta, TensorChange, layer_deltas, tensor_change_of
from loratools.dtypes import OUTPUT_DTYPES, DType, check_dtype_format, dtype_name, resolve_dtype
from loratools.errors import LoratoolsError
from loratools.format_fit import check_pipeline_names, fit_plan_to_format, unmapped_notes
from loratools.formats import default_format, pipeline_names
from loratools.hub import resolve_checkpoint
from loratools.linalg import pooled_rel_error
from loratools.names import natural_key, short_list
from loratools.options import RankPolicy, Selection, SvdSettings
from loratools.plan import LayerPair, Pairing, Plan, WholeTensor, plan_extract
from loratools.progress import Progress
from loratools.rsvd import compute_dtype, describe_svd, low_rank, svd_device
from loratools.writer import check_output, provenance, write_json


@dataclass
class ExtractedLayer:
    """What extraction did to one layer.

    Attributes:
        name: module name; tensor: weight name; shape: base layout; kind: layer kind.
        rank: rank kept; clamped: a fixed rank above min(rows, cols) was lowered to it.
        rel_error: ‖ΔW − B·A‖_F / ‖ΔW‖_F (see `LowRank.rel_error`); energy: fraction of ‖ΔW‖²_F kept (1 − rel_error²).
        sigma_1, sigma_r: largest and smallest kept singular value (0 when rank is 0).
        delta_norm: ‖ΔW‖_F.
        power_iters: power iterations the randomized SVD ran (0 for an exact SVD).
        optimal_rel_error: Eckart–Young optimum at this rank (only with an exact SVD).
        seconds: wall time for this layer (load, ΔW, SVD, error).
    """

    name: str
    tensor: str
    shape: tuple[int, ...]
    kind: str
    rank: int
    rel_error: float
    energy: float
    sigma_1: float
    sigma_r: float
    delta_norm: float
    clamped: bool
    power_iters: int
    seconds: float
    optimal_rel_error: float | None = None

    def to_json(self) -> dict:
        data = dict(asdict(self), shape=list(self.shape))
        if self.optimal_rel_error is None:
            del data["optimal_rel_error"]
        return data


@dataclass(frozen=True)
class ChangedTensor(TensorChange):
    """A whole tensor (not a LoRA) that differs between the checkpoints, and whether it was saved whole."""

    saved: bool = False
    why: str = ""
    left_out: bool = False  # a layer the output format cannot hold (`--format peft` keeps it)


@dataclass
class ExtractSummary:
    """Totals over the run; `notes` are the warnings a user should read (the CLI prints them on stderr)."""

    base: str
    tuned: str
    output: str
    format: str
    dtype: str
    rank_policy: str
    algorithm: str
    device: str
    layers: int = 0
    unchanged_tensors: int = 0
    rel_error: float = 0.0
    energy: float = 1.0
    adapter_bytes: int = 0
    full_delta_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    kind_source: str = ""
    format_reason: str = ""
    task_type: str | None = None
    pairing: Pairing = field(default_factory=Pairing)
    excluded: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "pairing"}
        return {**data, **self.pairing.to_json()}


@dataclass
class ExtractResult:
    """The outcome of `extract`: the plan, per-layer reports, changed whole tensors and a summary.

    `adapter` is the extracted Adapter in float32 (None for a dry run); `output` the written path.
    """

    plan: Plan
    summary: ExtractSummary
    layers: list[ExtractedLayer] = field(default_factory=list)
    changed: list[ChangedTensor] = field(default_factory=list)
    unchanged: int = 0
    adapter: Adapter | None = None
    dry_run: bool = False

    @property
    def notes(self) -> list[str]:
        return self.summary.notes

    def to_json(self) -> dict:
        """``{"layers": [...], "changed_tensors": [...], "summary": {...}}``, or ``{"plan": ...}`` for a dry run."""
        if self.dry_run:
            return {"plan": self.plan.to_json(), "summary": self.summary.to_json()}
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "changed_tensors": [c.to_json() for c in self.changed],
            "summary": self.summary.to_json(),
        }


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that shapes an extracted adapter apart from the files; one value for `extract` and fleet runs.

    Attributes:
        policy: rank policy for every layer (``policy.conv_rank``: a fixed rank for conv2d layers).
        selection: which tensors; embeddings as LoRA, whole or skipped; --save-full patterns (`Selection`).
        svd: how each ΔW is factored (randomized or exact, seed, precision, device; `SvdSettings`).
        format: ``peft``, ``kohya`` or ``diffusers``; None: from the base checkpoint (`default_format`).
        dtype: the written factors' dtype (``fp32``, ``fp16``, ``bf16`` or a torch dtype); None: the tuned weights'.
    """

    policy: RankPolicy = RankPolicy()
    selection: Selection = Selection()
    svd: SvdSettings = SvdSettings()
    format: str | None = None
    dtype: DType | None = None

    def __post_init__(self) -> None:
        if self.format is not None:
            check_format(self.format)
            check_dtype_format(self.dtype, self.format)
        resolve_dtype(self.dtype, quantized=True)

    def provenance_parameters(self) -> dict[str, str]:
        """The settings an adapter records in its provenance (`writer.provenance`): rank policy and SVD."""
        return {"rank_policy": self.policy.describe(), "algorithm": describe_svd(self.svd)}


@dataclass
class LayerOutcome:
    """One factored layer: its report row and factors B (rows, r), A (r, cols) in float32 on the CPU.

    `layer` is None when ΔW is zero; `factors` is None when the layer is unchanged or its rank is 0.
    """

    tensor: str
    layer: ExtractedLayer | None
    factors: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class WholeOutcome:
    """One whole tensor compared: its change (None when equal) and, when it is to be saved, the tuned tensor."""

    tensor: str
    change: TensorChange | None
    saved: torch.Tensor | None


Outcome = LayerOutcome | WholeOutcome


def factor_layer(pair: LayerPair, delta: LayerDelta, settings: ExtractSettings, *,
                 since: float | None = None) -> LayerOutcome:
    """Factor one layer's ΔW (rows, cols) at the rank its policy picks; the factors depend on nothing else.

    `since`: when this layer's work began (reading it), for its ``seconds``; default now.
    """
    tick = time.perf_counter() if since is None else since
    if delta.energy == 0:
        return LayerOutcome(pair.tensor, None, None)
    svd = settings.svd.for_layer(pair.module)
    lr = low_rank(delta.matrix, settings.policy.for_kind(pair.kind), settings=svd, total_energy=delta.energy)
    factors = None
    if lr.rank:
        left, right = lr.factors()
        factors = (left.to("cpu", torch.float32), right.to("cpu", torch.float32))
    layer = ExtractedLayer(
        pair.module, pair.tensor, pair.shape, pair.kind, lr.rank, lr.rel_error, lr.energy,
        float(lr.S[0]), float(lr.S[lr.rank - 1]) if lr.rank else 0.0, lr.total_energy**0.5, lr.clamped,
        lr.power_iters, time.perf_counter() - tick, lr.optimal_rel_error,
    )
    return LayerOutcome(pair.tensor, layer, factors)


def compare_whole(whole: WholeTensor, base_tensor: torch.Tensor, tuned_tensor: torch.Tensor) -> WholeOutcome:
    """Compare one whole tensor of both checkpoints (same shape); keep the tuned one when it changed and is saved."""
    change = tensor_change_of(whole.tensor, base_tensor, tuned_tensor)
    return WholeOutcome(whole.tensor, change, tuned_tensor if change is not None and whole.save else None)


@dataclass
class PairExtraction:
    """One base / tuned pair on its way to an adapter: `start_pair`, then an outcome per planned tensor
    (`record`, in any order), then `finish_pair`. `extract` and fleet runs (`loratools.fleet`) share it, so a
    fleet writes the bytes separate runs write."""

    base: str | os.PathLike
    tuned: str | os.PathLike
    out: str | os.PathLike
    settings: ExtractSettings
    result: ExtractResult
    names: dict[str, str] | None
    out_dtype: torch.dtype
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def plan(self) -> Plan:
        return self.result.plan

    def items(self) -> list[LayerPair | WholeTensor]:
        """The planned tensors: whole tensors first, then LoRA layers (each list in name order)."""
        return [*self.plan.whole, *self.plan.pairs]

    def record(self, outcome: Outcome) -> None:
        """Keep one tensor's outcome; a changed tensor to be saved whole on a LoRA module is refused here."""
        if isinstance(outcome, WholeOutcome) and outcome.saved is not None:
            whole = next(w for w in self.plan.whole if w.tensor == outcome.tensor)
            _refuse_module_conflict(whole, {p.module for p in self.plan.pairs})
        self.outcomes[outcome.tensor] = outcome


def start_pair(
    base_index: TensorIndex,
    tuned_index: TensorIndex,
    *,
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    settings: ExtractSettings,
    dry_run: bool = False,
) -> PairExtraction:
    """Plan one pair from headers (`plan_extract`), fitted to the output format; no tensor data is read.

    Args:
        base_index, tuned_index: the open checkpoints; base, tuned, out: the paths as the user gave them
            (recorded in the adapter and the report).
    """
    fmt = settings.format
    config = base_index.config or tuned_index.config
    format_reason = f"{fmt}: given with --format"
    if fmt is None:
        fmt, format_reason = default_format(list(base_index.tensors), config)
    plan = plan_extract(base_index, tuned_index, selection=settings.selection)
    fit_plan_to_format(plan, fmt, settings.selection, config, base)
    names = pipeline_names(list(base_index.tensors), config) if fmt != "peft" else None
    check_pipeline_names(plan, names, fmt)
    out_dtype = resolve_dtype(settings.dtype, quantized=True) or _tuned_dtype(plan, tuned_index)
    summary = ExtractSummary(
        base=str(base), tuned=str(tuned), output=str(out), format=fmt, dtype=dtype_name(out_dtype),
        rank_policy=settings.policy.describe(), algorithm=describe_svd(settings.svd), device=str(settings.svd.device),
        kind_source=plan.kind_source, format_reason=format_reason, task_type=plan.task_type, pairing=plan.pairing,
        excluded=len(plan.excluded),
    )
    result = ExtractResult(plan, summary, dry_run=dry_run)
    return PairExtraction(base, tuned, out, settings, result, names, out_dtype)


def assemble_pair(job: PairExtraction, tuned_index: TensorIndex) -> ExtractResult:
    """Build the adapter from every recorded outcome (in plan order) into ``job.result.adapter`` and check it;
    nothing is written.

    Raises:
        LoratoolsError when nothing changed.
    """
    result, plan = job.result, job.plan
    factors: dict[LayerPair, tuple[torch.Tensor, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for whole in plan.whole:
        seen = job.outcomes[whole.tensor]
        assert isinstance(seen, WholeOutcome)
        if seen.change is None:
            result.unchanged += 1
            continue
        result.changed.append(ChangedTensor(**asdict(seen.change), saved=whole.save, why=whole.why,
                                          left_out=whole.left_out))
        if seen.saved is not None:
            full[whole.tensor] = seen.saved
    for pair in plan.pairs:
        done = job.outcomes[pair.tensor]
        assert isinstance(done, LayerOutcome)
        if done.layer is None:
            result.unchanged += 1
            continue
        result.layers.append(done.layer)
        if done.factors is not None:
            factors[pair] = done.factors
    adapter = result.adapter = _build_adapter(factors, _with_module_siblings(full, tuned_index), plan, job.base)
    _finish_summary(result, adapter, job.out_dtype)
    fmt = result.summary.format
    result.summary.notes.extend(unmapped_notes(adapter, job.names, fmt))
    if not adapter.modules and not adapter.full:
        raise LoratoolsError(
            f"{job.tuned}: no changed layers to extract against {job.base} ({result.unchanged} unchanged tensors,"
            f" {len(result.changed)} changed tensors not saved); check the paths, or save changed tensors with"
            " --save-full PATTERN"
        )
    return result


def finish_pair(
    job: PairExtraction, tuned_index: TensorIndex, *, force: bool = False, report: str | os.PathLike | None = None,
    started: float | None = None,
) -> ExtractResult:
    """`assemble_pair`, then write the adapter and the report.

    Raises:
        LoratoolsError when nothing changed; OutputError when writing fails.
    """
    result = assemble_pair(job, tuned_index)
    adapter, fmt = result.adapter, result.summary.format
    assert adapter is not None
    inputs = [job.base, job.tuned]
    save_adapter(adapter, job.out, format=fmt, inputs=inputs, force=force, dtype=job.settings.dtype or job.out_dtype,
                 metadata=provenance("extract", inputs, job.settings.provenance_parameters()), names=job.names, base=job.base)
    if started is not None:
        result.summary.seconds = time.perf_counter() - started
    result.summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if report is not None:
        write_json(report, result.to_json(), inputs=[*inputs, job.out], force=force)
    return result


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    policy: RankPolicy = RankPolicy(),
    selection: Selection = Selection(),
    svd: SvdSettings = SvdSettings(),
    format: str | None = None,
    dtype: DType | None = None,
    dry_run: bool = False,
    force: bool = False,
    report: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter approximating ``tuned − base`` and write it to `out`.

    Args:
        base, tuned: checkpoints `open_checkpoint` reads (folders, shards, single files), or Hugging Face hub
            ids ``org/name[@revision]`` found in the local cache (`hub.resolve_checkpoint`).
        out: output path: a PEFT folder, a ``.safetensors`` file (bare PEFT or kohya).
        policy, selection, svd, format, dtype: see `ExtractSettings`.
        dry_run: plan only (reads headers, no tensor data), write nothing.
        force: replace an existing `out` (and `report`).
        report: also write ``result.to_json()`` to this path (the plan's report with `dry_run`); checked
            before any work, written atomically at the end.
        progress: called as ``progress(done, total, current_name)``.
    Returns:
        An ExtractResult.
    Raises:
        LoratoolsError subclasses, each naming the file, the tensor and the fix.

    Example:
        >>> result = extract("llama-base", "llama-tuned", "adapter", policy=RankPolicy("energy", 0.9))
        >>> result.summary.rel_error, [layer.rank for layer in result.layers][:3]
    """
    started = time.perf_counter()
    settings = ExtractSettings(policy, selection, svd, format, dtype)
    device = svd_device(svd)
    base_path, tuned_path = resolve_checkpoint(base), resolve_checkpoint(tuned)
    check_output(out, [base_path, tuned_path], force)
    if report is not None:
        check_output(report, [base_path, tuned_path, out], force)
    with open_checkpoint(base_path) as base_index, open_checkpoint(tuned_path) as tuned_index:
        job = start_pair(base_index, tuned_index, base=base, tuned=tuned, out=out, settings=settings,
                         dry_run=dry_run)
        if dry_run:
            if report is not None:
                write_json(report, job.result.to_json(), inputs=[base_path, tuned_path, out], force=force)
            return job.result
        _run_pair(job, base_index, tuned_index, device=device, progress=progress)
        return finish_pair(job, tuned_index, force=force, report=report, started=started)


def _run_pair(job: PairExtraction, base_index: TensorIndex, tuned_index: TensorIndex, *, device: torch.device,
              progress: Progress | None) -> None:
    """Compare every whole tensor and factor every layer of the plan, recording each outcome in `job`."""
    plan, settings = job.plan, job.settings
    total = len(plan.whole) + len(plan.pairs)
    for number, whole in enumerate(plan.whole):
        if progress:
            progress(number, total, whole.tensor)
        job.record(compare_whole(whole, base_index.get(whole.tensor), tuned_index.get(whole.tensor)))
    # one ΔW in memory at a time, each formed in the same workspace while the next is read ahead
    deltas = layer_deltas(base_index, tuned_index, plan.pairs, dtype=compute_dtype(settings.svd), device=device,
                          reuse=True)
    for number, pair in enumerate(plan.pairs):
        if progress:
            progress(len(plan.whole) + number, total, pair.module)
        tick = time.perf_counter()
        job.record(factor_layer(pair, next(deltas), settings, since=tick))
    if progress:
        progress(total, total, "")


def extract_adapter(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    policy: RankPolicy = RankPolicy(),
    selection: Selection = Selection(),
    svd: SvdSettings = SvdSettings(),
    format: str | None = None,
    dtype: DType | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """The adapter `extract` would write, in memory, writing nothing: arguments as for `extract`.

    Returns:
        An ExtractResult whose ``adapter`` holds the factors in the dtype `extract` writes them in.

    Example:
        >>> result = extract_adapter("fixtures/llama-base", "fixtures/llama-tuned", policy=RankPolicy("rank", 8))
        >>> result.adapter.ranks[:2]
        [8, 8]
    """
    started = time.perf_counter()
    settings = ExtractSettings(policy, selection, svd, format, dtype)
    device = svd_device(svd)
    with open_checkpoint(resolve_checkpoint(base)) as base_index, \
            open_checkpoint(resolve_checkpoint(tuned)) as tuned_index:
        job = start_pair(base_index, tuned_index, base=base, tuned=tuned, out="", settings=settings)
        _run_pair(job, base_index, tuned_index, device=device, progress=progress)
        result = assemble_pair(job, tuned_index)
    assert result.adapter is not None
    result.adapter = result.adapter.to(job.out_dtype)
    result.summary.seconds = time.perf_counter() - started
    return result


def _tuned_dtype(plan: Plan, tuned: TensorIndex) -> torch.dtype:
    counts = Counter(tuned.tensors[p.tensor].dtype for p in plan.pairs)
    floating = [d for d, _ in counts.most_common() if d in OUTPUT_DTYPES.values()]
    return floating[0] if floating else torch.float32


def _refuse_module_conflict(whole: WholeTensor, lora_modules: set[str]) -> None:
    if whole.module in lora_modules:
        raise LoratoolsError(
            f"{whole.tensor} changed and is to be saved whole, but {whole.module} also gets a LoRA, and PEFT cannot"
            f" load a module that is both a LoRA target and in modules_to_save; add {whole.module}.weight to"
            f" --save-full to save the whole module, or drop {whole.tensor} from --save-full"
        )


def _with_module_siblings(full: dict[str, torch.Tensor], tuned: TensorIndex) -> dict[str, torch.Tensor]:
    """The tensors to save whole, with every other parameter of their modules (unchanged ones too: PEFT's
    modules_to_save loads the whole module), in name order."""
    saved_modules = {name.rpartition(".")[0] for name in full}
    for name in tuned.tensors:
        if name.rpartition(".")[0] in saved_modules and name not in full:
            full[name] = tuned.get(name)
    return dict(sorted(full.items(), key=lambda item: natural_key(item[0])))


def _build_adapter(
    factors: dict[LayerPair, tuple[torch.Tensor, torch.Tensor]], full: dict[str, torch.Tensor], plan: Plan,
    base: str | os.PathLike,
) -> Adapter:
    ranks = Counter(right.shape[0] for _, right in factors.values())
    alpha = float(min(ranks, key=lambda r: (-ranks[r], r))) if ranks else 1.0
    modules = {
        pair.module: LoraModule.from_lora_matrix_factors(pair.module, left, right, pair.kind, pair.shape, alpha)
        for pair, (left, right) in factors.items()
    }
    return Adapter(modules, base_model=str(base), config={"task_type": plan.task_type}, full=full)


def _finish_summary(result: ExtractResult, adapter: Adapter, out_dtype: torch.dtype) -> None:
    summary, plan = result.summary, result.plan
    residual = pooled_rel_error(((layer.delta_norm * layer.rel_error) ** 2, layer.delta_norm**2)
                                for layer in result.layers)
    summary.layers = len(adapter.modules)
    summary.unchanged_tensors = result.unchanged
    summary.rel_error = residual
    summary.energy = 1 - residual**2
    summary.adapter_bytes = adapter.num_parameters() * out_dtype.itemsize
    summary.full_delta_bytes = sum(torch.Size(layer.shape).numel() for layer in result.layers) * out_dtype.itemsize
    notes = summary.notes
    clamped = [layer.name for layer in result.layers if layer.clamped]
    if clamped:
        notes.append(f"{len(clamped)} layer(s) smaller than the requested rank were clamped to min(out, in):"
                     f" {short_list(clamped)}")
    zero = [layer.name for layer in result.layers if layer.rank == 0]
    if zero:
        notes.append(f"{len(zero)} changed layer(s) got rank 0 under {summary.rank_policy} and are not in the"
                     f" adapter: {short_list(zero)}")
    left_out = [c.name for c in result.changed if not c.saved and c.left_out]
    if left_out:
        notes.append(f"{len(left_out)} changed tensor(s) the {summary.format} format cannot hold were left out: "
                     f"{short_list(left_out)}; use --format peft to keep them")
    dropped = [c.name for c in result.changed if not c.saved and not c.left_out]
    if dropped:
        notes.append(f"{len(dropped)} changed tensor(s) cannot be a LoRA and were not saved: {short_list(dropped)};"
                     " save them whole with --save-full PATTERN (PEFT modules_to_save)")
    notes += plan.pairing.notes()
