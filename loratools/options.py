"""The option dataclasses (and option names) that travel together through the API and the CLI: which tensors (`Selection`), which
rank (`RankPolicy`), how each truncated SVD is computed (`SvdSettings`), how --behaviour runs the models
(`BehaviourOptions`). Frozen, validated on creation, and free of torch, so the command line builds them without loading it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

from loratools.errors import LoratoolsError

EMBEDDING_MODES = ("lora", "full", "skip")
PRECISIONS = ("fp32", "fp64")  # the dtypes ΔW is formed and factored in (`dtypes.PRECISIONS` maps them)
# rank policy -> (test of its value, what the value must be)
POLICY_LIMITS = {
    "rank": (lambda v: v >= 1 and float(v).is_integer(), "a whole number ≥ 1"),
    "energy": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "max_error": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "sv_ratio": (lambda v: v >= 1, "a ratio ≥ 1"),
    "threshold": (lambda v: v >= 0, "a value ≥ 0"),
}
RANK_POLICIES = tuple(POLICY_LIMITS)
OUTPUT_DTYPE_NAMES = ("fp32", "fp16", "bf16")  # written dtypes (`dtypes.OUTPUT_DTYPES` maps them)
QUANTIZED_DTYPE_NAMES = ("q8_0",)  # written by the GGUF format only (`dtypes.QUANTIZED_DTYPES`)
EXPORT_DTYPES = ("fp32", "fp16")  # ONNX graph precisions; bf16 does not run on onnxruntime's CPU provider
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.25, "int4": 0.5}  # ONNX verification tolerance by graph precision
# formats an adapter is written in; `adapter_files.WRITERS` has one writer for each (a test holds them equal)
ADAPTER_FORMATS = ("peft", "kohya", "diffusers", "gguf")


def check_policy_value(kind: str, value: float) -> None:
    """LoratoolsError naming the option (``--energy``…) when `value` is out of the range of rank policy `kind`."""
    test, wants = POLICY_LIMITS[kind]
    if not test(value):
        raise LoratoolsError(f"--{kind.replace('_', '-')} {value} is out of range; it must be {wants}")


@dataclass(frozen=True)
class Selection:
    """Which tensors of a base / tuned pair a command works on; shared by extract, spectrum and verify.

    Attributes:
        include: keep only tensors matching one of these patterns (all when empty).
        exclude: leave out tensors matching one of these patterns.
        embeddings: ``lora`` (extract), ``full`` (save whole when changed) or ``skip`` (compare and report only).
        save_full: tensors matching these patterns are saved whole when changed (PEFT ``modules_to_save``),
            whatever their kind.
        skip_mismatched: leave out (and list) tensors whose shapes differ instead of raising ShapeError.
    Patterns are globs matched against the tensor and its module name (`names.matches`).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: str = "lora"
    save_full: tuple[str, ...] = ()
    skip_mismatched: bool = False

    def __post_init__(self) -> None:
        if self.embeddings not in EMBEDDING_MODES:
            raise LoratoolsError(f"--embeddings {self.embeddings!r}: choose one of {', '.join(EMBEDDING_MODES)}")
        for name in ("include", "exclude", "save_full"):  # accept any iterable of patterns, store a tuple
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class RankPolicy:
    """How many singular values to keep.

    kind:
        ``rank``       keep `value` (clamped to the layer's min(out, in));
        ``energy``     smallest k with Σ_{i<k} σ_i² ≥ value · ‖ΔW‖²_F;
        ``max_error``  smallest k with ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F ≤ value;
        ``sv_ratio``   keep σ_i ≥ σ_1 / value (kohya's resize);
        ``threshold``  keep σ_i > value (mergekit's sv-epsilon).
    Dynamic kinds (all but ``rank``) are capped at `max_rank`. `conv_rank` (``--conv-rank``) replaces the policy
    by that fixed rank for conv2d layers (`for_kind`).
    """

    kind: str = "rank"
    value: float = 16
    max_rank: int = 128
    conv_rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RANK_POLICIES:
            raise LoratoolsError(f"unknown rank policy {self.kind!r}; choose one of {', '.join(RANK_POLICIES)}")
        check_policy_value(self.kind, self.value)
        if self.max_rank < 1:
            raise LoratoolsError(f"--max-rank {self.max_rank} must be ≥ 1")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise LoratoolsError(f"--conv-rank {self.conv_rank} must be ≥ 1")

    @property
    def dynamic(self) -> bool:
        return self.kind != "rank"

    def describe(self) -> str:
        """The policy as its option reads, e.g. ``rank 16`` or ``energy 0.9 (max rank 128)``."""
        value = int(self.value) if float(self.value).is_integer() else self.value
        text = f"{self.kind.replace('_', '-')} {value}"
        text += f" (max rank {self.max_rank})" if self.dynamic else ""
        return text + (f", conv rank {self.conv_rank}" if self.conv_rank else "")

    def for_kind(self, kind: str) -> RankPolicy:
        """The policy for a layer of `kind` (``linear``, ``conv2d`` …): a fixed `conv_rank` for conv2d layers."""
        return RankPolicy("rank", self.conv_rank) if self.conv_rank and kind == "conv2d" else self


@dataclass(frozen=True)
class SvdSettings:
    """How every truncated SVD of a command is computed; shared by extract, spectrum and verify.

    Attributes:
        exact: a full SVD (``torch.linalg.svd``) instead of the randomized one; slow, but the spectrum is complete.
        seed: seed of the Gaussian test matrices (drawn on the CPU, so cpu and cuda agree).
        oversample: extra sketch columns; None: max(10, rank).
        power_iters: a fixed number of power iterations; None: adaptive (`_sketch_block`).
        precision: ``fp32`` or ``fp64``, the dtype ΔW is formed and factored in.
        device: where ΔW is formed and factored (``cpu``, ``cuda``, ``cuda:1`` …).
    """

    exact: bool = False
    seed: int = 0
    oversample: int | None = None
    power_iters: int | None = None
    precision: str = "fp32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise LoratoolsError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.oversample is not None and self.oversample < 0:
            raise LoratoolsError(f"--oversample {self.oversample} must be ≥ 0")
        if self.power_iters is not None and self.power_iters < 0:
            raise LoratoolsError(f"--power-iters {self.power_iters} must be ≥ 0")

    def for_layer(self, name: str) -> SvdSettings:
        """These settings with a seed derived from `seed` and the layer name, so that a layer's result does not
        depend on which other layers were selected."""
        return replace(self, seed=(self.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))


@dataclass(frozen=True)
class BehaviourOptions:
    """How ``--behaviour`` runs the models (`behaviour.measure_behaviour`).

    Attributes:
        texts: text files to run the models on (none: seeded random token sequences).
        max_tokens: at most this many tokens in all; bounds the tuned model's kept outputs (tokens × vocabulary
            floats for a causal LM).
        batch_size: windows per forward pass.
        dtype: the models' dtype in memory (fp32, fp16, bf16); merges are computed in fp32 and cast to it.
        device: where the forward passes run (cpu, cuda, cuda:1 …).
        seed: seed of the random token sequences.
    """

    texts: tuple[str, ...] = ()
    max_tokens: int = 2048
    batch_size: int = 4
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(str(path) for path in self.texts))
        if self.max_tokens < 2:
            raise LoratoolsError(f"--max-tokens {self.max_tokens} must be ≥ 2")
        if self.batch_size < 1:
            raise LoratoolsError(f"--batch-size {self.batch_size} must be ≥ 1")
        if self.dtype not in OUTPUT_DTYPE_NAMES:
            raise LoratoolsError(f"--dtype {self.dtype!r}: choose one of {', '.join(OUTPUT_DTYPE_NAMES)}")
