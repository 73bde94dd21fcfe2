"""Everything that touches onnx and onnxruntime: finishing and writing the graph (names, tied weights, external
data, fp16, int8), onnxruntime sessions, the comparison metrics and greedy generation with the KV cache.

Arrays here are numpy; the torch side (reference outputs) lives in `trace`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from loratools.errors import CheckpointError, ExportError
from loratools.silence import ONNX_LOGGERS, silenced

PROTOBUF_LIMIT = 2_000_000_000  # bytes of weights above which the graph must keep its tensors in a .data file
EXTERNAL_THRESHOLD = 1024  # tensors at least this big go to the .data file
DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")


@dataclass(frozen=True)
class OutputMetrics:
    """One output compared with PyTorch: max |ort − torch|, cosine of the flattened outputs, top-1 agreement of
    the last axis (logits only, else None), the tolerance it was held to and the verdict."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    cosine: float
    top1: float | None
    tolerance: float
    passed: bool

    def to_json(self) -> dict:
        return dict(self.__dict__, shape=list(self.shape))


def _rename_initializers(graph: ir.Graph, prefix: str) -> None:
    for value in list(graph.initializers.values()):
        if value.name and value.name.startswith(prefix):
            new = value.name[len(prefix):]
            if new in graph.initializers:
                continue
            graph.initializers.pop(value.name)
            value.name = new
            graph.register_initializer(value)


def _array(value: ir.Value) -> np.ndarray:
    if value.const_value is None:
        raise ExportError(f"initializer {value.name} has no data")
    return value.const_value.numpy()


def _share_transposed_copies(graph: ir.Graph, prefix: str) -> int:
    """Tied weights stored once: the exporter folds ``Transpose(W)`` of a weight used twice (embedding gather and
    lm_head matmul) into a second, anonymous initializer. Replace each such copy by a Transpose of the named one.

    Returns:
        how many copies were removed.
    """
    matrices = [v for v in graph.initializers.values() if v.shape is not None and len(v.shape) == 2]
    named = [v for v in matrices if not (v.name or "").startswith(("val_", "_val"))]
    anonymous = [v for v in matrices if (v.name or "").startswith(("val_", "_val"))]
    removed = 0
    for copy in anonymous:
        dims = tuple(copy.shape or ())
        if not all(isinstance(d, int) for d in dims) or dims[0] == dims[1]:
            continue
        rows, cols = dims
        for original in named:
            if tuple(original.shape or ()) != (cols, rows) or original.dtype != copy.dtype:
                continue
            a, b = _array(original), _array(copy)
            if not np.array_equal(a[:4, :4].T, b[:4, :4]) or not np.array_equal(a.T, b):
                continue
            node = ir.node("Transpose", inputs=[original], attributes={"perm": [1, 0]},
                           name=f"{original.name}/transpose")
            if len(graph):
                graph.insert_before(graph.node(0), node)
            else:
                graph.append(node)
            copy.replace_all_uses_with(node.outputs[0])
            node.outputs[0].name = f"{original.name}.T"
            graph.initializers.pop(copy.name or "")
            removed += 1
            break
    return removed


def finish_model(model: ir.Model, *, prefix: str) -> int:
    """Name initializers like the checkpoint (strip the wrapper's `prefix`), drop the exporter's debugging metadata
    (stack traces with local paths) and store tied weights once.

    Returns:
        number of duplicated tied weights removed.
    """
    _rename_initializers(model.graph, prefix)
    for node in model.graph.all_nodes():  # source paths and FX dumps: most of the graph's bytes, no use at run time
        for key in DROPPED_METADATA:
            node.metadata_props.pop(key, None)
    removed = _share_transposed_copies(model.graph, prefix)
    return removed


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def data_file(path: Path) -> Path:
    """The external data file that goes with a graph file: ``model.onnx`` → ``model.onnx.data``."""
    return path.with_name(path.name + ".data")


def save_ir(model: ir.Model, path: Path, *, external: bool) -> None:
    """Write `model` to `path`; with `external`, tensors ≥ 1 KiB go to ``<path>.data`` beside it."""
    if external:
        ir.save(model, path, external_data=data_file(path).name, size_threshold_bytes=EXTERNAL_THRESHOLD)
    else:
        ir.save(model, path)


def save_proto(proto: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Write `proto` to `path`; with `external`, tensors ≥ 1 KiB go to ``<path>.data`` beside it (with the graph
    file's permissions: onnx creates it 0600, which a server running as another user cannot read)."""
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(path).name, size_threshold=EXTERNAL_THRESHOLD)
        if data_file(path).exists():
            os.chmod(data_file(path), path.stat().st_mode & 0o777)
    else:
        onnx.save_model(proto, str(path))


def to_fp16(src: Path, dst: Path, *, external: bool, keep: Sequence[str] | None = None) -> None:
    """Convert an fp32 graph file to fp16 weights and compute (onnxruntime's converter); inputs and outputs stay
    fp32 (``keep_io_types``) so feeds are the same as for the fp32 graph; with `keep`, only those named do (LoRA
    slot inputs then become fp16)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with silenced(ONNX_LOGGERS):
        proto = onnx.load(str(src))
        converted = convert_float_to_float16(proto, keep_io_types=list(keep) if keep is not None else True, disable_shape_infer=external)
    save_proto(converted, dst, external=external)


def to_int8(src: Path, dst: Path, *, external: bool) -> None:
    """onnxruntime's dynamic quantization: MatMul weights int8 (per tensor), activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with silenced(ONNX_LOGGERS):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=external)


def graph_facts(path: Path) -> dict:
    """Opset, input and output names of a written graph (without loading its external data)."""
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {
        "opset": opset,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "initializers": len(proto.graph.initializer),
    }


def session(path: str | os.PathLike, *, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session with warnings off (no 'Initializer appears in graph inputs' chatter)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def compare(
    name: str, got: np.ndarray, ref: np.ndarray, *, atol: float, valid: np.ndarray | None = None, top1: bool = False
) -> OutputMetrics:
    """Compare an onnxruntime output with the PyTorch one.

    Args:
        got, ref: same shape, e.g. logits (batch, seq, vocab).
        atol: tolerance on max |got − ref|, scaled by max(1, max |ref|) so it is relative for outputs above 1.
        valid: (batch, seq) bool, positions to compare (padding excluded); None compares everything.
        top1: also report the fraction of positions whose argmax over the last axis agrees.
    """
    got64, ref64 = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got64.shape != ref64.shape:
        return OutputMetrics(name, tuple(got.shape), float("inf"), 0.0, None, atol, False)
    if valid is not None:
        got64, ref64 = got64[valid], ref64[valid]
    diff = float(np.max(np.abs(got64 - ref64))) if got64.size else 0.0
    denominator = float(np.linalg.norm(got64) * np.linalg.norm(ref64))
    cosine = float(np.dot(got64.ravel(), ref64.ravel()) / denominator) if denominator else 1.0
    agree = float(np.mean(got64.argmax(-1) == ref64.argmax(-1))) if top1 and got64.size else None
    scale = max(1.0, float(np.max(np.abs(ref64)))) if ref64.size else 1.0
    tolerance = atol * scale
    passed = bool(np.isfinite(diff) and diff <= tolerance)
    return OutputMetrics(name, tuple(got.shape), diff, cosine, agree, tolerance, passed)


def empty_past(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length KV cache feeds (batch, kv_heads, 0, head_dim) read from the graph's input shapes."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, head_dim = i.shape
            feeds[i.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return feeds


def greedy_generate(sess: ort.InferenceSession, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding with the KV cache: prefill the prompt (batch, seq) int64 with an empty past, then one
    token per step. Returns the generated ids (batch, steps)."""
    batch, length = prompt.shape
    past = empty_past(sess, batch)
    ids, mask = prompt, np.ones((batch, length), dtype=np.int64)
    positions = np.arange(length, dtype=np.int64)[None].repeat(batch, 0)
    generated = []
    for _ in range(steps):
        out = run(sess, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
        token = out["logits"][:, -1].argmax(-1).astype(np.int64)
        generated.append(token)
        past = {name.replace("present.", "past_key_values."): value
                for name, value in out.items() if name.startswith("present.")}
        ids = token[:, None]
        positions = np.full((batch, 1), mask.shape[1], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return np.stack(generated, axis=1)


def file_sizes(paths: Sequence[Path]) -> dict[str, int]:
    """File name → bytes, for the files that exist."""
    return {p.name: p.stat().st_size for p in paths if p.exists()}


# ONNX tensor element type -> dtype name (float types loratools reads and writes)
ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


def load_proto(path: Path, *, weights: bool) -> onnx.ModelProto:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as exc:  # protobuf and onnx raise several types; the user needs one line
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable ONNX model ({first})") from None
