"""Wrap a transformers model with flat, named tensor inputs and outputs and trace it with torch.onnx (dynamo).

torch and transformers only; the ONNX program returned is finished and written by `runtime`.

Graph interface (Optimum / onnxruntime-genai naming):
- causal LM: ``input_ids`` (batch, seq) int64, ``attention_mask`` (batch, past + seq) int64, ``position_ids``
  (batch, seq) int64 → ``logits`` (batch, seq, vocab); with the KV cache also ``past_key_values.{i}.key/.value``
  (batch, kv_heads, past, head_dim) → ``present.{i}.key/.value`` (batch, kv_heads, past + seq, head_dim).
  One graph serves prefill (past length 0) and decoding (seq 1).
- encoder: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model takes them), all
  (batch, seq) int64 → ``last_hidden_state`` (batch, seq, hidden).
Batch and sequence axes are dynamic.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loratools.errors import ExportError
from loratools.silence import EXPORTER_LOGGERS, silenced

WRAPPER_ATTRIBUTE = "hf"  # initializers come out as "hf.<parameter name>"; runtime strips the prefix
TRACE_SHAPE = (2, 5, 4)  # batch, sequence, past length used to trace; verification uses others


@dataclass(frozen=True)
class GraphSpec:
    """Names of the graph's inputs and outputs, in order, and the model facts they depend on."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: int = 0
    with_past: bool = False

    @property
    def past_inputs(self) -> tuple[str, ...]:
        return tuple(name for name in self.inputs if name.startswith("past_key_values."))

    @property
    def present_outputs(self) -> tuple[str, ...]:
        return tuple(name for name in self.outputs if name.startswith("present."))


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _cache_keyword(model: torch.nn.Module) -> str:
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _layer_count(model: torch.nn.Module) -> int:
    config = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ExportError(f"{type(model).__name__}: cannot tell the number of layers from its config")


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def graph_spec(model: torch.nn.Module, kind: str, *, with_past: bool) -> GraphSpec:
    """The graph interface for `model` (see the module docstring)."""
    accepted = _forward_parameters(model)
    if kind == "causal":
        if "position_ids" not in accepted:
            raise ExportError(f"{type(model).__name__}: forward() takes no position_ids; this model is not supported")
        inputs = ["input_ids", "attention_mask", "position_ids"]
        outputs = ["logits"]
        layers = _layer_count(model)
        if with_past:
            inputs += past_names(layers)
            outputs += present_names(layers)
        return GraphSpec(kind, tuple(inputs), tuple(outputs), layers, with_past)
    if with_past:
        raise ExportError(f"{type(model).__name__}: --with-past applies to causal LMs; this is an encoder")
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in accepted else [])
    return GraphSpec(kind, tuple(inputs), ("last_hidden_state",))


def _cache_from(past: Sequence[torch.Tensor], config: Any) -> Any:
    from transformers.cache_utils import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        cache = DynamicCache()
    for layer in range(len(past) // 2):
        cache.update(past[2 * layer], past[2 * layer + 1], layer)
    return cache


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for pair in zip(cache.key_cache, cache.value_cache, strict=True) for t in pair]  # transformers 4.x


class GraphModule(torch.nn.Module):
    """`model` with the graph's interface: positional tensors in `spec.inputs` order → tuple in `spec.outputs` order."""

    def __init__(self, model: torch.nn.Module, spec: GraphSpec):
        super().__init__()
        setattr(self, WRAPPER_ATTRIBUTE, model)
        self.spec = spec
        self.cache_keyword = _cache_keyword(model)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = getattr(self, WRAPPER_ATTRIBUTE)
        named = dict(zip(self.spec.inputs, tensors, strict=True))
        if self.spec.kind == "encoder":
            return (model(**named).last_hidden_state,)
        past = [named.pop(name) for name in self.spec.past_inputs]
        if not self.spec.with_past:
            return (model(**named, use_cache=False).logits,)
        out = model(**named, use_cache=True, **{self.cache_keyword: _cache_from(past, model.config)})
        cache = getattr(out, "cache", None) or out.past_key_values
        return (out.logits, *_cache_tensors(cache))


def position_ids_for(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Positions of the last `seq` tokens given a left-padded mask (batch, total): cumsum − 1, pads at 1."""
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)
    return positions[:, -seq:]


def prompt_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The KV cache (flat list key0, value0, key1 …, each (batch, kv_heads, len, head_dim)) of a prompt."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask, ids.shape[1]),
                    use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [t.detach().clone() for t in _cache_tensors(cache)]


def sample_inputs(
    module: GraphModule, *, batch: int, seq: int, past: int = 0, padded: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for the graph: token ids below the vocabulary, a mask (left padding of 2 on the last row
    for causal LMs, right padding for encoders when `padded`), positions from the mask, and for the KV cache
    the real cache of a random `past`-token prompt."""
    model, spec = getattr(module, WRAPPER_ATTRIBUTE), module.spec
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    total = past + seq if spec.with_past else seq
    ids = torch.randint(0, vocab, (batch, total), generator=generator)
    mask = torch.ones(batch, total, dtype=torch.long)
    if padded and total > 3:
        if spec.kind == "causal":
            mask[-1, :2] = 0
        else:
            mask[-1, -2:] = 0
    named: dict[str, torch.Tensor] = {"input_ids": ids[:, -seq:], "attention_mask": mask}
    if "token_type_ids" in spec.inputs:
        types = torch.zeros(batch, seq, dtype=torch.long)
        types[:, seq // 2 :] = 1
        named["token_type_ids"] = types
    if "position_ids" in spec.inputs:
        named["position_ids"] = position_ids_for(mask, seq)
    if spec.with_past:
        if past:
            cache = prompt_cache(model, ids[:, :past], mask[:, :past])
        else:  # an empty cache of the right (batch, kv_heads, 0, head_dim)
            cache = [t[:, :, :0] for t in prompt_cache(model, ids[:, :1], mask[:, :1])]
        named.update(zip(spec.past_inputs, cache, strict=True))
    return {name: named[name] for name in spec.inputs}


def run_torch(module: GraphModule, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped model's outputs for named inputs, by output name."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = module(*inputs.values())
    return dict(zip(module.spec.outputs, outputs, strict=True))


def _dynamic_shapes(spec: GraphSpec) -> tuple:
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length")
    total = torch.export.Dim("total_sequence_length")
    past = torch.export.Dim("past_sequence_length")
    shapes = []
    for name in spec.inputs:
        if name == "attention_mask":
            shapes.append({0: batch, 1: total if spec.with_past else seq})
        elif name.startswith("past_key_values."):
            shapes.append({0: batch, 2: past})
        else:
            shapes.append({0: batch, 1: seq})
    return (tuple(shapes),)


def trace(module: GraphModule, *, extra: Sequence[tuple[str, torch.Tensor, dict]] = ()) -> Any:
    """Export `module` with torch.onnx (dynamo=True) on inputs of TRACE_SHAPE, batch and sequence dynamic.

    Args:
        extra: further positional inputs after the graph's own, as (name, sample tensor, dynamic axes), e.g. the
            LoRA slots of `slots.SlottedModule`.
    Returns:
        torch.onnx.ONNXProgram (in memory; `runtime.write_model` finishes and saves it).
    """
    batch, seq, past = TRACE_SHAPE
    inputs = sample_inputs(module, batch=batch, seq=seq, past=past, seed=1)
    module.eval()
    try:
        with silenced(EXPORTER_LOGGERS):
            return torch.onnx.export(
                module,
                (*inputs.values(), *(sample for _, sample, _ in extra)),
                dynamo=True,
                verbose=False,
                input_names=[*module.spec.inputs, *(name for name, _, _ in extra)],
                output_names=list(module.spec.outputs),
                dynamic_shapes=((*_dynamic_shapes(module.spec)[0], *(axes for _, _, axes in extra)),),
            )
    except ImportError as exc:
        raise ExportError(f"torch.onnx needs {exc.name or 'onnxscript'}: pip install 'loratools[export]'") from None
    except Exception as exc:  # the exporter raises many types; one line naming the model is what the user needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx could not export {type(getattr(module, WRAPPER_ATTRIBUTE)).__name__}: {first[:300]}"
        ) from exc
