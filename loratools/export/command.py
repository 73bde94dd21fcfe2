"""`export_onnx`: merge adapters into a Hugging Face model in memory, trace it to ONNX, write it atomically and
verify it in onnxruntime against the merged model in PyTorch.

Steps (reported through ``progress`` as (step, steps, name)): merge, trace, write, verify.

Decisions:
- fp32 by default whatever the checkpoint dtype (onnxruntime's CPU provider does not run bf16); ``dtype="fp16"``
  converts the written graph with onnxruntime's converter, inputs and outputs staying fp32; ``quantize="int8"``
  is onnxruntime's dynamic quantization of the fp32 graph.
- Verification compares max |ort − torch| per output with ``atol × max(1, max |torch|)`` (relative above 1), on
  inputs of another batch and sequence length than the trace (batch 3, 7 tokens, past 6, one padded row);
  padded positions are left out. Default atol: fp32 1e-4, fp16 2e-2, int8 0.25. With the KV cache it also
  generates 8 tokens greedily in onnxruntime and compares them with transformers' ``generate`` (must match
  for fp32; reported for fp16 and int8, where near-ties may flip).
- The graph and its ``.data`` file are written into a temporary sibling folder, verified there, then renamed
  into place (data first, graph last): a failure leaves nothing, unless ``keep_on_fail``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratools.algebra import adapter_weights
from loratools.errors import ExportError, LoratoolsError, OutputError
from loratools.progress import Progress
from loratools.writer import check_output, output_path, remove_stale_temporaries, write_error

DTYPES = ("fp32", "fp16")
QUANTIZE = ("int8",)
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.25}
VERIFY_SHAPE = (3, 7, 6)  # batch, sequence, past: not TRACE_SHAPE, so dynamic axes are exercised
GENERATE_PROMPT, GENERATE_STEPS = 5, 8
EXTRA_DEPENDENCIES = ("transformers", "onnxscript")
BYTES_PER_WEIGHT = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}


@dataclass
class ExportCheck:
    """onnxruntime (CPU) vs the merged model in PyTorch fp32.

    Attributes:
        precision: "fp32", "fp16" or "int8".
        atol: the tolerance asked for (scaled per output by max(1, max |torch|)).
        batch, sequence, past: the verification input shape (trace used others).
        outputs: one OutputMetrics per graph output.
        generation: with the KV cache, {"prompt", "steps", "onnxruntime", "transformers", "matched", "passed"}.
        passed: every output within tolerance (and, for fp32, generation identical).
    """

    precision: str
    atol: float
    batch: int
    sequence: int
    past: int
    outputs: list = field(default_factory=list)
    generation: dict | None = None
    passed: bool = True

    def to_json(self) -> dict:
        return {
            "precision": self.precision,
            "atol": self.atol,
            "inputs": {"batch": self.batch, "sequence": self.sequence, "past": self.past},
            "passed": self.passed,
            "outputs": [m.to_json() for m in self.outputs],
            "generation": self.generation,
        }

    def failure(self) -> str:
        """A one-line description of what failed."""
        bad = [m for m in self.outputs if not m.passed]
        if bad:
            worst = max(bad, key=lambda m: m.max_abs_diff / max(m.tolerance, 1e-300))
            return (f"{len(bad)} output(s) differ from PyTorch; worst {worst.name}: max abs diff"
                    f" {worst.max_abs_diff:.3g} > tolerance {worst.tolerance:.3g} (atol {self.atol:g})")
        g = self.generation or {}
        return f"greedy generation differs from transformers after {g.get('matched')} of {g.get('steps')} tokens"


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

    @property
    def precision(self) -> str:
        return self.quantize or self.dtype

    @property
    def notes(self) -> list[str]:
        """Warnings for the user: none (a failed check is an error)."""
        return []

    def to_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "verification"}
        data["out"] = str(self.out)
        data["verification"] = self.verification.to_json() if self.verification else None
        return data


def _require_extras() -> None:
    missing = [name for name in EXTRA_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"export-onnx needs {' and '.join(missing)}: pip install 'loratools[export]'")


def _check_options(dtype: str, quantize: str | None, adapters: Sequence, weights: Sequence[float] | None,
                   lora_slots: str | None = None) -> list[float]:
    if dtype not in DTYPES:
        raise LoratoolsError(f"unknown dtype {dtype!r} for export; choose {', '.join(DTYPES)} (bf16 does not run on"
                             " onnxruntime's CPU provider)")
    if quantize is not None and quantize not in QUANTIZE:
        raise LoratoolsError(f"unknown quantization {quantize!r}; choose {', '.join(QUANTIZE)}")
    if quantize and dtype != "fp32":
        raise LoratoolsError("--quantize int8 quantizes the fp32 graph; drop --dtype fp16")
    if quantize and lora_slots:
        raise LoratoolsError("--quantize int8 does not apply to a graph with --lora-slots (the LoRA branch would be"
                             " quantized as activations); export the slotted graph in fp32 or fp16")
    return adapter_weights(len(adapters), weights)


def verify_graph(module: Any, sess: Any, *, precision: str, atol: float) -> ExportCheck:
    """Run `sess` on fresh inputs (VERIFY_SHAPE, one padded row) and compare with `module` in PyTorch."""
    import loratools.export.runtime as runtime
    import loratools.export.trace as trace

    batch, seq, past = VERIFY_SHAPE
    spec = module.spec
    inputs = trace.sample_inputs(module, batch=batch, seq=seq, past=past if spec.with_past else 0, padded=True,
                                 seed=2)
    expected = trace.run_torch(module, inputs)
    got = runtime.run(sess, {name: t.numpy() for name, t in inputs.items()})
    valid = inputs["attention_mask"][:, -seq:].numpy().astype(bool)
    report = ExportCheck(precision, atol, batch, seq, past if spec.with_past else 0)
    for name in spec.outputs:
        per_position = name in ("logits", "last_hidden_state")
        report.outputs.append(runtime.compare(
            name, got[name], expected[name].numpy(), atol=atol, valid=valid if per_position else None,
            top1=name == "logits",
        ))
    report.passed = all(m.passed for m in report.outputs)
    if spec.with_past:
        report.generation = _check_generation(module, sess, strict=precision == "fp32")
        report.passed = report.passed and report.generation["passed"]
    return report


def _check_generation(module: Any, sess: Any, *, strict: bool) -> dict:
    import torch

    import loratools.export.runtime as runtime
    import loratools.export.trace as trace
    from loratools.export.model import quiet_transformers

    model = getattr(module, trace.WRAPPER_ATTRIBUTE)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, int(model.config.vocab_size), (1, GENERATE_PROMPT), generator=generator)
    with torch.no_grad(), quiet_transformers():
        full = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GENERATE_STEPS,
                              do_sample=False, pad_token_id=0)
    reference = full[0, GENERATE_PROMPT:].tolist()  # may be shorter: generate stops at eos
    ours = runtime.greedy_generate(sess, prompt.numpy(), GENERATE_STEPS)[0].tolist()
    matched = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), len(reference))
    return {
        "prompt": GENERATE_PROMPT,
        "steps": len(reference),
        "onnxruntime": ours[: len(reference)],
        "transformers": reference,
        "matched": matched,
        "passed": matched == len(reference) or not strict,
    }


def place_files(tmp_dir: Path, out: Path) -> None:
    """Rename the verified files from `tmp_dir` into place: the .data file first, the graph last."""
    from loratools.export.runtime import data_file

    tmp_graph, tmp_data = tmp_dir / out.name, data_file(tmp_dir / out.name)
    if tmp_data.exists():
        os.replace(tmp_data, data_file(out))
    elif data_file(out).exists():
        data_file(out).unlink()  # --force over an export that had external data: no orphan
    os.replace(tmp_graph, out)


class Steps:
    """The named steps of an export, each reported through `progress` as it starts and timed.

    Use ``with steps("write"): …`` around each step; `timings` holds seconds per finished step (3 decimals),
    and `done` reports the end.
    """

    def __init__(self, names: Sequence[str], progress: Progress | None):
        self.names, self.progress = list(names), progress
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(self.names.index(name), len(self.names), name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)

    def done(self) -> None:
        if self.progress:
            self.progress(len(self.names), len(self.names), "done")


@contextlib.contextmanager
def staged_graph(out: Path, *, force: bool) -> Iterator[Path]:
    """A temporary folder beside `out` to write and verify a graph (and its .data file) in.

    When the block ends normally the files are renamed into place (`place_files`); on any error nothing is
    placed. The folder is always removed; temporaries of killed runs are cleaned first. A symlinked `out` is
    replaced, its target never written. An OSError becomes one line (`writer.write_error`).

    Yields:
        the folder; write the graph as ``folder / out.name``.
    """
    target = output_path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp_dir = target.parent / f".{target.name}.loratools-tmp-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    except OSError as exc:
        raise write_error(out, exc) from None
    try:
        yield tmp_dir
        if target.exists() and not force:  # appeared while exporting
            raise OutputError(f"{out}: already exists; pass --force to replace it or choose another -o path")
        place_files(tmp_dir, target)
    except OSError as exc:
        raise write_error(out, exc) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    weights: Sequence[float] | None = None,
    with_past: bool = False,
    dtype: str = "fp32",
    quantize: str | None = None,
    external_data: bool = False,
    verify: bool = True,
    atol: float | None = None,
    keep_on_fail: bool = False,
    force: bool = False,
    lora_slots: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a Hugging Face model folder, with adapters merged in memory, to an ONNX graph and verify it.

    Args:
        model: a model folder (config.json + weights; sharded, bf16 and tied embeddings are fine).
        out: the graph file (``model.onnx``); tensors go to ``model.onnx.data`` beside it when the weights pass
            2 GB or with ``external_data``.
        adapters, weights: PEFT/kohya adapters merged as W + Σ wᵢ·ΔWᵢ (weights default 1).
        with_past: causal LMs: KV-cache inputs ``past_key_values.{i}.key/.value`` (batch, kv_heads, past,
            head_dim) and outputs ``present.{i}.key/.value``.
        dtype: "fp32" (default) or "fp16"; quantize: None or "int8" (dynamic, fp32 graph).
        verify: compare onnxruntime with PyTorch (see the module docstring); atol: default per precision.
        keep_on_fail: keep the files when verification fails (still raises).
        lora_slots: onnxruntime multi-LoRA: an adapter path (its modules become the slots) or comma-separated
            module names / leaf names / globs; each such Linear or Conv1D layer adds ``(x @ A) @ B`` with A, B
            graph inputs of dynamic rank that default to zero size (see `slots`); verification then runs the
            graph without an adapter. Adapter files for it: `export_adapter`.
        progress: called as (step, steps, step name) before each step.
    Returns:
        ExportResult with files and sizes, graph interface, timings and the ExportCheck.
    Raises:
        CheckpointError, ExportError, ShapeError, OutputError (one-line messages); ExportError when
        verification fails.

    Example:
        >>> export_onnx("fixtures/llama-base", "out/llama.onnx", with_past=True).verification.passed
        True
    """
    weights = _check_options(dtype, quantize, adapters, weights, lora_slots)
    out = Path(out)
    inputs = [model, *adapters]
    check_output(out, inputs, force)
    _require_extras()

    import loratools.export.runtime as runtime
    import loratools.export.trace as trace
    from loratools.export.model import load_merged_model, read_config

    data_out = runtime.data_file(out)
    check_output(data_out, inputs, force)
    read_config(model)
    precision = quantize or dtype
    steps = Steps(["merge", "trace", "write"] + (["verify"] if verify else []), progress)
    with steps("merge"):
        loaded = load_merged_model(model, adapters=adapters, weights=weights)

    with steps("trace"):
        spec = trace.graph_spec(loaded.model, loaded.kind, with_past=with_past)
        if lora_slots:
            from loratools.export.slots import SlottedModule, resolve_slots

            slotted = SlottedModule(loaded.model, spec, resolve_slots(loaded.model, lora_slots, label=str(model)))
            module: trace.GraphModule = slotted
            program = trace.trace(slotted, extra=slotted.trace_extra())
        else:
            module = trace.GraphModule(loaded.model, spec)
            program = trace.trace(module)

    report: ExportCheck | None = None
    with staged_graph(out, force=force) as tmp_dir:
        with steps("write"):
            removed = runtime.finish_model(program.model, prefix=trace.WRAPPER_ATTRIBUTE + ".")
            if lora_slots:
                from loratools.export.slots import add_slots

                add_slots(program.model, slotted)
            fp32_bytes = runtime.weight_bytes(program.model)
            external = external_data or fp32_bytes * BYTES_PER_WEIGHT[precision] > runtime.PROTOBUF_LIMIT
            graph = tmp_dir / out.name
            if precision == "fp32":
                runtime.save_ir(program.model, graph, external=external)
            else:
                staging = tmp_dir / "fp32"
                staging.mkdir()
                runtime.save_ir(program.model, staging / out.name, external=fp32_bytes > runtime.PROTOBUF_LIMIT)
                del program
                if precision == "fp16":  # slot inputs become fp16 too: adapters then are fp16, like the weights
                    keep = [*spec.inputs, *spec.outputs] if lora_slots else None
                    runtime.to_fp16(staging / out.name, graph, external=external, keep=keep)
                else:
                    runtime.to_int8(staging / out.name, graph, external=external)
                shutil.rmtree(staging)
            program = None
            facts = runtime.graph_facts(graph)
            files = runtime.file_sizes([graph, runtime.data_file(graph)])

        if verify:
            with steps("verify"):
                sess = runtime.session(graph)
                report = verify_graph(module, sess, precision=precision,
                                      atol=atol if atol is not None else DEFAULT_ATOL[precision])
                del sess
            if not report.passed and not keep_on_fail:
                raise ExportError(f"{out}: verification failed: {report.failure()}; nothing was written"
                                  " (--keep-on-fail keeps the file, --atol sets the tolerance)")
    steps.done()
    result = ExportResult(
        out=out, files=files, kind=loaded.kind, architecture=loaded.architecture, source_dtype=loaded.source_dtype,
        dtype=dtype, quantize=quantize, with_past=with_past, external_data=runtime.data_file(out).exists(),
        opset=facts["opset"], inputs=facts["inputs"], outputs=facts["outputs"], adapters=[str(a) for a in adapters],
        merged_tensors=loaded.merged_tensors, tied_copies_removed=removed,
        timings=steps.timings, verification=report,
        slots=[slot.module for slot in getattr(module, "slots", [])],
    )
    if report is not None and not report.passed:
        raise ExportError(f"{out}: verification failed: {report.failure()}; the file was kept (--keep-on-fail)")
    return result
