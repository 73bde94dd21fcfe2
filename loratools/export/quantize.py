"""int4 weight-only quantization of an exported graph with onnxruntime's own quantizer (``MatMulNBits``), and the
accuracy a quantized graph keeps against PyTorch fp32.

Each MatMul whose second input is a constant 2-D weight (K, N) becomes a ``com.microsoft.MatMulNBits`` node: the
weight is cut along K into blocks of `block_size` values, each block stored as 4-bit integers with an fp32 scale
(and a 4-bit zero point when asymmetric). Activations stay float; at accuracy level 4 the CPU kernel computes in
int8. Embedding gathers, norms and attention stay fp32.

Decisions:
- Defaults are those of onnxruntime-genai's model builder for ``-p int4 -e cpu`` (its ``quant_config``): block
  size 32, symmetric, accuracy level 4, MatMul nodes only (the embedding gather stays fp32).
- MatMuls whose weight is a graph input stay float: a LoRA slot's ``x @ A`` and ``(x A) @ B`` take A and B as
  graph inputs whose zero-size defaults the quantizer would take for constant weights. They are found in the graph
  and passed to the quantizer by node name, so adapters still switch on an int4 base.
- onnxruntime's quantizer module calls ``logging.basicConfig(level=INFO)`` when imported (a handler on the root
  logger) and logs every node: `_quantizer_class` imports it with the root logger's handlers and level put back,
  and the run happens inside `silence.silenced(ONNX_LOGGERS)`.

onnx and onnxruntime are imported inside the functions: `Int4Options` is part of `ExportOptions`, which
``import loratools`` loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import LoratoolsError

if TYPE_CHECKING:
    import onnx

    from loratools.export.kit import ExportCheck

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes a power of two of at least 16
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute


@dataclass(frozen=True)
class Int4Options:
    """How `quantize_int4` quantizes; the defaults are onnxruntime-genai's for CPU int4 models.

    Attributes:
        block_size: weights per scale along the input axis K: 16, 32, 64, 128 or 256.
        symmetric: True: signed 4-bit values and one scale per block; False: unsigned values with a zero point per
            block as well (follows skewed weights better; a little larger).
        accuracy_level: MatMulNBits compute type on CPU: 4 int8 (fastest), 3 bf16, 2 fp16, 1 fp32, 0 onnxruntime's
            choice.
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise LoratoolsError(f"--block-size {self.block_size}: int4 blocks hold 16, 32, 64, 128 or 256 weights"
                                 " (default 32, as onnxruntime-genai's CPU int4 models)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise LoratoolsError(f"--accuracy-level {self.accuracy_level}: choose 0 to 4 (4: int8 compute, the"
                                 " default; 1: fp32 compute)")

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Int4Summary:
    """What `quantize_int4` did.

    Attributes:
        quantized: MatMul nodes that became MatMulNBits.
        kept_float: names of the MatMul nodes left float because their weight is a graph input (LoRA slots).
        options: the Int4Options used.
    """

    quantized: int
    kept_float: list[str]
    options: Int4Options

    def to_json(self) -> dict:
        return {"quantized": self.quantized, "kept_float": self.kept_float, "options": self.options.to_json()}


@dataclass(frozen=True)
class Agreement:
    """A quantized (or fp16) graph against the model in PyTorch fp32, from the export's verification.

    Attributes:
        logits_cosine: cosine of all logits (padding left out) on the verification inputs.
        top1: fraction of positions whose argmax (next token) agrees.
        greedy_matched, greedy_steps: with the KV cache, greedy tokens equal to transformers' ``generate``
            before the first difference, out of how many; None without the cache.
    """

    logits_cosine: float
    top1: float
    greedy_matched: int | None
    greedy_steps: int | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def agreement(check: ExportCheck) -> Agreement | None:
    """The Agreement in an ExportCheck of a causal LM (None for encoders: no logits)."""
    logits = next((m for m in check.outputs if m.name == "logits"), None)
    if logits is None:
        return None
    generation = check.generation or {}
    return Agreement(float(logits.cosine), float(logits.top1 or 0.0), generation.get("matched"),
                     generation.get("steps"))


def _quantizer_class() -> Any:
    """onnxruntime's MatMulNBitsQuantizer, imported without leaving its INFO handler on the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return MatMulNBitsQuantizer


def float_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes of `model` whose weight (second input) is a graph input, such as a LoRA slot's A
    or B with its zero-size default initializer: they stay float."""
    graph_inputs = {value.name for value in model.graph.input}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in graph_inputs]


def quantize_int4(src: Path, dst: Path, *, options: Int4Options = Int4Options(), external: bool) -> Int4Summary:
    """Write `dst`: the graph `src` with each constant-weight MatMul as an int4 MatMulNBits node.

    Weights (K, N) become (N, ⌈K/block⌉, block/2) uint8 plus (N, ⌈K/block⌉) fp32 scales (and packed zero points when
    asymmetric); MatMuls whose weight is a graph input (LoRA slots) stay float.

    Args:
        src: an fp32 ONNX graph (its .data file beside it, if any).
        dst: the graph to write; with `external` its tensors go to ``<dst>.data``.
        options: block size, symmetric or not, accuracy level.
    Returns:
        Int4Summary (MatMuls quantized, MatMuls left float).

    Example:
        >>> quantize_int4(Path("fp32/model.onnx"), Path("int4/model.onnx"), external=True).quantized
        15
    """
    import onnx

    from loratools.export.runtime import save_proto
    from loratools.silence import ONNX_LOGGERS, silenced

    with silenced(ONNX_LOGGERS):
        quantizer_class = _quantizer_class()
        proto = onnx.load(str(src))
        excluded = float_matmuls(proto)
        quantizer = quantizer_class(proto, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
                                    accuracy_level=options.accuracy_level, nodes_to_exclude=excluded,
                                    op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantized = quantizer.model.model
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    save_proto(quantized, dst, external=external)
    return Int4Summary(count, excluded, options)

