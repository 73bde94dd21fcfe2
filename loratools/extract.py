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
- Each layer's sketch is seeded from ``--seed`` and the module name, so a layer's result does not depend on
  which other layers were selected; the Gaussian test matrices are drawn on the CPU, so cpu and cuda agree.
- Whole tensors (norms, biases, ...) are compared before any LoRA is computed, so conflicts (a bias saved whole
  on a module that also gets a LoRA, which PEFT cannot load) fail fast. A module saved whole carries all its
  parameters (PEFT's ``modules_to_save`` loading needs the unchanged bias next to a changed weight).
- A layer whose policy rank is 0 (e.g. ``--threshold`` above σ₁) is reported and left out of the adapter.
- Without ``format``, `formats.default_format` picks it from the base checkpoint (kohya for Stable Diffusion
  inputs, PEFT otherwise) and the summary says why; a defaulted kohya / diffusers format only compares
  embeddings (neither layout has them; changed ones are reported), a given one refuses embedding LoRAs. kohya and diffusers keys use each module's diffusers pipeline name
  (`formats.pipeline_names`: original single-file U-Nets renamed to the diffusers layout), which every
  Stable Diffusion loader maps; layers without one are named in a note.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from loratools.adapter import Adapter, LoraModule, lora_matrix
from loratools.adapter_files import save_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import CheckpointError, FormatError, LoratoolsError
from loratools.formats import FORMATS, ORIGINAL_NAMESPACES, default_format, pipeline_names
from loratools.linalg import MAX_POWER_ITERS, POWER_GAIN, RankPolicy, compute_dtype, frobenius_energy, low_rank
from loratools.plan import LayerPair, Plan, WholeTensor, natural_key, plan_extract
from loratools.progress import Progress
from loratools.writer import OUTPUT_DTYPES, atomic_output, check_output

SUB_CHUNK = 1 << 20  # elements per block when subtracting the base
READ_AHEAD_BYTES = 256 * 1024 * 1024  # stored bytes of upcoming pairs asked of the OS ahead of their use


@dataclass(frozen=True)
class LayerDelta:
    """One layer's ΔW = tuned − base as its LoRA matrix.

    Attributes:
        pair: the planned layer.
        matrix: (rows, cols) = ``pair.matrix_shape``, in the requested dtype and device.
        energy: ‖ΔW‖²_F (float64); 0 for an unchanged layer.
    """

    pair: LayerPair
    matrix: torch.Tensor
    energy: float


def layer_delta(
    base: TensorIndex,
    tuned: TensorIndex,
    pair: LayerPair,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    workspace: torch.Tensor | None = None,
) -> LayerDelta:
    """One pair's ΔW = tuned − base as its LoRA matrix, formed in `dtype` whatever the stored dtypes.

    Memory: one (rows, cols) matrix, new or a view of `workspace` (1-D, in `dtype` on `device`, at least
    rows·cols long); the stored tensors are memory-mapped pages, never written. Reusing a workspace saves
    most of the time: a fresh matrix of this size is zero-filled page by page by the OS, which costs several
    times the copy itself.

    Raises:
        CheckpointError naming the tensor and the file when ΔW holds inf or nan.
    """
    stored_tuned = tuned.get(pair.tensor)
    if workspace is None:
        delta = stored_tuned.to(device=device, dtype=dtype, copy=True)
    else:
        delta = workspace[: stored_tuned.numel()].view(stored_tuned.shape).copy_(stored_tuned)
    stored = base.get(pair.tensor).to(device=device)
    for part, subtrahend in zip(delta.view(-1).split(SUB_CHUNK), stored.view(-1).split(SUB_CHUNK), strict=True):
        part.sub_(subtrahend)  # in blocks: a mixed-dtype sub_ makes a converted copy of its whole operand
    matrix = lora_matrix(delta, pair.kind)
    energy = frobenius_energy(matrix)
    if not math.isfinite(energy):
        raise non_finite_error(pair.tensor, base, tuned)
    return LayerDelta(pair, matrix, energy)


def layer_deltas(
    base: TensorIndex,
    tuned: TensorIndex,
    pairs: list[LayerPair],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    reuse: bool = False,
) -> Iterator[LayerDelta]:
    """Yield `layer_delta` for each pair in turn: one ΔW in memory at a time if the caller drops each one.

    While a ΔW is being used, the next pair's tensors are read ahead from disk (`TensorIndex.prefetch`).

    Args:
        base, tuned: open checkpoints; pairs: from `plan_extract` (``plan.pairs``).
        reuse: form every ΔW in one workspace sized for the largest pair; each yielded matrix is then
            overwritten by the next, so use (or copy) it before asking for the next one.

    Example:
        >>> with open_checkpoint("base") as b, open_checkpoint("tuned") as t:
        ...     for d in layer_deltas(b, t, plan_extract(b, t).pairs, reuse=True):
        ...         print(d.pair.module, tuple(d.matrix.shape), d.energy ** 0.5)
    """
    workspace = None
    if reuse and pairs:
        workspace = torch.empty(max(math.prod(p.shape) for p in pairs), dtype=dtype, device=device)
    sizes = [base.info(p.tensor).nbytes + tuned.info(p.tensor).nbytes for p in pairs]
    asked = 1  # pairs[1:asked] have been read ahead; the first is read when needed
    for number, pair in enumerate(pairs):
        # keep the next pair, and more within READ_AHEAD_BYTES of stored data, on its way from disk
        asked = max(asked, number + 1)
        while asked < len(pairs) and (asked == number + 1 or sum(sizes[number + 1:asked]) < READ_AHEAD_BYTES):
            base.prefetch(pairs[asked].tensor)
            tuned.prefetch(pairs[asked].tensor)
            asked += 1
        yield layer_delta(base, tuned, pair, dtype=dtype, device=device, workspace=workspace)


def non_finite_error(tensor: str, base: TensorIndex, tuned: TensorIndex) -> CheckpointError:
    """The error for a non-finite ΔW of `tensor`, naming the checkpoint and file that hold the nan/inf."""
    for index in (tuned, base):
        if not bool(torch.isfinite(index.get(tensor)).all()):
            return CheckpointError(
                f"{tensor}: non-finite values (nan or inf) in {index.path} ({index.info(tensor).file.name}); "
                "the checkpoint is corrupt or overflowed: repair it, or leave the tensor out with --exclude"
            )
    return CheckpointError(f"{tensor}: tuned − base overflows (non-finite ΔW); leave the tensor out with --exclude")


@dataclass
class LayerReport:
    """What extraction did to one layer (JSON field names in parentheses where they differ).

    Attributes:
        name: module name; tensor: weight name; shape: base layout; kind: layer kind.
        rank: rank kept; clamped: a fixed rank above min(rows, cols) was lowered to it.
        rel_error: ‖ΔW − B·A‖_F / ‖ΔW‖_F (see `LowRank.rel_error`); energy: fraction of ‖ΔW‖²_F kept (1 − rel_error²).
        sigma_1, sigma_r: largest and smallest kept singular value (0 when rank is 0).
        delta_norm: ‖ΔW‖_F.
        power_iters: power iterations the randomized SVD ran (0 for an exact SVD).
        optimal_rel_error: Eckart–Young optimum at this rank (only with ``exact``).
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


@dataclass
class ChangedTensor:
    """A whole tensor (not a LoRA) that differs between the checkpoints."""

    name: str
    shape: tuple[int, ...]
    saved: bool
    why: str
    max_abs_change: float
    rel_change: float

    def to_json(self) -> dict:
        return dict(asdict(self), shape=list(self.shape))


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
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    mismatched: list[dict] = field(default_factory=list)
    excluded: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ExtractResult:
    """The outcome of `extract`: the plan, per-layer reports, changed whole tensors and a summary.

    `adapter` is the extracted Adapter in float32 (None for a dry run); `output` the written path.
    """

    plan: Plan
    summary: ExtractSummary
    layers: list[LayerReport] = field(default_factory=list)
    changed: list[ChangedTensor] = field(default_factory=list)
    unchanged: int = 0
    adapter: Adapter | None = None
    dry_run: bool = False

    def to_json(self) -> dict:
        """``{"layers": [...], "changed_tensors": [...], "summary": {...}}``, or ``{"plan": ...}`` for a dry run."""
        if self.dry_run:
            return {"plan": self.plan.to_json(), "summary": asdict(self.summary)}
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "changed_tensors": [c.to_json() for c in self.changed],
            "summary": asdict(self.summary),
        }


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    policy: RankPolicy = RankPolicy(),
    conv_rank: int | None = None,
    embeddings: str = "lora",
    save_full: tuple[str, ...] | list[str] = (),
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    skip_mismatched: bool = False,
    format: str | None = None,
    dtype: str | None = None,
    precision: str = "fp32",
    exact: bool = False,
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
    device: str = "cpu",
    dry_run: bool = False,
    force: bool = False,
    report: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter approximating ``tuned − base`` and write it to `out`.

    Args:
        base, tuned: checkpoints `open_checkpoint` reads (folders, shards, single files).
        out: output path: a PEFT folder, a ``.safetensors`` file (bare PEFT or kohya).
        policy: rank policy for every layer; `conv_rank` overrides it with a fixed rank for conv2d layers.
        embeddings: ``lora``, ``full`` (save whole when changed) or ``skip`` (report only).
        save_full: patterns of tensors to save whole when changed (PEFT ``modules_to_save``).
        include, exclude, skip_mismatched: tensor selection, see `plan_extract`.
        format: ``peft``, ``kohya`` or ``diffusers``; default from the base checkpoint (`default_format`).
        dtype: ``fp32``, ``fp16`` or ``bf16`` for the written factors; default the tuned weights' dtype.
        precision: ``fp32`` or ``fp64`` for ΔW and the SVD.
        exact: full SVD per layer instead of randomized SVD (slow; reports the Eckart–Young optimum).
        seed, oversample, power_iters: randomized SVD settings (see `low_rank`).
        device: ``cpu`` or ``cuda`` (``cuda:N``) for the SVD.
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
    if format is not None and format not in FORMATS:
        raise FormatError(f"--format {format!r}: choose peft, kohya or diffusers")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise LoratoolsError(f"--dtype {dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    work_dtype = compute_dtype(precision)
    torch_device = _check_device(device)
    check_output(out, [base, tuned], force)
    if report is not None:
        check_output(report, [base, tuned, out], force)
    with open_checkpoint(base) as base_index, open_checkpoint(tuned) as tuned_index:
        config = base_index.config or tuned_index.config
        format_reason = f"{format}: given with --format"
        if format is None:
            format, format_reason = default_format(list(base_index.tensors), config)
            if format != "peft" and embeddings == "lora":
                embeddings = "skip"
                format_reason += f" (embeddings compared only: {format} has no embedding layout)"
        plan = plan_extract(base_index, tuned_index, include=include, exclude=exclude, embeddings=embeddings,
                            save_full=save_full, skip_mismatched=skip_mismatched)
        _check_format(plan, format)
        names = pipeline_names(list(base_index.tensors), config) if format != "peft" else None
        _check_pipeline_names(plan, names, format)
        out_dtype = OUTPUT_DTYPES[dtype] if dtype else _tuned_dtype(plan, tuned_index)
        summary = ExtractSummary(
            base=str(base), tuned=str(tuned), output=str(out), format=format,
            dtype=str(out_dtype).removeprefix("torch."), rank_policy=_describe(policy, conv_rank),
            algorithm=_algorithm(exact, oversample, power_iters, seed, precision), device=str(torch_device),
            kind_source=plan.kind_source, format_reason=format_reason, task_type=plan.task_type, only_in_base=plan.only_in_base,
            only_in_tuned=plan.only_in_tuned, excluded=len(plan.excluded),
            mismatched=[{"name": n, "base": list(b), "tuned": list(t)} for n, b, t in plan.mismatched],
        )
        result = ExtractResult(plan, summary, dry_run=dry_run)
        if dry_run:
            _write_report(result, report, [base, tuned, out], force)
            return result
        total = len(plan.whole) + len(plan.pairs)
        full = _compare_whole(plan, base_index, tuned_index, result, progress, total)
        factors = {}
        # one ΔW in memory at a time, each formed in the same workspace while the next is read ahead
        deltas = layer_deltas(base_index, tuned_index, plan.pairs, dtype=work_dtype, device=torch_device, reuse=True)
        for number, pair in enumerate(plan.pairs):
            if progress:
                progress(len(plan.whole) + number, total, pair.module)
            tick = time.perf_counter()
            delta = next(deltas)
            if delta.energy == 0:
                result.unchanged += 1
                continue
            layer_policy = RankPolicy("rank", conv_rank) if conv_rank and pair.kind == "conv2d" else policy
            lr = low_rank(delta.matrix, layer_policy, exact=exact, oversample=oversample, power_iters=power_iters,
                          seed=_layer_seed(seed, pair.module), dtype=work_dtype, total_energy=delta.energy)
            if lr.rank:
                factors[pair] = tuple(f.to("cpu", torch.float32) for f in lr.factors())
            result.layers.append(LayerReport(
                pair.module, pair.tensor, pair.shape, pair.kind, lr.rank, lr.rel_error, lr.energy,
                float(lr.S[0]), float(lr.S[lr.rank - 1]) if lr.rank else 0.0, lr.total_energy**0.5, lr.clamped,
                lr.power_iters, time.perf_counter() - tick, lr.optimal_rel_error,
            ))
        if progress:
            progress(total, total, "")
    result.adapter = _build_adapter(factors, full, plan, base)
    _finish_summary(result, out_dtype)
    _note_unmapped(result, names, format)
    if not result.adapter.modules and not result.adapter.full:
        raise LoratoolsError(
            f"{tuned}: no changed layers to extract against {base} ({result.unchanged} unchanged tensors,"
            f" {len(result.changed)} changed tensors not saved); check the paths, or save changed tensors with"
            " --save-full PATTERN"
        )
    save_adapter(result.adapter, out, format, inputs=[base, tuned], force=force, dtype=out_dtype,
                 metadata=_provenance(summary), names=names)
    summary.seconds = time.perf_counter() - started
    summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _write_report(result, report, [base, tuned, out], force)
    return result


def _write_report(result: ExtractResult, report: str | os.PathLike | None, inputs: list, force: bool) -> None:
    if report is not None:
        with atomic_output(report, inputs, force) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")


def _check_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise LoratoolsError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise LoratoolsError(
            f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu,"
            " or install a CUDA build of torch on a machine with a GPU"
        )
    return torch_device


def _check_format(plan: Plan, format: str) -> None:
    if format == "peft":
        return
    odd = [p for p in plan.pairs if p.kind in ("embedding", "conv1d")]
    if odd:
        fix = "--embeddings skip (or full with --format peft)" if odd[0].kind == "embedding" else "--format peft"
        raise FormatError(f"{odd[0].tensor}: {format} has no {odd[0].kind} layout; use {fix}, or --exclude it")
    saved = [w for w in plan.whole if w.save]
    if saved:
        raise FormatError(f"{saved[0].tensor}: {format} files cannot hold whole tensors (--save-full/--embeddings"
                          " full); use --format peft")


def _unmapped(modules: list[str], names: dict[str, str] | None) -> list[str]:
    """Original single-file modules that have no diffusers pipeline name."""
    return [m for m in modules if names is not None and m not in names and m.startswith(tuple(ORIGINAL_NAMESPACES))]


def _check_pipeline_names(plan: Plan, names: dict[str, str] | None, format: str) -> None:
    odd = _unmapped([p.module for p in plan.pairs], names)
    if format == "diffusers" and odd:
        raise FormatError(f"{odd[0]}: no diffusers name for this original-layout layer ({len(odd)} such layers:"
                          f" {_names(odd)}); --exclude them, or use --format kohya")


def _note_unmapped(result: ExtractResult, names: dict[str, str] | None, format: str) -> None:
    odd = _unmapped(list(result.adapter.modules), names)
    if odd:
        result.summary.notes.append(
            f"{len(odd)} layer(s) have no diffusers name and keep their original kohya names, which diffusers'"
            f" loader cannot map (A1111 and ComfyUI can): {_names(odd)}"
        )
    if format != "kohya" or names is None:
        return
    for space in ("text_encoder.", "text_encoder_2."):  # diffusers reads kohya q/k/v keys only next to out_proj's
        modules = [n for n in (names.get(m, m) for m in result.adapter.modules) if n.startswith(space)]
        attention = [n for n in modules if n.endswith(("q_proj", "k_proj", "v_proj"))]
        if attention and not any(n.endswith("out_proj") for n in modules):
            result.summary.notes.append(
                f"{space[:-1]}: attention LoRAs with none on out_proj ({_names(attention)}): diffusers' kohya loader"
                " refuses or drops them; add the out_proj layers, or use --format diffusers"
            )


def _tuned_dtype(plan: Plan, tuned: TensorIndex) -> torch.dtype:
    counts = Counter(tuned.tensors[p.tensor].dtype for p in plan.pairs)
    floating = [d for d, _ in counts.most_common() if d in OUTPUT_DTYPES.values()]
    return floating[0] if floating else torch.float32


def _describe(policy: RankPolicy, conv_rank: int | None) -> str:
    value = int(policy.value) if float(policy.value).is_integer() else policy.value
    text = f"{policy.kind.replace('_', '-')} {value}"
    if policy.dynamic:
        text += f" (max rank {policy.max_rank})"
    return text + (f", conv rank {conv_rank}" if conv_rank else "")


def _algorithm(exact: bool, oversample: int | None, power_iters: int | None, seed: int, precision: str) -> str:
    if exact:
        return f"exact SVD ({precision})"
    over = "max(10, rank)" if oversample is None else str(oversample)
    iterations = (f"adaptive power iterations (1–{MAX_POWER_ITERS}, until more would gain < {POWER_GAIN:.1%})"
                  if power_iters is None else f"{power_iters} power iterations")
    return f"randomized SVD ({precision}, oversample {over}, {iterations}, seed {seed})"


def _layer_seed(seed: int, module: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(module.encode())) % (1 << 63)


def _compare_whole(
    plan: Plan, base: TensorIndex, tuned: TensorIndex, result: ExtractResult, progress: Progress | None, total: int
) -> dict[str, torch.Tensor]:
    """Compare every whole tensor; record the changed ones; return the tensors to save whole, by name: each
    changed tensor marked `save`, with the other parameters of its module (unchanged ones too)."""
    lora_modules = {p.module for p in plan.pairs}
    full = {}
    for number, whole in enumerate(plan.whole):
        if progress:
            progress(number, total, whole.tensor)
        b, t = base.get(whole.tensor), tuned.get(whole.tensor)
        if torch.equal(b, t):  # compares values across dtypes (fp32 base vs bf16 tuned)
            result.unchanged += 1
            continue
        diff = t.double() - b.double()
        norm = float(b.double().norm())
        result.changed.append(ChangedTensor(
            whole.tensor, whole.shape, whole.save, whole.why, float(diff.abs().max()),
            float(diff.norm()) / norm if norm else float("inf"),
        ))
        if whole.save:
            _refuse_module_conflict(whole, lora_modules)
            full[whole.tensor] = t
    saved_modules = {name.rpartition(".")[0] for name in full}
    for name in tuned.tensors:  # PEFT's modules_to_save loads every parameter of a saved module
        if name.rpartition(".")[0] in saved_modules and name not in full:
            full[name] = tuned.get(name)
    return dict(sorted(full.items(), key=lambda item: natural_key(item[0])))


def _refuse_module_conflict(whole: WholeTensor, lora_modules: set[str]) -> None:
    if whole.module in lora_modules:
        raise LoratoolsError(
            f"{whole.tensor} changed and is to be saved whole, but {whole.module} also gets a LoRA, and PEFT cannot"
            f" load a module that is both a LoRA target and in modules_to_save; add {whole.module}.weight to"
            f" --save-full to save the whole module, or drop {whole.tensor} from --save-full"
        )


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


def _finish_summary(result: ExtractResult, out_dtype: torch.dtype) -> None:
    summary, plan, adapter = result.summary, result.plan, result.adapter
    total = sum(layer.delta_norm**2 for layer in result.layers)
    residual = sum((layer.delta_norm * layer.rel_error) ** 2 for layer in result.layers)
    summary.layers = len(adapter.modules)
    summary.unchanged_tensors = result.unchanged
    summary.rel_error = (residual / total) ** 0.5 if total else 0.0
    summary.energy = 1 - residual / total if total else 1.0
    summary.adapter_bytes = adapter.num_parameters() * out_dtype.itemsize
    summary.full_delta_bytes = sum(torch.Size(layer.shape).numel() for layer in result.layers) * out_dtype.itemsize
    notes = summary.notes
    clamped = [layer.name for layer in result.layers if layer.clamped]
    if clamped:
        notes.append(f"{len(clamped)} layer(s) smaller than the requested rank were clamped to min(out, in):"
                     f" {_names(clamped)}")
    zero = [layer.name for layer in result.layers if layer.rank == 0]
    if zero:
        notes.append(f"{len(zero)} changed layer(s) got rank 0 under {summary.rank_policy} and are not in the"
                     f" adapter: {_names(zero)}")
    dropped = [c.name for c in result.changed if not c.saved]
    if dropped:
        notes.append(f"{len(dropped)} changed tensor(s) cannot be a LoRA and were not saved: {_names(dropped)};"
                     " save them whole with --save-full PATTERN (PEFT modules_to_save)")
    if plan.only_in_tuned:
        notes.append(f"{len(plan.only_in_tuned)} tensor(s) only in the tuned checkpoint are not in the adapter:"
                     f" {_names(plan.only_in_tuned)}")
    if plan.only_in_base:
        notes.append(f"{len(plan.only_in_base)} tensor(s) only in the base checkpoint: {_names(plan.only_in_base)}")
    if plan.mismatched:
        notes.append(f"{len(plan.mismatched)} tensor(s) with different shapes skipped:"
                     f" {_names([n for n, _, _ in plan.mismatched])}")


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")


def _provenance(summary: ExtractSummary) -> dict[str, str]:
    return {
        "loratools_command": "extract",
        "loratools_base": summary.base,
        "loratools_tuned": summary.tuned,
        "loratools_rank_policy": summary.rank_policy,
        "loratools_algorithm": summary.algorithm,
    }

