"""Hugging Face model folders run with transformers: config.json, the kind of model, the model, its tokenizer.

The module that owns running transformers models (imported inside functions: ``import loratools`` must not need
it). `behaviour` runs forward passes with it; `export` builds the models it traces.

Decisions:
- The kind follows config.json: "causal" when an architecture ends in ForCausalLM / LMHeadModel (or, without
  architectures, when the config has a causal-LM class), "encoder" when the config's base model reads token
  ids (BERT family), otherwise an error naming what the model is (encoder-decoder, image model …).
- Checkpoint tensor names map to the model's parameters with or without the base model prefix (``bert.``):
  a BertForMaskedLM checkpoint loads into the BertModel that AutoModel builds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from loratools.checkpoint import open_checkpoint, read_model_config
from loratools.errors import CheckpointError, ModelError
from loratools.silence import quiet_transformers

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
IGNORED_MISSING = ("pooler.",)  # an encoder head checkpoint (BertForMaskedLM) has no pooler; it is not used
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def import_transformers(purpose: str = "export-onnx") -> Any:
    """The transformers module; ModelError naming the extra to install when it is missing."""
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{purpose} runs models with transformers: pip install 'loratools[hf]'") from None
    return transformers


def read_config(folder: str | os.PathLike, *, purpose: str = "export-onnx") -> dict:
    """config.json of a model folder; CheckpointError naming `purpose` and the fix when there is none."""
    path = Path(folder)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; {purpose} needs a Hugging Face model folder (config.json + weights)"
        )
    return read_model_config(config_path)


def auto_config(folder: str | os.PathLike, config_dict: dict, *, purpose: str = "export-onnx") -> Any:
    """transformers' config object of `folder`; ModelError when transformers does not know the model type."""
    transformers = import_transformers(purpose)

    with quiet_transformers():
        try:
            return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        except (ValueError, KeyError, OSError) as exc:
            model_type = config_dict.get("model_type", "?")
            raise ModelError(
                f"{Path(folder) / 'config.json'}: model_type {model_type!r} is not an architecture transformers"
                f" {transformers.__version__} knows ({str(exc).splitlines()[0][:120]}); upgrade transformers or"
                " fix config.json"
            ) from None


def model_kind(config: Any, architectures: Sequence[str], *, purpose: str = "export-onnx") -> str:
    """"causal" or "encoder" (a text encoder that reads token ids); ModelError for anything else."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{config.model_type}: encoder-decoder models are not supported by {purpose};"
            " it handles causal LMs and encoders"
        )
    if any(name.endswith(CAUSAL_SUFFIXES) for name in architectures):
        return "causal"
    if not architectures and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal"
    model_class: Any = MODEL_MAPPING.get(type(config), None)
    reads = getattr(model_class, "main_input_name", "input_ids")
    if reads != "input_ids":
        raise ModelError(
            f"{config.model_type}: {', '.join(architectures) or model_class.__name__} reads {reads}, not token ids;"
            f" {purpose} handles causal LMs and text encoders"
        )
    return "encoder"


def context_length(config: Any) -> int | None:
    """The longest sequence the model takes (max_position_embeddings, n_positions …), None when unbounded."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class HfModel:
    """A transformers model loaded from a folder, and what callers need to know about it.

    Attributes:
        model: the transformers module, eval mode, in the dtype asked for.
        kind: "causal" (outputs logits) or "encoder" (outputs last_hidden_state).
        architecture: class name, e.g. "LlamaForCausalLM".
        config: transformers' config object.
        source_dtype: dtype(s) of the checkpoint's floating tensors, e.g. "bfloat16".
    """

    model: torch.nn.Module
    kind: str
    architecture: str
    config: Any
    source_dtype: str
    parameters: dict[str, torch.nn.Parameter] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.parameters = dict(self.model.named_parameters(remove_duplicate=False))

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the token ids the model takes."""
        return int(cast(Any, self.model).get_input_embeddings().num_embeddings)

    def parameter(self, name: str) -> torch.nn.Parameter | None:
        """The model parameter a checkpoint tensor name loads into (with or without the base model prefix)."""
        params = self.parameters
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        if prefix:
            candidates.append(f"{prefix}.{name}")
        return next((params[c] for c in candidates if c in params), None)


def load_model(
    folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    purpose: str = "export-onnx",
) -> HfModel:
    """The model of `folder` (config.json + weights) in `dtype` on `device`, eval mode.

    Causal LMs load with AutoModelForCausalLM, encoders with AutoModel. Peak memory: the model.
    Raises:
        CheckpointError (no config.json, weights missing), ModelError (architecture unknown or unsupported).
    """
    transformers = import_transformers(purpose)
    config_dict = read_config(folder, purpose=purpose)
    architectures = list(config_dict.get("architectures") or [])
    config = auto_config(folder, config_dict, purpose=purpose)
    kind = model_kind(config, architectures, purpose=purpose)
    auto: Any = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with open_checkpoint(folder) as index:
        floating = sorted({str(i.dtype).removeprefix("torch.") for i in index.tensors.values() if i.dtype.is_floating_point})
    with quiet_transformers():
        try:
            model, info = auto.from_pretrained(
                str(folder), config=config, trust_remote_code=False, output_loading_info=True, **{dtype_key: dtype},
            )
        except (ValueError, KeyError) as exc:
            raise ModelError(
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
    model.to(device).eval()
    return HfModel(model, kind, type(model).__name__, config, ", ".join(floating))


def load_tokenizer(folder: str | os.PathLike) -> Any | None:
    """The tokenizer saved in `folder`, or None when the folder holds no tokenizer files.

    Raises:
        ModelError when tokenizer files are there but transformers cannot load them.
    """
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    transformers = import_transformers("--behaviour")
    with quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelError(f"{folder}: its tokenizer does not load ({str(exc).splitlines()[0][:160]})") from None
