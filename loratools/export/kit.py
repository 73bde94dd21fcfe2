"""The kit every ONNX output shares: its options' defaults, the verification against PyTorch, the staged
write (a temporary folder beside the output, renamed into place only when verified) and the timed steps.

Decisions:
- Verification compares max |ort − torch| per output with ``atol × max(1, max |torch|)`` (relative above 1), on
  inputs of another batch and sequence length than the trace (batch 3, 7 tokens, past 6, one padded row);
  padded positions are left out. Default atol (DEFAULT_ATOL): fp32 1e-4, fp16 2e-2, int8 0.25. With the KV
  cache it also generates 8 tokens greedily in onnxruntime and compares them with transformers' ``generate``
  (must match for fp32; reported for fp16 and int8, where near-ties may flip).
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

import torch

import loratools.export.trace as trace
from loratools.errors import ExportError, OutputError
from loratools.hf_model import quiet_transformers
from loratools.progress import Progress
from loratools.writer import output_path, remove_stale_temporaries, write_error

EXPORT_DTYPES = ("fp32", "fp16")  # graph precisions; bf16 does not run on onnxruntime's CPU provider
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.25}
VERIFY_SHAPE = (3, 7, 6)  # batch, sequence, past: not TRACE_SHAPE, so dynamic axes are exercised
GENERATE_PROMPT, GENERATE_STEPS = 5, 8
EXTRA_DEPENDENCIES = ("transformers", "onnxscript")


@dataclass(frozen=True)
class VerifyOptions:
    """How an ONNX output is checked against the model in PyTorch.

    Attributes:
        verify: run the check at all.
        atol: tolerance; None: DEFAULT_ATOL of the graph's precision.
        keep_on_fail: keep the files when the check fails (it still raises).
    """

    verify: bool = True
    atol: float | None = None
    keep_on_fail: bool = False

    def tolerance(self, precision: str) -> float:
        """The atol for a graph of `precision` ("fp32", "fp16", "int8" …)."""
        return self.atol if self.atol is not None else DEFAULT_ATOL[precision]


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


def require_extras(command: str = "export-onnx") -> None:
    """ExportError with the install line when transformers or onnxscript (the ``export`` extra) is missing."""
    missing = [name for name in EXTRA_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"{command} needs {' and '.join(missing)}: pip install 'loratools[export]'")


def verify_graph(module: Any, sess: Any, *, precision: str, atol: float) -> ExportCheck:
    """Run `sess` on fresh inputs (VERIFY_SHAPE, one padded row) and compare with `module` in PyTorch."""
    import loratools.export.runtime as runtime  # onnx: only once a graph is run

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
    import loratools.export.runtime as runtime

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
