"""Build the Hugging Face model of a folder in fp32 and merge adapters into it, one tensor at a time.

`hf_model.load_model` has transformers load the folder (shards, bf16, tied embeddings, key renames, buffers);
the tensors the adapters change are then replaced by W + Σ wᵢ·ΔWᵢ computed by the merge code from the
checkpoint's own tensors, so the model in memory is exactly what ``loratools merge`` would write, without the
copy on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from loratools.checkpoint import TensorIndex, open_checkpoint
from loratools.errors import ExportError, LoratoolsError
from loratools.hf_model import load_model
from loratools.merging import apply_ops, plan_merge


@dataclass
class LoadedModel:
    """The merged fp32 model and what the exporter needs to know about it.

    Attributes:
        model: the transformers module, eval mode, fp32.
        kind: "causal" (output logits) or "encoder" (output last_hidden_state).
        architecture: class name, e.g. "LlamaForCausalLM".
        source_dtype: dtype of the checkpoint's floating tensors, e.g. "bfloat16".
        merged_tensors: how many tensors the adapters changed.
    """

    model: torch.nn.Module
    kind: str
    architecture: str
    source_dtype: str
    merged_tensors: int


def merged_state(
    index: TensorIndex, adapters: Sequence[str | os.PathLike], weights: Sequence[float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint tensor name, merged fp32 tensor) for every tensor the adapters change, one at a time.

    The one place that calls the merge code; W (checkpoint layout, e.g. (out, in), (in, out) for Conv1D)
    becomes W + Σ wᵢ·ΔWᵢ in fp32. Raises ShapeError when an adapter module matches no tensor.
    """
    if not adapters:
        return
    ops = plan_merge(index, adapters, weights=weights)
    for name, contributions in ops.items():
        yield name, apply_ops(index.get(name), contributions)


def load_merged_model(
    folder: str | os.PathLike, *, adapters: Sequence[str | os.PathLike] = (), weights: Sequence[float] = ()
) -> LoadedModel:
    """The model of `folder` in fp32 (whatever the checkpoint dtype) with the adapters merged in.

    Args:
        folder: a Hugging Face model folder (config.json + safetensors or .bin weights, sharded or not).
        adapters: PEFT folders/files and kohya files, applied with `weights` (one each).
    Returns:
        LoadedModel; peak memory is the model plus one tensor.
    Raises:
        CheckpointError (no config.json), ModelError (architecture unknown to transformers, unsupported),
        ShapeError (an adapter that does not fit the model).
    """
    loaded = load_model(folder, dtype=torch.float32)
    model = loaded.model
    with open_checkpoint(folder) as index:
        merged = 0
        with torch.no_grad():
            for name, tensor in merged_state(index, adapters, weights):
                param = loaded.parameter(name)
                if param is None:
                    raise LoratoolsError(
                        f"{name}: changed by an adapter but {type(model).__name__} has no such parameter;"
                        " the adapter targets a part of the checkpoint that is not exported"
                    )
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ExportError(
                        f"{name}: merged tensor {tuple(tensor.shape)} but {type(model).__name__} expects"
                        f" {tuple(param.shape)}"
                    )
                param.data = tensor.to(param.dtype)
                merged += 1
    return LoadedModel(model, loaded.kind, loaded.architecture, loaded.source_dtype, merged)
