"""`export_onnx`: merge adapters into a Hugging Face model in memory, trace it to ONNX, write it atomically and
verify it in onnxruntime against the merged model in PyTorch (`kit.verify_graph`).

Steps (reported through ``progress`` as (step, steps, name)): merge, trace, write, verify.

Decisions:
- fp32 by default whatever the checkpoint dtype (onnxruntime's CPU provider does not run bf16); ``dtype="fp16"``
  converts the written graph with onnxruntime's converter, inputs and outputs staying fp32; ``quantize="int8"``
  is onnxruntime's dynamic quantization of the fp32 graph; ``quantize="int4"`` its weight-only MatMulNBits
  quantization (`quantize`), also of slotted graphs, whose LoRA branches stay float.
- A quantized or fp16 graph reports its agreement with PyTorch fp32 (`quantize.Agreement`: logits cosine, top-1,
  greedy tokens) and the fp32 weight bytes beside the bytes written.
- Verification and the staged write are the kit's (`kit`): a failure leaves nothing, unless ``keep_on_fail``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import loratools.export.trace as trace
from loratools.algebra import adapter_weights
from loratools.errors import ExportError, LoratoolsError
from loratools.export.kit import (
    ExportCheck,
    Steps,
    VerifyOptions,
    require_extras,
    result_json,
    staged_graph,
    verify_graph,
)
from loratools.export.model import load_merged_model
from loratools.export.quantize import Agreement, Int4Options, Int4Summary, agreement
from loratools.export.slots import SlottedModule, add_slots, resolve_slots
from loratools.hf_model import read_config
from loratools.options import EXPORT_DTYPES
from loratools.progress import Progress
from loratools.writer import check_output

QUANTIZE = ("int8", "int4")
BYTES_PER_WEIGHT = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25, "int4": 0.16}  # int4: 4 bits + a scale per 32


@dataclass(frozen=True)
class ExportOptions:
    """What graph `export_onnx` writes.

    Attributes:
        with_past: causal LMs: KV-cache inputs ``past_key_values.{i}.key/.value`` (batch, kv_heads, past,
            head_dim) and outputs ``present.{i}.key/.value``.
        dtype: "fp32" (default) or "fp16" (EXPORT_DTYPES).
        quantize: None, "int8" (dynamic, fp32 graph) or "int4" (weight-only MatMulNBits; LoRA slots stay float).
        int4: block size, symmetric or not, accuracy level of "int4" (`quantize.Int4Options`; defaults as
            onnxruntime-genai's CPU int4 models).
        external_data: tensors in ``<out>.data`` (automatic when the weights pass 2 GB).
        lora_slots: onnxruntime multi-LoRA: an adapter path (its modules become the slots) or comma-separated
            module names / leaf names / globs; each such Linear or Conv1D layer adds ``(x @ A) @ B`` with A, B
            graph inputs of dynamic rank that default to zero size (see `slots`); verification then runs the
            graph without an adapter. Adapter files for it: `export_adapter`.
    """

    with_past: bool = False
    dtype: str = "fp32"
    quantize: str | None = None
    external_data: bool = False
    lora_slots: str | None = None
    int4: Int4Options = Int4Options()

    def __post_init__(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise LoratoolsError(f"unknown dtype {self.dtype!r} for export; choose {', '.join(EXPORT_DTYPES)} (bf16"
                                 " does not run on onnxruntime's CPU provider)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise LoratoolsError(f"unknown quantization {self.quantize!r}; choose {', '.join(QUANTIZE)}")
        if self.quantize and self.dtype != "fp32":
            raise LoratoolsError(f"--quantize {self.quantize} quantizes the fp32 graph; drop --dtype fp16")
        if self.quantize != "int4" and self.int4 != Int4Options():
            raise LoratoolsError("--block-size, --asymmetric and --accuracy-level set int4 quantization; add"
                                 " --quantize int4 or drop them")
        if self.quantize == "int8" and self.lora_slots:
            raise LoratoolsError(f"--quantize {self.quantize} does not apply to a graph with --lora-slots (the LoRA"
                                 " branch would be quantized as activations); use --quantize int4 (the base"
                                 " weights only) or export the slotted graph in fp32 or fp16")

    @property
    def precision(self) -> str:
        """The graph's precision: the quantization, else the dtype."""
        return self.quantize or self.dtype


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how it checked.

    Attributes:
        out: the graph file; files: name → bytes of every file written (graph, and ``.data`` if external).
        inputs, outputs: graph input and output names. opset: the default-domain opset.
        timings: seconds per step (merge, trace, write, verify).
        verification: None with ``verify=False``.
        slots: modules with a LoRA slot (``lora_slots``): inputs ``<module>.lora_A.weight`` (in, lora_r) and
            ``<module>.lora_B.weight`` (lora_r, out), zero-size by default.
        fp32_bytes: bytes of the fp32 weights (compare with `files` for a quantized graph).
        int4: what the int4 quantizer did (``quantize="int4"``), else None.
        accuracy: a quantized or fp16 causal LM's agreement with PyTorch fp32 (needs the verification).
    """

    out: Path
    files: dict[str, int]
    kind: str
    architecture: str
    source_dtype: str
    dtype: str
    quantize: str | None
    with_past: bool
    external_data: bool
    opset: int
    inputs: list[str]
    outputs: list[str]
    adapters: list[str]
    merged_tensors: int
    tied_copies_removed: int
    timings: dict[str, float]
    verification: ExportCheck | None = None
    slots: list[str] = field(default_factory=list)
    fp32_bytes: int = 0
    int4: Int4Summary | None = None
    accuracy: Agreement | None = None

    @property
    def precision(self) -> str:
        return self.quantize or self.dtype

    @property
    def notes(self) -> list[str]:
        """Warnings for the user: none (a failed check is an error)."""
        return []

    def to_json(self) -> dict:
        return result_json(self)


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    weights: Sequence[float] | None = None,
    options: ExportOptions = ExportOptions(),
    checks: VerifyOptions = VerifyOptions(),
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a Hugging Face model folder, with adapters merged in memory, to an ONNX graph and verify it.

    Args:
        model: a model folder (config.json + weights; sharded, bf16 and tied embeddings are fine).
        out: the graph file (``model.onnx``); tensors go to ``model.onnx.data`` beside it when the weights pass
            2 GB or with ``options.external_data``.
        adapters, weights: PEFT/kohya adapters merged as W + Σ wᵢ·ΔWᵢ (weights default 1).
        options: the graph (`ExportOptions`: KV cache, dtype, quantization, external data, LoRA slots).
        checks: verification (`kit.VerifyOptions`: on/off, atol, keep the files on failure).
        progress: called as (step, steps, step name) before each step.
    Returns:
        ExportResult with files and sizes, graph interface, timings and the ExportCheck.
    Raises:
        CheckpointError, ExportError, ShapeError, OutputError (one-line messages); ExportError when
        verification fails.

    Example:
        >>> export_onnx("fixtures/llama-base", "out/llama.onnx", options=ExportOptions(with_past=True)).verification.passed
        True
    """
    weights = adapter_weights(len(adapters), weights)
    out = Path(out)
    inputs = [model, *adapters]
    check_output(out, inputs, force)
    require_extras()

    import loratools.export.runtime as runtime  # onnx: only once a graph is written

    data_out = runtime.data_file(out)
    check_output(data_out, inputs, force)
    read_config(model)
    precision = options.precision
    steps = Steps(["merge", "trace", "write"] + (["verify"] if checks.verify else []), progress)
    with steps("merge"):
        loaded = load_merged_model(model, adapters=adapters, weights=weights)

    with steps("trace"):
        spec = trace.graph_spec(loaded.model, loaded.kind, with_past=options.with_past)
        if options.lora_slots:
            slotted = SlottedModule(loaded.model, spec, resolve_slots(loaded.model, options.lora_slots,
                                                                      label=str(model)))
            module: trace.GraphModule = slotted
            program = trace.trace(slotted, extra=slotted.trace_extra())
        else:
            module = trace.GraphModule(loaded.model, spec)
            program = trace.trace(module)

    report: ExportCheck | None = None
    int4: Int4Summary | None = None
    with staged_graph(out, force=force) as tmp_dir:
        with steps("write"):
            removed = runtime.finish_model(program.model, prefix=trace.WRAPPER_ATTRIBUTE + ".")
            if options.lora_slots:
                add_slots(program.model, slotted)
            fp32_bytes = runtime.weight_bytes(program.model)
            external = options.external_data or fp32_bytes * BYTES_PER_WEIGHT[precision] > runtime.PROTOBUF_LIMIT
            graph = tmp_dir / out.name
            if precision == "fp32":
                runtime.save_ir(program.model, graph, external=external)
            else:
                staging = tmp_dir / "fp32"
                staging.mkdir()
                runtime.save_ir(program.model, staging / out.name, external=fp32_bytes > runtime.PROTOBUF_LIMIT)
                del program
                if precision == "fp16":  # slot inputs become fp16 too: adapters then are fp16, like the weights
                    keep = [*spec.inputs, *spec.outputs] if options.lora_slots else None
                    runtime.to_fp16(staging / out.name, graph, external=external, keep=keep)
                elif precision == "int4":
                    from loratools.export.quantize import quantize_int4

                    int4 = quantize_int4(staging / out.name, graph, options=options.int4, external=external)
                else:
                    runtime.to_int8(staging / out.name, graph, external=external)
                shutil.rmtree(staging)
            program = None
            facts = runtime.graph_facts(graph)
            files = runtime.file_sizes([graph, runtime.data_file(graph)])

        if checks.verify:
            with steps("verify"):
                sess = runtime.session(graph)
                report = verify_graph(module, sess, precision=precision, atol=checks.tolerance(precision))
                del sess
            if not report.passed and not checks.keep_on_fail:
                raise ExportError(f"{out}: verification failed: {report.failure()}; nothing was written"
                                  " (--keep-on-fail keeps the file, --atol sets the tolerance)")
    steps.done()
    result = ExportResult(
        out=out, files=files, kind=loaded.kind, architecture=loaded.architecture, source_dtype=loaded.source_dtype,
        dtype=options.dtype, quantize=options.quantize, with_past=options.with_past,
        external_data=runtime.data_file(out).exists(), opset=facts["opset"], inputs=facts["inputs"],
        outputs=facts["outputs"], adapters=[str(a) for a in adapters], merged_tensors=loaded.merged_tensors,
        tied_copies_removed=removed, timings=steps.timings, verification=report,
        slots=[slot.module for slot in getattr(module, "slots", [])], fp32_bytes=fp32_bytes, int4=int4,
        accuracy=agreement(report) if report is not None and precision != "fp32" else None,
    )
    if report is not None and not report.passed:
        raise ExportError(f"{out}: verification failed: {report.failure()}; the file was kept (--keep-on-fail)")
    return result
