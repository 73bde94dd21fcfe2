"""Build the Hugging Face model of a folder in fp32 and merge adapters into it, one tensor at a time.

torch and transformers only (transformers imported inside functions: ``import loratools`` must not need it).
transformers loads the folder itself (shards, bf16, tied embeddings, key renames, buffers); the tensors the
adapters change are then replaced by W + Σ wᵢ·ΔWᵢ computed by the merge code from the checkpoint's own
tensors, so the model in memory is exactly what ``loratools merge`` would write, without the copy on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratools.checkpoint import TensorIndex, open_checkpoint, read_model_config
from loratools.errors import CheckpointError, ExportError, LoratoolsError
from loratools.merging import apply_ops, plan_merge
from loratools.silence import quiet_transformers

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
IGNORED_MISSING = ("pooler.",)  # an encoder head checkpoint (BertForMaskedLM) has no pooler; it is not exported


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


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a model folder; CheckpointError naming the fix when there is none."""
    path = Path(folder)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; export-onnx needs a Hugging Face model folder (config.json + weights)"
        )
    return read_model_config(config_path)


def _model_kind(config: Any, architectures: Sequence[str]) -> str:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(
            f"{config.model_type}: encoder-decoder models are not supported by export-onnx;"
            " it exports causal LMs and encoders"
        )
    if any(name.endswith(CAUSAL_SUFFIXES) for name in architectures):
        return "causal"
    if not architectures and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal"
    return "encoder"


def _parameter_lookup(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _find_parameter(params: dict[str, torch.nn.Parameter], name: str, prefix: str) -> torch.nn.Parameter | None:
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    if prefix:
        candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        if candidate in params:
            return params[candidate]
    return None


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
        CheckpointError (no config.json), ExportError (architecture unknown to transformers, unsupported),
        ShapeError (an adapter that does not fit the model).
    """
    import transformers

    config_dict = read_config(folder)
    architectures = list(config_dict.get("architectures") or [])
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        except (ValueError, KeyError, OSError) as exc:
            model_type = config_dict.get("model_type", "?")
            raise ExportError(
                f"{Path(folder) / 'config.json'}: model_type {model_type!r} is not an architecture transformers"
                f" {transformers.__version__} knows ({str(exc).splitlines()[0][:120]}); upgrade transformers or"
                " fix config.json"
            ) from None
    kind = _model_kind(config, architectures)
    auto: Any = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with open_checkpoint(folder) as index:
        floating = sorted({str(i.dtype).removeprefix("torch.") for i in index.tensors.values() if i.dtype.is_floating_point})
        with quiet_transformers():
            try:
                model, info = auto.from_pretrained(
                    str(folder), config=config, trust_remote_code=False, output_loading_info=True,
                    **{dtype_key: torch.float32},
                )
            except (ValueError, KeyError) as exc:
                raise ExportError(
                    f"{folder}: transformers cannot build {', '.join(architectures) or config.model_type} from this"
                    f" folder ({str(exc).splitlines()[0][:160]})"
                ) from None
        missing = [k for k in info.get("missing_keys", []) if not any(p in k for p in IGNORED_MISSING)]
        if missing:
            shown = ", ".join(sorted(missing)[:4]) + (" …" if len(missing) > 4 else "")
            raise CheckpointError(
                f"{folder}: {len(missing)} weight(s) of {type(model).__name__} missing from the checkpoint ({shown});"
                " the folder's weights do not match its config.json"
            )
        model.eval()
        params = _parameter_lookup(model)
        prefix = getattr(model, "base_model_prefix", "") or ""
        merged = 0
        with torch.no_grad():
            for name, tensor in merged_state(index, adapters, weights):
                param = _find_parameter(params, name, prefix)
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
    return LoadedModel(model, kind, type(model).__name__, ", ".join(floating), merged)
