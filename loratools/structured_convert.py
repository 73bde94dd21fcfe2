"""LoHa, LoKr and DoRA modules as plain LoRA: the best approximation of the true ΔW at a rank policy, with its
error against the Eckart–Young optimum; and the true ΔW of a structured module for merge, verify and inspect.

- LoHa and LoKr spectra are exact (`structured_modules`: Hadamard factors + QR, or Kronecker factor SVDs), so
  the truncation is the optimal one and its error is the Eckart–Young error itself.
- DoRA's ΔW = W' − W depends on the base weight (``base``) and is full rank in general: it is formed and
  truncated by the randomized SVD (`rsvd.low_rank`); the optimum comes from its full spectrum
  (``torch.linalg.svdvals``) when min(rows, cols) ≤ 2048, else it is not reported (None).
- Without a policy, every module keeps its exact rank (the numerical rank of its ΔW), capped at 128.
- Flat factors (a convolution stored as a 2-D matrix) are written as convolutions when the base tensor is known,
  else as linear layers (noted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from loratools.adapter import Adapter, LoraModule, lora_matrix
from loratools.checkpoint import TensorIndex
from loratools.errors import FormatError, ShapeError
from loratools.formats import KOHYA_PREFIXES
from loratools.linalg import pooled_rel_error
from loratools.matching import find_tensor, module_aliases, resolve_kohya_names
from loratools.policies import RankPolicy, choose_rank, truncation_errors
from loratools.progress import Progress
from loratools.rsvd import SvdSettings, compute_dtype, low_rank, svd_device
from loratools.structured import numerical_rank
from loratools.structured_modules import (
    DoraModule,
    StructuredModule,
    fits,
    layer_kind,
    structured_delta,
    with_base_shape,
)

DEFAULT_MAX_RANK = 128
EXACT_SPECTRUM_LIMIT = 2048  # formed ΔW up to this min(rows, cols) also get their full spectrum (the optimum)


@dataclass(frozen=True)
class ConvertedLayer:
    """One structured module written as a plain LoRA.

    Attributes:
        type: LoHa, LoKr, DoRA, LoHa+DoRA …; method: how the spectrum was taken (kron, factors, formed,
            randomized).
        exact_rank: the numerical rank of the true ΔW (None when a randomized SVD saw only part of it).
        rel_error: ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the written LoRA; optimal_rel_error: the Eckart–Young error at
            the same rank (None when not known).
        delta_energy: ‖ΔW‖²_F.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    rank: int
    exact_rank: int | None
    rel_error: float
    optimal_rel_error: float | None
    delta_energy: float
    method: str

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass
class ConvertReport:
    """Per-layer results of turning structured modules into plain LoRA, and the overall errors."""

    layers: list[ConvertedLayer]
    notes: list[str]

    @property
    def rel_error(self) -> float:
        return pooled_rel_error((layer.rel_error**2 * layer.delta_energy, layer.delta_energy) for layer in self.layers)

    @property
    def optimal_rel_error(self) -> float | None:
        if any(layer.optimal_rel_error is None for layer in self.layers):
            return None
        return pooled_rel_error(((layer.optimal_rel_error or 0.0) ** 2 * layer.delta_energy, layer.delta_energy)
                                for layer in self.layers)

    def to_json(self) -> dict:
        return {"layers": [layer.to_json() for layer in self.layers], "rel_error": self.rel_error,
                "optimal_rel_error": self.optimal_rel_error, "notes": self.notes}


def structured_targets(adapter: Adapter, index: TensorIndex) -> tuple[dict[str, tuple[str, StructuredModule]], dict[str, str]]:
    """Each structured module matched to the base tensor it changes (names resolved like `matching.match_adapter`).

    Returns:
        (module name -> (tensor name, the module with the tensor's shape), module name -> why it matches no
        tensor: missing, or a shape the module cannot take). Kohya stems come back as the base's dotted names.
    """
    aliases = module_aliases(index)
    found: dict[str, tuple[str, StructuredModule]] = {}
    unmatched: dict[str, str] = {}
    for name, module in resolve_kohya_names(adapter, index.tensors).structured.items():
        tensor = find_tensor(name + ".weight", index)
        if tensor is None and name in aliases:
            tensor = find_tensor(aliases[name] + ".weight", index)
        if tensor is None:
            unmatched[name] = f"no tensor {name}.weight in {index.path}; is the adapter for this base model?"
            continue
        shape = index.info(tensor).shape
        if not fits(module, shape):
            unmatched[name] = (f"a {module.type_name} for a {module.matrix_shape[0]}×{module.matrix_shape[1]}"
                               f" matrix, but {tensor} has shape {tuple(shape)}; the adapter was made for another model")
            continue
        found[name] = (tensor, with_base_shape(module, shape))
    return found, unmatched


def base_weights(adapter: Adapter, index: TensorIndex) -> dict[str, str]:
    """Structured module name -> the base tensor it changes (`structured_targets`).

    Raises:
        ShapeError naming the first module whose tensor is missing or has a shape the module cannot take.
    """
    found, unmatched = structured_targets(adapter, index)
    if unmatched:
        name, reason = next(iter(unmatched.items()))
        raise ShapeError(f"{name}: {reason}")
    return {name: tensor for name, (tensor, _) in found.items()}


def _kohya_resolved(adapter: Adapter, index: TensorIndex | None) -> Adapter:
    """The adapter with kohya stems of structured modules renamed to the base's dotted names (when given)."""
    if index is None:
        return adapter
    return resolve_kohya_names(adapter, index.tensors)


def true_delta(module: StructuredModule, index: TensorIndex | None, tensor: str | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The true ΔW of `module` as its LoRA matrix; DoRA reads its base weight (FormatError without a base)."""
    if isinstance(module, DoraModule):
        if index is None or tensor is None:
            raise FormatError(f"{module.name}: a DoRA delta is W' − W, which needs the base weight: pass --base")
        weight = lora_matrix(index.get(tensor).to(dtype), layer_kind(module))
        return structured_delta(module, weight, dtype=dtype)
    return structured_delta(module, dtype=dtype)


def _truncated(module: StructuredModule, delta: torch.Tensor | None, policy: RankPolicy | None,
               svd: SvdSettings) -> tuple[torch.Tensor, torch.Tensor, ConvertedLayer]:
    """(left (rows, k), right (k, cols), report) of the best rank-k approximation of the module's true ΔW."""
    shape = module.matrix_shape
    if delta is None:  # LoHa / LoKr: exact spectrum from the structure
        assert not isinstance(module, DoraModule)
        exact, method = module.svd(compute_dtype(svd))
        S = exact.S
        exact_rank = numerical_rank(S, shape)
        if policy is None:
            rank = min(exact_rank, DEFAULT_MAX_RANK)
        else:
            chosen = choose_rank(S, policy)
            rank = min(len(S), policy.max_rank) if chosen is None else chosen
        rank = max(rank, 1)
        errors = truncation_errors(S)
        error = float(errors[min(rank, len(S))])
        left, right = exact.factors(rank)
        energy = float((S.double() ** 2).sum())
        return left, right, ConvertedLayer(module.name, module.type_name, shape, rank, exact_rank, error, error,
                                           energy, method)
    layer_policy = policy or RankPolicy("max_error", 0.0, DEFAULT_MAX_RANK)
    best = low_rank(delta, layer_policy, settings=svd.for_layer(module.name))
    rank = max(1, best.rank)
    if best.rank == 0:
        best = replace(best, U=delta.new_zeros(shape[0], 1), S=delta.new_zeros(1), Vh=delta.new_zeros(1, shape[1]),
                       rank=1)
    left, right = best.factors()
    spectrum = best.S if best.complete else None
    if spectrum is None and min(shape) <= EXACT_SPECTRUM_LIMIT:
        spectrum = torch.linalg.svdvals(delta.to(compute_dtype(svd)))
    dense_rank: int | None = None
    optimum: float | None = None
    if spectrum is not None:
        dense_rank = numerical_rank(spectrum, shape)
        optimum = float(truncation_errors(spectrum, best.total_energy)[min(rank, len(spectrum))])
    method = "formed" if best.complete else "randomized"
    return left, right, ConvertedLayer(module.name, module.type_name, shape, rank, dense_rank, best.rel_error,
                                       optimum, best.total_energy, method)


def plain_lora(
    adapter: Adapter,
    *,
    policy: RankPolicy | None = None,
    base: TensorIndex | None = None,
    svd: SvdSettings = SvdSettings(),
    progress: Progress | None = None,
) -> tuple[Adapter, ConvertReport]:
    """Every structured module of `adapter` replaced by the best plain LoRA at `policy` (plain modules kept).

    Args:
        policy: the rank policy per layer; None keeps each layer's exact rank (capped at 128).
        base: the open base checkpoint; needed for DoRA, and to write flattened convolutions as convolutions.
        svd: how DoRA's formed ΔW is factored (randomized by default; ``exact`` for the complete spectrum).
    Returns:
        (adapter of plain LoRA modules, report: per-layer rank, exact rank, error and optimal error). Each
        written module has alpha = rank (scale 1).
    Raises:
        FormatError naming a DoRA module when `base` is None; ShapeError for a module that fits no base tensor.
    """
    adapter = _kohya_resolved(adapter, base)
    tensors = base_weights(adapter, base) if base is not None else {}
    modules = dict(adapter.modules)
    layers: list[ConvertedLayer] = []
    flat: list[str] = []
    for done, (name, module) in enumerate(adapter.structured.items(), 1):
        tensor = tensors.get(name)
        if tensor is not None and base is not None:
            module = with_base_shape(module, base.info(tensor).shape)
        delta = (true_delta(module, base, tensor, compute_dtype(svd)).to(svd_device(svd))
                 if isinstance(module, DoraModule) else None)
        left, right, layer = _truncated(module, delta, policy, svd)
        shape = module.base_shape
        if shape is None:
            flat.append(name)
            shape = module.matrix_shape
        kind = layer_kind(module) if module.base_shape is not None else "linear"
        # a kohya stem found through the base's aliases (a diffusers model folder) takes its module's dotted name
        written = tensor.removesuffix(".weight") if tensor is not None and name.startswith(KOHYA_PREFIXES) else name
        plain = LoraModule.from_lora_matrix_factors(written, left.float().cpu(), right.float().cpu(), kind,
                                                    tuple(shape), float(layer.rank))
        modules[written] = replace(plain, A=plain.A.contiguous(), B=plain.B.contiguous())
        layers.append(replace(layer, shape=tuple(shape)))
        if progress is not None:
            progress(done, len(adapter.structured), name)
    notes = _rank_notes(layers)
    if flat:
        notes.append(f"{len(flat)} module(s) store their factors flat (a linear layer and a flattened convolution"
                     " look the same): written as linear layers; pass --base to write convolutions as convolutions")
    converted = replace(adapter, modules=modules, structured={}, metadata=_plain_metadata(adapter.metadata))
    return converted, ConvertReport(layers, notes)


def _plain_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """kohya metadata of a LyCORIS file, made true of the plain LoRA written from it: ``ss_network_module``
    becomes kohya's LoRA network and the LyCORIS ``ss_network_args`` (algo = loha …) go."""
    if not metadata.get("ss_network_module", "").startswith("lycoris"):
        return metadata
    plain = {key: value for key, value in metadata.items() if key != "ss_network_args"}
    plain["ss_network_module"] = "networks.lora"
    return plain


def _rank_notes(layers: list[ConvertedLayer]) -> list[str]:
    short = [layer for layer in layers if layer.exact_rank is not None and layer.rank < layer.exact_rank]
    if not short:
        return []
    worst = max((layer.exact_rank or 0) for layer in short)
    names = ", ".join(f"{layer.name} ({layer.rank} < {layer.exact_rank})" for layer in short[:3])
    more = f" and {len(short) - 3} more" if len(short) > 3 else ""
    return [f"{len(short)} layer(s) kept a rank below the rank that would be exact: {names}{more};"
            f" --rank {worst} reproduces every layer exactly"]

