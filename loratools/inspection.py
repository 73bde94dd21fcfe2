"""`inspect`: what an adapter holds, and the exact spectrum of every module's ΔW, from the factors alone.

Decisions:
- A conv2d module's spectrum is that of its 2-D LoRA matrix (out, in·kh·kw) — the matrix a LoRA factorises.
- Rows are filtered (`pattern`, a regex searched in the module name) before any spectrum is computed;
  the header always describes the whole adapter.
- ``sort="name"`` is a natural sort (layers.2 before layers.10); ``norm`` and ``rank`` sort descending.
- The metadata summary holds the kohya ``ss_*`` / ``modelspec.*`` keys and PEFT config fields that say what
  the adapter is (SUMMARY_KEYS); everything else is in `metadata` / `config`, shown by ``--metadata``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loratools.adapter import Adapter, LoraModule, lora_matrix
from loratools.adapter_files import adapter_weights_path, load_adapter
from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import LoratoolsError
from loratools.matching import resolve_kohya_names
from loratools.names import natural_key
from loratools.progress import Progress
from loratools.spectral import SpectrumStats, module_singular_values, spectrum_stats
from loratools.structured import DoraChange, dora_change, numerical_rank
from loratools.structured_convert import base_weights, true_delta
from loratools.structured_modules import DoraModule, StructuredModule, layer_kind, with_base_shape
from loratools.writer import PROVENANCE_KEYS

SORTS = ("name", "norm", "rank")
SUMMARY_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_output_name",
    "ss_training_comment",
    "ss_num_epochs",
    "ss_learning_rate",
    "modelspec.title",
    "modelspec.architecture",
    *PROVENANCE_KEYS,
)
CONFIG_SUMMARY_KEYS = (
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
)


@dataclass
class ModuleReport:
    """One module's row: what it is and its exact spectrum.

    Attributes:
        shape: the base weight's shape (out, in), (out, in, kh, kw) or (num, dim).
        singular_values: (k,) float32 descending, k = min(rank, out, in).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float
    singular_values: torch.Tensor
    stats: SpectrumStats
    type: str = "LoRA"
    method: str = "factors"
    exact_rank: int | None = None
    dora: DoraChange | None = None

    def to_json(self) -> dict:
        """The documented JSON row: name, type, kind, shape, rank, alpha, scale, norm, singular_values, stats;
        for LoHa / LoKr / DoRA also method (how the spectrum was taken), exact_rank and (DoRA) dora."""
        extra = {} if self.type == "LoRA" else {"method": self.method, "exact_rank": self.exact_rank,
                                                  "dora": asdict(self.dora) if self.dora is not None else None}
        return {
            "name": self.name,
            "type": self.type,
            **extra,
            "kind": self.kind,
            "shape": list(self.shape),
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "norm": self.stats.norm,
            "sigma1": self.stats.sigma1,
            "effective_rank": self.stats.effective_rank,
            "stable_rank": self.stats.stable_rank,
            "top_quarter_energy": self.stats.top_quarter_energy,
            "singular_values": self.singular_values.tolist(),
        }


@dataclass
class InspectReport:
    """Everything `inspect` knows about an adapter; `modules` holds the selected rows, the rest the whole adapter.

    Attributes:
        file_size: bytes of the weights file (plus adapter_config.json), None for an in-memory adapter.
        rank_histogram: rank -> number of modules, over all modules.
        alpha, scale: the common value, or None when they differ between modules (see the rows).
        unsupported: recognised module types this tool cannot read (LoHa, LoKr, DoRA, ...), by module name.
        full: shapes of full tensors saved as-is (PEFT ``modules_to_save``), by tensor name.
    """

    source: str
    format: str
    base_model: str | None
    dtypes: list[str]
    file_size: int | None
    num_parameters: int
    num_modules: int
    rank_histogram: dict[int, int]
    alpha: float | None
    scale: float | None
    metadata: dict[str, str]
    config: dict
    unsupported: dict[str, str]
    full: dict[str, tuple[int, ...]]
    notes: list[str]
    modules: list[ModuleReport] = field(default_factory=list)

    def metadata_summary(self) -> dict[str, str]:
        """The identifying metadata and config fields (SUMMARY_KEYS, CONFIG_SUMMARY_KEYS) that are present."""
        summary = {k: self.metadata[k] for k in SUMMARY_KEYS if self.metadata.get(k)}
        for key in CONFIG_SUMMARY_KEYS:
            value = self.config.get(key)
            if value not in (None, {}, [], False):
                summary[key] = str(value)
        return summary

    def summary(self) -> dict:
        """Adapter-level figures for the JSON ``summary`` object."""
        return {
            "source": self.source,
            "dtypes": self.dtypes,
            "file_size": self.file_size,
            "parameters": self.num_parameters,
            "modules": self.num_modules,
            "shown": len(self.modules),
            "rank_histogram": {str(r): n for r, n in self.rank_histogram.items()},
            "alpha": self.alpha,
            "scale": self.scale,
            "unsupported": self.unsupported,
            "full": {name: list(shape) for name, shape in self.full.items()},
            "notes": self.notes,
            "metadata_summary": self.metadata_summary(),
        }

    def to_json(self) -> dict:
        """``{"format", "base_model", "metadata", "config", "modules": [...], "summary": {...}}``."""
        return {
            "format": self.format,
            "base_model": self.base_model,
            "metadata": self.metadata,
            "config": self.config,
            "modules": [m.to_json() for m in self.modules],
            "summary": self.summary(),
        }


def inspect_module(module: LoraModule) -> ModuleReport:
    """The row of one module; cost O((out + in)·r²), ΔW never formed."""
    s = module_singular_values(module)
    return ModuleReport(
        name=module.name,
        kind=module.kind,
        shape=module.base_shape,
        rank=module.rank,
        alpha=module.alpha,
        scale=module.scale,
        singular_values=s,
        stats=spectrum_stats(s, module.rank),
    )


def inspect_structured(module: StructuredModule, base: TensorIndex | None = None,
                       tensor: str | None = None) -> ModuleReport:
    """The row of a LoHa / LoKr / DoRA module: the exact spectrum of its true ΔW (LoKr from the Kronecker factors,
    LoHa from the r₁r₂-wide Hadamard factors or formed, DoRA formed from the base weight, which it needs: without
    `base` a DoRA row has an empty spectrum and method ``needs --base``)."""
    shape = module.base_shape or module.matrix_shape
    dora = None
    if isinstance(module, DoraModule):
        if base is None or tensor is None:
            s, method = torch.zeros(0), "needs --base"
        else:
            weight = lora_matrix(base.get(tensor).float(), layer_kind(module))
            delta = true_delta(module, base, tensor)
            s, method = torch.linalg.svdvals(delta), "formed"
            per_channel = 1 if module.per_row else module.matrix_shape[1] // module.magnitude.numel()
            dora = dora_change(weight, weight + delta, per_row=module.per_row, columns_per_channel=per_channel)
    else:
        exact, method = module.svd()
        s = exact.S.float()
    exact_rank = numerical_rank(s, module.matrix_shape) if len(s) else None
    return ModuleReport(name=module.name, kind=layer_kind(module) if module.base_shape is not None else "matrix",
                        shape=tuple(shape), rank=module.rank, alpha=module.alpha, scale=module.scale,
                        singular_values=s, stats=spectrum_stats(s, max(module.rank, 1)), type=module.type_name,
                        method=method, exact_rank=exact_rank, dora=dora)


def _uniform(values: list[float]) -> float | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def _file_size(path: Path) -> int:
    weights, config = adapter_weights_path(path)
    return weights.stat().st_size + (config.stat().st_size if config is not None else 0)


def inspect_adapter(
    source: str | os.PathLike | Adapter,
    *,
    sort: str = "name",
    pattern: str | None = None,
    top: int | None = None,
    base: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> InspectReport:
    """Describe an adapter (PEFT folder or file, kohya or diffusers-style file, or an Adapter) module by module.

    Args:
        sort: "name" (natural order), "norm" or "rank" (both descending).
        pattern: a regex; only modules whose name it matches (``re.search``) get rows.
        top: keep the first `top` rows after sorting.
        base: the base model; DoRA rows need it (their ΔW = W' − W), and it gives flat LoHa / LoKr factors their
            layer shapes.
        progress: called as ``progress(done, total, module_name)`` after each module.
    Returns:
        An InspectReport; each row's spectrum is exact ((k,) with k = min(rank, out, in)).
    Example:
        >>> report = inspect_adapter("fixtures/llama-lora-peft", sort="norm", top=3)
        >>> [round(m.stats.sigma1, 3) for m in report.modules]
        [0.25, 0.25, 0.25]
    """
    if sort not in SORTS:
        raise LoratoolsError(f"unknown sort {sort!r}; choose one of {', '.join(SORTS)}")
    if top is not None and top < 1:
        raise LoratoolsError(f"--top {top} must be ≥ 1")
    if isinstance(source, Adapter):
        adapter, name, size = source, "adapter", None
    else:
        # spectra and norms do not depend on row order: a GGUF file's q/k rows may stay in llama.cpp's order
        adapter, name, size = load_adapter(source, any_row_order=True), str(source), _file_size(Path(source))
    if base is None:
        return _report(adapter, name, size, None, sort=sort, pattern=pattern, top=top, progress=progress)
    with open_checkpoint(base) as index:
        adapter = resolve_kohya_names(adapter, index.tensors)
        return _report(adapter, name, size, index, sort=sort, pattern=pattern, top=top, progress=progress)


def _report(adapter: Adapter, name: str, size: int | None, index: TensorIndex | None, *, sort: str,
            pattern: str | None, top: int | None, progress: Progress | None) -> InspectReport:
    tensors = base_weights(adapter, index) if index is not None and adapter.structured else {}
    structured = {n: with_base_shape(m, index.info(tensors[n]).shape) if index is not None and n in tensors else m
                  for n, m in adapter.structured.items()}
    selected: list[LoraModule | StructuredModule] = [*adapter.modules.values(), *structured.values()]
    total = len(selected)
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise LoratoolsError(f"--filter {pattern!r} is not a valid regular expression ({exc})") from None
        every = [m.name for m in selected]
        selected = [m for m in selected if regex.search(m.name)]
        if not selected and every:
            raise LoratoolsError(f"--filter {pattern!r} matches none of the {total} modules (e.g. {every[0]!r})")
    rows = []
    for done, module in enumerate(selected, 1):
        rows.append(inspect_module(module) if isinstance(module, LoraModule)
                    else inspect_structured(module, index, tensors.get(module.name)))
        if progress is not None:
            progress(done, len(selected), module.name)
    rows.sort(key=lambda m: natural_key(m.name))
    if sort == "norm":
        rows.sort(key=lambda m: -m.stats.norm)
    elif sort == "rank":
        rows.sort(key=lambda m: -m.rank)
    modules: list[LoraModule | StructuredModule] = [*adapter.modules.values(), *adapter.structured.values()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for m in adapter.modules.values() for t in (m.A, m.B)}
                    | {str(t.dtype).removeprefix("torch.") for m in adapter.structured.values() for t in m.tensors()})
    return InspectReport(
        source=name,
        format=adapter.format,
        base_model=adapter.base_model,
        dtypes=dtypes,
        file_size=size,
        num_parameters=adapter.num_parameters(),
        num_modules=len(modules),
        rank_histogram=dict(sorted(Counter(m.rank for m in modules).items())),
        alpha=_uniform([m.alpha for m in modules]),
        scale=_uniform([m.scale for m in modules]),
        metadata=dict(adapter.metadata),
        config=dict(adapter.config),
        unsupported=dict(adapter.unsupported),
        full={n: tuple(t.shape) for n, t in adapter.full.items()},
        notes=list(adapter.notes),
        modules=rows[:top] if top is not None else rows,
    )
